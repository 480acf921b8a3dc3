#!/usr/bin/env python3
"""Downtime, and the age of the helpers' state at resume, for each way state can move.

Two libvirt hosts on this machine (as in the demo), one run, the same TCG guest
migrating back and forth with plain ``virsh migrate --live`` (``virt-vmstate
migrate`` for the pre-copy XML carrier).  Helpers run in --clock mode: their
state is the wall clock at Save, so the destination's helper tells when the
state it Loaded was taken.  Per hop:

- downtime: what libvirt reports for the completed migration (destination's job stats);
- age: when the destination resumed (libvirt's RESUMED event) minus when the
  Loaded state was Saved.

Ways compared, each with 1 helper of 4 KiB and with 16 helpers whose Save sleeps 50 ms:
  no helpers      the baseline: a guest with no helpers at all
  QEMU direct     QEMU's dbus-vmstate object calling the helpers itself (one after another)
  stream (proxy)  virt-vmstate enable: QEMU's object calls our proxy, which calls all at once
  XML pre-copy    virt-vmstate migrate: Save before the RAM copy, state in the domain XML

The helpers' profiles say up_before = "guest" (QEMU does not connect to them), so they come
up while QEMU starts.

    make bench      (or: .venv/bin/python benchmarks/downtime.py [ROUNDS])
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "plugin"), str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

from hosts import LibvirtHost, LifecycleEvents, benchmark_hosts, clock_saved_at, guest_xml  # noqa: E402
from procs import TEST_HELPER, DBusDaemon, HelperProcess, bench_helper_profile  # noqa: E402

from virt_vmstate.core.domxml import DomainConfig, HelperSpec, config_element  # noqa: E402
from stamp import stamp  # noqa: E402

SHAPES = {  # name: (helpers, extra helper args)
    "1 x 4 KiB": (1, ["--random-size", "4096"]),
    "16 x Save 50 ms": (16, ["--save-delay", "0.05", "--random-size", "64"]),
}
DIRECT_BUS = "/run/libvirt/vmst-bench/bus.sock"  # /run/libvirt is private to each host


def profiles() -> str:
    return "\n".join(bench_helper_profile(f"shape{index}", "--clock", *args)
                     for index, (_, args) in enumerate(SHAPES.values()))


def downtime_ms(events: LifecycleEvents, host: LibvirtHost, name: str) -> Optional[float]:
    import libvirt
    stats = events.conns[host.name].lookupByName(name).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    value = stats.get("downtime")
    return float(value) if value is not None else None


def last_saved_at(address: str, helper_id: str) -> float:
    from jeepney import DBusAddress, new_method_call
    from jeepney.io.blocking import open_dbus_connection

    from virt_vmstate.bus.vmstate1 import HelperBus
    with HelperBus.open(address, call_timeout=5) as bus:
        unique = next(h.unique_name for h in bus.helpers() if h.id == helper_id)
    obj = DBusAddress("/org/qemu/VMState1", bus_name=unique, interface="org.virtvmstate.Counter1")
    with open_dbus_connection(address) as conn:
        loaded, _ = conn.send_and_get_reply(new_method_call(obj, "LastLoad"), timeout=5).body
    return clock_saved_at(loaded) if len(loaded) >= 8 else float("nan")


def run(argv: List[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}...: {result.stderr.strip()}")


def hops(way: str, shape: Optional[str], a: LibvirtHost, b: LibvirtHost, events: LifecycleEvents,
         rounds: int, tmp: Path) -> Tuple[List[float], List[float], List[float]]:
    name = f"bench{uuid.uuid4().hex[:6]}"
    dom_uuid = str(uuid.uuid4())
    count, args = SHAPES[shape] if shape else (0, [])
    ids = [f"h{i}" for i in range(count)]
    metadata, extra = "", ""
    direct: List[Any] = []
    stream = way.startswith("stream")
    if stream or way == "XML pre-copy":
        index = list(SHAPES).index(shape)  # type: ignore[arg-type]
        metadata = config_element(DomainConfig(tuple(HelperSpec(i, f"shape{index}") for i in ids)))
    if way == "QEMU direct":
        obj = json.dumps({"qom-type": "dbus-vmstate", "id": "direct", "addr": f"unix:path={DIRECT_BUS}",
                          "id-list": ",".join(ids)})
        extra = ("<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
                 f"<qemu:arg value='-object'/><qemu:arg value='{obj}'/></qemu:commandline>")
        for host in (a, b):
            daemon = DBusDaemon(host.dir / "run/libvirt/vmst-bench")
            direct.append(daemon)
            for i in ids:
                log = host.dir / f"direct-{i}.log"
                ready = host.dir / f"direct-{i}.pid"
                ready.unlink(missing_ok=True)
                direct.append(HelperProcess([sys.executable, str(TEST_HELPER), "--bus", daemon.address,
                                             "--id", i, "--clock", "--pidfile", str(ready), *args],
                                            log, ready=ready))
    xml = guest_xml(name, dom_uuid, metadata).replace("</domain>", extra + "</domain>")
    path = tmp / f"{name}.xml"
    path.write_text(xml)
    downtimes: List[float] = []
    ages: List[float] = []
    walls: List[float] = []
    try:
        if stream:
            run(["virsh", "-c", a.uri, "define", str(path)])
            run(a.vmstate_argv() + ["enable", name, "-c", a.uri])
            run(["virsh", "-c", a.uri, "start", name])
        else:
            run(["virsh", "-c", a.uri, "create", str(path)])
        src, dst = a, b
        for _ in range(rounds):
            started = time.time()
            wall = time.perf_counter()
            if way == "XML pre-copy":
                run(src.vmstate_argv() + ["migrate", name, dst.uri, "-c", src.uri,
                                          "--migrateuri", dst.migration_uri])
            else:
                run(["virsh", "-c", src.uri, "migrate", "--live", name, dst.uri, dst.migration_uri])
            walls.append((time.perf_counter() - wall) * 1000)
            downtime = downtime_ms(events, dst, name)
            if downtime is not None:
                downtimes.append(downtime)
            if ids:
                address = (f"unix:path={dst.dir}/run/libvirt/vmst-bench/bus.sock" if way == "QEMU direct"
                           else dst.bus_address(dom_uuid))
                saved = last_saved_at(address, ids[0])
                resumed = events.first(dst.name, name, "RESUMED", started)
                if resumed is not None:
                    ages.append((resumed - saved) * 1000)
            time.sleep(0.5)  # the source's stopped/release hooks
            src, dst = dst, src
    finally:
        for host in (a, b):
            subprocess.run(["virsh", "-c", host.uri, "destroy", name], capture_output=True)
            subprocess.run(["virsh", "-c", host.uri, "undefine", name], capture_output=True)
        for proc in reversed(direct):
            proc.stop()
    return downtimes, ages, walls


def main() -> int:
    print(stamp())
    hosts = benchmark_hosts(sys.argv)
    if hosts is None:
        return 1
    rounds, a, b = hosts
    tmp = Path("/run/vmst-e2e/bench-tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    rows: List[Tuple[str, str, List[float], List[float], List[float]]] = []
    try:
        for host in (a, b):
            host.prepare(extra_config=profiles(), spool=None)
            host.start()
        events = LifecycleEvents([a, b])
        base, _, base_walls = hops("no helpers", None, a, b, events, rounds, tmp)
        rows.append(("no helpers", "-", base, [], base_walls))
        for shape in SHAPES:
            for way in ("QEMU direct", "stream (proxy)", "XML pre-copy"):
                downtimes, ages, walls = hops(way, shape, a, b, events, rounds, tmp)
                rows.append((way, shape, downtimes, ages, walls))
    finally:
        for host in (a, b):
            host.stop()
    base_ms = statistics.median(base) if base else float("nan")
    base_wall = statistics.median(base_walls)
    print(f"\ndowntime, age of the Loaded state at resume, wall time of the migration command; "
          f"medians of {rounds} hops; baseline: no helpers, {base_ms:.0f} ms downtime, "
          f"{base_wall:.0f} ms wall\n")
    print(f"| {'way':<15} | {'helpers':<16} | downtime ms | vs no helpers | ratio | age at resume ms "
          "| wall ms | wall ratio |")
    print(f"|{'-' * 17}|{'-' * 18}|-------------|---------------|-------|------------------|---------|------------|")
    for way, shape, downtimes, ages, walls in rows:
        d = statistics.median(downtimes) if downtimes else float("nan")
        age = f"{statistics.median(ages):.0f}" if ages else "-"
        w = statistics.median(walls)
        print(f"| {way:<15} | {shape:<16} | {d:11.0f} | {d - base_ms:+13.0f} | {d / base_ms:5.2f} | {age:>16} "
              f"| {w:7.0f} | {w / base_wall:10.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
