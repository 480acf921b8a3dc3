#!/usr/bin/env python3
"""Where a stream-enabled domain's migration spends the time a domain without helpers does not.

Two libvirt hosts on this machine (as in the demo).
Three TCG guests migrate back and forth, alternating, with plain ``virsh migrate --live``:
one without helpers, and two with the stream carrier (``virt-vmstate enable``) and one
helper up while QEMU starts (up_before = "guest"): the test helper with 4 KiB of state,
a Python program, and libslirp-helper, a C program.  Each host's hook is wrapped to note when
each event began and ended, so each hop splits into segments:

  cmd -> migrate      virsh starts, connects, libvirt's Begin on the source
  migrate begin ...   the destination's hook events, each one whole (bash included)
  QEMU launch         'start begin' ended -> 'started begin' began: QEMU starts on the
                      destination, while the helper and the proxy start beside it
  transfer            'started begin' ended -> the source's 'stopped end': RAM copy and
                      switchover (the proxies' Save and Load included)
  ... -> end          the source's stop, virsh's own end

Medians over the hops; the last column is the enabled domain's extra time.

    make bench      (or: .venv/bin/python benchmarks/timeline.py [ROUNDS])
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "plugin"), str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

from hosts import LibvirtHost, benchmark_hosts, guest_xml  # noqa: E402
from procs import bench_helper_profile, slirp_profile  # noqa: E402

from virt_vmstate.core.domxml import DomainConfig, HelperSpec, config_element  # noqa: E402
from stamp import stamp  # noqa: E402

PROFILE = bench_helper_profile("timeline", "--random-size", "4096") + slirp_profile("timeline-slirp", "guest")
# Each guest's helper (its profile), and the column it gets.
GUESTS = {"plain": (None, "no helpers"), "enabled": ("timeline", "test helper"),
          "slirp": ("timeline-slirp", "libslirp-helper")}
EVENTS = ("migrate", "prepare", "start", "started", "stopped", "release")


def wrap_hook(host: LibvirtHost, log: Path) -> None:
    """Put a wrapper in front of the host's hook that appends one line per event."""
    hook = host.dir / "etc/libvirt/hooks/qemu"
    real = hook.with_name("qemu.timed")
    hook.rename(real)
    hook.write_text(f"""#!/bin/bash
began=$EPOCHREALTIME
{real} "$@"
status=$?
echo "{host.name} $began $EPOCHREALTIME $1 $2 $status" >> {log}
exit $status
""")
    hook.chmod(0o755)


def segments(started: float, ended: float, events: Dict[str, Tuple[float, float]]) -> Dict[str, float]:
    """One hop's segments in ms, from its events (op: (began, ended))."""
    points: List[Tuple[str, float, float]] = [("cmd -> migrate begin", started, events["migrate"][0])]
    for before, op in zip(EVENTS, EVENTS[1:]):
        points.append((f"{before} hook", *events[before]))
        gap = {"start": "QEMU launch", "started": "transfer"}.get(before, f"{before} -> {op}")
        points.append((gap, events[before][1], events[op][0]))
    points += [("release hook", *events["release"]), ("release -> end", events["release"][1], ended),
               ("total", started, ended)]
    return {name: (b - a) * 1000 for name, a, b in points}


def hop_segments(log: Path, offset: int, started: float, ended: float) -> Dict[str, float]:
    """One hop's segments in ms, from the events the wrapped hooks wrote to ``log`` after
    its first ``offset`` lines."""
    time.sleep(0.3)  # nothing left of the hop's events on either host
    events = {}
    for line in log.read_text().splitlines()[offset:]:
        _, began, finished, _, op, _ = line.split()
        events[op] = (float(began), float(finished))
    return segments(started, ended, events)


def run(argv: List[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}...: {result.stderr.strip()}")


def main() -> int:
    print(stamp())
    hosts = benchmark_hosts(sys.argv)
    if hosts is None:
        return 1
    rounds, a, b = hosts
    log = a.dir.parent / "timeline-events.log"
    table: Dict[str, Dict[str, List[float]]] = {}
    try:
        for host in (a, b):
            host.prepare(extra_config=PROFILE, spool=None)
            wrap_hook(host, log)
            host.start()
        log.write_text("")
        for name, (profile, _) in GUESTS.items():
            metadata = config_element(DomainConfig((HelperSpec("h0", profile),))) if profile else ""
            xml = a.dir / f"{name}.xml"
            xml.write_text(guest_xml(name, str(uuid.uuid4()), metadata))
            run(["virsh", "-c", a.uri, "define", str(xml)])
            if profile:
                run(a.vmstate_argv() + ["enable", name, "-c", a.uri])
            run(["virsh", "-c", a.uri, "start", name])
        where = {name: (a, b) for name in GUESTS}
        for _ in range(rounds):
            for name, (src, dst) in where.items():
                offset = len(log.read_text().splitlines())
                started = time.time()
                run(["virsh", "-c", src.uri, "migrate", "--live", name, dst.uri, dst.migration_uri])
                ended = time.time()
                for segment, ms in hop_segments(log, offset, started, ended).items():
                    table.setdefault(segment, {}).setdefault(name, []).append(ms)
                where[name] = (dst, src)
    finally:
        for host in (a, b):
            for name in GUESTS:
                subprocess.run(["virsh", "-c", host.uri, "destroy", name], capture_output=True)
                subprocess.run(["virsh", "-c", host.uri, "undefine", name], capture_output=True)
            host.stop()
    print(f"\none live migration, medians of {rounds} hops each, ms: a guest without helpers against "
          "guests with one helper and the stream carrier (the test helper, a Python program with 4 KiB "
          "of state, or libslirp-helper)")
    helped = [name for name in GUESTS if name != "plain"]
    print(f"| {'segment':<22} | no helpers | " + " | ".join(f"{GUESTS[n][1]:>15} | extra" for n in helped) + " |")
    print(f"|{'-' * 24}|------------|" + "-----------------|-------|" * len(helped))
    for segment, by_name in table.items():
        plain = statistics.median(by_name["plain"])
        cells = []
        for name in helped:
            ms = statistics.median(by_name[name])
            cells.append(f"{ms:15.1f} | {ms - plain:+5.1f}")
        print(f"| {segment:<22} | {plain:10.1f} | " + " | ".join(cells) + " |")
    total = {name: statistics.median(table["total"][name]) for name in GUESTS}
    print("\nratio of the totals: " + ", ".join(f"{GUESTS[n][1]} {total[n] / total['plain']:.2f}"
                                             for n in helped))
    # Each round's hop against the guest without helpers in the same round: the drift cancels.
    paired = {n: [ours - plain for ours, plain in zip(table["total"][n], table["total"]["plain"])]
              for n in helped}
    print("paired extra (median of each round's total minus the plain guest's): " + ", ".join(
        f"{GUESTS[n][1]} {statistics.median(paired[n]):+.1f} ms" for n in helped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
