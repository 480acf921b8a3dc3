"""'virt-vmstate serve' behind the bash hook: no Python per event, and never a lost event.

The hook's own behaviour through the server is tested by running all of test_hook.py
both ways; these are the server's own cases: it is gone, stale, killed, or its worker is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from procs import HookServer, helper_profiles_toml, stop_pid, write_hook_script
from virt_vmstate import domxml
from virt_vmstate.config import load_config
from virt_vmstate.domxml import DomainConfig, HelperSpec
from virt_vmstate.managed import ManagedProcesses, is_running
from virt_vmstate.rundir import RunDir
from virt_vmstate.serve import PROTOCOL, Request
from virt_vmstate.vmstate1 import HelperBus

ROOT = Path(__file__).resolve().parents[2]


class Setup:
    """A host config, the bash hook whose virt-vmstate only records that it was run, and
    (once ``serve`` is called) a server."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.runtime = workdir / "run"
        self.config = workdir / "config.toml"
        py = sys.executable
        self.config.write_text(f"""
[paths]
runtime_dir = "{self.runtime}"
[timeouts]
hook = 20
[logging]
syslog = false
{helper_profiles_toml(py)}
[profiles.never]
command = ["/bin/sleep", "60"]
[profiles.touches]
command = ["/bin/sh", "-c", "touch {{rundir}}/made-by-helper && exec sleep 60"]
up_before = "guest"
[profiles.stubborn]
command = ["/bin/sh", "-c", "trap '' TERM && touch {{rundir}}/deaf && exec sleep 60"]
up_before = "guest"
""")
        self.calls = workdir / "calls"
        recorder = workdir / "record"
        recorder.write_text(f'#!/bin/sh\necho "$@" >> {self.calls}\ncat > /dev/null\n')
        recorder.chmod(0o755)
        self.script = write_hook_script(workdir / "qemu", recorder)
        self.env = {"PATH": os.environ["PATH"], "LC_ALL": "C", "VIRT_VMSTATE_CONFIG": str(self.config)}
        self.server: HookServer | None = None

    def serve(self) -> HookServer:
        self.server = HookServer(self.config, self.runtime, self.workdir / "serve.log")
        return self.server

    def hook(self, name: str, event: str, xml: bytes, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        return subprocess.run([str(self.script), name, *event.split(), "-"], input=xml,
                              env=self.env, timeout=60, **kwargs)

    def python_runs(self) -> List[str]:
        """The events for which the hook started virt-vmstate itself."""
        return self.calls.read_text().splitlines() if self.calls.exists() else []

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.runtime.exists():
            config = load_config(str(self.config))
            for rundir in [*self.runtime.glob("*-*-*-*-*"), *self.runtime.glob(".stopping-*/*")]:
                ManagedProcesses(RunDir(str(rundir.parent), uuid.UUID(rundir.name)), config).stop_all()


@pytest.fixture
def setup(workdir):
    made = Setup(workdir)
    yield made
    made.stop()


def managed_domain(profile: str = "counter", name: str = "vm",
                   missing_state: str = "fresh") -> Tuple[uuid.UUID, bytes]:
    dom_uuid = uuid.uuid4()
    config = DomainConfig((HelperSpec("c1", profile),), missing_state=missing_state)
    return dom_uuid, (f"<domain type='qemu'>\n  <name>{name}</name>\n  <uuid>{dom_uuid}</uuid>\n"
                      f"  <metadata>\n{domxml.config_element(config)}\n</metadata>\n</domain>\n").encode()


def server_children(server: HookServer) -> List[int]:
    """Its workers, oldest first: the last one is the spare waiting for the next event."""
    with open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children") as f:
        pids = [int(pid) for pid in f.read().split()]
    started: Dict[int, int] = {}
    for pid in pids:
        try:
            started[pid] = start_time(pid)
        except FileNotFoundError:
            pass  # a worker that finished its event between the two reads
    return sorted(started, key=started.__getitem__)


def fd_target(pid: int, fd: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return ""


def stat_fields(pid: int) -> List[bytes]:
    """The fields of /proc/PID/stat after the command name: state, ppid, ..."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def start_time(pid: int) -> int:
    return int(stat_fields(pid)[19])


def test_with_a_server_no_event_starts_python_and_the_work_is_done(setup):
    setup.serve()
    dom_uuid, xml = managed_domain()
    for event in ("prepare begin", "start begin", "started begin"):
        result = setup.hook("vm", event, xml)
        assert (result.returncode, result.stderr) == (0, b""), event
    address = f"unix:path={setup.runtime / str(dom_uuid) / 'bus.sock'}"
    with HelperBus.open(address, call_timeout=5) as bus:
        assert [h.id for h in bus.helpers()] == ["c1"]
    assert setup.hook("vm", "stopped end", xml).returncode == 0
    assert not (setup.runtime / str(dom_uuid)).exists()
    assert setup.python_runs() == []
    # Nothing is left of the requests: no request file, no reply FIFO.
    assert sorted(os.listdir(setup.runtime / ".hook-server")) == ["pid", "requests"]


def wait_until(done, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_stop_answers_libvirt_first_and_a_new_start_of_the_domain_does_not_wait(setup):
    """The runtime dir is set aside at once; its processes are stopped after the answer."""
    setup.serve()
    dom_uuid, xml = managed_domain("stubborn")
    rundir = setup.runtime / str(dom_uuid)
    assert setup.hook("vm", "prepare begin", xml).returncode == 0
    wait_until((rundir / "deaf").exists, "the helper did not start")  # SIGTERM is ignored from here on
    deaf = ManagedProcesses(RunDir(str(setup.runtime), dom_uuid), load_config(str(setup.config))).records()
    assert [r.role for r in deaf if r.role.startswith("helper")] == ["helper-0"]
    result = setup.hook("vm", "stopped end", xml)  # libvirt's pipes: it returns at their EOF
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert not rundir.exists()
    assert all(is_running(r) for r in deaf)  # SIGTERM's grace is seconds: still there
    [aside] = list(setup.runtime.glob(".stopping-*"))
    # A start of the same domain right away gets a runtime dir and processes of its own.
    assert setup.hook("vm", "prepare begin", xml).returncode == 0
    fresh = ManagedProcesses(RunDir(str(setup.runtime), dom_uuid), load_config(str(setup.config))).records()
    assert fresh and not {r.pid for r in fresh} & {r.pid for r in deaf}
    wait_until(lambda: not any(is_running(r) for r in deaf), "the old processes were not stopped")
    wait_until(lambda: not aside.exists(), "the set-aside runtime dir was not removed")
    assert all(is_running(r) for r in fresh)
    assert setup.hook("vm", "release end", xml).returncode == 0  # not ours: the stop was before
    assert all(is_running(r) for r in fresh)
    assert setup.python_runs() == []


def test_what_a_stop_left_set_aside_is_stopped_by_the_next_stop(setup):
    """A worker killed while it stopped a domain's processes: the next stop on the host ends them."""
    setup.serve()
    gone = subprocess.Popen(["true"])
    gone.wait()  # a PID that no process has now
    lost_uuid = uuid.uuid4()
    left = RunDir(str(setup.runtime / f".stopping-{gone.pid}"), lost_uuid)
    left.create()  # as RunDir.set_aside leaves it
    orphan = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (Path(left.path) / "helper-0.pid").write_text(f"{orphan.pid} {start_time(orphan.pid)} sleep\n")
        dom_uuid, xml = managed_domain("touches")
        assert setup.hook("vm", "prepare begin", xml).returncode == 0
        assert orphan.poll() is None  # a start leaves it alone
        assert setup.hook("vm", "stopped end", xml).returncode == 0
        assert orphan.wait(10) == -signal.SIGTERM
        wait_until(lambda: not Path(left.base).exists(), "the abandoned dir was not removed")
        wait_until(lambda: not list(setup.runtime.glob(".stopping-*")), "the stop's own dir was not removed")
    finally:
        stop_pid(orphan)


def test_without_a_server_the_hook_runs_virt_vmstate_itself(setup):
    dom_uuid, xml = managed_domain()
    assert setup.hook("vm", "prepare begin", xml).returncode == 0
    assert setup.python_runs() == ["hook vm prepare begin -"]


def test_a_server_killed_outright_leaves_a_stale_pid_and_the_hook_runs_itself(setup):
    server = setup.serve()
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(5)
    assert (setup.runtime / ".hook-server" / "pid").exists()  # stale: nobody cleaned up
    started = time.monotonic()
    result = setup.hook("vm", "prepare begin", managed_domain()[1])
    assert result.returncode == 0 and setup.python_runs() == ["hook vm prepare begin -"]
    assert time.monotonic() - started < 5  # not the claim wait: the PID is seen to be gone at once


def test_a_server_gone_before_it_took_the_event_gives_it_back_to_the_hook(setup, workdir):
    """A live process that never answers stands for a server that stops right after the
    hook checked it: the hook takes its request back once that process is gone."""
    server_dir = setup.runtime / ".hook-server"
    setup.runtime.mkdir(mode=0o700)
    server_dir.mkdir(mode=0o700)
    os.mkfifo(server_dir / "requests", 0o600)
    silent = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (server_dir / "pid").write_text(f"{silent.pid} {PROTOCOL}\n")
        hook = subprocess.Popen([str(setup.script), "vm", "prepare", "begin", "-"], env=setup.env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        hook.stdin.write(managed_domain()[1])
        hook.stdin.close()
        time.sleep(1.5)
        assert hook.poll() is None and setup.python_runs() == []  # still waiting for a claim
    finally:
        stop_pid(silent)
    assert hook.wait(10) == 0
    assert setup.python_runs() == ["hook vm prepare begin -"]
    assert sorted(os.listdir(server_dir)) == ["pid", "requests"]  # request and reply taken back


def test_a_reply_line_cut_by_the_hooks_read_timeout_is_read_whole(setup):
    """The hook waits for replies one second at a time; a line that arrives across the end of
    such a wait must not be lost (bash keeps what it read of it).  A stand-in worker writes
    its exit line in two parts, the second after the hook's read gave up."""
    server_dir = setup.runtime / ".hook-server"
    setup.runtime.mkdir(mode=0o700)
    server_dir.mkdir(mode=0o700)
    os.mkfifo(server_dir / "requests", 0o600)
    stand_in = subprocess.Popen(["sleep", "60"], start_new_session=True)  # the server and worker PID
    try:
        (server_dir / "pid").write_text(f"{stand_in.pid} {PROTOCOL}\n")
        requests = os.open(server_dir / "requests", os.O_RDWR)
        hook = subprocess.Popen([str(setup.script), "vm", "prepare", "begin", "-"], env=setup.env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        hook.stdin.write(managed_domain()[1])
        hook.stdin.close()
        client = int(os.read(requests, 64).decode().split()[0])
        os.close(requests)
        request = Request.decode((server_dir / f"{client}.req").read_bytes())
        reply = os.open(f"/proc/{client}/fd/{request.reply_fd}", os.O_WRONLY)
        os.write(reply, f"claimed {stand_in.pid}\n".encode())
        os.write(reply, b"exi")
        time.sleep(1.3)  # past the end of the hook's one-second read
        os.write(reply, b"t 3\n")
        os.close(reply)
        assert hook.wait(10) == 3, hook.stderr.read()
    finally:
        stop_pid(stand_in)
    assert setup.python_runs() == []


def test_a_worker_killed_midway_fails_the_event_in_one_line(setup):
    server = setup.serve()
    # A start that waits: the helper bus is there, but the helper never owns its name.
    dom_uuid, xml = managed_domain("never")
    assert setup.hook("vm", "prepare begin", xml).returncode == 0
    hook = subprocess.Popen([str(setup.script), "vm", "start", "begin", "-"], env=setup.env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    hook.stdin.write(xml)
    hook.stdin.close()
    # Killed once it has said it claimed the event, not between taking the request line and
    # claiming it: then the hook would take it back.  The worker takes the hook's stderr as
    # its own right before it says so, then waits for the helper.
    pipe = os.readlink(f"/proc/self/fd/{hook.stderr.fileno()}")
    worker = None
    deadline = time.monotonic() + 10
    while worker is None and time.monotonic() < deadline:
        worker = next((pid for pid in server_children(server) if fd_target(pid, 2) == pipe), None)
        time.sleep(0.02)
    assert worker is not None
    time.sleep(0.2)  # its "claimed" follows at once; the helper's wait lasts seconds
    os.kill(worker, signal.SIGKILL)  # the worker is our server's child
    assert hook.wait(10) == 1
    stderr = hook.stderr.read().decode()
    assert stderr.count("\n") == 1 and "domain vm: start begin: the hook's worker" in stderr
    assert "ended without a result" in stderr
    assert setup.python_runs() == []


def test_what_a_worker_starts_gets_the_hooks_umask_not_the_servers(setup):
    os.umask(0o022)
    setup.serve()
    dom_uuid, xml = managed_domain("touches")
    for event in ("prepare begin", "start begin"):
        result = setup.hook("vm", event, xml, umask=0o027)  # not libvirt's, nor the server's
        assert (result.returncode, result.stderr) == (0, b""), event
    made = setup.runtime / str(dom_uuid) / "made-by-helper"
    deadline = time.monotonic() + 10
    while not made.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert made.stat().st_mode & 0o777 == 0o640
    assert setup.python_runs() == []


def test_output_reaches_the_hooks_own_files_in_order(setup, workdir):
    """stdout and stderr that are files, not libvirt's pipes, are appended to."""
    setup.serve()
    broken = setup.config.read_text() + "\n[timeouts]\nhook = 'x'\n"  # a second [timeouts]

    out, err = workdir / "out", workdir / "err"
    out.write_bytes(b"before\n")
    err.write_bytes(b"before\n")
    good = setup.config.read_text()
    setup.config.write_text(broken)
    with open(out, "ab") as stdout, open(err, "ab") as stderr:
        result = setup.hook("vm", "prepare begin", managed_domain()[1], stdout=stdout, stderr=stderr,
                            capture_output=False)
    setup.config.write_text(good)
    assert result.returncode == 1
    lines = err.read_text().splitlines()
    assert lines[0] == "before" and len(lines) == 2 and "config.toml" in lines[1]
    assert out.read_bytes() == b"before\n"
    # The server itself was never disturbed: it reads no config per event.
    assert setup.server is not None and setup.server.serving()


def test_many_hooks_at_once_each_get_their_own_answer(setup):
    setup.serve()
    results: Dict[int, subprocess.CompletedProcess] = {}

    def run(index: int) -> None:
        xml = managed_domain(name=f"vm{index}", missing_state="refuse")[1]
        results[index] = setup.hook(f"vm{index}", "migrate begin", xml)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == list(range(12))
    assert setup.python_runs() == []
    tokens = set()
    for index, result in results.items():
        # Each hook gets the XML of its own domain back, bound to its own incoming record
        # (of a migration that carries no state, to be refused at 'prepare begin').
        assert (result.returncode, result.stderr) == (0, b""), index
        incoming = domxml.parse_domain(result.stdout).incoming
        assert f"<name>vm{index}</name>".encode() in result.stdout and incoming is not None
        tokens.add(incoming.token)
    assert len(tokens) == 12


def test_one_spare_worker_waits_and_ends_with_its_server_even_a_killed_one(setup):
    server = setup.serve()
    deadline = time.monotonic() + 10
    while not server_children(server) and time.monotonic() < deadline:
        time.sleep(0.02)
    spare = server_children(server)
    assert len(spare) == 1
    dom_uuid, xml = managed_domain()
    assert setup.hook("vm", "prepare begin", xml).returncode == 0
    while (len(server_children(server)) != 1 or server_children(server) == spare) and time.monotonic() < deadline:
        time.sleep(0.02)
    after = server_children(server)
    assert len(after) == 1 and after != spare  # the spare ran the event; a new one waits
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(5)
    while os.path.exists(f"/proc/{after[0]}") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{after[0]}")  # no orphan left waiting on the FIFO


def test_a_stray_line_without_its_newline_does_not_hold_up_the_next_event(setup):
    setup.serve()
    fifo = os.open(setup.runtime / ".hook-server" / "requests", os.O_WRONLY)
    os.write(fifo, b"stray")  # no hook writes this; root could
    os.close(fifo)
    log = setup.workdir / "serve.log"
    deadline = time.monotonic() + 10
    while "ignoring a request line that is not a PID: b'stray'" not in log.read_text():
        assert time.monotonic() < deadline, "the spare worker is still reading the stray line"
        time.sleep(0.02)
    started = time.monotonic()
    result = setup.hook("vm", "prepare begin", managed_domain()[1])
    assert (result.returncode, result.stderr) == (0, b"")
    assert setup.python_runs() == [] and time.monotonic() - started < 5  # served, not taken back


def test_a_restarted_server_clears_what_an_earlier_one_left(setup):
    server_dir = setup.runtime / ".hook-server"
    setup.runtime.mkdir(mode=0o700)
    server_dir.mkdir(mode=0o700)
    (server_dir / "123.req").write_bytes(b"stale")
    (server_dir / "pid").write_text("1\n")
    setup.serve()
    assert sorted(os.listdir(server_dir)) == ["pid", "requests"]


def test_a_second_server_for_the_same_runtime_dir_refuses_to_start(setup):
    first = setup.serve()
    second = subprocess.run([sys.executable, "-m", "virt_vmstate", "serve"], capture_output=True, text=True,
                            env=dict(setup.env, PYTHONPATH=str(ROOT / "plugin")), timeout=30)
    assert second.returncode == 1
    assert f"another 'virt-vmstate serve' (PID {first.proc.pid}) serves" in second.stderr
    assert first.serving() and (setup.runtime / ".hook-server" / "requests").exists()


def test_sigterm_stops_the_server_and_removes_its_pid_file(setup):
    server = setup.serve()
    os.kill(server.proc.pid, signal.SIGTERM)
    assert server.proc.wait(5) == 0
    assert sorted(os.listdir(setup.runtime / ".hook-server")) == []


@pytest.mark.parametrize("data, why", [
    (b"", "not a hook request"),
    (b"1\x0010\x0011\x004\x00vm\x00prepare\x00begin\x00-\x000\x00<domain/>\x00", "not a hook request"),
    (b"2\x001\x002\x0012\x004\x00vm\x00prepare\x00begin\x00-\x000\x00<domain/>\x00", "own copies"),
    (b"2\x0010\x0011\x000\x004\x00vm\x00prepare\x00begin\x00-\x000\x00<domain/>\x00", "reply pipe"),
    (b"2\x0010\x0011\x0012\x009\x00vm\x00prepare\x00begin\x00-\x000\x00<domain/>\x00", "argument count"),
    (b"2\x0010\x0011\x0012\x004\x00vm\x00prepare\x00begin\x00-\x002\x00VIRT_VMSTATE_CONFIG=x\x00<domain/>\x00",
     "cut short"),
    (b"2\x0010\x0011\x0012\x004\x00vm\x00prepare\x00begin\x00-\x001\x00LD_PRELOAD=/x.so\x00<domain/>\x00",
     "LD_PRELOAD"),
    (b"2\x0010\x0011\x0012\x004\x00vm\x00prepare\x00begin\x00-\x000\x00<domain/>", "cut short"),
    (b"2\x00x\x0011\x0012\x004\x00vm\x00prepare\x00begin\x00-\x000\x00<domain/>\x00", "invalid literal"),
])
def test_a_request_that_is_not_one_is_refused(data, why):
    with pytest.raises(ValueError, match=why):
        Request.decode(data)


@pytest.mark.parametrize("data, fd", [
    (b"2\x0010\x0011\x0012\x009\x00vm\x00", 12),  # refused by decode, answered all the same
    (b"2\x0010\x0011\x002\x004\x00vm\x00", None),  # stderr is no reply pipe
    (b"2\x0010\x0011\x00-5\x004\x00vm\x00", None),
    (b"1\x0010\x0011\x0012\x004\x00vm\x00", None),  # another protocol's
    (b"2\x0010\x0011", None),
])
def test_where_to_reply_is_read_even_from_a_refused_request(data, fd):
    assert Request.reply_fd_of(data) == fd


def test_a_request_round_trips_arguments_environment_and_xml():
    data = (b"2\x0010\x0011\x0012\x004\x00my vm\x00prepare\x00begin\x00-\x00"
            b"1\x00VIRT_VMSTATE_CONFIG=/etc/a b.toml\x00<domain/>\n\x00")
    request = Request.decode(data)
    assert (request.stdout_fd, request.stderr_fd, request.reply_fd) == (10, 11, 12)
    assert request.argv == ["my vm", "prepare", "begin", "-"]
    assert request.env == {"VIRT_VMSTATE_CONFIG": "/etc/a b.toml"}
    assert request.xml == b"<domain/>\n"


def test_the_spares_rehearsal_parses_a_domain_of_ours_with_every_element_a_hook_reads():
    from virt_vmstate.serve import _REHEARSAL_XML
    parsed = domxml.parse_domain(_REHEARSAL_XML)
    assert parsed.config is not None and parsed.config.helpers
    assert parsed.stream_object and parsed.incoming is not None and parsed.dbus_vmstate_args()


def test_only_what_a_gone_process_set_aside_counts_as_abandoned(tmp_path):
    from virt_vmstate.rundir import abandoned_aside
    base = str(tmp_path / "run")
    mine = RunDir(base, uuid.uuid4()).create().set_aside()  # this process's own: it is stopping it
    assert not Path(base, mine.uuid).exists() and Path(mine.path).is_dir()
    live = subprocess.Popen(["sleep", "60"])
    gone, gone_too = subprocess.Popen(["true"]), subprocess.Popen(["true"])
    gone.wait()
    gone_too.wait()  # PIDs that no process has now
    lost = str(uuid.uuid4())
    try:
        for pid, name in ((live.pid, str(uuid.uuid4())), (gone.pid, lost), (gone.pid, "not-a-uuid"),
                          ("x", str(uuid.uuid4()))):
            os.makedirs(Path(base, f".stopping-{pid}", name))
        empty = Path(base, f".stopping-{gone_too.pid}")
        empty.mkdir()
        found = abandoned_aside(base)
        assert [(Path(r.base).name, r.uuid) for r in found] == [(f".stopping-{gone.pid}", lost)]
        assert not empty.exists()  # nothing was left in it: it just goes
        assert Path(mine.path).is_dir()
    finally:
        stop_pid(live)
