#!/usr/bin/env python3
"""Large state through the spool carrier, next to a plain ``cp`` of the same bytes.

Three helpers (8 + 8 + 16 MiB of random, incompressible state) on one real
dbus-daemon, three incoming helpers on another.  Each run calls the same code
a migration does: on the source, Save all three, seal the bundle and write it
to the spool (``migrate.carry``); on the destination, the hook's ``prepare``
(read the spool file, verify it, keep it in the runtime dir) and ``finish``
(Load every helper, remove the spool file).  The baselines, run in the same
process on the same bytes: ``cp`` of a 32 MiB file into the spool directory
(which copies inside the kernel with copy_file_range) and ``dd bs=4M``, which
moves the bytes through a process as any reader and writer of the data must.

    make bench      (or: .venv/bin/python benchmarks/spool.py [SPOOL_DIR])
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "plugin"), str(ROOT / "tests")]

from procs import DBusDaemon, HelperProcess, test_helper  # noqa: E402

from virt_vmstate.bus.transfer import capture  # noqa: E402
from virt_vmstate.bus.vmstate1 import HelperBus  # noqa: E402
from virt_vmstate.commands.migrate import carry  # noqa: E402
from virt_vmstate.core.config import HostConfig, Limits, SpoolCarrier  # noqa: E402
from virt_vmstate.core.domxml import DomainConfig, config_element, insert_state, parse_domain  # noqa: E402
from virt_vmstate.hook.events import phases  # noqa: E402
from virt_vmstate.host.rundir import RunDir  # noqa: E402
from stamp import stamp  # noqa: E402

MiB = 1024 * 1024
SIZES = {"big1": 8 * MiB, "big2": 8 * MiB, "big3": 16 * MiB}
TOTAL = sum(SIZES.values())
REPEAT = 5


def median_s(func: Callable[[], object]) -> float:
    func()
    times = []
    for _ in range(REPEAT):
        started = time.perf_counter()
        func()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def domain_xml(domain: uuid.UUID, bus: str) -> bytes:
    config = config_element(DomainConfig(bus_mode="address", bus_address=bus))
    return (f"<domain type='qemu'><name>bench</name><uuid>{domain}</uuid>"
            f"<metadata>{config}</metadata></domain>").encode()


def main() -> int:
    print(stamp())
    procs: List[HelperProcess] = []
    with tempfile.TemporaryDirectory(prefix="vmst-spool-bench-") as tmp:
        work = Path(tmp)
        spool_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else work / "spool"
        spool_dir.mkdir(mode=0o700, exist_ok=True)
        config = HostConfig(runtime_dir=str(work / "run"), spool=SpoolCarrier(str(spool_dir)),
                            limits=Limits(max_bundle_size=1024 * MiB))
        src_bus, dst_bus = DBusDaemon(work / "src"), DBusDaemon(work / "dst")
        try:
            for n, (helper_id, size) in enumerate(SIZES.items()):
                procs.append(test_helper(src_bus.address, helper_id, work, "--random-size", str(size),
                                         "--seed", str(n)))
                procs.append(test_helper(dst_bus.address, helper_id, work, "--incoming"))
            src = HelperBus.open(src_bus.address, call_timeout=60, state_cap=64 * MiB)
            domain = uuid.uuid4()
            stages: Dict[str, List[float]] = {"save": [], "carry": [], "receive": [], "load": []}

            def migrate_state() -> None:
                t0 = time.perf_counter()
                sealed = capture(src, domain_uuid=domain)
                t1 = time.perf_counter()
                xml = domain_xml(domain, dst_bus.address)
                carried = carry(sealed, config, "bench", "spool", len(xml))
                incoming = insert_state(xml, carried.element)
                t2 = time.perf_counter()
                rundir = RunDir(config.runtime_dir, domain)
                ctx = phases.HookContext(parse_domain(incoming), incoming, config, rundir, time.monotonic() + 60)
                runs_with = phases.receive_migration(ctx)  # 'migrate begin': verify and keep the state
                t3 = time.perf_counter()
                ctx = phases.HookContext(parse_domain(runs_with), runs_with, config, rundir, time.monotonic() + 60)
                phases.load_before_guest_runs(ctx)
                t4 = time.perf_counter()
                ctx.rundir.remove()
                assert not any(spool_dir.iterdir())
                for key, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    stages[key].append(seconds)

            ours = median_s(migrate_state)
            src.close()
            blob = work / "blob"
            blob.write_bytes(os.urandom(TOTAL))
            target = spool_dir / "copy"

            def copy(argv: List[str]) -> Callable[[], None]:
                def run() -> None:
                    subprocess.run(argv, check=True, stderr=subprocess.DEVNULL)
                    target.unlink()
                return run
            cp = median_s(copy(["cp", str(blob), str(target)]))
            dd = median_s(copy(["dd", f"if={blob}", f"of={target}", "bs=4M"]))
        finally:
            for proc in procs:
                proc.stop()
            src_bus.stop()
            dst_bus.stop()

    def row(label: str, seconds: float) -> str:
        return (f"{label:<46} {seconds * 1000:7.0f} ms {TOTAL / MiB / seconds:8.0f} MiB/s "
                f"{cp / seconds:7.2f} {dd / seconds:7.2f}")

    print(f"{'32 MiB of state (8 + 8 + 16 MiB, random)':<46} {'median':>10} {'throughput':>14} "
          f"{'vs cp':>7} {'vs dd':>7}")
    print(row("Save + carry + Load through the spool", ours))
    for key, label in (("save", "  source: Save 3 helpers concurrently"),
                       ("carry", "  source: seal, write the spool file"),
                       ("receive", "  destination migrate begin: read, verify, keep"),
                       ("load", "  destination started begin: Load 3, remove file")):
        print(row(label, statistics.median(stages[key])))
    print(row("cp of a 32 MiB file into the spool dir", cp))
    print(row("dd bs=4M of the same file", dd))
    print(f"\nmedians of {REPEAT}; spool directory {spool_dir}, runtime dir {config.runtime_dir}; "
          "'vs' columns: throughput relative to that baseline (1.00 = as fast)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
