"""The stream carrier under real libvirt: plain virsh migrate, save/restore and managedsave
of enabled domains, with real QEMU guests, the proxy and real helpers (libslirp-helper too)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hosts import LibvirtHost, LifecycleEvents, busy_ram_commandline, clock_saved_at, guest_xml  # noqa: E402
from procs import TEST_HELPER  # noqa: E402

from virt_vmstate.core.domxml import DomainConfig, HelperSpec, config_element, parse_domain  # noqa: E402
from virt_vmstate.host.managed import is_running  # noqa: E402

pytestmark = pytest.mark.e2e


PROXY_TIMEOUT = 4.0  # a hung helper fails the switchover within seconds


def host_config(host_index: int) -> str:
    return f"""
[profiles.clock]
command = ["{sys.executable}", "{TEST_HELPER}", "--bus", "{{bus}}", "--id", "{{id}}", "--clock"]
incoming_args = ["--incoming"]
[profiles.counter-later]
command = ["{sys.executable}", "{TEST_HELPER}", "--bus", "{{bus}}", "--id", "{{id}}"]
incoming_args = ["--incoming"]
up_before = "guest"
[logging]
level = "debug"
"""




def define_enabled(host: LibvirtHost, tmp_path: Path, name: str, config: DomainConfig,
                   ram: bool = False, start: bool = True) -> str:
    """Define a persistent guest, enable the stream carrier while it is shut off, start it."""
    dom_uuid = str(uuid.uuid4())
    xml = guest_xml(name, dom_uuid, config_element(config))
    if ram:
        xml = xml.replace("</domain>", busy_ram_commandline() + "</domain>")
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
    host.wait_gone(dom_uuid)


def processes_of(host: LibvirtHost, dom_uuid: str) -> List[str]:
    from virt_vmstate.host.configfile import load_config
    from virt_vmstate.host.managed import ManagedProcesses
    from virt_vmstate.host.rundir import RunDir
    records = ManagedProcesses(RunDir(str(host.runtime), uuid.UUID(dom_uuid)),
                               load_config(str(host.config))).records()
    return sorted(r.role for r in records if is_running(r))


CLOCK = DomainConfig((HelperSpec("clock", "clock"), HelperSpec("slirp0", "slirp")))


def test_plain_virsh_migrate_loads_the_state_saved_after_the_vcpus_stopped(hosts, tmp_path):
    a, b = hosts
    dom_uuid = define_enabled(a, tmp_path, "ticking", CLOCK, ram=True)
    slirp_before = a.states(dom_uuid)["slirp0"]
    watch = LifecycleEvents([a])
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
    saved_at = clock_saved_at(loaded)
    suspended = watch.first("e2e-a", "ticking", "SUSPENDED", started)
    assert ended - started > 3.0, "the RAM phase should take seconds"
    assert suspended is not None, "libvirt reported no suspend of the source"
    # Saved after the source stopped, not before the RAM copy; Loaded moments later.
    assert saved_at >= suspended - 0.05, (saved_at, suspended)
    assert saved_at - started > 2.5
    assert 0 <= loaded_at_ns / 1e9 - saved_at < 1.0
    assert b.states(dom_uuid)["slirp0"] == slirp_before
    assert not parse_domain(b.virsh("dumpxml", "ticking").stdout.encode()).state
    a.wait_gone(dom_uuid)
    # At 'started begin' the proxy and the helpers had long been up (QEMU takes hundreds of
    # ms to start) and QEMU waited for the stream: the bash hook answered it alone.
    assert b.python_events("ticking") == ["migrate begin", "prepare begin", "start begin"]
    b.virsh("destroy", "ticking")
    a.virsh("undefine", "ticking")


def test_save_and_restore_on_the_same_and_the_other_host_keep_the_state(hosts, tmp_path):
    a, b = hosts
    config = DomainConfig((HelperSpec("counter", "counter"), HelperSpec("slirp0", "slirp")))
    dom_uuid = define_enabled(a, tmp_path, "saved", config)
    a.counter_call(dom_uuid, "counter", "Increment", 17)
    before = a.states(dom_uuid)
    image = tmp_path / "saved.img"
    a.virsh("save", "saved", str(image))
    a.wait_gone(dom_uuid)
    a.virsh("restore", str(image))
    assert a.states(dom_uuid) == before
    assert a.counter_call(dom_uuid, "counter", "Get") == 17
    a.counter_call(dom_uuid, "counter", "Increment", 3)
    before = a.states(dom_uuid)
    a.virsh("save", "saved", str(image))
    a.wait_gone(dom_uuid)
    b.virsh("restore", str(image))
    assert b.states(dom_uuid) == before
    assert b.counter_call(dom_uuid, "counter", "Get") == 20
    b.virsh("destroy", "saved")
    b.wait_gone(dom_uuid)
    a.virsh("undefine", "saved")


def test_helpers_up_before_the_guest_keep_their_state_through_migration_and_restore(hosts, tmp_path):
    """A helper that comes up while QEMU starts ('started begin' waits for it) beside one up
    before QEMU: byte-exact across a live migration, a migration back, and a save/restore."""
    a, b = hosts
    config = DomainConfig((HelperSpec("later", "counter-later"), HelperSpec("counter", "counter"),
                           HelperSpec("slirp0", "slirp")))
    dom_uuid = define_enabled(a, tmp_path, "later", config)
    assert not (a.runtime / dom_uuid / "started.wait").exists()
    a.counter_call(dom_uuid, "later", "Increment", 11)
    a.counter_call(dom_uuid, "counter", "Increment", 4)
    before = a.states(dom_uuid)
    image = tmp_path / "later.img"
    a.virsh("migrate", "--live", "later", b.uri, b.migration_uri)
    assert b.states(dom_uuid) == before
    assert not (b.runtime / dom_uuid / "started.wait").exists()
    b.counter_call(dom_uuid, "later", "Increment", 2)
    before = b.states(dom_uuid)
    b.vmstate("migrate", "later", a.uri, "-c", b.uri, "--migrateuri", a.migration_uri)
    assert a.states(dom_uuid) == before
    assert a.counter_call(dom_uuid, "later", "Get") == 13
    a.virsh("save", "later", str(image))
    a.wait_gone(dom_uuid)
    a.virsh("restore", str(image))
    assert a.states(dom_uuid) == before
    undefine(a, "later", dom_uuid)
    b.wait_gone(dom_uuid)


def test_managedsave_and_start_keep_the_state(hosts, tmp_path):
    a, _ = hosts
    config = DomainConfig((HelperSpec("counter", "counter"),))
    dom_uuid = define_enabled(a, tmp_path, "managed", config)
    a.counter_call(dom_uuid, "counter", "Increment", 5)
    before = a.states(dom_uuid)
    a.virsh("managedsave", "managed")
    a.wait_gone(dom_uuid)
    a.virsh("start", "managed")
    assert a.states(dom_uuid) == before
    undefine(a, "managed", dom_uuid)


def test_restore_of_an_image_without_helper_state_is_refused(hosts, tmp_path):
    a, _ = hosts
    dom_uuid = define_enabled(a, tmp_path, "old", DomainConfig((HelperSpec("counter", "counter"),)))
    a.vmstate("disable", "old", "-c", a.uri)
    image = tmp_path / "old.img"
    a.virsh("save", "old", str(image))
    a.wait_gone(dom_uuid)
    result = a.virsh("restore", str(image), check=False)
    assert result.returncode != 0
    assert "carries no state for helpers counter" in result.stderr
    assert "old" not in a.virsh("list", "--name").stdout
    a.virsh("undefine", "old")


COUNTER = DomainConfig((HelperSpec("counter", "counter"), HelperSpec("slirp0", "slirp")))


def plain_migrate(src: LibvirtHost, dst: LibvirtHost, name: str, *flags: str,
                  port_offset: int = 0) -> subprocess.CompletedProcess:
    uri = f"tcp://127.0.0.1:{dst.migration_port + port_offset}"
    args = ["migrate", "--live", *flags, name, dst.uri]
    if "--tunnelled" not in flags:
        args.append(uri)
    return src.virsh(*args, check=False)


def test_every_virsh_migrate_variant_and_virt_vmstate_migrate_carry_the_state(hosts, tmp_path):
    a, b = hosts
    dom_uuid = define_enabled(a, tmp_path, "hops", COUNTER)
    hops = [(a, b, ["--p2p"]), (b, a, ["--p2p", "--tunnelled"]),
            (a, b, ["--persistent", "--undefinesource"]), (b, a, ["--persistent", "--undefinesource"])]
    for count, (src, dst, flags) in enumerate(hops, start=1):
        src.counter_call(dom_uuid, "counter", "Increment", count)
        before = src.states(dom_uuid)
        result = plain_migrate(src, dst, "hops", *flags)
        assert result.returncode == 0, (flags, result.stderr)
        assert dst.states(dom_uuid) == before, flags
        src.wait_gone(dom_uuid)
    assert a.counter_call(dom_uuid, "counter", "Get") == 10
    before = a.states(dom_uuid)
    result = a.vmstate("migrate", "hops", b.uri, "-c", a.uri, "--migrateuri", b.migration_uri, "--json",
                       check=False)
    assert result.returncode == 0, result.stderr
    assert '"carrier": "stream"' in result.stdout
    assert b.states(dom_uuid) == before
    a.wait_gone(dom_uuid)
    b.virsh("destroy", "hops")
    a.virsh("undefine", "hops", check=False)


def test_hot_added_object_travels_and_disable_takes_it_away_everywhere(hosts, tmp_path):
    a, b = hosts
    dom_uuid = str(uuid.uuid4())
    path = tmp_path / "hot.xml"
    path.write_text(guest_xml("hot", dom_uuid, config_element(COUNTER)))
    a.virsh("create", str(path))  # transient, started without the object
    a.counter_call(dom_uuid, "counter", "Increment", 4)
    enabled = a.vmstate("enable", "hot", "-c", a.uri)
    assert "object added" in enabled.stdout and "inline" in enabled.stdout
    # The e2e hosts run libvirt with its security driver off: said so, as fine.
    assert "confinement (ok): QEMU is not confined" in enabled.stdout, enabled.stdout
    assert processes_of(a, dom_uuid) == ["bus", "helper-0", "helper-1", "proxy"]
    before = a.states(dom_uuid)
    assert plain_migrate(a, b, "hot").returncode == 0
    assert b.states(dom_uuid) == before
    a.wait_gone(dom_uuid)
    # On B the object came in through the XML; back to A the same way.
    assert plain_migrate(b, a, "hot").returncode == 0
    assert a.states(dom_uuid) == before
    b.wait_gone(dom_uuid)
    a.vmstate("disable", "hot", "-c", a.uri)
    assert "proxy" not in processes_of(a, dom_uuid)
    result = plain_migrate(a, b, "hot")
    assert result.returncode != 0 and "carries no state for helpers" in result.stderr
    assert "running" in a.virsh("domstate", "hot").stdout
    assert a.states(dom_uuid) == before
    assert "hot" not in b.domains()
    a.virsh("destroy", "hot")
    a.wait_gone(dom_uuid)


def test_large_state_goes_by_reference_through_the_spool(hosts, tmp_path):
    from hosts import SPOOL
    a, b = hosts
    dom_uuid = define_enabled(a, tmp_path, "large", COUNTER)
    big = os.urandom(3 << 20)
    a.counter_call(dom_uuid, "counter", "SetFail", body=("",), signature="s")  # the knob exists
    from test_migration import feed
    feed(a, dom_uuid, tmp_path, {"counter": ["--random-size", str(3 << 20), "--seed", "11"]})
    before = a.states(dom_uuid)
    assert len(before["counter"]) == len(big)
    assert plain_migrate(a, b, "large").returncode == 0
    assert b.states(dom_uuid) == before
    assert not [p for p in SPOOL.iterdir() if p.name.startswith(dom_uuid)]
    a.wait_gone(dom_uuid)
    b.virsh("destroy", "large")
    a.virsh("undefine", "large")


def assert_failed_cleanly(src: LibvirtHost, dst: LibvirtHost, name: str, dom_uuid: str,
                          result: subprocess.CompletedProcess, before: Optional[Dict[str, bytes]]) -> None:
    assert result.returncode != 0
    assert "running" in src.virsh("domstate", name).stdout
    if before is not None:
        assert src.states(dom_uuid) == before
    assert name not in dst.domains()
    dst.wait_gone(dom_uuid)


@pytest.mark.parametrize("fault", ["save-fails", "save-hangs", "proxy-killed", "bus-dies"])
def test_source_side_faults_fail_the_migration_and_the_source_runs_on(hosts, tmp_path, fault):
    a, b = hosts
    name = f"src-{fault}"
    dom_uuid = define_enabled(a, tmp_path, name, COUNTER)
    a.counter_call(dom_uuid, "counter", "Increment", 9)
    before: Optional[Dict[str, bytes]] = a.states(dom_uuid)
    records = {r: p for r, p in _pids(a, dom_uuid).items()}
    if fault == "save-fails":
        a.counter_call(dom_uuid, "counter", "SetFail", signature="s", body=("save",))
    elif fault == "save-hangs":
        a.counter_call(dom_uuid, "counter", "SetFail", signature="s", body=("hang-save",))
    elif fault == "proxy-killed":
        os.kill(records["proxy"], 9)
    else:
        os.kill(records["bus"], 9)
        before = None
    started = time.monotonic()
    result = plain_migrate(a, b, name)
    assert time.monotonic() - started < 30
    if fault in ("save-fails", "save-hangs"):
        a.counter_call(dom_uuid, "counter", "SetFail", signature="s", body=("",))
    assert_failed_cleanly(a, b, name, dom_uuid, result, before)
    check = a.vmstate("check", name, "-c", a.uri, check=False)
    if fault == "save-fails":
        assert "helper 'counter'" in check.stdout and "cannot save, told to fail" in check.stdout
        assert "QEMU is not confined" in check.stdout  # these hosts run libvirt without a security driver
    elif fault == "save-hangs":
        assert "helper 'counter'" in check.stdout and "did not answer" in check.stdout
    elif fault == "proxy-killed":
        assert "proxy" in check.stdout and "not running" in check.stdout
    else:
        assert "FAIL  bus" in check.stdout, check.stdout
    undefine(a, name, dom_uuid)


def _pids(host: LibvirtHost, dom_uuid: str) -> Dict[str, int]:
    from virt_vmstate.host.configfile import load_config
    from virt_vmstate.host.managed import ManagedProcesses
    from virt_vmstate.host.rundir import RunDir
    return {r.role: r.pid for r in ManagedProcesses(RunDir(str(host.runtime), uuid.UUID(dom_uuid)),
                                                    load_config(str(host.config))).records()}


def test_destination_load_failure_fails_the_migration_and_the_source_runs_on(hosts, tmp_path):
    a, b = hosts
    config = DomainConfig((HelperSpec("counter", "counter"), HelperSpec("fragile", "fragile")))
    dom_uuid = define_enabled(a, tmp_path, "dstfail", config)
    before = a.states(dom_uuid)
    result = a.vmstate("migrate", "dstfail", b.uri, "-c", a.uri, "--migrateuri", b.migration_uri,
                       check=False)
    assert_failed_cleanly(a, b, "dstfail", dom_uuid, result, before)
    assert result.stderr.count("\n") == 1 and "dstfail" in result.stderr
    undefine(a, "dstfail", dom_uuid)


def test_destination_without_the_profile_refuses_before_anything_moves(hosts, tmp_path):
    a, b = hosts
    config = DomainConfig((HelperSpec("counter", "counter"), HelperSpec("extra", "only-here")))
    a.config.write_text(a.config.read_text() + f"""
[profiles.only-here]
command = ["{sys.executable}", "{TEST_HELPER}", "--bus", "{{bus}}", "--id", "{{id}}"]
""")
    dom_uuid = define_enabled(a, tmp_path, "noprof", config)
    before = a.states(dom_uuid)
    result = plain_migrate(a, b, "noprof")
    assert "profile 'only-here'" in result.stderr
    assert_failed_cleanly(a, b, "noprof", dom_uuid, result, before)
    undefine(a, "noprof", dom_uuid)


def test_offline_migration_of_a_shut_off_enabled_domain_passes(hosts, tmp_path):
    a, b = hosts
    dom_uuid = define_enabled(a, tmp_path, "offline", COUNTER, start=False)
    result = a.virsh("migrate", "--offline", "--persistent", "offline", b.uri, check=False)
    assert result.returncode == 0, result.stderr
    assert "offline" in b.domains()
    # Started at once: the start must not be taken for the migration's incoming half.
    b.virsh("start", "offline")
    assert processes_of(b, dom_uuid) == ["bus", "helper-0", "helper-1", "proxy"]
    assert not [role for role, pid in _pids(b, dom_uuid).items()
                if b"--incoming" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                or b"--dbus-incoming" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    b.counter_call(dom_uuid, "counter", "Increment", 2)
    before = b.states(dom_uuid)
    assert plain_migrate(b, a, "offline").returncode == 0  # the proxy Saves: it is not waiting
    assert a.states(dom_uuid) == before
    b.wait_gone(dom_uuid)
    undefine(a, "offline", dom_uuid)
    b.virsh("undefine", "offline")


def test_three_enabled_guests_migrating_at_once_keep_their_own_state(hosts, tmp_path):
    a, b = hosts
    guests = {}
    for i in range(3):
        name = f"trio{i}"
        guests[name] = define_enabled(a, tmp_path, name, COUNTER)
        a.counter_call(guests[name], "counter", "Increment", 10 + i)
    before = {name: a.states(u) for name, u in guests.items()}
    results: Dict[str, subprocess.CompletedProcess] = {}
    threads = [threading.Thread(target=lambda n=name, i=i: results.__setitem__(
        n, plain_migrate(a, b, n, port_offset=10 + i))) for i, name in enumerate(guests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, dom_uuid in guests.items():
        assert results[name].returncode == 0, results[name].stderr
        assert b.states(dom_uuid) == before[name]
        assert b.counter_call(dom_uuid, "counter", "Get") == 10 + int(name[-1])
    for name, dom_uuid in guests.items():
        a.wait_gone(dom_uuid)
        b.virsh("destroy", name)
        a.virsh("undefine", name)
