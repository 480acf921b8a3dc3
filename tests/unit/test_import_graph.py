"""Which way imports run between the package's layers, and what the paths every migration
runs import.

The layers, lowest first: the shared base (``errors``, ``logs``), ``core`` (pure formats),
``bus`` (the D-Bus client and the only importer of jeepney), ``host`` (runtime dirs,
processes, the config file), ``proxy``, ``hook`` (libvirt's events), ``commands`` (the only
importer of libvirt), and the entry point (``main``).  A module imports only its own layer
and those below; what is imported for type hints alone does not count.

What each hook event imports is measured in a fresh interpreter, as libvirt starts the
hook.  The stdlib modules the hook's path does without are those whose replacements save
5 ms or more there (``benchmarks/imports.py`` measures each with ``-X importtime``):
``dataclasses`` (``core/values.py``), ``logging`` (``logs.py``) and ``tomllib`` (the parsed
config in ``host/configcache.py``); ``uuid`` and its ``platform`` are never needed
(``core/names.py``).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import virt_vmstate

PACKAGE = Path(virt_vmstate.__file__).parent
PLUGIN = str(PACKAGE.parent)
LAYERS = ["base", "core", "bus", "host", "proxy", "hook", "commands", "entry"]
BASE = {"errors", "logs", "__init__"}
ENTRY = {"main", "__main__"}


def layer_of(module: str) -> str:
    """The layer of ``virt_vmstate.X[.Y]``."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in BASE:
        return "base"
    if parts[0] in ENTRY:
        return "entry"
    return parts[0]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        found[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return found


def runtime_imports(path: Path, module: str) -> list[str]:
    """What ``module`` imports at run time (not under ``if TYPE_CHECKING:``), absolute."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                prefix = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{prefix}.{base}" if base else prefix
            found.append(base)
            if base.startswith("virt_vmstate"):  # 'from . import bundle' names a module
                found += [f"{base}.{alias.name}" for alias in node.names
                          if f"{base}.{alias.name}" in MODULES]
    return found


MODULES = modules()


def test_the_layers_are_folders_and_every_module_has_one():
    layers = {layer_of(name) for name in MODULES}
    assert layers == set(LAYERS), layers
    for name in MODULES:
        parts = name.split(".")
        assert len(parts) <= 3, f"{name}: one level of subpackages"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    own = LAYERS.index(layer_of(module))
    upward = [target for target in runtime_imports(MODULES[module], module)
              if target.startswith("virt_vmstate") and LAYERS.index(layer_of(target)) > own]
    assert upward == [], f"{module} ({layer_of(module)}) imports a higher layer"


def test_only_the_bus_layer_imports_jeepney_and_only_commands_import_libvirt():
    for module, path in MODULES.items():
        imported = {target.split(".")[0] for target in runtime_imports(path, module)}
        if "jeepney" in imported:
            assert layer_of(module) == "bus", module
        if imported & {"libvirt", "libvirt_qemu"}:
            assert layer_of(module) == "commands", module


def test_the_check_sees_an_upward_import():
    assert layer_of("virt_vmstate.host.managed") == "host"
    assert "virt_vmstate.proxy.service" in runtime_imports(MODULES["virt_vmstate.hook.phases"],
                                                           "virt_vmstate.hook.phases")


# -- what each hook event imports ---------------------------------------------------

DOES_WITHOUT = {"dataclasses", "logging", "tomllib", "tomli", "uuid", "platform", "typing", "pathlib",
                "libvirt"}

RUN_EVENT = """
import io, os, sys
sys.stdin = io.TextIOWrapper(io.BytesIO(open(os.environ["PROBE_XML"], "rb").read()))
sys.stdout = io.TextIOWrapper(io.BytesIO())
from virt_vmstate.main import main
status = main(["hook", "vm", *os.environ["PROBE_EVENT"].split(), "-"])
with open(os.environ["PROBE_OUT"], "w") as out:
    out.write(f"{status}\\n" + "\\n".join(sorted(sys.modules)))
"""


def run_event(tmp_path: Path, event: str, xml: bytes) -> tuple[int, set[str]]:
    (tmp_path / "in.xml").write_bytes(xml)
    env = {**os.environ, "PYTHONPATH": PLUGIN, "VIRT_VMSTATE_CONFIG": str(tmp_path / "config.toml"),
           "PROBE_XML": str(tmp_path / "in.xml"), "PROBE_EVENT": event, "PROBE_OUT": str(tmp_path / "out.json")}
    subprocess.run([sys.executable, "-c", RUN_EVENT], env=env, timeout=60, check=True)
    status, *imported = (tmp_path / "out.json").read_text().splitlines()
    return int(status), set(imported)


def domain(tmp_path: Path, config: object, extra: str = "") -> bytes:
    from virt_vmstate.core.domxml import config_element
    return (f"<domain><name>vm</name><uuid>{UUID}</uuid><metadata>{config_element(config)}</metadata>"
            f"{extra}</domain>").encode()


UUID = str(uuid.UUID(int=0x1234))


@pytest.fixture
def host(tmp_path: Path) -> Path:
    (tmp_path / "config.toml").write_text(f'[paths]\nruntime_dir = "{tmp_path}/run"\n'
                                          '[logging]\nsyslog = false\n')
    return tmp_path


def stream_enabled(tmp_path: Path) -> bytes:
    from virt_vmstate.core import domxml, stream
    from virt_vmstate.core.domxml import DomainConfig, HelperSpec
    xml = domain(tmp_path, DomainConfig((HelperSpec("h"),), bus_mode="address",
                                        bus_address="unix:path=/nonexistent"))
    dom = domxml.parse_domain(xml)
    return stream.definition_xml(xml, dom, f"unix:path={tmp_path}/run/{UUID}/libvirt-{UUID}")


def test_each_hook_event_imports_none_of_what_the_hook_does_without(host):
    from virt_vmstate.core.domxml import DomainConfig, HelperSpec
    address_bus = domain(host, DomainConfig((HelperSpec("h"),), bus_mode="address",
                                            bus_address="unix:path=/nonexistent", missing_state="fresh"))
    enabled = stream_enabled(host)
    # The first run makes the runtime dir, the second keeps the parsed config there.
    for _ in range(2):
        assert run_event(host, "migrate begin", enabled)[0] == 0
    events = [("migrate begin", enabled), ("prepare begin", address_bus), ("start begin", address_bus),
              ("started begin", address_bus), ("stopped end", enabled)]
    for event, xml in events:
        status, imported = run_event(host, event, xml)
        assert status == 0, event
        assert imported & DOES_WITHOUT == set(), event
        assert "jeepney" not in imported, f"{event}: nothing to wait for, nothing to call"
    assert not (host / "run" / UUID).exists()  # the stop ran: the probe saw a real event


def test_the_probe_sees_what_an_event_imports(host):
    """Without the parsed config kept, the event imports the TOML parser: the probe sees it."""
    from virt_vmstate.core.domxml import DomainConfig, HelperSpec
    xml = domain(host, DomainConfig((HelperSpec("h"),), bus_mode="address", bus_address="unix:path=/x",
                                    missing_state="fresh"))
    status, imported = run_event(host, "prepare begin", xml)
    assert status == 0 and {"tomllib", "tomli"} & imported


# -- a migration's Save and the proxy -----------------------------------------------

def loaded(code: str, wanted: set[str]) -> list[str]:
    """Which of ``wanted`` a fresh interpreter holds after running ``code``."""
    probe = f"import json, sys; {code}; print(json.dumps(sorted(set({sorted(wanted)!r}) & set(sys.modules))))"
    env = {**os.environ, "PYTHONPATH": PLUGIN}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                            timeout=60, check=True)
    return json.loads(result.stdout)


SAVE_PATH = ("from virt_vmstate.bus import transfer, vmstate1; "
             "from virt_vmstate.core import bundle, streamreply, precopy; "
             "from virt_vmstate.commands.migrate import Migration")
PROXY = "from virt_vmstate.proxy import service; service._import_save_and_load()"


@pytest.mark.parametrize("path,code", [("save", SAVE_PATH), ("proxy", PROXY)])
def test_no_uuid_module_on_a_migrations_save_or_in_the_proxy(path, code):
    assert loaded(code, {"uuid", "platform"}) == []


def test_the_probe_sees_what_is_imported():
    assert "uuid" in loaded("import uuid", {"uuid", "platform"})  # with platform before Python 3.13


# What the proxy does inside the downtime, after it imported what Save and Load need.
SWITCHOVER = """
from virt_vmstate.core import bundle, streamreply
from virt_vmstate.core.names import random_uuid
from virt_vmstate.proxy import service
service._import_save_and_load()
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
