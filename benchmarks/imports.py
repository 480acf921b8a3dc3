#!/usr/bin/env python3
"""What each stdlib replacement on the hook's path saves, measured with ``-X importtime``.

The hook's Python path does without three stdlib modules, each replaced by a small
module of its own: ``dataclasses`` (``core/values.py``), ``logging`` (``logs.py``) and
``tomllib`` (the parsed config kept by ``host/configcache.py``).  A replacement stays
only where the module it replaces would cost 5 ms or more on a path every migration
pays; ``json`` is measured too, as the module whose replacement did not earn its place.  For each hook event, this runs the
event in a fresh interpreter as libvirt does, then imports the stdlib module under
``python -X importtime``: what it reports for that import is what the module would add
to that event, given what the event has imported already.  Medians of ROUNDS runs
(default 9), on the same runtime dir and config as a host's hook uses.

    make bench      (or: .venv/bin/python benchmarks/imports.py [ROUNDS])
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "plugin"), str(ROOT / "tests")]

from stamp import stamp  # noqa: E402

from virt_vmstate.core import domxml, stream  # noqa: E402
from virt_vmstate.core.domxml import DomainConfig, HelperSpec, config_element  # noqa: E402

REPLACED = [("dataclasses", "core/values.py"), ("logging", "logs.py"), ("tomllib", "host/configcache.py"),
            ("json", "none: json is used")]
UUID = str(uuid.UUID(int=0xB1))

EVENT_THEN_IMPORT = """
import io, os, sys
sys.stdin = io.TextIOWrapper(io.BytesIO(open(os.environ["PROBE_XML"], "rb").read()))
sys.stdout = io.TextIOWrapper(io.BytesIO())
from virt_vmstate.main import main
main(["hook", "vm", *os.environ["PROBE_EVENT"].split(), "-"])
sys.stderr.write("-- event done --\\n")
import {module}
"""


def marginal_ms(module: str, event: str, xml: Path, env: dict[str, str]) -> float:
    """What ``-X importtime`` reports for ``import module`` after the event ran."""
    run_env = dict(env, PROBE_XML=str(xml), PROBE_EVENT=event)
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", EVENT_THEN_IMPORT.format(module=module)],
                            env=run_env, capture_output=True, text=True, timeout=60, check=True)
    after = result.stderr.split("-- event done --", 1)[1]
    for line in after.splitlines():
        fields = [f.strip() for f in line.split("|")]
        if line.startswith("import time:") and fields[-1] == module:
            return int(fields[1]) / 1000
    return 0.0  # imported by the event already: it costs the event nothing more


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 9
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "config.toml").write_text(f'[paths]\nruntime_dir = "{base}/run"\n[logging]\nsyslog = false\n')
        env = {**os.environ, "PYTHONPATH": str(ROOT / "plugin"), "VIRT_VMSTATE_CONFIG": str(base / "config.toml")}
        helpers = DomainConfig((HelperSpec("h"),), bus_mode="address", bus_address="unix:path=/nonexistent",
                               missing_state="fresh")
        plain = (f"<domain><name>vm</name><uuid>{UUID}</uuid><metadata>{config_element(helpers)}"
                 "</metadata></domain>").encode()
        dom = domxml.parse_domain(plain)
        enabled = stream.definition_xml(plain, dom, f"unix:path={base}/run/{UUID}/libvirt-{UUID}")
        (base / "plain.xml").write_bytes(plain)
        (base / "enabled.xml").write_bytes(enabled)
        events = [("migrate begin", base / "enabled.xml", "migrate begin, stream carrier"),
                  ("prepare begin", base / "plain.xml", "prepare begin"),
                  ("stopped end", base / "enabled.xml", "stopped end")]
        # The runtime dir, and the parsed config kept in it, as on a host that ran hooks before.
        for _ in range(2):
            subprocess.run([sys.executable, "-m", "virt_vmstate", "hook", "vm", "migrate", "begin", "-"],
                           input=enabled, env=env, capture_output=True, check=True, timeout=60)
        table = {}
        for module, _ in REPLACED:
            for event, xml, label in events:
                samples = []
                for _ in range(rounds):
                    samples.append(marginal_ms(module, event, xml, env))
                    if event == "stopped end":  # the stop removed the runtime dir: make it again
                        subprocess.run([sys.executable, "-m", "virt_vmstate", "hook", "vm", "migrate", "begin", "-"],
                                       input=enabled, env=env, capture_output=True, check=True, timeout=60)
                table[module, label] = statistics.median(samples)
    print(stamp())
    print(f"what importing the stdlib module would add to each hook event, ms (median of {rounds}, "
          "python -X importtime)\n")
    labels = [label for _, _, label in events]
    print("| stdlib module | replaced by | " + " | ".join(labels) + " | kept (5 ms or more) |")
    print("|---|---|" + "---|" * len(labels) + "---|")
    for module, replacement in REPLACED:
        costs = [table[module, label] for label in labels]
        print(f"| `{module}` | `{replacement}` | " + " | ".join(f"{c:.1f}" for c in costs)
              + f" | {'yes' if max(costs) >= 5 else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
