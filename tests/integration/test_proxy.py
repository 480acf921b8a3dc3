"""The proxy between real QEMUs (their own dbus-vmstate object, migrating over QMP) and real helpers."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest
from jeepney import DBusAddress, new_method_call
from procs import ids_on_bus, stop_pid
from qemu import QEMU, QemuProcess

from virt_vmstate.bus.vmstate1 import HelperBus
from virt_vmstate.core import stream
from virt_vmstate.host.rundir import RunDir
from virt_vmstate.proxy.service import last_failure

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not os.path.exists(QEMU), reason=f"{QEMU} is not installed (make deps)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Side:
    """One host's half: helper bus, proxy (on its own socket), and its config and runtime dir."""

    def __init__(self, workdir: Path, name: str, buses, dom_uuid: uuid.UUID, extra_config: str = "") -> None:
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.helper_bus = buses(f"{name}-helpers")
        self.proxy_address = f"unix:path={self.dir / 'proxy.sock'}"
        self.uuid = dom_uuid
        self.config = self.dir / "config.toml"
        self.config.write_text(f'[paths]\nruntime_dir = "{self.dir / "run"}"\n'
                               f'[logging]\nsyslog = false\nlevel = "debug"\n'
                               f'[carriers.stream]\nlocal_dir = "{self.dir / "local"}"\n{extra_config}')
        self.rundir = RunDir(str(self.dir / "run"), dom_uuid).create()
        self.proc: Optional[subprocess.Popen] = None

    def start_proxy(self, ids: str = "counter,slirp0", incoming: Optional[str] = None) -> None:
        argv = [sys.executable, "-m", "virt_vmstate", "--config", str(self.config), "proxy",
                "--domain", "vm", "--uuid", str(self.uuid), "--helper-bus", self.helper_bus.address,
                "--listen", self.proxy_address, "--ids", ids]
        if incoming:
            argv += ["--incoming", incoming]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "plugin"))
        with open(self.dir / "proxy.log", "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=env, start_new_session=True)
        deadline = time.monotonic() + 15
        while stream.PROXY_ID not in ids_on_bus(self.proxy_address):
            assert self.proc.poll() is None, (self.dir / "proxy.log").read_text()
            assert time.monotonic() < deadline, "the proxy did not come up"
            time.sleep(0.02)

    def proxy_log(self) -> str:
        return (self.dir / "proxy.log").read_text()

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)


@pytest.fixture
def sides(workdir, buses) -> Iterator:
    made: List[Side] = []
    qemus: List[QemuProcess] = []

    def side(name: str, dom_uuid: uuid.UUID, extra_config: str = "") -> Side:
        made.append(Side(workdir, name, buses, dom_uuid, extra_config))
        return made[-1]

    def qemu(name: str, s: Side, **kw) -> QemuProcess:
        qemus.append(QemuProcess(workdir / "qemu", name, object_addr=s.proxy_address, **kw))
        return qemus[-1]

    yield side, qemu
    for q in qemus:
        q.stop()
    for s in made:
        s.stop()


def states_on(address: str) -> Dict[str, bytes]:
    with HelperBus.open(address) as bus:
        return bus.save(bus.helpers())


def wait_status(q: QemuProcess, status: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while q.status() != status:
        assert time.monotonic() < deadline, f"QEMU is {q.status()}, not {status}"
        time.sleep(0.02)


def migrate_pair(side, qemu, helpers, *, src_state: List[str], dst_args: List[str] = (),
                 src_config: str = "", dst_config: str = ""):
    dom = uuid.uuid4()
    src, dst = side("src", dom, src_config), side("dst", dom, dst_config)
    helpers(src.helper_bus.address, "counter", *src_state)
    helpers(src.helper_bus.address, "slirp0", slirp=True)
    helpers(dst.helper_bus.address, "counter", *dst_args, incoming=True)
    helpers(dst.helper_bus.address, "slirp0", slirp=True, incoming=True)
    src.start_proxy()
    dst.rundir.write("incoming.record", b"as the destination's 'migrate begin' writes it\n")
    dst.start_proxy(incoming="migration")
    port = free_port()
    source = qemu("src", src)
    target = qemu("dst", dst, incoming=f"tcp:127.0.0.1:{port}")
    before = states_on(src.helper_bus.address)
    info = source.migrate(f"tcp:127.0.0.1:{port}")
    return src, dst, source, target, before, info


def failed_migration(side, qemu, helpers, name: str, counter_args: List[str], config: str = ""):
    """Migrate from a source whose helpers cannot be saved (as ``counter_args`` make them) to an
    empty destination: the migration fails and the source QEMU runs on.  The proxy's failure record."""
    dom = uuid.uuid4()
    src = side(name, dom, config)
    helpers(src.helper_bus.address, "counter", *counter_args)
    helpers(src.helper_bus.address, "slirp0", slirp=True)
    src.start_proxy()
    port = free_port()
    source = qemu(f"{name}-src", src)
    dst = side(f"{name}-dst", dom)  # its proxy waits for state, with no helper to Load
    dst.start_proxy(incoming="migration")
    qemu(f"{name}-dst", dst, incoming=f"tcp:127.0.0.1:{port}")
    result = source.migrate(f"tcp:127.0.0.1:{port}")
    assert result["status"] == "failed", result
    wait_status(source, "running")
    return last_failure(src.rundir)


def proxy_with_helpers(side, helpers, name: str) -> Side:
    """One side with its counter and slirp0 helpers and its proxy up, not waiting for state."""
    s = side(name, uuid.uuid4())
    helpers(s.helper_bus.address, "counter")
    helpers(s.helper_bus.address, "slirp0", slirp=True)
    s.start_proxy()
    return s


def test_proxy_is_the_only_helper_qemu_sees(sides, helpers):
    s = proxy_with_helpers(sides[0], helpers, "one")
    assert ids_on_bus(s.proxy_address) == [stream.PROXY_ID]
    assert sorted(ids_on_bus(s.helper_bus.address)) == ["counter", "slirp0"]


def test_live_migration_through_qemu_carries_every_helper_byte_exact(sides, helpers):
    side, qemu = sides
    src, dst, source, target, before, info = migrate_pair(
        side, qemu, helpers, src_state=["--random-size", "300000", "--seed", "7"])
    assert info["status"] == "completed", info
    wait_status(target, "running")
    after = states_on(dst.helper_bus.address)
    assert after == before and len(after["counter"]) == 300000 and after["slirp0"]
    status = json.loads(src.rundir.read("proxy-status.json", 4096))
    assert status["ok"] and status["operation"] == "save"
    assert "inline" in status["detail"]
    assert not dst.rundir.has("incoming.record")  # used up by the Load


def test_the_proxy_removes_started_wait_once_it_and_every_required_helper_are_up(sides, helpers):
    side, _ = sides
    s = side("starting", uuid.uuid4())
    s.rundir.write("started.wait", b"")
    helpers(s.helper_bus.address, "counter", incoming=True)
    s.start_proxy(incoming="migration")  # returns once the proxy owns its name
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        assert s.rundir.has("started.wait"), "removed while slirp0 is not on the helper bus"
        time.sleep(0.05)
    helpers(s.helper_bus.address, "slirp0", slirp=True, incoming=True)
    deadline = time.monotonic() + 10
    while s.rundir.has("started.wait"):
        assert time.monotonic() < deadline, s.proxy_log()
        time.sleep(0.01)


def test_state_past_qemus_cap_travels_by_reference_through_the_spool(sides, helpers, workdir):
    side, qemu = sides
    spool = workdir / "spool"
    spool.mkdir()
    shared = f'[carriers.spool]\ndir = "{spool}"\n'
    src, dst, source, target, before, info = migrate_pair(
        side, qemu, helpers, src_state=["--random-size", str(3 << 20)], src_config=shared,
        dst_config=shared)
    assert info["status"] == "completed", info
    wait_status(target, "running")
    assert states_on(dst.helper_bus.address) == before
    assert list(spool.iterdir()) == []  # the destination removed it once loaded
    # Synced after QEMU had its answer: the same file may back a save image.
    synced = re.search(r"synced (\S+) to disk", src.proxy_log())
    assert synced and synced.group(1).startswith(f"{spool}/")


def test_state_past_the_cap_without_a_spool_fails_cleanly_on_the_destination(sides, helpers):
    side, qemu = sides
    src, dst, source, target, before, info = migrate_pair(
        side, qemu, helpers, src_state=["--random-size", str(2 << 20)])
    deadline = time.monotonic() + 20
    while target.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert target.proc.poll() is not None, "the destination QEMU should have failed the load"
    assert "cannot read" in dst.proxy_log() and "[carriers.spool]" in dst.proxy_log()
    assert "Failed to Load" in target.log_text() or "Failed to restore" in target.log_text()
    failure = last_failure(dst.rundir)
    assert failure and failure["operation"] == "load" and "spool" in str(failure["detail"])


def test_helper_save_failure_fails_pre_save_and_the_source_runs_on(sides, helpers):
    side, qemu = sides
    src, dst, source, target, before, info = migrate_pair(
        side, qemu, helpers, src_state=["--state-hex", "0102"], dst_args=())
    assert info["status"] == "completed"  # healthy first; now break the source's counter
    failure = failed_migration(side, qemu, helpers, "src2", ["--fail", "save"])
    assert failure and "helper 'counter'" in str(failure["detail"])
    assert "cannot save, told to fail" in str(failure["detail"])


def test_load_is_refused_unless_started_for_an_incoming_migration(sides, helpers):
    s = proxy_with_helpers(sides[0], helpers, "plain")
    from virt_vmstate.bus.connection import BusConnection, error_text, is_error
    with BusConnection.open(s.proxy_address, 5) as conn:
        proxy = HelperBus(conn).helpers()[0]
        reply = conn.call(new_method_call(DBusAddress("/org/qemu/VMState1", proxy.unique_name,
                                                      "org.qemu.VMState1"), "Load", "ay", (b"x",)), 5)
    assert is_error(reply)
    assert "not started for an incoming migration" in error_text(reply)[1]
    assert "domain vm" in error_text(reply)[1]


def test_state_too_big_for_any_carrier_fails_pre_save_and_the_source_runs_on(sides, helpers):
    side, qemu = sides
    failure = failed_migration(side, qemu, helpers, "big", ["--random-size", str(3 << 20)],
                               "[limits]\nmax_bundle_size = 1048576\n")
    assert failure and "max_bundle_size" in str(failure["detail"]) and "counter" in str(failure["detail"])


def test_only_root_and_the_qemu_user_may_connect_to_the_proxy(sides, helpers):
    """The proxy's socket is open to every uid on the file system: the proxy itself closes a
    connection from any other uid than root's and security.qemu_user's, as the bus policy did."""
    s = proxy_with_helpers(sides[0], helpers, "uids")
    path = s.proxy_address[len("unix:path="):]
    probe = ("import socket, sys\n"
             "s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])\n"
             "try:\n"
             "    s.sendall(b'\\0AUTH EXTERNAL ' + str(__import__('os').getuid()).encode().hex().encode() + b'\\r\\n')\n"
             "    print(repr(s.recv(100)))\n"
             "except OSError:\n"
             "    print(repr(b''))\n")
    # The system's python3: another user may not run a Python under root's home (pyenv).
    as_nobody = subprocess.run(["/usr/bin/python3", "-c", probe, path], user="nobody", capture_output=True,
                               timeout=30)
    assert as_nobody.stdout.strip() == b"b''", as_nobody  # closed, unanswered
    as_root = subprocess.run([sys.executable, "-c", probe, path], capture_output=True, timeout=30)
    assert as_root.stdout.startswith(b"b'OK "), as_root
    assert "refused a connection" in s.proxy_log() and "from uid 65534" in s.proxy_log()


def test_a_client_stuck_in_authentication_does_not_hold_up_the_others(sides, helpers):
    s = proxy_with_helpers(sides[0], helpers, "stuck")
    path = s.proxy_address[len("unix:path="):]
    with socket.socket(socket.AF_UNIX) as stuck:
        stuck.connect(path)
        stuck.sendall(b"\0AUTH")  # and never the end of the line
        assert ids_on_bus(s.proxy_address) == [stream.PROXY_ID]
        stuck.setblocking(False)
        with pytest.raises(BlockingIOError):  # still connected: the other was served meanwhile
            stuck.recv(100)


def test_a_proxy_told_no_migration_comes_serves_save_instead_of_waiting_for_load(sides, helpers):
    """'started begin' finds QEMU started without -incoming though a record said otherwise: QEMU
    is connected to the proxy, which keeps running, told by SIGUSR1 to serve Save."""
    import signal

    from virt_vmstate.bus.connection import BusConnection, error_text, is_error
    s = sides[0]("told", uuid.uuid4())
    helpers(s.helper_bus.address, "counter", "--state-hex", "0a0b")
    helpers(s.helper_bus.address, "slirp0", slirp=True)
    s.start_proxy(incoming="migration")
    save = new_method_call(DBusAddress("/org/qemu/VMState1", ":1.0", "org.qemu.VMState1"), "Save")
    with BusConnection.open(s.proxy_address, 5) as conn:
        refused = conn.call(save, 10)
        assert is_error(refused) and "wait for their state" in error_text(refused)[1]
        assert s.proc is not None
        os.kill(s.proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while "serving Save, not waiting for a Load" not in s.proxy_log():
            assert time.monotonic() < deadline, s.proxy_log()
            time.sleep(0.02)
        saved = conn.call(save, 10)
    assert not is_error(saved), error_text(saved)
    assert len(saved.body[0]) > 0


def test_a_second_proxy_on_a_socket_that_is_served_refuses_to_start(sides, helpers):
    s = proxy_with_helpers(sides[0], helpers, "twice")
    again = subprocess.run([sys.executable, "-m", "virt_vmstate", "--config", str(s.config), "proxy",
                            "--domain", "vm", "--uuid", str(s.uuid), "--helper-bus", s.helper_bus.address,
                            "--listen", s.proxy_address], env=dict(os.environ, PYTHONPATH=str(ROOT / "plugin")),
                           capture_output=True, timeout=60)
    assert again.returncode == 1
    assert b"another proxy already listens" in again.stderr
    assert ids_on_bus(s.proxy_address) == [stream.PROXY_ID]  # the first one still serves
