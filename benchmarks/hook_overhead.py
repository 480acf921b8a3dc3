#!/usr/bin/env python3
"""What the hook costs libvirt on every event of every domain.

Prints the median wall time of ``hooks/qemu`` for a domain that is not ours and
for one that is (``prepare begin`` of a domain on an address bus: parse, lock,
nothing to start), against ``sh -c 'cat >/dev/null'`` and ``python3 -I -c pass``
on the same XML, all in one run.

    make bench      (or: .venv/bin/python benchmarks/hook_overhead.py)
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "plugin"))

from virt_vmstate.domxml import DomainConfig, HelperSpec, config_element  # noqa: E402

RUNS = 200


def median_ms(argv: List[str], stdin: bytes, env: dict) -> float:
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        subprocess.run(argv, input=stdin, stdout=subprocess.DEVNULL, env=env, check=False)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> int:
    venv_cli = ROOT / ".venv" / "bin" / "virt-vmstate"
    body = "<memory unit='KiB'>65536</memory>\n" + "<!-- padding -->\n" * 60
    plain = f"<domain type='qemu'><name>vm</name><uuid>{uuid.uuid4()}</uuid>{body}</domain>\n".encode()
    ours_cfg = config_element(DomainConfig((HelperSpec("slirp0"),), bus_mode="address",
                                           bus_address="unix:path=/nonexistent"))
    ours = (f"<domain type='qemu'><name>vm</name><uuid>{uuid.uuid4()}</uuid>"
            f"<metadata>{ours_cfg}</metadata>{body}</domain>\n").encode()
    with tempfile.TemporaryDirectory() as tmp:
        hook = Path(tmp) / "qemu"
        hook.write_text((ROOT / "hooks" / "qemu").read_text().replace(
            "VIRT_VMSTATE=/usr/bin/virt-vmstate", f"VIRT_VMSTATE={venv_cli}"))
        hook.chmod(0o755)
        config = Path(tmp) / "config.toml"
        config.write_text(f'[paths]\nruntime_dir = "{tmp}/run"\n[logging]\nsyslog = false\n')
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "VIRT_VMSTATE_CONFIG": str(config)}
        rows = [
            ("sh -c 'cat >/dev/null' (baseline)", median_ms(["sh", "-c", "cat >/dev/null"], plain, env)),
            ("python3 -I -c pass", median_ms(["/usr/bin/python3", "-I", "-c", "pass"], plain, env)),
            ("hook, domain not ours", median_ms([str(hook), "vm", "prepare", "begin", "-"], plain, env)),
            ("hook, ours, prepare begin", median_ms([str(hook), "vm", "prepare", "begin", "-"], ours, env)),
        ]
    base = rows[0][1]
    print(f"domain XML {len(plain)} bytes, {RUNS} runs each, median wall time")
    print(f"{'case':<36} {'ms':>8} {'x baseline':>11}")
    for label, ms in rows:
        print(f"{label:<36} {ms:>8.2f} {ms / base:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
