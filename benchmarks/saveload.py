#!/usr/bin/env python3
"""Save/Load speed on a real dbus-daemon with real helper processes.

Prints one table.  The baseline column is jeepney's own blocking connection
making the same calls one after another (send_and_get_reply), run in the same
process against the same helpers; the ratio is virt-vmstate / baseline.  The
last two columns are virt-vmstate's same calls with the bus run by dbus-broker
instead of dbus-daemon, and their ratio to dbus-daemon's.

    make bench      (or: .venv/bin/python benchmarks/saveload.py)
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "plugin"), str(ROOT / "tests")]

from jeepney import DBusAddress, new_method_call  # noqa: E402
from jeepney.io.blocking import open_dbus_connection  # noqa: E402
from procs import DBusBroker, DBusDaemon, HelperProcess, dbus_broker_binary, test_helper  # noqa: E402

from virt_vmstate.bus.vmstate1 import HelperBus  # noqa: E402
from stamp import stamp  # noqa: E402

KiB, MiB = 1024, 1024 * 1024


def median_ms(func: Callable[[], object], repeat: int) -> float:
    func()  # warm up
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        func()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def jeepney_round_trip(address: str, names: List[str], sources: List[str]) -> Callable[[], None]:
    conn = open_dbus_connection(address)

    def run() -> None:
        for source, target in zip(sources, names):
            obj = DBusAddress("/org/qemu/VMState1", bus_name=source, interface="org.qemu.VMState1")
            state = conn.send_and_get_reply(new_method_call(obj, "Save"), timeout=60).body[0]
            dest = DBusAddress("/org/qemu/VMState1", bus_name=target, interface="org.qemu.VMState1")
            conn.send_and_get_reply(new_method_call(dest, "Load", "ay", (state,)), timeout=60)
    return run


def jeepney_saves(address: str, names: List[str]) -> Callable[[], None]:
    conn = open_dbus_connection(address)

    def run() -> None:
        for name in names:
            obj = DBusAddress("/org/qemu/VMState1", bus_name=name, interface="org.qemu.VMState1")
            conn.send_and_get_reply(new_method_call(obj, "Save"), timeout=60)
    return run


Row = Tuple[str, float, float]


def measure(address: str, work: Path) -> List[Row]:
    """Each case on one bus: (case, virt-vmstate ms, jeepney one at a time ms)."""
    rows: List[Row] = []
    procs: List[HelperProcess] = []
    try:
        bus = HelperBus.open(address, call_timeout=60)

        def round_trip_case(label: str, count: int, size: int, repeat: int) -> None:
            tag = f"{label.replace(' ', '')}"
            for i in range(count):
                procs.append(test_helper(address, f"{tag}-src-{i}", work, "--random-size",
                                         str(size), "--seed", str(i)))
                procs.append(test_helper(address, f"{tag}-dst-{i}", work, "--incoming"))
            everyone = {h.id: h for h in bus.helpers()}
            src = [everyone[f"{tag}-src-{i}"] for i in range(count)]
            dst = [everyone[f"{tag}-dst-{i}"] for i in range(count)]

            def ours() -> None:
                states = bus.save(src)
                bus.load(dst, {d.id: states[s.id] for s, d in zip(src, dst)})
            base = jeepney_round_trip(address, [d.unique_name for d in dst], [s.unique_name for s in src])
            rows.append((label, median_ms(ours, repeat), median_ms(base, repeat)))

        round_trip_case("1 x 64 B round trip", 1, 64, 50)
        round_trip_case("1 x 64 KiB round trip", 1, 64 * KiB, 50)
        round_trip_case("1 x 1 MiB round trip", 1, MiB, 30)
        round_trip_case("1 x 16 MiB round trip", 1, 16 * MiB, 7)
        round_trip_case("16 x 1 MiB round trip", 16, MiB, 7)

        for i in range(16):
            procs.append(test_helper(address, f"slow-{i}", work, "--save-delay", "0.05"))
        slow = [h for h in bus.helpers() if h.id.startswith("slow-")]
        rows.append(("16 x Save sleeping 50 ms", median_ms(lambda: bus.save(slow), 5),
                     median_ms(jeepney_saves(address, [h.unique_name for h in slow]), 3)))
        bus.close()
    finally:
        for proc in procs:
            proc.stop()
    return rows


def main() -> int:
    print(stamp())
    broker_binary = dbus_broker_binary()
    with tempfile.TemporaryDirectory(prefix="vmst-bench-") as tmp:
        work = Path(tmp)
        daemon = DBusDaemon(work / "daemon")
        try:
            on_daemon = measure(daemon.address, work / "daemon-helpers")
        finally:
            daemon.stop()
        on_broker: List[Row] = []
        if broker_binary is not None:
            broker = DBusBroker(work / "broker", broker_binary)
            try:
                on_broker = measure(broker.address, work / "broker-helpers")
            finally:
                broker.stop()

    print(f"{'case':<28} {'virt-vmstate':>13} {'jeepney, one at a time':>23} {'ratio':>7}"
          f"{'   on dbus-broker':>18} {'x dbus-daemon':>14}")
    for index, (label, ours, base) in enumerate(on_daemon):
        line = f"{label:<28} {ours:>10.2f} ms {base:>20.2f} ms {ours / base:>7.2f}"
        if on_broker:
            broker_ms = on_broker[index][1]
            line += f" {broker_ms:>14.2f} ms {broker_ms / ours:>14.2f}"
        print(line)
    print("\nmedians; Save and Load on one real dbus-daemon, helpers are tests/helpers/vmstate_helper.py; "
          "'on dbus-broker': virt-vmstate's same calls on a dbus-broker with the same helpers")
    if broker_binary is None:
        print("dbus-broker: not measured, no binary ('make deps' unpacks one into build/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
