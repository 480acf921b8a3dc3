#!/usr/bin/env python3
"""A live migration with helper state against the same migration without it.

Two libvirt hosts on this machine (as in the demo).  One TCG guest with four
helpers of 64 KiB state each, missing-state policy ``fresh``, migrates back
and forth in one run, alternating ``virt-vmstate migrate`` (Save, carry, Load)
with a plain ``virsh migrate --live`` of the same guest (the helpers start
fresh on the destination, their state is not moved).  QEMU does not connect to
the helpers, so their profile lets them come up while QEMU starts (up_before =
"guest").  Each hop is timed as the operator sees it: the wall time of the
command.  Run as root.

    make bench      (or: .venv/bin/python benchmarks/migration.py [ROUNDS])
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "plugin"), str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

from hosts import benchmark_hosts, guest_xml  # noqa: E402
from procs import bench_helper_profile  # noqa: E402
from virt_vmstate.domxml import DomainConfig, HelperSpec, config_element  # noqa: E402

PROFILE = bench_helper_profile("bench", "--random-size", "65536")


def timed(argv: List[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])}...: {result.stderr.strip()}")
    return elapsed


def main() -> int:
    hosts = benchmark_hosts(sys.argv)
    if hosts is None:
        return 1
    rounds, a, b = hosts
    times: Dict[str, List[float]] = {"virt-vmstate migrate": [], "virsh migrate": []}
    try:
        for host in (a, b):
            host.prepare(extra_config=PROFILE)
            host.start()
        config = DomainConfig(tuple(HelperSpec(f"h{i}", "bench") for i in range(4)),
                              missing_state="fresh")
        xml = a.dir / "bench.xml"
        xml.write_text(guest_xml("bench", str(uuid.uuid4()), config_element(config)))
        a.virsh("create", str(xml))
        here, there = a, b
        for _ in range(rounds):
            for tool in times:
                if tool == "virsh migrate":
                    argv = ["virsh", "-c", here.uri, "migrate", "--live", "bench", there.uri,
                            there.migration_uri]
                else:
                    argv = [*here.vmstate_argv(), "migrate", "bench", there.uri, "-c", here.uri,
                            "--migrateuri", there.migration_uri]
                times[tool].append(timed(argv))
                here, there = there, here
    finally:
        for host in (a, b):
            host.stop()

    base = statistics.median(times["virsh migrate"])
    print(f"{'one live migration, 4 helpers x 64 KiB':<40} {'median':>9} {'min':>9} {'max':>9} {'ratio':>7}")
    for tool, values in times.items():
        print(f"{tool:<40} {statistics.median(values) * 1000:6.0f} ms {min(values) * 1000:6.0f} ms "
              f"{max(values) * 1000:6.0f} ms {statistics.median(values) / base:7.2f}")
    print(f"\n{rounds} hops each, alternating, one TCG guest (64 MiB) between two libvirtd on this "
          "machine; wall time of each command; ratio against plain virsh migrate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
