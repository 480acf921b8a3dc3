"""Real processes for tests: a private dbus-daemon and helpers, stopped by PID."""

from __future__ import annotations

import array
import itertools
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

HERE = Path(__file__).resolve().parent
TEST_HELPER = HERE / "helpers" / "vmstate_helper.py"
SLIRP_HELPER = "/usr/bin/libslirp-helper"
_serial = itertools.count()

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
  <limit name="max_message_size">134217728</limit>
  <limit name="max_incoming_bytes">1000000000</limit>
  <limit name="max_outgoing_bytes">1000000000</limit>
  <limit name="reply_timeout">600000</limit>
</busconfig>
"""


# The command from this checkout, with no host config: what the CLI tests run.
COMMAND_ENV = dict(os.environ, PYTHONPATH=str(HERE.parent / "plugin"), VIRT_VMSTATE_CONFIG="/dev/null")


def vmstate(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m virt_vmstate ARGS``, its output as text."""
    return subprocess.run([sys.executable, "-m", "virt_vmstate", *args], env=COMMAND_ENV,
                          capture_output=True, text=True, timeout=timeout)


def write_hook_script(path: Path, command: object) -> Path:
    """The project's hooks/qemu at ``path``, running ``command`` where it runs /usr/bin/virt-vmstate."""
    path.write_text((HERE.parent / "hooks" / "qemu").read_text().replace(
        "VIRT_VMSTATE=/usr/bin/virt-vmstate", f"VIRT_VMSTATE={command}"))
    path.chmod(0o755)
    return path


def helper_profiles_toml(python: str = sys.executable) -> str:
    """Host-config profiles for the test helper ("counter") and libslirp-helper ("slirp")."""
    return f"""
[profiles.counter]
command = ["{python}", "{TEST_HELPER}", "--bus", "{{bus}}", "--id", "{{id}}"]
incoming_args = ["--incoming"]
{slirp_profile("slirp")}"""


def slirp_profile(name: str, up_before: Optional[str] = None) -> str:
    """A host-config profile running libslirp-helper, on a socket of its own in the runtime dir."""
    return (f"[profiles.{name}]\n"
            f'command = ["{SLIRP_HELPER}", "--socket-path", "{{rundir}}/{{id}}.sock", '
            '"--dbus-address", "{bus}", "--dbus-id", "{id}"]\n'
            'incoming_args = ["--dbus-incoming"]\n' + (f'up_before = "{up_before}"\n' if up_before else ""))


def bench_helper_profile(name: str, *args: str) -> str:
    """A host-config profile running the test helper with ``args``, up while QEMU starts
    (QEMU does not connect to it), as the benchmarks use it."""
    argv = ", ".join(f'"{a}"' for a in [sys.executable, str(TEST_HELPER), "--bus", "{bus}", "--id", "{id}",
                                          *args])
    return (f"[profiles.{name}]\ncommand = [{argv}]\nincoming_args = [\"--incoming\"]\n"
            'up_before = "guest"\n')


def stop_pid(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Stop a process we started, by its PID, and reap it."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout)
    except ProcessLookupError:
        pass


class DBusDaemon:
    """A private dbus-daemon on a unix socket in ``directory``."""

    def __init__(self, directory: Path, config_text: Optional[str] = None) -> None:
        """``config_text``: a whole dbus-daemon config instead of the permissive test one."""
        directory.mkdir(parents=True, exist_ok=True)
        self.socket = directory / "bus.sock"
        self.address = f"unix:path={self.socket}"
        config = directory / "bus.conf"
        config.write_text(config_text or BUS_CONFIG.format(socket=self.socket))
        with open(directory / "bus.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["dbus-daemon", f"--config-file={config}", "--nofork", "--nopidfile", "--print-address=1"],
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        if not ready or not self.proc.stdout.readline():
            stop_pid(self.proc)
            raise RuntimeError("dbus-daemon did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_pid(self.proc)
        if self.proc.stdout:
            self.proc.stdout.close()


def dbus_broker_binary() -> Optional[str]:
    """dbus-broker, the other D-Bus bus daemon: the system's, or the copy that
    ``make deps`` unpacks into build/ (its package would become the system bus)."""
    for candidate in (os.environ.get("DBUS_BROKER", ""), "/usr/bin/dbus-broker",
                      str(HERE.parent / "build" / "dbus-broker" / "usr" / "bin" / "dbus-broker")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


# A policy for AddListener that lets everyone connect, own, send and receive, as
# BUS_CONFIG does for dbus-daemon.  Its type is dbus-broker's (src/launch/policy.c):
# per-uid batches, uid/gid range batches, SELinux names, AppArmor, the bus type.
_BROKER_BATCH = "bta(btbs)a(btssssuutt)a(btssssuutt)"
_BROKER_POLICY_TYPE = f"(a(u({_BROKER_BATCH}))a(buu({_BROKER_BATCH}))a(ss)bs)"
_ANY_MESSAGE = (True, 1, "", "", "", "", 0, 0, 0, 2 ** 64 - 1)
_BROKER_ALLOW_ALL = ([(0xFFFFFFFF, (True, 1, [(True, 1, True, "")], [_ANY_MESSAGE], [_ANY_MESSAGE]))],
                     [], [], False, "")


class DBusBroker:
    """A private dbus-broker on a unix socket in ``directory``, as permissive as DBusDaemon.

    dbus-broker takes its listening socket and policy from a controller over a
    socketpair (its launcher's job, which needs systemd): this object is that
    controller.  The broker exits when the controller's end closes."""

    def __init__(self, directory: Path, binary: Optional[str] = None) -> None:
        binary = binary or dbus_broker_binary()
        if binary is None:
            raise RuntimeError("no dbus-broker: run 'make deps', or set DBUS_BROKER")
        directory.mkdir(parents=True, exist_ok=True)
        self.socket = directory / "bus.sock"
        self.address = f"unix:path={self.socket}"
        # The broker accepts on its own event loop: the socket must not block.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        listener.bind(str(self.socket))
        listener.listen(256)
        self.controller, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Only the broker keeps its end: a broker that exits is then EOF on ours.
            with theirs, open(directory / "bus.log", "ab") as log:
                self.proc = subprocess.Popen(
                    [binary, "--controller", str(theirs.fileno()), "--machine-id", os.urandom(16).hex()],
                    pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    start_new_session=True)
            self._add_listener(listener)
        except BaseException:
            self.stop()
            raise
        finally:
            listener.close()

    def _add_listener(self, listener: socket.socket) -> None:
        from jeepney.auth import BEGIN, Authenticator
        from jeepney.low_level import Endianness, Header, HeaderFields, Message, MessageType, Parser
        self.controller.settimeout(10)
        auth = Authenticator(enable_fds=True)
        for request in auth:
            self.controller.sendall(request)
            answer = self.controller.recv(1024)
            if not answer:
                raise RuntimeError("dbus-broker closed its controller socket: see its bus.log")
            auth.feed(answer)
        self.controller.sendall(BEGIN)
        # A peer-to-peer call with no destination, which jeepney's wrappers do not make.
        call = Message(Header(Endianness.little, MessageType.method_call, 0, 1, -1, -1, {
            HeaderFields.path: "/org/bus1/DBus/Broker", HeaderFields.interface: "org.bus1.DBus.Broker",
            HeaderFields.member: "AddListener", HeaderFields.signature: "ohv"}),
            ("/org/bus1/DBus/Listener/0", listener.fileno(), (_BROKER_POLICY_TYPE, _BROKER_ALLOW_ALL)))
        fds: List[int] = []
        data = call.serialise(serial=1, fds=fds)
        self.controller.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        parser = Parser()
        while True:
            chunk = self.controller.recv(65536)
            if not chunk:
                raise RuntimeError("dbus-broker closed its controller socket: see its bus.log")
            parser.add_data(chunk)
            reply = parser.get_next_message()
            if reply is not None:
                break
        if reply.header.message_type != MessageType.method_return:
            raise RuntimeError(f"dbus-broker refused AddListener: {reply.body}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if hasattr(self, "proc"):
            stop_pid(self.proc)
        self.controller.close()


class HelperProcess:
    """A helper process on a bus; ready once it owns org.qemu.VMState1."""

    def __init__(self, argv: Sequence[str], log: Path, ready: Optional[Path] = None,
                 address: Optional[str] = None, helper_id: Optional[str] = None) -> None:
        self.argv = list(argv)
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=out, start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"helper exited early ({self.proc.returncode}): {log.read_text()}")
            if ready is not None and ready.exists():
                return
            if ready is None and address and helper_id and helper_id in ids_on_bus(address):
                return
            time.sleep(0.01)
        stop_pid(self.proc)
        raise RuntimeError(f"helper did not become ready: {log.read_text()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_pid(self.proc)


def ids_on_bus(address: str) -> List[str]:
    from virt_vmstate.bus.vmstate1 import HelperBus
    try:
        with HelperBus.open(address, call_timeout=5) as bus:
            return [h.id for h in bus.helpers()]
    except Exception:
        return []


def test_helper(address: str, helper_id: str, workdir: Path, *extra: str) -> HelperProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    pidfile = workdir / f"{helper_id[:40]}-{next(_serial)}.pid"
    argv = [sys.executable, str(TEST_HELPER), "--bus", address, "--id", helper_id,
            "--pidfile", str(pidfile), *extra]
    return HelperProcess(argv, pidfile.with_suffix(".log"), ready=pidfile)


def slirp_helper(address: str, helper_id: str, workdir: Path, incoming: bool = False) -> HelperProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    sock = workdir / f"{helper_id}-{next(_serial)}.sock"  # slirp needs a fresh socket each start
    argv = [SLIRP_HELPER, "--socket-path", str(sock), "--dbus-address", address,
            "--dbus-id", helper_id]
    if incoming:
        argv.append("--dbus-incoming")
    return HelperProcess(argv, sock.with_suffix(".log"), address=address, helper_id=helper_id)

