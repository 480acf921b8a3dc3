"""The hook invoked as libvirt invokes it: argv plus the domain XML on stdin."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
from procs import TEST_HELPER, helper_profiles_toml, ids_on_bus, stop_pid, write_hook_script

from virt_vmstate.bus.transfer import capture
from virt_vmstate.bus.vmstate1 import HelperBus
from virt_vmstate.core import bundle as B
from virt_vmstate.core import domxml
from virt_vmstate.core.domxml import DomainConfig, HelperSpec, StateElement
from virt_vmstate.core.layout import ASIDE_PREFIX
from virt_vmstate.host.configfile import load_config
from virt_vmstate.host.managed import ManagedProcesses, is_running
from virt_vmstate.host.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
DESTINATION = ("migrate begin", "prepare begin", "start begin", "started begin")


def domain_xml(name: str, dom_uuid: uuid.UUID, config: Optional[DomainConfig]) -> bytes:
    meta = f"<metadata>\n{domxml.config_element(config)}\n</metadata>" if config else ""
    return (f"<domain type='qemu'>\n  <name>{name}</name>\n  <uuid>{dom_uuid}</uuid>\n  {meta}\n"
            f"  <memory unit='KiB'>65536</memory>\n</domain>\n").encode()


@pytest.fixture(autouse=True, params=["python", "bash"])
def hook_path(request, workdir):
    """Every test twice: 'virt-vmstate hook' run directly, and the bash hook libvirt runs
    (which answers some events without Python)."""
    Host.bash = request.param == "bash"
    Host.workdir = workdir
    yield request.param
    Host.bash = False


class Host:
    """A destination host: its config file and runtime dir; with ``bash``, the hook is the
    bash hook."""

    made: List["Host"] = []
    bash = False
    workdir = Path("/nonexistent")

    def __init__(self, workdir: Path, extra: str = "", call: float = 5, helper_start: float = 5,
                 hook: float = 20) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        Host.made.append(self)
        self.runtime = workdir / "run"
        self.config = workdir / "config.toml"
        py, helper = sys.executable, TEST_HELPER
        self.config.write_text(f"""
[paths]
runtime_dir = "{self.runtime}"
[timeouts]
call = {call}
helper_start = {helper_start}
hook = {hook}
[logging]
syslog = false
{helper_profiles_toml(py)}
[profiles.load-hangs]
command = ["{py}", "{helper}", "--bus", "{{bus}}", "--id", "{{id}}", "--hang-in", "load"]
[profiles.load-fails]
command = ["{py}", "{helper}", "--bus", "{{bus}}", "--id", "{{id}}", "--fail", "load"]
[profiles.counter-later]
command = ["{py}", "{helper}", "--bus", "{{bus}}", "--id", "{{id}}"]
incoming_args = ["--incoming"]
up_before = "guest"
[profiles.exits-later]
command = ["/bin/false"]
up_before = "guest"
{extra}
""")
        if Host.bash:
            # Written here, not by the first hook: hooks run from several threads at once.
            self.script = hook_script(Host.workdir)

    def hook(self, name: str, event: str, xml: bytes, timeout: float = 60) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ["PATH"], "LC_ALL": "C", "PYTHONPATH": str(ROOT / "plugin"),
               "VIRT_VMSTATE_CONFIG": str(self.config)}
        op, subop = event.split()
        argv = [sys.executable, "-m", "virt_vmstate", "hook"]
        if Host.bash:
            argv = [str(self.script)]
        return subprocess.run([*argv, name, op, subop, "-"],
                              input=xml, capture_output=True, env=env, timeout=timeout)

    def rundir(self, dom_uuid: uuid.UUID) -> RunDir:
        return RunDir(str(self.runtime), dom_uuid)

    def processes(self, dom_uuid: uuid.UUID) -> List:
        return ManagedProcesses(self.rundir(dom_uuid), load_config(str(self.config))).records()


def stop_hosts() -> None:
    """Stop, by PID, whatever the hooks of every Host started: also what a stop set aside
    (a failed start's cleanup stops it in a process of its own, which may not be done)."""
    for host in Host.made:
        if not host.config.exists():
            continue
        config = load_config(str(host.config))
        for rundir in [*host.runtime.glob("*-*-*-*-*"), *host.runtime.glob(f"{ASIDE_PREFIX}*/*-*-*-*-*")]:
            ManagedProcesses(RunDir(str(rundir.parent), uuid.UUID(rundir.name)), config).stop_all()
    Host.made.clear()


@pytest.fixture(autouse=True)
def stop_managed_processes(workdir):
    """Even when the test failed, and before its workdir goes."""
    yield
    stop_hosts()


def sealed_state(address: str, dom_uuid: uuid.UUID, created_ms: Optional[int] = None) -> bytes:
    with HelperBus.open(address) as bus:
        b = capture(bus, domain_uuid=str(dom_uuid))
    if created_ms is not None:
        b = B.new_bundle(b.states, created_ms=created_ms, migration_id=b.migration_id, domain_uuid=str(dom_uuid))
    return b.encode()


def with_state(xml: bytes, raw: bytes) -> bytes:
    import hashlib
    return domxml.insert_state(xml, StateElement("xml", len(raw), hashlib.sha256(raw).hexdigest(), raw))


def states_on(address: str) -> Dict[str, bytes]:
    with HelperBus.open(address) as bus:
        return bus.save(bus.helpers())


def assert_nothing_left(host: Host, dom_uuid: uuid.UUID, records: List) -> None:
    assert not host.rundir(dom_uuid).exists()
    assert not os.path.exists(host.rundir(dom_uuid).lock_path)
    deadline = time.monotonic() + 5
    while any(is_running(r) for r in records) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [r for r in records if is_running(r)]


CONFIG = DomainConfig((HelperSpec("counter", "counter"), HelperSpec("slirp0", "slirp")))


def test_destination_sequence_loads_every_helper_then_cleans_up(buses, helpers, workdir):
    src = buses("src")
    helpers(src.address, "counter", "--random-size", "300000", "--seed", "5")
    helpers(src.address, "slirp0", slirp=True)
    dom_uuid = uuid.uuid4()
    before = states_on(src.address)
    xml = with_state(domain_xml("vm1", dom_uuid, CONFIG), sealed_state(src.address, dom_uuid))

    host = Host(workdir / "dst")
    result = host.hook("vm1", "migrate begin", xml)
    assert result.returncode == 0, result.stderr
    stripped = result.stdout
    parsed = domxml.parse_domain(stripped)
    assert parsed.state is None and parsed.incoming is not None
    # Every other byte is libvirt's: only the state left and the incoming token came in.
    without_token = domxml.splice(stripped, [(*parsed.incoming.span, b"")])
    assert without_token == domxml.strip_state(xml, domxml.parse_domain(xml))
    for event in DESTINATION[1:]:
        result = host.hook("vm1", event, stripped)
        assert result.returncode == 0, (event, result.stderr)
        assert result.stdout == b""
    address = f"unix:path={Path(host.rundir(dom_uuid).path, 'bus.sock')}"
    assert states_on(address) == before
    assert not host.rundir(dom_uuid).has("incoming.vmstate")

    records = host.processes(dom_uuid)
    assert sorted(r.role for r in records) == ["bus", "helper-0", "helper-1"]
    assert all(is_running(r) for r in records)
    for event in ("stopped end", "release end"):
        assert host.hook("vm1", event, stripped).returncode == 0
    assert_nothing_left(host, dom_uuid, records)


def test_plain_start_starts_helpers_fresh(workdir):
    host = Host(workdir / "h")
    dom_uuid = uuid.uuid4()
    xml = domain_xml("fresh", dom_uuid, DomainConfig((HelperSpec("counter", "counter"),)))
    for event in DESTINATION[1:]:
        result = host.hook("fresh", event, xml)
        assert result.returncode == 0, result.stderr
    address = f"unix:path={Path(host.rundir(dom_uuid).path, 'bus.sock')}"
    assert states_on(address) == {"counter": b""}
    records = host.processes(dom_uuid)
    host.hook("fresh", "stopped end", xml)
    assert_nothing_left(host, dom_uuid, records)


def test_domain_without_metadata_is_left_alone(workdir):
    host = Host(workdir / "h")
    xml = domain_xml("other", uuid.uuid4(), None)
    for event in DESTINATION + ("stopped end", "release end", "reconnect begin", "restore begin"):
        result = host.hook("other", event, xml)
        assert (result.returncode, result.stdout, result.stderr) == (0, b"", b""), event
    assert not host.runtime.exists()


def test_hook_script_passes_ours_and_drops_others(workdir):
    script = hook_script(workdir)
    host = Host(workdir / "h")
    env = {"PATH": os.environ["PATH"], "VIRT_VMSTATE_CONFIG": str(host.config)}
    other = subprocess.run([str(script), "x", "migrate", "begin", "-"], env=env, capture_output=True,
                           input=domain_xml("x", uuid.uuid4(), None))
    assert (other.returncode, other.stdout, other.stderr) == (0, b"", b"")
    ours = subprocess.run([str(script), "y", "restore", "begin", "-"], env=env, capture_output=True,
                          input=domain_xml("y", uuid.uuid4(), CONFIG))
    assert ours.returncode == 1 and b"carries no state" in ours.stderr


def refuse(host: Host, name: str, xml: bytes, events=DESTINATION) -> str:
    """Run the destination sequence until a hook fails; return its stderr."""
    for event in events:
        started = time.monotonic()
        result = host.hook(name, event, xml if event == "migrate begin" else stripped_or(xml))
        if result.returncode != 0:
            assert time.monotonic() - started < 30
            assert result.stdout == b""
            lines = result.stderr.decode().strip().splitlines()
            assert len(lines) == 1, result.stderr
            assert f"domain {name}" in lines[0]
            return lines[0]
        if event == "migrate begin" and result.stdout:
            xml = result.stdout
    raise AssertionError("every hook succeeded")


def stripped_or(xml: bytes) -> bytes:
    return domxml.strip_state(xml, domxml.parse_domain(xml))


def test_missing_state_is_refused_with_how_to_migrate(workdir):
    host = Host(workdir / "h")
    line = refuse(host, "vm", domain_xml("vm", uuid.uuid4(), CONFIG))
    assert "carries no state for helpers counter, slirp0" in line
    assert "virt-vmstate migrate vm" in line and "--stage" in line


def test_missing_state_with_fresh_policy_goes_on(workdir):
    host = Host(workdir / "h")
    config = DomainConfig((HelperSpec("counter", "counter"),), missing_state="fresh")
    result = host.hook("vm", "migrate begin", domain_xml("vm", uuid.uuid4(), config))
    assert (result.returncode, result.stdout) == (0, b"")


@pytest.mark.parametrize("damage,expect", [
    ("truncated", "cut short"),
    ("replayed", "older than the allowed"),
    ("future", "in the future"),
    ("other-domain", "not to domain"),
    ("sha-mismatch", "does not match the sha256"),
    ("bad-base64", "not valid base64"),
])
def test_bad_bundles_are_refused(buses, helpers, workdir, damage, expect):
    src = buses("src")
    helpers(src.address, "counter", "--state-hex", "0102")
    helpers(src.address, "slirp0", "--state-hex", "0304")
    dom_uuid = uuid.uuid4()
    now = int(time.time() * 1000)
    raw = sealed_state(src.address, uuid.uuid4() if damage == "other-domain" else dom_uuid,
                       created_ms={"replayed": now - 3_600_000, "future": now + 3_600_000}.get(damage))
    if damage == "truncated":
        raw = raw[:-10]
    xml = with_state(domain_xml("vm", dom_uuid, CONFIG), raw)
    if damage == "sha-mismatch":
        xml = xml.replace(domxml.parse_domain(xml).state.sha256.encode(), b"0" * 64)
    if damage == "bad-base64":
        xml = xml.replace(b"</vmstate-state:state>", b"*</vmstate-state:state>")
    host = Host(workdir / "h")
    line = refuse(host, "vm", xml)
    assert expect in line
    assert not host.runtime.exists() or not host.rundir(dom_uuid).exists()


def test_profile_missing_on_this_host_is_refused(workdir):
    host = Host(workdir / "h")
    config = DomainConfig((HelperSpec("x", "not-here"),), missing_state="fresh")
    line = refuse(host, "vm", domain_xml("vm", uuid.uuid4(), config))
    assert "profile 'not-here'" in line and "does not define" in line


def test_xml_cannot_carry_a_command(workdir):
    host = Host(workdir / "h")
    xml = domain_xml("vm", uuid.uuid4(), CONFIG).replace(
        b'profile="counter"', b'profile="counter" command="/bin/sh -c reboot"')
    line = refuse(host, "vm", xml)
    assert "unknown attribute 'command'" in line and "only name" in line


def _failing_finish(buses, helpers, workdir, profile: str, **host_args) -> tuple:
    src = buses("src")
    helpers(src.address, "h", "--state-hex", "abcd")
    dom_uuid = uuid.uuid4()
    config = DomainConfig((HelperSpec("h", profile),))
    xml = with_state(domain_xml("vm", dom_uuid, config), sealed_state(src.address, dom_uuid))
    host = Host(workdir / "h", **host_args)
    records: List = []

    def snapshot():
        records[:] = host.processes(dom_uuid)
    original = host.hook

    def hook(name, event, data, timeout=60):
        if event == "started begin":
            snapshot()
        return original(name, event, data, timeout)
    host.hook = hook  # type: ignore[assignment]
    started = time.monotonic()
    line = refuse(host, "vm", xml)
    elapsed = time.monotonic() - started
    assert records, "helpers were started before the finish phase"
    assert_nothing_left(host, dom_uuid, records)
    return line, elapsed


def test_load_that_errors_aborts_and_cleans_up(buses, helpers, workdir):
    line, _ = _failing_finish(buses, helpers, workdir, "load-fails")
    assert "started begin" in line and "helper 'h'" in line and "LoadFailed" in line


def test_load_that_hangs_times_out(buses, helpers, workdir):
    line, elapsed = _failing_finish(buses, helpers, workdir, "load-hangs", call=1)
    assert "helper 'h'" in line and "Load did not answer within 1 s" in line


def test_hook_deadline_bounds_everything(buses, helpers, workdir):
    line, elapsed = _failing_finish(buses, helpers, workdir, "load-hangs", call=60, hook=2)
    assert "ran past its deadline" in line


def test_required_helper_that_never_appears(buses, helpers, workdir):
    src = buses("src")
    helpers(src.address, "ghost", "--state-hex", "01")
    dom_uuid = uuid.uuid4()
    config = DomainConfig((HelperSpec("ghost"),))  # no profile: nobody starts it
    xml = with_state(domain_xml("vm", dom_uuid, config), sealed_state(src.address, dom_uuid))
    host = Host(workdir / "h", helper_start=1)
    line = refuse(host, "vm", xml)
    assert "ghost did not appear" in line
    assert not host.rundir(dom_uuid).exists()


def test_two_domains_at_once_keep_their_own_state(buses, helpers, workdir):
    host = Host(workdir / "dst")
    jobs = []
    for n in range(2):
        src = buses(f"src{n}")
        helpers(src.address, "counter", "--random-size", "5000", "--seed", str(n))
        dom_uuid = uuid.uuid4()
        config = DomainConfig((HelperSpec("counter", "counter"),))
        xml = with_state(domain_xml(f"vm{n}", dom_uuid, config), sealed_state(src.address, dom_uuid))
        jobs.append((f"vm{n}", dom_uuid, xml, states_on(src.address)))
    failures: List[str] = []

    def run(name, dom_uuid, xml, expected):
        for event in DESTINATION:
            result = host.hook(name, event, xml)
            if result.returncode:
                failures.append(result.stderr.decode())
                return
            if result.stdout:
                xml = result.stdout
    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    for name, dom_uuid, xml, expected in jobs:
        assert states_on(f"unix:path={Path(host.rundir(dom_uuid).path, 'bus.sock')}") == expected
        records = host.processes(dom_uuid)
        host.hook(name, "stopped end", stripped_or(xml))
        assert_nothing_left(host, dom_uuid, records)


def test_hooks_for_one_domain_serialize(workdir):
    host = Host(workdir / "h", hook=1)
    dom_uuid = uuid.uuid4()
    xml = domain_xml("vm", dom_uuid, DomainConfig((HelperSpec("counter", "counter"),)))
    with RunDir(str(host.runtime), dom_uuid).lock(5):
        result = host.hook("vm", "prepare begin", xml)
    assert result.returncode == 1 and b"held the lock" in result.stderr
    assert not (host.runtime / str(dom_uuid) / "bus.pid").exists()
    assert host.hook("vm", "prepare begin", xml).returncode == 0
    records = host.processes(dom_uuid)
    host.hook("vm", "release end", xml)
    assert_nothing_left(host, dom_uuid, records)


def test_domain_names_with_a_space_or_accent_start_unless_a_profile_puts_them_in_argv(workdir):
    host = Host(workdir / "h", extra=f"""
[profiles.named]
command = ["{sys.executable}", "{TEST_HELPER}", "--bus", "{{bus}}", "--id", "{{id}}-{{name}}"]
""")
    for name, profile, ok in (("my vm", "counter", True), ("café", "counter", True),
                              ("my vm", "named", False)):
        dom_uuid = uuid.uuid4()
        xml = domain_xml(name, dom_uuid, DomainConfig((HelperSpec("counter", profile),)))
        results = [host.hook(name, event, xml) for event in DESTINATION[1:3]]
        if ok:
            assert [r.returncode for r in results] == [0, 0], results[-1].stderr
            assert host.processes(dom_uuid)
        else:
            assert results[0].returncode == 1  # 'prepare begin' starts the helpers
            assert b"domain name 'my vm' cannot be put into a profile command" in results[0].stderr
            assert not host.processes(dom_uuid)
        host.hook(name, "stopped end", xml)


def hook_script(workdir: Path) -> Path:
    """hooks/qemu in ``workdir``, running this tree's virt-vmstate."""
    if (workdir / "qemu").exists():
        return workdir / "qemu"
    wrapper = workdir / "virt-vmstate"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT / 'plugin'} exec {sys.executable} -m virt_vmstate \"$@\"\n")
    wrapper.chmod(0o755)
    return write_hook_script(workdir / "qemu", wrapper)


def started_domain(workdir: Path) -> Tuple[Host, uuid.UUID, bytes]:
    """A domain "vm" with one managed helper, started through the hook as libvirt starts it."""
    host = Host(workdir / "h")
    dom_uuid = uuid.uuid4()
    xml = domain_xml("vm", dom_uuid, DomainConfig((HelperSpec("counter", "counter"),)))
    for event in DESTINATION[1:]:
        assert host.hook("vm", event, xml).returncode == 0
    return host, dom_uuid, xml


def test_a_broken_config_at_stop_time_still_stops_everything(workdir):
    host, dom_uuid, xml = started_domain(workdir)
    records = host.processes(dom_uuid)
    good = host.config.read_text()
    host.config.write_text(good + "\n[timeouts\n")  # a typo while the domain runs
    result = host.hook("vm", "stopped end", xml)
    host.config.write_text(good)
    assert b"not valid TOML" in result.stderr and b"cleaning up domain vm" in result.stderr
    assert_nothing_left(host, dom_uuid, records)


def test_a_start_never_adopts_processes_left_from_an_earlier_run(workdir):
    host, dom_uuid, xml = started_domain(workdir)
    old = host.processes(dom_uuid)   # its stop hook never ran
    for event in DESTINATION[1:]:
        assert host.hook("vm", event, xml).returncode == 0
    new = host.processes(dom_uuid)
    assert not [r for r in old if is_running(r)]
    assert {r.pid for r in new}.isdisjoint({r.pid for r in old}) and all(is_running(r) for r in new)
    host.hook("vm", "stopped end", xml)
    assert_nothing_left(host, dom_uuid, new)


def test_metadata_removed_while_running_still_stops_everything(workdir):
    host, dom_uuid, xml = started_domain(workdir)
    records = host.processes(dom_uuid)
    script = hook_script(workdir)
    env = {"PATH": os.environ["PATH"], "VIRT_VMSTATE_CONFIG": str(host.config)}
    bare = domain_xml("vm", dom_uuid, None)
    other = subprocess.run([str(script), "vm", "stopped", "end", "-"], env=env, capture_output=True,
                           input=bare)
    assert other.returncode == 0, other.stderr
    assert_nothing_left(host, dom_uuid, records)


def staged_domain(buses, helpers) -> Tuple[uuid.UUID, bytes]:
    """A domain's XML carrying a helper state saved from a real helper, as a staged state is."""
    src = buses("src")
    helpers(src.address, "counter", "--state-hex", "0102")
    dom_uuid = uuid.uuid4()
    config = DomainConfig((HelperSpec("counter", "counter"),))
    return dom_uuid, with_state(domain_xml("vm", dom_uuid, config), sealed_state(src.address, dom_uuid))


def test_a_state_used_here_is_refused_when_a_migration_brings_it_again(buses, helpers, workdir):
    dom_uuid, staged = staged_domain(buses, helpers)
    host = Host(workdir / "h")
    # This host was the source: the domain left with that staged state.
    assert host.hook("vm", "stopped end", staged).returncode == 0
    line = refuse(host, "vm", staged)
    assert "already used on this host: a replay" in line and "--unstage" in line


def test_a_start_whose_definition_carries_state_ignores_it_and_refuses_its_replay(buses, helpers, workdir):
    dom_uuid, staged = staged_domain(buses, helpers)
    host = Host(workdir / "h")
    for event in DESTINATION[1:]:  # a cold start of a definition that carries the state
        assert host.hook("vm", event, staged).returncode == 0
    assert states_on(f"unix:path={Path(host.rundir(dom_uuid).path, 'bus.sock')}") == {"counter": b""}
    host.hook("vm", "stopped end", staged)
    assert "a replay" in refuse(host, "vm", staged)


def test_a_definition_with_a_live_stream_marker_is_refused_at_start(workdir):
    host = Host(workdir / "h")
    marker = domxml.stream_element(True)
    xml = domain_xml("vm", uuid.uuid4(), DomainConfig((HelperSpec("counter", "counter"),))).replace(
        b"</metadata>", marker.encode() + b"</metadata>")
    result = host.hook("vm", "prepare begin", xml)
    assert result.returncode == 1
    assert b"made from a running domain's XML" in result.stderr and b"virt-vmstate enable vm" in result.stderr


def recording_hook(workdir: Path) -> Tuple[Path, Path, Path, Dict[str, str]]:
    """The bash hook with a recorder where virt-vmstate runs: the script, the file the
    recorder appends each call's argv to, the runtime dir, and the hook's environment."""
    calls = workdir / "calls"
    recorder = workdir / "record"
    recorder.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    recorder.chmod(0o755)
    script = write_hook_script(workdir / "qemu", recorder)
    runtime = workdir / "rt"
    config = workdir / "config.toml"
    config.write_text(f"[paths]\nruntime_dir = '{runtime}'\n")  # TOML's literal string
    return script, calls, runtime, {"PATH": os.environ["PATH"], "VIRT_VMSTATE_CONFIG": str(config)}


def test_hook_script_starts_python_only_for_events_with_work(workdir):
    script, calls, runtime, env = recording_hook(workdir)
    dom_uuid = uuid.uuid4()
    ours = domain_xml("vm", dom_uuid, CONFIG)

    def run(event: str, xml: bytes) -> None:
        subprocess.run([str(script), "vm", *event.split(), "-"], input=xml, env=env, check=True)
    for event in ("start begin", "started begin", "release end", "reconnect begin"):
        run(event, ours)  # no runtime dir, no incoming record: nothing to do
    run("stopped end", domain_xml("vm", dom_uuid, None))
    run("start begin", domain_xml("vm", dom_uuid, None))  # not ours
    assert not calls.exists()
    (runtime / str(dom_uuid)).mkdir(parents=True)
    run("start begin", ours)  # 'prepare begin' started everything, and nothing waits for a helper
    run("started begin", ours)  # still no incoming record
    assert not calls.exists()
    run("stopped end", domain_xml("vm", dom_uuid, None))  # metadata gone, runtime dir there
    (runtime / str(dom_uuid) / "start.wait").write_text("")
    run("start begin", ours)  # a helper to wait for before QEMU starts
    (runtime / str(dom_uuid) / "started.wait").write_text("")
    run("started begin", ours)  # processes started to wait for
    (runtime / str(dom_uuid) / "started.wait").unlink()
    (runtime / str(dom_uuid) / "incoming.record").write_text("x")
    run("started begin", ours)
    run("prepare begin", ours)
    assert calls.read_text().splitlines() == ["hook vm stopped end -", "hook vm start begin -",
                                              "hook vm started begin -", "hook vm started begin -",
                                              "hook vm prepare begin -"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: libvirt's QEMU pidfile is put in "
                    "/run/libvirt/qemu of a mount namespace of the test's own")
def test_hook_script_answers_started_begin_when_the_state_comes_in_qemus_stream(workdir):
    from virt_vmstate.core import stream
    from virt_vmstate.hook.phases import IncomingRecord, new_token
    script, calls, runtime, env = recording_hook(workdir)
    run = workdir / "run"  # /run in the hook's mount namespace
    (run / "libvirt" / "qemu").mkdir(parents=True)
    dom_uuid, token = uuid.uuid4(), new_token()
    plain = domain_xml("vm", dom_uuid, CONFIG)
    xml = stream.incoming_xml(plain, domxml.parse_domain(plain), "unix:path=/x", token, "migration",
                              with_object=True)
    rundir = runtime / str(dom_uuid)
    rundir.mkdir(parents=True)
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    incoming = subprocess.Popen([*sleep, "-incoming", "defer"])
    started = subprocess.Popen([*sleep, "-S"])

    def python_ran(record: str = "stream", age: float = 0, qemu: Optional[subprocess.Popen] = incoming,
                   wait: bool = False, dom: bytes = xml) -> bool:
        carrier, tok = (record, token) if record != "other token" else ("stream", new_token())
        (rundir / "incoming.record").write_bytes(
            IncomingRecord(tok, "migration", carrier, time.time() - age).encode())
        pidfile = run / "libvirt" / "qemu" / "vm.pid"
        pidfile.unlink(missing_ok=True)
        if qemu is not None:
            pidfile.write_text(str(qemu.pid))  # as libvirt writes it: no newline
        (rundir / "started.wait").unlink(missing_ok=True)
        if wait:
            (rundir / "started.wait").write_text("")
        calls.unlink(missing_ok=True)
        subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        'mount --bind "$0" /run && exec "$@"', str(run), str(script), "vm", "started",
                        "begin", "-"], input=dom, env=env, check=True)
        return calls.exists()
    try:
        assert not python_ran()
        assert python_ran(wait=True)  # the proxy or a helper is not up yet
        assert python_ran(qemu=started)  # a plain start that the record was mistaken for
        assert python_ran(qemu=None)
        assert python_ran(record="xml")  # a pre-copy state to Load
        assert python_ran(age=60)
        assert python_ran(record="other token")
        assert python_ran(dom=plain)  # the XML of a start, without the record's token
        assert not python_ran()
    finally:
        for proc in (incoming, started):
            stop_pid(proc)


def stream_domain(host: Host, name: str, dom_uuid: uuid.UUID,
                  config: DomainConfig = DomainConfig((HelperSpec("counter", "counter"),))) -> bytes:
    """A domain with the stream carrier's object, pointing at ``host``'s proxy for it."""
    from virt_vmstate.core import stream
    from virt_vmstate.host.addresses import proxy_address
    xml = domain_xml(name, dom_uuid, config)
    dom = domxml.parse_domain(xml)
    return stream.definition_xml(xml, dom, proxy_address(dom, load_config(str(host.config))))


def test_a_stream_start_has_its_proxy_up_before_the_guest_runs(workdir):
    from virt_vmstate.core.stream import PROXY_ID
    host = Host(workdir / "h")
    dom_uuid = uuid.uuid4()
    xml = stream_domain(host, "vm", dom_uuid)
    for event in DESTINATION[1:]:
        result = host.hook("vm", event, xml)
        assert result.returncode == 0, result.stderr
    rundir = host.rundir(dom_uuid)
    proxy = next(r for r in host.processes(dom_uuid) if r.role == "proxy")
    assert rundir.read("proxy.ready", 64) == f"{proxy.pid}\n".encode()
    assert ids_on_bus(f"unix:path={rundir.path}/libvirt-{dom_uuid}") == [PROXY_ID]
    # QEMU's side has no dbus-daemon: the proxy answers on its socket itself.
    assert sorted(r.role for r in host.processes(dom_uuid)) == ["bus", "helper-0", "proxy"]
    # The hook forks it: no Python starts for it.
    with open(f"/proc/{proxy.pid}/comm") as comm, open(f"/proc/{proxy.pid}/cmdline", "rb") as cmdline:
        name, argv = comm.read().strip(), cmdline.read().split(b"\0")
    assert name == "vmstate-proxy" and b"hook" in argv
    assert os.getsid(proxy.pid) == proxy.pid  # a session of its own, as every managed process
    assert not rundir.has("started.wait")
    records = host.processes(dom_uuid)
    host.hook("vm", "stopped end", xml)
    assert_nothing_left(host, dom_uuid, records)


def test_a_proxy_that_dies_at_start_fails_the_start_and_everything_stops(workdir):
    host = Host(workdir / "h")
    dom_uuid = uuid.uuid4()
    xml = stream_domain(host, "vm", dom_uuid)
    assert host.hook("vm", "prepare begin", xml).returncode == 0
    proxy = next(r for r in host.processes(dom_uuid) if r.role == "proxy")
    os.kill(proxy.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while is_running(proxy) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert host.hook("vm", "start begin", xml).returncode == 0
    records = host.processes(dom_uuid)
    result = host.hook("vm", "started begin", xml)
    assert result.returncode == 1
    line = result.stderr.decode().strip()
    assert len(line.splitlines()) == 1
    assert "domain vm" in line and "started begin" in line and "proxy exited" in line, line
    assert_nothing_left(host, dom_uuid, records)


def test_a_helper_up_before_the_guest_is_waited_for_at_started_begin(buses, helpers, workdir):
    """Pre-copy: 'start begin' waits for the helper up before QEMU, not for this one;
    'started begin' does, then Loads both."""
    src = buses("src")
    helpers(src.address, "late", "--state-hex", "0badcafe")
    helpers(src.address, "counter", "--state-hex", "01")
    dom_uuid = uuid.uuid4()
    config = DomainConfig((HelperSpec("late", "counter-later"), HelperSpec("counter", "counter")))
    xml = with_state(domain_xml("vm", dom_uuid, config), sealed_state(src.address, dom_uuid))
    host = Host(workdir / "h")
    address = f"unix:path={Path(host.rundir(dom_uuid).path, 'bus.sock')}"
    for event in DESTINATION[:3]:
        result = host.hook("vm", event, xml if event == "migrate begin" else stripped_or(xml))
        assert result.returncode == 0, result.stderr
        xml = result.stdout or xml
        if event == "prepare begin":  # it started both; 'counter' is to be up before QEMU
            assert host.rundir(dom_uuid).has("start.wait")
    assert not host.rundir(dom_uuid).has("start.wait")
    assert "counter" in ids_on_bus(address)
    assert host.rundir(dom_uuid).has("started.wait")
    result = host.hook("vm", "started begin", xml)
    assert result.returncode == 0, result.stderr
    assert not host.rundir(dom_uuid).has("started.wait")
    assert states_on(address) == {"late": bytes.fromhex("0badcafe"), "counter": b"\x01"}


@pytest.mark.parametrize("carrier", ["pre-copy", "stream"])
def test_a_helper_up_before_the_guest_that_exits_fails_started_begin(workdir, carrier):
    host = Host(workdir / "h")
    dom_uuid = uuid.uuid4()
    config = DomainConfig((HelperSpec("gone", "exits-later"),))
    xml = (stream_domain(host, "vm", dom_uuid, config) if carrier == "stream"
           else domain_xml("vm", dom_uuid, config))
    for event in ("prepare begin", "start begin"):
        result = host.hook("vm", event, xml)
        assert result.returncode == 0, result.stderr
    records = host.processes(dom_uuid)
    result = host.hook("vm", "started begin", xml)
    assert result.returncode == 1
    line = result.stderr.decode().strip()
    assert "started begin" in line and "helper 'gone' (/bin/false) exited" in line, line
    assert_nothing_left(host, dom_uuid, records)


@pytest.mark.parametrize("daemon, why", [("exit 3", "managed dbus-daemon (bus) exited"),
                                         ("exec sleep 30", "no answer within")])
def test_a_bus_that_does_not_come_up_fails_start_begin_and_everything_stops(workdir, daemon, why):
    """'prepare begin' starts the buses and all that connects to them without waiting; 'start
    begin' waits for the helper, and says why it does not come."""
    fake = workdir / "dbus-daemon"
    fake.write_text(f"#!/bin/sh\n{daemon}\n")
    fake.chmod(0o755)
    host = Host(workdir / "h", extra=f'[bus]\ndbus_daemon = "{fake}"\n', helper_start=1)
    dom_uuid = uuid.uuid4()
    xml = stream_domain(host, "vm", dom_uuid)
    assert host.hook("vm", "prepare begin", xml).returncode == 0
    records = host.processes(dom_uuid)
    assert sorted(r.role for r in records) == ["bus", "helper-0", "proxy"]
    result = host.hook("vm", "start begin", xml)
    assert result.returncode == 1
    line = result.stderr.decode().strip()
    assert len(line.splitlines()) == 1
    assert "domain vm" in line and "start begin" in line and why in line, line
    assert_nothing_left(host, dom_uuid, records)


SELINUX_UNLABELLED = b"<seclabel type='dynamic' model='selinux' relabel='yes'/>"
SELINUX_LABELLED = (b"<seclabel type='dynamic' model='selinux' relabel='yes'>"
                    b"<label>system_u:system_r:svirt_t:s0:c12,c345</label>"
                    b"<imagelabel>system_u:object_r:svirt_image_t:s0:c12,c345</imagelabel></seclabel>")


def with_seclabel(xml: bytes, seclabel: bytes) -> bytes:
    return xml.replace(b"</domain>", seclabel + b"</domain>")


def test_selinux_the_proxy_socket_gets_the_domains_image_label_before_qemu_starts(workdir):
    """libvirt makes the domain's label between 'prepare begin' and 'start begin': the socket
    is labelled then, with the <imagelabel>, as libvirt labels the domain's own files.  (The
    label is an extended attribute any file system here keeps; no SELinux runs here to
    enforce it.)"""
    from virt_vmstate.host.selinux import label_of
    host = Host(workdir / "h")
    dom_uuid = uuid.uuid4()
    xml = stream_domain(host, "vm", dom_uuid)
    result = host.hook("vm", "prepare begin", with_seclabel(xml, SELINUX_UNLABELLED))
    assert result.returncode == 0, result.stderr
    rundir = host.rundir(dom_uuid)
    assert rundir.has("start.wait")  # so the bash hook runs Python at 'start begin'
    socket_path = rundir.file(f"libvirt-{dom_uuid}")
    assert label_of(socket_path) is None
    result = host.hook("vm", "start begin", with_seclabel(xml, SELINUX_LABELLED))
    assert result.returncode == 0, result.stderr
    assert label_of(socket_path) == "system_u:object_r:svirt_image_t:s0:c12,c345"
    assert not rundir.has("start.wait")
    records = host.processes(dom_uuid)
    host.hook("vm", "stopped end", xml)
    assert_nothing_left(host, dom_uuid, records)


def test_selinux_a_start_without_an_image_label_is_refused_in_one_line(workdir):
    host = Host(workdir / "h")
    dom_uuid = uuid.uuid4()
    xml = with_seclabel(stream_domain(host, "vm", dom_uuid), SELINUX_UNLABELLED)
    assert host.hook("vm", "prepare begin", xml).returncode == 0
    records = host.processes(dom_uuid)
    result = host.hook("vm", "start begin", xml)
    assert result.returncode == 1
    line = result.stderr.decode().strip()
    assert len(line.splitlines()) == 1 and "no <imagelabel>" in line and "domain vm" in line, line
    assert_nothing_left(host, dom_uuid, records)


def test_without_selinux_start_begin_has_nothing_to_do_for_a_stream_domain(workdir):
    host = Host(workdir / "h")
    dom_uuid = uuid.uuid4()
    xml = stream_domain(host, "vm", dom_uuid, DomainConfig((HelperSpec("counter", "counter-later"),)))
    assert host.hook("vm", "prepare begin", xml).returncode == 0
    assert not host.rundir(dom_uuid).has("start.wait")  # the bash hook answers alone
    records = host.processes(dom_uuid)
    host.hook("vm", "stopped end", xml)
    assert_nothing_left(host, dom_uuid, records)
    # The same domain under SELinux: 'start begin' has a socket to label.
    assert host.hook("vm", "prepare begin", with_seclabel(xml, SELINUX_UNLABELLED)).returncode == 0
    assert host.rundir(dom_uuid).has("start.wait")
    records = host.processes(dom_uuid)
    host.hook("vm", "stopped end", xml)
    assert_nothing_left(host, dom_uuid, records)
