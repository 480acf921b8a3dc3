#!/usr/bin/env python3
"""The demo: real live migrations between two libvirt hosts on this machine, with a
guest whose helpers (libslirp-helper, a counter, and a clock whose state changes
every moment) keep their state, first by the pre-copy carrier, then by the stream
carrier with a plain 'virsh migrate --live'.  Run as root: make demo
"""

from __future__ import annotations

import hashlib
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "plugin"), str(HERE.parent)]

from hosts import LibvirtHost, LifecycleEvents, clock_saved_at, guest_xml, prerequisites  # noqa: E402
from procs import TEST_HELPER  # noqa: E402

from virt_vmstate.bus.vmstate1 import HelperBus  # noqa: E402
from virt_vmstate.core.domxml import DomainConfig, HelperSpec, config_element  # noqa: E402

CLOCK_PROFILE = f"""
[profiles.clock]
command = ["{sys.executable}", "{TEST_HELPER}", "--bus", "{{bus}}", "--id", "{{id}}", "--clock"]
incoming_args = ["--incoming"]
"""


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show_helpers(host: LibvirtHost, dom_uuid: str) -> None:
    with HelperBus.open(host.bus_address(dom_uuid)) as bus:
        found = bus.helpers()
        saved = bus.save(found)
    for h in found:
        state = saved[h.id]
        if h.id == "counter":
            detail = f"counter = {int.from_bytes(state[:8].rjust(8, bytes(1)), 'big') if state else 0}"
        elif h.id == "clock":
            detail = "state = the wall clock at each Save (it changes every moment)"
        else:
            detail = f"{len(state)} bytes of state, sha256 {hashlib.sha256(state).hexdigest()[:16]}"
        print(f"   {host.name}: {h.id:<8} pid {h.pid:<7} {detail}")


def age_at_resume(events: LifecycleEvents, host: LibvirtHost, dom_uuid: str,
                  since: float) -> Optional[float]:
    """How old the clock helper's Loaded state was when the guest resumed there, in ms."""
    loaded, _ = host.counter_call(dom_uuid, "clock", "LastLoad")  # type: ignore[misc]
    resumed = events.first(host.name, "demo", "RESUMED", since)
    if resumed is None or len(loaded) < 8:
        return None
    return (resumed - clock_saved_at(loaded)) * 1000


def downtime(events: LifecycleEvents, host: LibvirtHost) -> Optional[float]:
    import libvirt
    stats = events.conns[host.name].lookupByName("demo").jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    value = stats.get("downtime")
    return float(value) if value is not None else None


def main() -> int:
    why = prerequisites()
    if why:
        print(f"demo cannot run: {why}", file=sys.stderr)
        return 1
    a, b = LibvirtHost("demo-a", 1), LibvirtHost("demo-b", 2)
    events: Optional[LifecycleEvents] = None
    try:
        say("bringing up two libvirt hosts (own mount + UTS namespace, virt-vmstate as their qemu hook)")
        for host in (a, b):
            host.prepare(extra_config=CLOCK_PROFILE)
            host.start()
            print(f"   {host.name}: {host.uri}")
        events = LifecycleEvents([a, b])
        dom_uuid = str(uuid.uuid4())
        config = DomainConfig((HelperSpec("counter", "counter"), HelperSpec("slirp0", "slirp"),
                               HelperSpec("clock", "clock")))
        xml = a.dir / "demo.xml"
        xml.write_text(guest_xml("demo", dom_uuid, config_element(config)))
        say("starting guest 'demo' (TCG, 64 MiB) on demo-a; its hook starts a private bus and three helpers")
        a.virsh("create", str(xml))
        a.counter_call(dom_uuid, "counter", "Increment", 42)
        print("   incremented the counter helper 42 times")
        show_helpers(a, dom_uuid)

        say("pre-copy carrier: virt-vmstate migrate demo demo-a -> demo-b (Save before the RAM copy)")
        started = time.time()
        result = a.vmstate("migrate", "demo", b.uri, "-c", a.uri, "--migrateuri", b.migration_uri)
        print("   " + result.stdout.strip().replace("\n", "\n   "))
        show_helpers(b, dom_uuid)
        precopy_age = age_at_resume(events, b, dom_uuid, started)
        precopy_down = downtime(events, b)
        print(f"   the clock helper's state was {precopy_age:.0f} ms old when the guest resumed on demo-b")

        say("a plain 'virsh migrate' of a domain that is not enabled is refused; the guest keeps running")
        time.sleep(0.5)
        refused = b.virsh("migrate", "--live", "demo", a.uri, a.migration_uri, check=False)
        from virt_vmstate.commands.migrate import libvirt_message
        print("   virsh: " + libvirt_message(refused.stderr.strip()))
        print(f"   demo-b: guest is {b.virsh('domstate', 'demo').stdout.strip()}")

        say("virt-vmstate enable demo (on demo-b): QEMU's own dbus-vmstate object, talking to our proxy")
        print("   " + b.vmstate("enable", "demo", "-c", b.uri).stdout.strip().replace("\n", "\n   "))
        b.counter_call(dom_uuid, "counter", "Increment", 1)
        print("   incremented the counter once more on demo-b")

        say("stream carrier: a plain 'virsh migrate --live demo' demo-b -> demo-a (Save at switchover)")
        started = time.time()
        b.virsh("migrate", "--live", "demo", a.uri, a.migration_uri)
        print(f"   guest is {a.virsh('domstate', 'demo').stdout.strip()} on demo-a")
        show_helpers(a, dom_uuid)
        stream_age = age_at_resume(events, a, dom_uuid, started)
        stream_down = downtime(events, a)

        say("how old the helpers' state was when the guest resumed on the destination")
        print(f"   pre-copy (virt-vmstate migrate):  {precopy_age:6.0f} ms   (downtime {precopy_down:.0f} ms)")
        print(f"   stream   (plain virsh migrate):   {stream_age:6.0f} ms   (downtime {stream_down:.0f} ms)")
        say("tearing down")
    finally:
        if events is not None:
            events.close()
        for host in (a, b):
            host.stop()
    print("   done: both hosts stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
