"""Live migration between two real libvirt daemons with real QEMU guests and helpers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs  # noqa: E402
from hosts import SPOOL, LibvirtHost, busy_ram_commandline, guest_xml  # noqa: E402
from procs import TEST_HELPER, DBusDaemon  # noqa: E402

from virt_vmstate.core.domxml import DomainConfig, HelperSpec, config_element  # noqa: E402

pytestmark = pytest.mark.e2e


def host_config(host_index: int) -> str:
    return f"""
[profiles.slowsave]
command = ["{sys.executable}", "{TEST_HELPER}", "--bus", "{{bus}}", "--id", "{{id}}",
           "--save-delay", "1.5", "--load-delay", "1"]
incoming_args = ["--incoming"]
"""




def destroy(host: LibvirtHost, name: str, dom_uuid: str) -> None:
    host.virsh("destroy", name)
    host.wait_gone(dom_uuid)


def virsh_migrate(src: LibvirtHost, dst: LibvirtHost, name: str) -> subprocess.CompletedProcess:
    return src.virsh("migrate", "--live", name, dst.uri, dst.migration_uri, check=False)


def start_guest(host: LibvirtHost, tmp_path: Path, name: str, config: DomainConfig,
                verb: str = "create") -> str:
    """A new guest with ``config`` in its metadata, started ("create") or only defined."""
    dom_uuid = str(uuid.uuid4())
    xml = tmp_path / f"{name}.xml"
    xml.write_text(guest_xml(name, dom_uuid, config_element(config)))
    host.virsh(verb, str(xml))
    return dom_uuid


def migrate(src: LibvirtHost, dst: LibvirtHost, name: str, *extra: str) -> subprocess.CompletedProcess:
    return src.vmstate("migrate", name, dst.uri, "-c", src.uri, "--migrateuri", dst.migration_uri,
                       *extra, check=False)


def feed(host: LibvirtHost, dom_uuid: str, tmp_path: Path, helpers: Dict[str, List[str]]) -> None:
    """Give helpers of a running guest new state, as an operator would: save elsewhere, load here."""
    bundle = tmp_path / f"feed-{uuid.uuid4()}.vmstate"
    workdir = tmp_path / f"feeder-{uuid.uuid4().hex[:8]}"
    daemon = DBusDaemon(workdir)
    started = []
    try:
        for helper_id, args in helpers.items():
            started.append(procs.test_helper(daemon.address, helper_id, workdir, *args))
        host.vmstate("save", "--bus", daemon.address, "-o", str(bundle))
    finally:
        for helper in started:
            helper.stop()
        daemon.stop()
    host.vmstate("load", "--bus", host.bus_address(dom_uuid), "-i", str(bundle))


def spool_files() -> List[str]:
    return sorted(p.name for p in SPOOL.iterdir())


THREE = DomainConfig((HelperSpec("big", "counter"), HelperSpec("empty", "counter"),
                      HelperSpec("slirp0", "slirp")))


def test_live_migration_there_and_back_keeps_every_helper_state(hosts, tmp_path):
    a, b = hosts
    dom_uuid = start_guest(a, tmp_path, "three", THREE)
    feed(a, dom_uuid, tmp_path, {"big": ["--random-size", str(1 << 20)]})
    last = a.states(dom_uuid)
    assert len(last["big"]) == 1 << 20 and last["empty"] == b"" and len(last["slirp0"]) > 0

    for src, dst in ((a, b), (b, a)):
        result = migrate(src, dst, "three", "--json")
        assert result.returncode == 0, result.stderr
        assert "running" in dst.virsh("domstate", "three").stdout
        assert dst.states(dom_uuid) == last
        src.wait_gone(dom_uuid)
        assert "three" not in src.domains()
        last = dst.states(dom_uuid)
    destroy(a, "three", dom_uuid)


def test_plain_virsh_migrate_without_state_is_refused(hosts, tmp_path):
    a, b = hosts
    dom_uuid = start_guest(a, tmp_path, "plain", DomainConfig((HelperSpec("counter", "counter"),)))
    before = a.states(dom_uuid)
    result = virsh_migrate(a, b, "plain")
    assert result.returncode != 0
    assert "virt-vmstate" in result.stderr and "carries no state" in result.stderr
    assert "virt-vmstate migrate plain" in result.stderr
    assert "running" in a.virsh("domstate", "plain").stdout
    assert a.states(dom_uuid) == before
    assert "plain" not in b.domains()
    destroy(a, "plain", dom_uuid)


def test_staged_state_travels_with_plain_virsh_migrate(hosts, tmp_path):
    a, b = hosts
    dom_uuid = start_guest(a, tmp_path, "staged", DomainConfig((HelperSpec("slirp0", "slirp"),)))
    before = a.states(dom_uuid)
    a.vmstate("save", "--domain", "staged", "-c", a.uri, "--stage")
    result = virsh_migrate(a, b, "staged")
    assert result.returncode == 0, result.stderr
    assert b.states(dom_uuid) == before
    assert "vmstate-state" not in b.virsh("dumpxml", "staged").stdout
    a.wait_gone(dom_uuid)
    destroy(b, "staged", dom_uuid)


def test_destination_missing_the_profile_aborts_and_source_keeps_running(hosts, tmp_path):
    a, b = hosts
    config = DomainConfig((HelperSpec("counter", "counter"), HelperSpec("extra", "only-on-a")))
    a.config.write_text(a.config.read_text() + f"""
[profiles.only-on-a]
command = ["{sys.executable}", "{Path(__file__).parents[1] / 'helpers' / 'vmstate_helper.py'}",
           "--bus", "{{bus}}", "--id", "{{id}}", "--state-hex", "0102"]
""")
    dom_uuid = start_guest(a, tmp_path, "noprofile", config)
    before = a.states(dom_uuid)
    result = migrate(a, b, "noprofile")
    assert result.returncode == 1
    assert "profile 'only-on-a'" in result.stderr and "does not define" in result.stderr
    assert "running" in a.virsh("domstate", "noprofile").stdout
    assert a.states(dom_uuid) == before
    destroy(a, "noprofile", dom_uuid)


def test_unreachable_destination_is_refused_and_the_guest_paused_for_save_runs_on(hosts, tmp_path):
    # The Save runs while the destination's connection opens: the failure to open it
    # is the one told, and the guest paused for the Save is resumed.
    a, _ = hosts
    config = DomainConfig((HelperSpec("counter", "counter"), HelperSpec("slow", "slowsave")))
    dom_uuid = start_guest(a, tmp_path, "nodest", config)
    before = a.states(dom_uuid)
    nowhere = f"qemu+unix:///system?socket={tmp_path}/no-such-libvirt-sock"
    result = a.vmstate("migrate", "nodest", nowhere, "-c", a.uri, "--consistent", check=False)
    assert result.returncode == 1, result.stderr
    assert f"cannot connect to libvirt at {nowhere}" in result.stderr
    assert "running" in a.virsh("domstate", "nodest").stdout
    assert a.states(dom_uuid) == before
    destroy(a, "nodest", dom_uuid)


def test_a_helper_failing_its_save_refuses_the_migration_by_name(hosts, tmp_path):
    a, b = hosts
    a.config.write_text(a.config.read_text() + f"""
[profiles.nosave]
command = ["{sys.executable}", "{TEST_HELPER}", "--bus", "{{bus}}", "--id", "{{id}}", "--fail", "save"]
""")
    config = DomainConfig((HelperSpec("counter", "counter"), HelperSpec("stubborn", "nosave")))
    dom_uuid = start_guest(a, tmp_path, "nosave", config)
    result = migrate(a, b, "nosave")
    assert result.returncode == 1, result.stderr
    assert "stubborn" in result.stderr and "told to fail" in result.stderr
    assert "running" in a.virsh("domstate", "nosave").stdout
    assert "nosave" not in b.domains()
    destroy(a, "nosave", dom_uuid)


def test_consistent_migration_resumes_after_load(hosts, tmp_path):
    a, b = hosts
    dom_uuid = start_guest(a, tmp_path, "consistent", DomainConfig((HelperSpec("counter", "counter"),)))
    before = a.states(dom_uuid)
    result = migrate(a, b, "consistent", "--consistent")
    assert result.returncode == 0, result.stderr
    assert "running" in b.virsh("domstate", "consistent").stdout
    assert b.states(dom_uuid) == before
    a.wait_gone(dom_uuid)
    destroy(b, "consistent", dom_uuid)


def test_destination_load_failure_aborts_and_source_keeps_running(hosts, tmp_path):
    a, b = hosts
    config = DomainConfig((HelperSpec("counter", "counter"), HelperSpec("fragile", "fragile")))
    dom_uuid = start_guest(a, tmp_path, "fragile", config)
    feed(a, dom_uuid, tmp_path, {"fragile": ["--random-size", "4096"]})
    before = a.states(dom_uuid)
    result = migrate(a, b, "fragile")
    assert result.returncode == 1
    assert "fragile" in result.stderr and "cannot load, told to fail" in result.stderr
    assert "running" in a.virsh("domstate", "fragile").stdout
    assert a.states(dom_uuid) == before
    assert "fragile" not in b.domains()
    b.wait_gone(dom_uuid)  # the destination stopped the helpers and bus it had started
    destroy(a, "fragile", dom_uuid)


def test_consistent_pauses_for_save_and_resumes_only_after_load(hosts, tmp_path):
    a, b = hosts
    dom_uuid = start_guest(a, tmp_path, "steady", DomainConfig((HelperSpec("slow", "slowsave"),)))
    before = a.states(dom_uuid)
    samples: List[Tuple[str, str, bool]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            src = a.virsh("domstate", "steady", check=False).stdout.strip()
            dst = b.virsh("domstate", "steady", check=False).stdout.strip()
            samples.append((src, dst, dst == "running" and loaded(b, dom_uuid, "slow")))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = migrate(a, b, "steady", "--consistent")
    finally:
        done.set()
        watcher.join()
    assert result.returncode == 0, result.stderr
    assert any(src == "paused" for src, _, _ in samples), samples
    assert all(ok for _, dst, ok in samples if dst == "running"), samples
    assert "running" in b.virsh("domstate", "steady").stdout
    assert b.states(dom_uuid) == before
    a.wait_gone(dom_uuid)
    destroy(b, "steady", dom_uuid)


def loaded(host: LibvirtHost, dom_uuid: str, helper_id: str) -> bool:
    return bool(host.counter_call(dom_uuid, helper_id, "Loaded"))


def test_three_guests_migrating_at_once_keep_their_own_state(hosts, tmp_path, fault_table):
    a, b = hosts
    guests = {}
    for n, name in enumerate(("twin1", "twin2", "twin3")):
        dom_uuid = start_guest(a, tmp_path, name, DomainConfig((HelperSpec("counter", "counter"),
                                                                HelperSpec("slirp0", "slirp"))))
        feed(a, dom_uuid, tmp_path, {"counter": ["--random-size", "65536", "--seed", str(n + 1)]})
        guests[name] = (dom_uuid, a.states(dom_uuid))
    assert len({g[1]["counter"] for g in guests.values()}) == 3
    started = time.monotonic()
    # Each incoming migration listens on a port of its own.
    runs = {name: subprocess.Popen([*a.vmstate_argv(), "migrate", name, b.uri, "-c", a.uri,
                                    "--migrateuri", f"tcp://127.0.0.1:{b.migration_port + 10 + n}"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for n, name in enumerate(guests)}
    for name, run in runs.items():
        _, err = run.communicate(timeout=180)
        assert run.returncode == 0, f"{name}: {err}"
    seconds = time.monotonic() - started
    for name, (dom_uuid, before) in guests.items():
        assert b.states(dom_uuid) == before, name
        a.wait_gone(dom_uuid)
        destroy(b, name, dom_uuid)
    fault_table("3 live migrations at once", "each guest keeps its own state",
                "3/3 migrated byte-exact, sources cleaned", seconds, "none")


BIG = DomainConfig((HelperSpec("big1", "counter"), HelperSpec("big2", "counter"),
                    HelperSpec("big3", "counter")))


def test_large_state_goes_through_the_spool_there_and_back(hosts, tmp_path):
    a, b = hosts
    dom_uuid = start_guest(a, tmp_path, "large", BIG)
    MiB = 1 << 20
    feed(a, dom_uuid, tmp_path, {"big1": ["--random-size", str(8 * MiB), "--seed", "1"],
                                 "big2": ["--random-size", str(8 * MiB), "--seed", "2"],
                                 "big3": ["--random-size", str(16 * MiB), "--seed", "3"]})
    last = a.states(dom_uuid)
    assert sorted(len(v) for v in last.values()) == [8 * MiB, 8 * MiB, 16 * MiB]
    for src, dst in ((a, b), (b, a)):
        result = migrate(src, dst, "large", "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["carrier"] == "spool" and report["state_bytes"] == 32 * MiB
        assert dst.states(dom_uuid) == last
        assert spool_files() == []
        src.wait_gone(dom_uuid)
    destroy(a, "large", dom_uuid)


def test_compressible_state_of_three_mib_goes_in_the_xml(hosts, tmp_path):
    a, b = hosts
    dom_uuid = start_guest(a, tmp_path, "table", DomainConfig((HelperSpec("conntrack", "counter"),)))
    feed(a, dom_uuid, tmp_path, {"conntrack": ["--text-size", str(3 << 20)]})
    before = a.states(dom_uuid)
    result = migrate(a, b, "table", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["carrier"], report["codec"]) == ("xml", "zlib")
    assert report["bundle_bytes"] < (3 << 20) // 2
    assert b.states(dom_uuid) == before
    a.wait_gone(dom_uuid)
    destroy(b, "table", dom_uuid)


def test_state_too_big_for_the_xml_carrier_is_refused_before_anything_moves(hosts, tmp_path):
    a, b = hosts
    dom_uuid = start_guest(a, tmp_path, "toobig", DomainConfig((HelperSpec("huge", "counter"),)))
    feed(a, dom_uuid, tmp_path, {"huge": ["--random-size", str(5 << 20)]})
    before = a.states(dom_uuid)
    result = migrate(a, b, "toobig", "--carrier", "xml")
    assert result.returncode == 1
    assert "huge 5242880 B" in result.stderr and "nothing was migrated" in result.stderr
    assert "running" in a.virsh("domstate", "toobig").stdout and "toobig" not in b.domains()
    assert a.states(dom_uuid) == before
    assert spool_files() == []
    destroy(a, "toobig", dom_uuid)


@pytest.mark.parametrize("damage", ["missing", "truncated", "replaced", "directory"])
def test_damaged_spool_file_refuses_the_migration(hosts, tmp_path, damage):
    a, b = hosts
    name = f"spool-{damage}"
    dom_uuid = start_guest(a, tmp_path, name, DomainConfig((HelperSpec("counter", "counter"),)))
    feed(a, dom_uuid, tmp_path, {"counter": ["--random-size", "100000"]})
    before = a.states(dom_uuid)
    a.vmstate("save", "--domain", name, "-c", a.uri, "--stage", "--carrier", "spool")
    [spooled] = spool_files()
    path = SPOOL / spooled
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "replaced":
        path.write_bytes(os.urandom(path.stat().st_size))
    else:
        path.unlink()
        path.mkdir()
    result = virsh_migrate(a, b, name)
    assert result.returncode != 0
    expected = {"missing": "does not exist on this host", "truncated": "cut short or replaced",
                "replaced": "does not match the SHA-256", "directory": "not a regular file"}[damage]
    assert expected in result.stderr
    assert "running" in a.virsh("domstate", name).stdout and name not in b.domains()
    assert a.states(dom_uuid) == before
    if path.is_dir():
        path.rmdir()
    a.vmstate("save", "--domain", name, "-c", a.uri, "--unstage")
    assert spool_files() == []
    destroy(a, name, dom_uuid)


def test_check_reports_ready_and_what_the_destination_lacks(hosts, tmp_path):
    a, b = hosts
    dest_command = " ".join(b.vmstate_argv())
    dom_uuid = start_guest(a, tmp_path, "checked", THREE)
    result = a.vmstate("check", "checked", "-c", a.uri, "--dest", b.uri, "--dest-command",
                       dest_command, "--json", check=False)
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["ok"], result.stdout
    names = {c["check"]: c["ok"] for c in report["checks"]}
    assert names["destination profile counter"] and names["destination profile slirp"]
    assert names["destination spool"] and report["carrier"] == "xml"
    assert spool_files() == []
    destroy(a, "checked", dom_uuid)

    config = DomainConfig((HelperSpec("counter", "counter"), HelperSpec("x", "fragile-only-here")))
    a.config.write_text(a.config.read_text() + f"""
[profiles.fragile-only-here]
command = ["{sys.executable}", "{TEST_HELPER}", "--bus", "{{bus}}", "--id", "{{id}}"]
""")
    dom_uuid = start_guest(a, tmp_path, "unready", config)
    result = a.vmstate("check", "unready", "-c", a.uri, "--dest", b.uri, "--dest-command",
                       dest_command, check=False)
    assert result.returncode == 1
    assert "FAIL  destination profile fragile-only-here" in result.stdout
    assert "NOT ready to migrate" in result.stdout
    destroy(a, "unready", dom_uuid)


def test_a_refused_migration_leaves_no_state_for_a_later_start(hosts, tmp_path):
    a, b = hosts
    dom_uuid = start_guest(a, tmp_path, "twin", DomainConfig((HelperSpec("counter", "counter"),)))
    a.counter_call(dom_uuid, "counter", "Increment", 7)
    # B defines another domain of that name: libvirt refuses after B's 'migrate begin' kept the state.
    other = tmp_path / "twin-other.xml"
    other.write_text(guest_xml("twin", str(uuid.uuid4()), ""))
    b.virsh("define", str(other))
    result = migrate(a, b, "twin")
    assert result.returncode != 0 and "already exists" in result.stderr
    assert "running" in a.virsh("domstate", "twin").stdout
    b.virsh("undefine", "twin")
    # An HA restart of the same domain on B: its helpers start fresh, never with that state.
    b.virsh("create", str(tmp_path / "twin.xml"))
    assert b.counter_call(dom_uuid, "counter", "Get") == 0
    assert not (b.runtime / dom_uuid / "incoming.vmstate").exists()
    destroy(b, "twin", dom_uuid)
    destroy(a, "twin", dom_uuid)


def test_ctrl_c_during_migrate_aborts_it_and_the_source_runs_on(hosts, tmp_path):
    import signal
    a, b = hosts
    dom_uuid = str(uuid.uuid4())
    config = DomainConfig((HelperSpec("counter", "counter"),))
    path = tmp_path / "ctrlc.xml"
    path.write_text(guest_xml("ctrlc", dom_uuid, config_element(config)).replace(
        "</domain>", busy_ram_commandline() + "</domain>"))
    a.virsh("create", str(path))
    a.counter_call(dom_uuid, "counter", "Increment", 3)
    before = a.states(dom_uuid)
    proc = subprocess.Popen([*a.vmstate_argv(), "migrate", "ctrlc", b.uri, "-c", a.uri, "--migrateuri",
                             b.migration_uri, "--bandwidth", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until guest memory is moving (40 MiB at 2 MiB/s)
        job = a.virsh("domjobinfo", "ctrlc", check=False).stdout
        moved = re.search(r"Data processed:\s+([\d.]+) (\w+)", job)
        if "Outgoing migration" in job and moved and float(moved.group(1)) > 0:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "aborted on Ctrl-C" in err and "keep running" in err
    assert "running" in a.virsh("domstate", "ctrlc").stdout
    assert a.states(dom_uuid) == before
    assert "ctrlc" not in b.domains()
    b.wait_gone(dom_uuid)
    destroy(a, "ctrlc", dom_uuid)


def define_guest(host: LibvirtHost, tmp_path: Path, name: str, config: DomainConfig) -> str:
    return start_guest(host, tmp_path, name, config, verb="define")


def test_a_start_right_after_an_offline_migration_runs_with_fresh_helpers(hosts, tmp_path):
    a, b = hosts
    define_guest(a, tmp_path, "offline", DomainConfig((HelperSpec("counter", "counter"),)))
    try:
        moved = a.virsh("migrate", "--offline", "--persistent", "offline", b.uri, check=False)
        assert moved.returncode == 0, moved.stderr
        started = b.virsh("start", "offline", check=False)  # within moments of the migration
        assert started.returncode == 0, started.stderr
        dom_uuid = b.virsh("domuuid", "offline").stdout.strip()
        assert b.states(dom_uuid) == {"counter": b""}  # a fresh helper, not one waiting for Load
        destroy(b, "offline", dom_uuid)
    finally:
        for host in (a, b):
            host.virsh("destroy", "offline", check=False)
            host.virsh("undefine", "offline", check=False)


def test_a_start_after_a_stop_that_ran_no_hook_begins_from_a_clean_runtime_dir(hosts, tmp_path):
    a, _ = hosts
    dom_uuid = define_guest(a, tmp_path, "unhooked", DomainConfig((HelperSpec("slirp0", "slirp"),)))
    hook = a.dir / "etc/libvirt/hooks/qemu"
    real = hook.with_name("qemu.real")  # libvirt runs only 'qemu' and qemu.d/*
    try:
        a.virsh("start", "unhooked")
        assert a.states(dom_uuid)["slirp0"]
        socket = a.runtime / dom_uuid / "slirp0.sock"
        assert socket.exists()
        hook.rename(real)
        hook.write_text(f'#!/bin/bash\ncase $2 in stopped|release) exit 0 ;; esac\nexec {real} "$@"\n')
        hook.chmod(0o755)
        a.virsh("destroy", "unhooked")
        assert socket.exists()  # the stop ran no hook: the runtime dir and processes stay
        real.replace(hook)
        started = a.virsh("start", "unhooked", check=False)
        assert started.returncode == 0, started.stderr
        assert a.states(dom_uuid)["slirp0"]
        destroy(a, "unhooked", dom_uuid)
    finally:
        if real.exists():
            real.replace(hook)
        a.virsh("destroy", "unhooked", check=False)
        a.virsh("undefine", "unhooked", check=False)


def test_the_hosts_find_a_domain_whose_name_has_a_space(hosts, tmp_path):
    a, _ = hosts
    dom_uuid = start_guest(a, tmp_path, "two words", DomainConfig())
    try:
        assert "two words" in a.domains()
    finally:
        destroy(a, "two words", dom_uuid)
