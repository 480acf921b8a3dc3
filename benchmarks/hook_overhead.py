#!/usr/bin/env python3
"""What the hook costs libvirt on every event of every domain.

Median wall time of ``hooks/qemu`` against ``sh -c 'cat >/dev/null'`` and
``python3 -I -c pass`` on the same XML, all in one run:

- a domain that is not ours (bash decides);
- a domain that is ours, events with nothing to do: ``started begin`` of a start
  with no incoming state, ``release end`` after the stop (bash decides);
- ``prepare begin`` of a domain on an address bus (Python: parse, config, lock,
  nothing to start), and ``migrate begin`` of a stream-enabled domain (Python:
  the XML this host's QEMU runs with, and the incoming record);
- ``prepare begin`` + ``start begin`` of a managed domain with one helper, split
  into virt-vmstate's own time and the time it waits for the helper (the bus listens
  before its daemon runs, so nothing waits for it);
then the largest imports of the Python hook path (``python -X importtime`` of
the installed command, as libvirt runs it).

    make bench      (or: .venv/bin/python benchmarks/hook_overhead.py)
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "plugin"), str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

from procs import helper_profiles_toml, write_hook_script  # noqa: E402
from hosts import installed_command, write_launcher  # noqa: E402

from virt_vmstate.core.domxml import DomainConfig, HelperSpec, config_element, quoteattr  # noqa: E402
from virt_vmstate.core.stream import object_arg  # noqa: E402
from stamp import stamp  # noqa: E402

RUNS = 100


def median_ms(argv: List[str], stdin: bytes, env: Dict[str, str], runs: int = RUNS) -> float:
    """As libvirt runs a hook: until it exits and its stdout and stderr pipes are at their end."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, input=stdin, capture_output=True, env=env, check=False)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def managed_start(hook: Path, xml: bytes, env: Dict[str, str], runs: int = 15) -> Tuple[float, float]:
    """Median wall time of prepare + start begin, and of the part spent waiting for processes."""
    walls, waits = [], []
    timed = dict(env, VIRT_VMSTATE_HOOK_TIMING="1")
    for _ in range(runs):
        wall = wait = 0.0
        for event in (["prepare", "begin"], ["start", "begin"]):
            started = time.perf_counter()
            done = subprocess.run([str(hook), "vm", *event, "-"], input=xml, capture_output=True, env=timed)
            wall += time.perf_counter() - started
            found = re.search(rb"waiting ([\d.]+) ms", done.stderr)
            if done.returncode != 0 or not found:
                raise RuntimeError(done.stderr.decode())
            wait += float(found.group(1)) / 1000
        subprocess.run([str(hook), "vm", "stopped", "end", "-"], input=xml, env=env, check=True)
        walls.append(wall)
        waits.append(wait)
    return statistics.median(walls) * 1000, statistics.median(waits) * 1000


def importtime(command: Path, xml: bytes, env: Dict[str, str], top: int = 12) -> List[Tuple[int, str]]:
    done = subprocess.run([sys.executable, "-X", "importtime", str(command), "hook", "vm", "prepare", "begin", "-"],
                          input=xml, capture_output=True, env=env)
    rows = []
    for line in done.stderr.decode().splitlines():
        found = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)", line)
        if found and len(found.group(2)) <= 4:  # top-level and direct imports
            rows.append((int(found.group(1)), found.group(2) + found.group(3)))
    return sorted(rows, reverse=True)[:top]


def main() -> int:
    print(stamp())
    body = "<memory unit='KiB'>65536</memory>\n" + "<!-- padding -->\n" * 60

    def domain(config: str = "", extra: str = "") -> bytes:
        meta = f"<metadata>{config}</metadata>" if config else ""
        return f"<domain type='qemu'><name>vm</name><uuid>{dom_uuid}</uuid>{meta}{body}{extra}</domain>\n".encode()
    dom_uuid = uuid.uuid4()
    plain = domain()
    ours = domain(config_element(DomainConfig((HelperSpec("slirp0"),), bus_mode="address",
                                              bus_address="unix:path=/nonexistent")))
    managed = domain(config_element(DomainConfig((HelperSpec("counter", "counter"),))))
    enabled = domain(config_element(DomainConfig((HelperSpec("counter", "counter"),))),
                     "<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
                     "<qemu:arg value='-object'/>"
                     f"<qemu:arg value={quoteattr(object_arg('unix:path=/elsewhere/qemu.sock'))}/>"
                     "</qemu:commandline>")
    with tempfile.TemporaryDirectory() as tmp:
        # The packages' launcher, run by this tree's Python, as a host's hook runs it.
        venv_cli = Path(tmp) / "virt-vmstate"
        write_launcher(venv_cli, installed_command())
        hook = write_hook_script(Path(tmp) / "qemu", venv_cli)
        config = Path(tmp) / "config.toml"
        config.write_text(f'[paths]\nruntime_dir = "{tmp}/run"\n[logging]\nsyslog = false\n'
                          + helper_profiles_toml())
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "VIRT_VMSTATE_CONFIG": str(config)}
        rows = [
            ("sh -c 'cat >/dev/null' (baseline)", median_ms(["sh", "-c", "cat >/dev/null"], plain, env)),
            ("python3 -I -c pass", median_ms(["/usr/bin/python3", "-I", "-c", "pass"], plain, env)),
            ("hook, domain not ours", median_ms([str(hook), "vm", "prepare", "begin", "-"], plain, env)),
            ("hook, ours, started begin (nothing came)",
             median_ms([str(hook), "vm", "started", "begin", "-"], ours, env)),
            ("hook, ours, release end (already stopped)",
             median_ms([str(hook), "vm", "release", "end", "-"], ours, env)),
        ]
        python_rows = [
            ("prepare begin (address bus)", [str(hook), "vm", "prepare", "begin", "-"], ours),
            ("migrate begin (stream carrier)", [str(hook), "vm", "migrate", "begin", "-"], enabled),
        ]
        for label, argv, xml in python_rows:
            rows.append((f"hook, ours, {label}", median_ms(argv, xml, env, runs=40)))
        wall, waiting = managed_start(hook, managed, env)
        imports = importtime(venv_cli, ours, env)
    base, python = rows[0][1], rows[1][1]
    print(f"domain XML {len(plain)} bytes, median wall time ({RUNS} runs; 40 and 15 for the Python rows)")
    print(f"{'case':<46} {'ms':>8} {'x baseline':>11} {'x python3':>10}")
    for label, ms in rows:
        print(f"{label:<46} {ms:>8.2f} {ms / base:>11.2f} {ms / python:>10.2f}")
    print(f"{'hook, managed: prepare + start begin, 1 helper':<46} {wall:>8.2f} {wall / base:>11.2f} "
          f"{wall / python:>10.2f}")
    print(f"{'  of which waiting for the helper':<46} {waiting:>8.2f}")
    print(f"{'  of which virt-vmstate itself (2 Python runs)':<46} {wall - waiting:>8.2f}")
    print("\nlargest imports on the Python hook path (python -X importtime, cumulative us):")
    for us, name in imports:
        print(f"  {us:>8}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
