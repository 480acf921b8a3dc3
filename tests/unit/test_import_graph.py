"""What the paths every migration runs import: nothing they do not need.

Each module is measured in a fresh interpreter, as the command and the proxy
start; ``python -X importtime`` (printed by benchmarks/hook_overhead.py) shows
what each costs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import virt_vmstate

PLUGIN = str(Path(virt_vmstate.__file__).parents[1])

# uuid imports platform (2.7 ms with it): a migration's Save, the proxy and the
# hook use names.uuid_bytes / uuid_text / random_uuid instead.
SAVE_PATH = ("from virt_vmstate import transfer, vmstate1, bundle, streamreply, carrier; "
             "from virt_vmstate.migrate import Migration")
PROXY = "from virt_vmstate import proxy; proxy._import_save_and_load()"
HOOK = "from virt_vmstate import hook, phases"


def loaded(code: str, modules: set[str]) -> list[str]:
    """Which of ``modules`` a fresh interpreter holds after running ``code``."""
    probe = f"import json, sys; {code}; print(json.dumps(sorted(set({sorted(modules)!r}) & set(sys.modules))))"
    env = {**os.environ, "PYTHONPATH": PLUGIN}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                            timeout=60, check=True)
    return json.loads(result.stdout)


@pytest.mark.parametrize("path,code", [("save", SAVE_PATH), ("proxy", PROXY), ("hook", HOOK)])
def test_no_uuid_module_on_the_paths_every_migration_runs(path, code):
    assert loaded(code, {"uuid", "platform"}) == []


def test_the_probe_sees_what_is_imported():
    assert loaded("import uuid", {"uuid", "platform"}) == ["platform", "uuid"]


# What the proxy does inside the downtime, after it imported what Save and Load need.
SWITCHOVER = """
from virt_vmstate import bundle, proxy, streamreply
from virt_vmstate.names import random_uuid
proxy._import_save_and_load()
before = set(sys.modules)
uuid = random_uuid()
sealed = bundle.new_bundle([bundle.HelperState("a", bytes(4096))], created_ms=1, migration_id=uuid,
                           domain_uuid=uuid)
reply = streamreply.plan_reply(sealed, spool_configured=False, max_bundle_size=1 << 20, domain="vm")
loaded = bundle.decode(reply.bundle, max_size=1 << 20)
bundle.check_fresh(loaded, domain_uuid=uuid, now_ms=1, max_age_s=60)
streamreply.is_reference(reply.bundle)
late = sorted(set(sys.modules) - before)
"""


def test_the_proxy_imports_nothing_inside_the_downtime():
    probe = f"import json, sys\n{SWITCHOVER}\nprint(json.dumps(late))"
    env = {**os.environ, "PYTHONPATH": PLUGIN}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                            timeout=60, check=True)
    assert json.loads(result.stdout) == []
