#!/usr/bin/env python3
"""A live migration with helper state against the same migration without it.

Two libvirt hosts on this machine (as in the demo).  TCG guests, missing-state
policy ``fresh``, migrate back and forth in one run, each alternating
``virt-vmstate migrate`` with a plain ``virsh migrate --live`` of the same guest:

- the demo guest (its three helpers: a counter, libslirp-helper, a clock), by
  the pre-copy carrier;
- a pre-copy guest with four helpers of 64 KiB state each: ``virt-vmstate
  migrate`` Saves, carries and Loads; the plain ``virsh migrate`` moves no
  state (the helpers start fresh);
- the same guest stream-enabled (``virt-vmstate enable``): both move the state
  in QEMU's stream, so the difference is the command itself.

Before the migrations, each command's own start is timed: the same command for
a domain that does not exist, which fails as soon as libvirt says so; beside
them the floor of any Python tool that asks libvirt the same (this Python,
``import libvirt``, connect, look the domain up).

After them, where the demo guest's extra time goes: more hops of it, each
host's hook wrapped to note when each event began and ended (as timeline.py
does; the wrapper costs both commands the same), split into segments, with
the Save and the carry as ``virt-vmstate migrate --json`` reports them.

QEMU does not connect to the helpers, so their profile lets them come up while
QEMU starts (up_before = "guest").  Each hop is timed as the operator sees it:
the wall time of the command.  Run as root.

    make bench      (or: .venv/bin/python benchmarks/migration.py [ROUNDS])
"""

from __future__ import annotations

import json
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
from procs import bench_helper_profile  # noqa: E402
from timeline import hop_segments, wrap_hook  # noqa: E402

from virt_vmstate.core.domxml import DomainConfig, HelperSpec, config_element  # noqa: E402
from stamp import stamp  # noqa: E402

PROFILES = bench_helper_profile("bench", "--random-size", "65536") + bench_helper_profile("clock", "--clock")
LOOKUP = "import sys, libvirt; libvirt.open(sys.argv[1]).lookupByName('nosuch')"


def start_ms(argv: List[str], runs: int = 20) -> float:
    """Median wall time of a command that fails once libvirt says the domain does not exist."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        times.append(time.perf_counter() - started)
        if result.returncode == 0 or "nosuch" not in result.stderr:
            raise RuntimeError(f"{' '.join(argv[:3])}...: expected a missing domain: {result.stderr.strip()}")
    return statistics.median(times) * 1000


def timed(argv: List[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])}...: {result.stderr.strip()}")
    return elapsed


BENCH = DomainConfig(tuple(HelperSpec(f"h{i}", "bench") for i in range(4)), missing_state="fresh")
DEMO = DomainConfig((HelperSpec("counter", "counter"), HelperSpec("slirp0", "slirp"),
                     HelperSpec("clock", "clock")), missing_state="fresh")
# name: (what the table calls it, its helpers, stream-enabled)
GUESTS = {"benchdemo": ("demo guest, pre-copy", DEMO, False),
          "bench": ("4 x 64 KiB, pre-copy", BENCH, False),
          "benchstream": ("4 x 64 KiB, stream", BENCH, True)}
TOOLS = ("virt-vmstate migrate", "virsh migrate")


def migrate_argv(tool: str, guest: str, here: LibvirtHost, there: LibvirtHost) -> List[str]:
    if tool == "virsh migrate":
        return ["virsh", "-c", here.uri, "migrate", "--live", guest, there.uri, there.migration_uri]
    return [*here.vmstate_argv(), "migrate", guest, there.uri, "-c", here.uri,
            "--migrateuri", there.migration_uri]


def demo_breakdown(guest: str, where: Tuple[LibvirtHost, LibvirtHost], rounds: int,
                   ) -> Tuple[Dict[str, Dict[str, List[float]]], Dict[str, List[float]]]:
    """The guest's hops split by the hosts' hook events (ms), and the command's own phases."""
    log = where[0].dir.parent / "migration-events.log"
    log.write_text("")
    for host in where:
        wrap_hook(host, log)
    table: Dict[str, Dict[str, List[float]]] = {}
    phases: Dict[str, List[float]] = {}
    here, there = where
    for _ in range(rounds):
        for tool in TOOLS:
            offset = len(log.read_text().splitlines())
            argv = migrate_argv(tool, guest, here, there)
            started = time.time()
            result = subprocess.run(argv + (["--json"] if tool != "virsh migrate" else []),
                                    capture_output=True, text=True, timeout=300)
            ended = time.time()
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(argv[:3])}...: {result.stderr.strip()}")
            if tool != "virsh migrate":
                for phase, seconds in json.loads(result.stdout)["seconds"].items():
                    phases.setdefault(phase, []).append(seconds * 1000)
            for segment, ms in hop_segments(log, offset, started, ended).items():
                table.setdefault(segment, {}).setdefault(tool, []).append(ms)
            here, there = there, here
    return table, phases


def main() -> int:
    print(stamp())
    hosts = benchmark_hosts(sys.argv)
    if hosts is None:
        return 1
    rounds, a, b = hosts
    times: Dict[str, Dict[str, List[float]]] = {guest: {tool: [] for tool in TOOLS} for guest in GUESTS}
    try:
        for host in (a, b):
            host.prepare(extra_config=PROFILES)
            host.start()
        starts = {"virt-vmstate migrate": start_ms([*a.vmstate_argv(), "migrate", "nosuch", b.uri, "-c", a.uri]),
                  "virsh migrate": start_ms(["virsh", "-c", a.uri, "migrate", "--live", "nosuch", b.uri]),
                  "python3 + libvirt": start_ms([sys.executable, "-c", LOOKUP, a.uri])}
        for guest, (_, config, stream) in GUESTS.items():
            xml = a.dir / f"{guest}.xml"
            xml.write_text(guest_xml(guest, str(uuid.uuid4()), config_element(config)))
            a.virsh("define", str(xml))
            if stream:
                a.vmstate("enable", guest, "-c", a.uri)
            a.virsh("start", guest)
        where = {guest: (a, b) for guest in GUESTS}
        for _ in range(rounds):
            for guest in GUESTS:
                for tool in TOOLS:
                    here, there = where[guest]
                    times[guest][tool].append(timed(migrate_argv(tool, guest, here, there)))
                    where[guest] = (there, here)
        breakdown, phases = demo_breakdown("benchdemo", where["benchdemo"], rounds)
    finally:
        for host in (a, b):
            for guest in GUESTS:
                subprocess.run(["virsh", "-c", host.uri, "destroy", guest], capture_output=True)
                subprocess.run(["virsh", "-c", host.uri, "undefine", guest], capture_output=True)
            host.stop()

    print(f"{'one live migration':<44} {'median':>9} {'min':>9} {'max':>9} {'ratio':>7}   paired extra")
    for guest, (title, _, _) in GUESTS.items():
        base = statistics.median(times[guest]["virsh migrate"])
        for tool, values in times[guest].items():
            label = f"{title}: {tool}"
            paired = ""
            if tool != "virsh migrate":
                # Each hop against the plain one right after it: the machine's drift cancels.
                extra = [(ours - plain) * 1000 for ours, plain in zip(values, times[guest]["virsh migrate"])]
                low, _, high = statistics.quantiles(extra, n=4) if len(extra) > 1 else (extra * 3)
                paired = f"   {statistics.median(extra):+6.1f} ms (quartiles {low:+.1f} to {high:+.1f})"
            print(f"{label:<44} {statistics.median(values) * 1000:6.0f} ms {min(values) * 1000:6.0f} ms "
                  f"{max(values) * 1000:6.0f} ms {statistics.median(values) / base:7.2f}{paired}")
    print(f"{'start, until libvirt: no such domain':<44} "
          f"{starts['virt-vmstate migrate']:6.1f} ms vs {starts['virsh migrate']:.1f} ms for virsh "
          f"(+{starts['virt-vmstate migrate'] - starts['virsh migrate']:.1f} ms)")
    print(f"{'  of which any Python tool pays':<44} "
          f"{starts['python3 + libvirt']:6.1f} ms (python3, import libvirt, connect, lookup: "
          f"+{starts['python3 + libvirt'] - starts['virsh migrate']:.1f} ms over virsh)")
    print(f"\n{rounds} hops each, alternating, TCG guests (64 MiB) between two libvirtd on this "
          "machine; wall time of each command; ratio against plain virsh migrate of the same guest; "
          "paired extra: the median of each hop's time minus the plain hop's right after it")

    print(f"\nwhere the demo guest's extra time goes, medians of {rounds} more hops each, ms, "
          "both hosts' hooks wrapped to time each event (see timeline.py)")
    print(f"| {'segment':<22} | virt-vmstate migrate | virsh migrate | extra |")
    print(f"|{'-' * 24}|----------------------|---------------|-------|")
    for segment, by_tool in breakdown.items():
        ours, plain = (statistics.median(by_tool[tool]) for tool in TOOLS)
        print(f"| {segment:<22} | {ours:20.1f} | {plain:13.1f} | {ours - plain:+5.1f} |")
    print("inside 'cmd -> migrate begin', as virt-vmstate migrate --json reports it: " + ", ".join(
        f"{phase} {statistics.median(phases[phase]):.1f} ms" for phase in ("save", "carry"))
        + " (the Save in a thread, beside libvirt's calls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
