#!/usr/bin/env python3
"""The demo: a real live migration A -> B -> A between two libvirt hosts on this
machine, with a guest whose two helpers (libslirp-helper and a counter) keep
their state across every hop.  Run as root: make demo
"""

from __future__ import annotations

import hashlib
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "plugin"), str(HERE.parent)]

from hosts import LibvirtHost, guest_xml, prerequisites  # noqa: E402
from virt_vmstate.domxml import DomainConfig, HelperSpec, config_element  # noqa: E402
from virt_vmstate.vmstate1 import HelperBus  # noqa: E402


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
        else:
            detail = f"{len(state)} bytes of state, sha256 {hashlib.sha256(state).hexdigest()[:16]}"
        print(f"   {host.name}: {h.id:<8} pid {h.pid:<7} {detail}")


def bump_counter(host: LibvirtHost, dom_uuid: str, times: int) -> None:
    host.counter_call(dom_uuid, "counter", "Increment", times)


def main() -> int:
    why = prerequisites()
    if why:
        print(f"demo cannot run: {why}", file=sys.stderr)
        return 1
    a, b = LibvirtHost("demo-a", 1), LibvirtHost("demo-b", 2)
    try:
        say("bringing up two libvirt hosts (own mount + UTS namespace, virt-vmstate as their qemu hook)")
        for host in (a, b):
            host.prepare()
            host.start()
            print(f"   {host.name}: {host.uri}")
        dom_uuid = str(uuid.uuid4())
        config = DomainConfig((HelperSpec("counter", "counter"), HelperSpec("slirp0", "slirp")))
        xml = a.dir / "demo.xml"
        xml.write_text(guest_xml("demo", dom_uuid, config_element(config)))
        say("starting guest 'demo' (TCG, 64 MiB) on demo-a; its hook starts a private bus and two helpers")
        a.virsh("create", str(xml))
        bump_counter(a, dom_uuid, 42)
        print("   incremented the counter helper 42 times")
        show_helpers(a, dom_uuid)
        for src, dst in ((a, b), (b, a)):
            say(f"virt-vmstate migrate demo {src.name} -> {dst.name}")
            started = time.monotonic()
            result = src.vmstate("migrate", "demo", dst.uri, "-c", src.uri, "--migrateuri",
                                 dst.migration_uri)
            print("   " + result.stdout.strip().replace("\n", "\n   "))
            print(f"   wall time {time.monotonic() - started:.2f} s; guest is "
                  f"{dst.virsh('domstate', 'demo').stdout.strip()} on {dst.name}")
            show_helpers(dst, dom_uuid)
            bump_counter(dst, dom_uuid, 1)
            print(f"   incremented the counter once more on {dst.name}")
        say("a plain 'virsh migrate' without state is refused, and the guest keeps running")
        refused = a.virsh("migrate", "--live", "demo", b.uri, b.migration_uri, check=False)
        print("   " + refused.stderr.strip())
        print(f"   demo-a: guest is {a.virsh('domstate', 'demo').stdout.strip()}")
        show_helpers(a, dom_uuid)
        say("tearing down")
    finally:
        for host in (a, b):
            host.stop()
    print("   done: both hosts stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
