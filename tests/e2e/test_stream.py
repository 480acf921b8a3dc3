"""The stream carrier under real libvirt: plain virsh migrate, save/restore and managedsave
of enabled domains, with real QEMU guests, the proxy and real helpers (libslirp-helper too)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hosts import BASE, LibvirtHost, guest_xml, prerequisites  # noqa: E402
from procs import TEST_HELPER  # noqa: E402

from virt_vmstate.domxml import DomainConfig, HelperSpec, config_element, parse_domain  # noqa: E402
from virt_vmstate.managed import is_running  # noqa: E402
from virt_vmstate.vmstate1 import HelperBus  # noqa: E402

pytestmark = pytest.mark.e2e

RAM_FILE = BASE / "ram.bin"   # random guest RAM, so the RAM phase takes seconds at a set bandwidth
RAM_MIB = 40


@pytest.fixture(scope="module")
def hosts() -> Iterator[Tuple[LibvirtHost, LibvirtHost]]:
    why = prerequisites()
    if why:
        if os.environ.get("VIRT_VMSTATE_REQUIRE_E2E"):
            pytest.fail(f"end-to-end tests cannot run: {why}")
        pytest.skip(f"end-to-end tests need real libvirt: {why}")
    a, b = LibvirtHost("e2e-a", 1), LibvirtHost("e2e-b", 2)
    try:
        for host, fragile in ((a, ""), (b, ', "--fail", "load"')):
            host.prepare(proxy_timeout=4.0, extra_config=f"""
[profiles.clock]
command = ["{sys.executable}", "{TEST_HELPER}", "--bus", "{{bus}}", "--id", "{{id}}", "--clock"]
incoming_args = ["--incoming"]
[profiles.fragile]
command = ["{sys.executable}", "{TEST_HELPER}", "--bus", "{{bus}}", "--id", "{{id}}"{fragile}]
incoming_args = ["--incoming"]
""")
            host.start()
        if not RAM_FILE.exists():
            RAM_FILE.write_bytes(os.urandom(RAM_MIB << 20))
        yield a, b
    finally:
        for host in (a, b):
            host.stop()


def states(host: LibvirtHost, dom_uuid: str) -> Dict[str, bytes]:
    with HelperBus.open(host.bus_address(dom_uuid), call_timeout=10) as bus:
        return bus.save(bus.helpers())


def wait_gone(host: LibvirtHost, dom_uuid: str, timeout: float = 10) -> None:
    rundir = host.runtime / dom_uuid
    deadline = time.monotonic() + timeout
    while rundir.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not rundir.exists(), f"{rundir} is still there"


def define_enabled(host: LibvirtHost, tmp_path: Path, name: str, config: DomainConfig,
                   ram: bool = False, start: bool = True) -> str:
    """Define a persistent guest, enable the stream carrier while it is shut off, start it."""
    dom_uuid = str(uuid.uuid4())
    xml = guest_xml(name, dom_uuid, config_element(config))
    if ram:
        loader = (f"<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
                  f"<qemu:arg value='-device'/>"
                  f"<qemu:arg value='loader,file={RAM_FILE},addr=0x1000000,force-raw=on'/>"
                  "</qemu:commandline>\n")
        xml = xml.replace("</domain>", loader + "</domain>")
    path = tmp_path / f"{name}.xml"
    path.write_text(xml)
    host.virsh("define", str(path))
    host.vmstate("enable", name, "-c", host.uri)
    if start:
        host.virsh("start", name)
    return dom_uuid


def undefine(host: LibvirtHost, name: str, dom_uuid: str) -> None:
    if "running" in host.virsh("domstate", name, check=False).stdout:
        host.virsh("destroy", name)
    host.virsh("undefine", name, "--managed-save", check=False)
    wait_gone(host, dom_uuid)


def processes_of(host: LibvirtHost, dom_uuid: str) -> List[str]:
    from virt_vmstate.config import load_config
    from virt_vmstate.managed import ManagedProcesses
    from virt_vmstate.rundir import RunDir
    records = ManagedProcesses(RunDir(str(host.runtime), uuid.UUID(dom_uuid)),
                               load_config(str(host.config))).records()
    return sorted(r.role for r in records if is_running(r))


class SuspendWatch:
    """When libvirt reports the source guest suspended (QEMU's STOP at switchover)."""

    def __init__(self, host: LibvirtHost, name: str) -> None:
        import libvirt
        libvirt.virEventRegisterDefaultImpl()
        self.stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        self.conn = libvirt.open(host.uri)
        self.suspended: List[float] = []
        dom = self.conn.lookupByName(name)

        def callback(conn, dom, event, detail, opaque):
            if event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED:
                self.suspended.append(time.time())
        self.cb = self.conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                                   callback, None)

    def _loop(self) -> None:
        import libvirt
        while not self.stop:
            libvirt.virEventRunDefaultImpl()

    def close(self) -> None:
        try:
            self.conn.domainEventDeregisterAny(self.cb)
        except Exception:
            pass
        self.stop = True
        self.conn.close()


CLOCK = DomainConfig((HelperSpec("clock", "clock"), HelperSpec("slirp0", "slirp")))


def test_plain_virsh_migrate_loads_the_state_saved_after_the_vcpus_stopped(hosts, tmp_path):
    a, b = hosts
    dom_uuid = define_enabled(a, tmp_path, "ticking", CLOCK, ram=True)
    slirp_before = states(a, dom_uuid)["slirp0"]
    watch = SuspendWatch(a, "ticking")
    try:
        started = time.time()
        # 40 MiB of random guest RAM at 10 MiB/s: a RAM phase of about 4 s.
        result = a.virsh("migrate", "--live", "--bandwidth", "10", "ticking", b.uri, b.migration_uri,
                         check=False)
        ended = time.time()
    finally:
        watch.close()
    assert result.returncode == 0, result.stderr
    assert "running" in b.virsh("domstate", "ticking").stdout
    loaded, loaded_at_ns = b.counter_call(dom_uuid, "clock", "LastLoad")
    saved_at = struct.unpack(">Q", bytes(loaded[:8]))[0] / 1e9
    print(f"migration {ended - started:.2f} s; suspended {watch.suspended[0] - started if watch.suspended else None:.3f} s "
          f"after start; saved {saved_at - started:.3f} s; loaded {loaded_at_ns / 1e9 - saved_at:.3f} s after saving")
    assert ended - started > 3.0, "the RAM phase should take seconds"
    assert watch.suspended, "libvirt reported no suspend of the source"
    # Saved after the source stopped, not before the RAM copy; Loaded moments later.
    assert saved_at >= watch.suspended[0] - 0.05, (saved_at, watch.suspended)
    assert saved_at - started > 2.5
    assert 0 <= loaded_at_ns / 1e9 - saved_at < 1.0
    assert states(b, dom_uuid)["slirp0"] == slirp_before
    assert not parse_domain(b.virsh("dumpxml", "ticking").stdout.encode()).state
    wait_gone(a, dom_uuid)
    b.virsh("destroy", "ticking")
    a.virsh("undefine", "ticking")


def test_save_and_restore_on_the_same_and_the_other_host_keep_the_state(hosts, tmp_path):
    a, b = hosts
    config = DomainConfig((HelperSpec("counter", "counter"), HelperSpec("slirp0", "slirp")))
    dom_uuid = define_enabled(a, tmp_path, "saved", config)
    a.counter_call(dom_uuid, "counter", "Increment", 17)
    before = states(a, dom_uuid)
    image = tmp_path / "saved.img"
    a.virsh("save", "saved", str(image))
    wait_gone(a, dom_uuid)
    a.virsh("restore", str(image))
    assert states(a, dom_uuid) == before
    assert a.counter_call(dom_uuid, "counter", "Get") == 17
    a.counter_call(dom_uuid, "counter", "Increment", 3)
    before = states(a, dom_uuid)
    a.virsh("save", "saved", str(image))
    wait_gone(a, dom_uuid)
    b.virsh("restore", str(image))
    assert states(b, dom_uuid) == before
    assert b.counter_call(dom_uuid, "counter", "Get") == 20
    b.virsh("destroy", "saved")
    wait_gone(b, dom_uuid)
    a.virsh("undefine", "saved")


def test_managedsave_and_start_keep_the_state(hosts, tmp_path):
    a, _ = hosts
    config = DomainConfig((HelperSpec("counter", "counter"),))
    dom_uuid = define_enabled(a, tmp_path, "managed", config)
    a.counter_call(dom_uuid, "counter", "Increment", 5)
    before = states(a, dom_uuid)
    a.virsh("managedsave", "managed")
    wait_gone(a, dom_uuid)
    a.virsh("start", "managed")
    assert states(a, dom_uuid) == before
    undefine(a, "managed", dom_uuid)


def test_restore_of_an_image_without_helper_state_is_refused(hosts, tmp_path):
    a, _ = hosts
    dom_uuid = define_enabled(a, tmp_path, "old", DomainConfig((HelperSpec("counter", "counter"),)))
    a.vmstate("disable", "old", "-c", a.uri)
    image = tmp_path / "old.img"
    a.virsh("save", "old", str(image))
    wait_gone(a, dom_uuid)
    result = a.virsh("restore", str(image), check=False)
    assert result.returncode != 0
    assert "carries no state for helpers counter" in result.stderr
    assert "old" not in a.virsh("list", "--name").stdout
    a.virsh("undefine", "old")
