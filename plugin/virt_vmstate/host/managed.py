"""The managed processes of one domain: its private helper bus (a dbus-daemon), its profile
helpers, and for the stream carrier its proxy, on a socket bound here.

Every process started here is detached from the hook: its own session, stdin
from /dev/null, stdout and stderr to a log file in the domain's runtime dir,
never the hook's pipes (libvirt waits for EOF on those).  Each is recorded in a
pidfile with its kernel start time, so it is stopped by PID only while that PID
is still the same process.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import time

from ..core.layout import (BUS_SOCKET, READY_FILE, RUNTIME_DIR_MAX, SOCKET_PATH_MAX, bus_config_file, logfile,
                           pidfile, proxy_socket)
from ..core.names import is_name
from ..core.values import Value
from ..errors import DeadlineExceeded, ManagedProcessError, VMStateError
from ..logs import log
from .addresses import bus_address, proxy_address, socket_address

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Sequence

    from ..bus.vmstate1 import Helper, HelperBus
    from ..core.config import HostConfig, Profile
    from ..core.domxml import DomainXML
    from ..core.proxyspec import ProxySpec
    from .rundir import RunDir


class WaitingTime:
    """Seconds this process spent waiting for managed processes to come up; the hook
    reports it next to its own time (benchmarks/hook_overhead.py)."""

    seconds = 0.0

DAEMON_ROLES = ("bus",)  # stopped last: the proxy and helpers are connected to it
SOCKET_BACKLOG = 64  # connections that may wait for the process still starting behind a socket


class ProcessRecord(Value):
    """A pidfile, ``<role>.pid``: the process, and its start time to tell it from a later
    one with the same PID, as one line ``PID START_TIME ARGV0``."""

    __slots__ = ("role", "pid", "start_time", "argv0")

    def __init__(self, role: str, pid: int, start_time: int, argv0: str) -> None:
        self.role = role
        self.pid = pid
        self.start_time = start_time
        self.argv0 = argv0

    def encode(self) -> bytes:
        return f"{self.pid} {self.start_time} {self.argv0}\n".encode()

    @classmethod
    def decode(cls, role: str, data: bytes) -> ProcessRecord:
        """Raises ValueError for anything but a pidfile (JSON ones of earlier versions included)."""
        if data.startswith(b"{"):
            import json
            old = json.loads(data)
            return cls(role, int(old["pid"]), int(old["start_time"]), str(old["argv0"]))
        pid, start_time, argv0 = data.decode().rstrip("\n").split(" ", 2)
        return cls(role, int(pid), int(start_time), argv0)


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def helper_role(index: int) -> str:
    """The role (pidfile and log name) of a domain's helper, by its place in the metadata:
    an Id may not be a file name."""
    return f"helper-{index}"


def is_running(record: ProcessRecord) -> bool:
    return _start_time(record.pid) == record.start_time


def _detach(log_fd: int, keep: Sequence[int] = ()) -> None:
    """In a forked child: a session of its own, in /, stdin from /dev/null, stdout and
    stderr to ``log_fd``, and of the other descriptors only ``keep``."""
    os.setsid()
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    kept = {0, 1, 2, *keep}
    for fd in [int(entry) for entry in os.listdir("/proc/self/fd")]:
        if fd not in kept:
            try:
                os.close(fd)
            except OSError:
                pass  # the listing's own descriptor, gone already


def start_detached(argv: Sequence[str], log_fd: int, ids: tuple[int, int] | None = None,
                   listen_fd: int | None = None) -> int:
    """Run ``argv`` in a session of its own, in /, with stdin from /dev/null and stdout and
    stderr to ``log_fd``, as ``ids`` (uid, gid; no supplementary groups) if given.  No other
    descriptor stays open but ``listen_fd``, passed as descriptor 3 with ``LISTEN_FDS=1``
    and ``LISTEN_PID`` set, as systemd passes a socket it listens on.  Returns its PID;
    raises OSError when it could not start.  Never waited for: the hook exits long before it."""
    import subprocess
    env = None
    pass_fds: tuple[int, ...] = ()
    if listen_fd is not None:
        # LISTEN_PID must be the PID of the program that takes the socket: bash (whose
        # redirections take any descriptor number) sets it,
        # moves the socket to descriptor 3 and becomes that program.
        if "/" in argv[0] and not os.access(argv[0], os.X_OK):  # the shell would say so too late
            code = errno.EACCES if os.path.exists(argv[0]) else errno.ENOENT
            raise OSError(code, os.strerror(code))
        env = {key: value for key, value in os.environ.items() if not key.startswith("LISTEN_")}
        env["LISTEN_FDS"] = "1"
        argv = ["/bin/bash", "-c", f'LISTEN_PID=$$ exec "$0" "$@" 3<&{listen_fd} {listen_fd}<&-', *argv]
        pass_fds = (listen_fd,)
    if ids is not None:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                                   cwd="/", start_new_session=True, pass_fds=pass_fds, env=env,
                                   user=ids[0], group=ids[1], extra_groups=[])
    else:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                                   cwd="/", start_new_session=True, pass_fds=pass_fds, env=env)
    process.returncode = 0  # it outlives this process: not to be reaped, nor warned about, here
    return process.pid


def fork_detached(main: Callable[[], int], log_fd: int, name: str, keep: Sequence[int] = ()) -> int:
    """Run ``main`` in a copy of this process, detached as ``start_detached`` detaches what
    it runs (with the descriptors ``keep`` open), named ``name`` (its ``ps -o comm``);
    returns its PID.  No Python starts: the hook's modules are imported already, and a
    new interpreter's start would compete with QEMU's for the CPU
    (benchmarks/hook_overhead.py)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    status = 1  # pragma: no cover - the child; it never returns
    try:
        import signal
        _detach(log_fd, keep)  # closes the hook's pipes (libvirt waits for their EOF) and the domain's lock
        for signum in (signal.SIGALRM, signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        with open("/proc/self/comm", "w") as comm:
            comm.write(name)
        log.context = ""
        status = main()
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def run_detached(work: Callable[[], None], name: str) -> int:
    """``fork_detached`` with its output to /dev/null: work that outlives the hook run and
    logs through ``log`` alone."""
    def main() -> int:
        work()
        return 0
    fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        return fork_detached(main, fd, name)
    finally:
        os.close(fd)


def _tail(path: str, limit: int = 300) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return " ".join(f.read().decode("utf-8", "replace").split())
    except OSError:
        return ""


def _check_arg(kind: str, value: str) -> str:
    if not is_name(value, 255, "_.:@+-"):
        raise ManagedProcessError(
            f"{kind} {value[:60]!r} cannot be put into a profile command",
            hint="use letters, digits and '_.:@+-' in names that profiles use")
    return value


def _wait_gone(records: Sequence[ProcessRecord], deadline: float) -> None:
    """Wait until none of these processes runs, or until ``deadline``.

    Each exit wakes the wait at once through a pidfd (Linux 5.3); without pidfds, it polls.
    """
    import select
    poller = select.poll()
    pidfds = []
    for record in records:
        try:
            pidfds.append(os.pidfd_open(record.pid))
        except (AttributeError, OSError):  # Python < 3.9 or an older kernel; or it is gone
            continue
        poller.register(pidfds[-1], select.POLLIN)
    try:
        while any(is_running(r) for r in records):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if pidfds:
                for fd, _ in poller.poll(min(left, 0.1) * 1000):
                    poller.unregister(fd)  # exited: it would wake every poll from now on
            else:
                time.sleep(min(left, 0.01))
    finally:
        for fd in pidfds:
            os.close(fd)


class ManagedProcesses:
    """Starting, recording, finding and stopping one domain's managed processes."""

    def __init__(self, rundir: RunDir, config: HostConfig) -> None:
        self.rundir = rundir
        self.config = config

    def _address(self, socket_name: str) -> str:
        return socket_address(self.rundir, socket_name)

    @property
    def bus_address(self) -> str:
        return self._address(BUS_SOCKET)

    def running(self, role: str) -> ProcessRecord | None:
        for record in self.records():
            if record.role == role and is_running(record):
                return record
        return None

    def records(self) -> list[ProcessRecord]:
        found: list[ProcessRecord] = []
        try:
            names = sorted(name for name in os.listdir(self.rundir.path) if name.endswith(pidfile("")))
        except FileNotFoundError:
            return found
        for name in names:
            path = os.path.join(self.rundir.path, name)
            try:
                with open(path, "rb") as f:
                    found.append(ProcessRecord.decode(name[:-len(pidfile(""))], f.read(4096)))
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("ignoring unreadable pidfile %s", path)
        return found

    def _spawn(self, role: str, argv: Sequence[str], user: str | None = None,
               listen_fd: int | None = None, main: Callable[[], int] | None = None) -> ProcessRecord:
        """Start ``role``: ``argv``, or with ``main`` a fork of this process that runs it
        (``argv`` is then what it stands for, in the pidfile and the log); ``listen_fd``
        is passed on to either."""
        ids = None
        if user and user != "root":
            import pwd
            try:
                entry = pwd.getpwnam(user)
            except KeyError:
                raise ManagedProcessError(f"{role}: user {user!r} does not exist on this host") from None
            ids = (entry.pw_uid, entry.pw_gid)
        fd = os.open(self.rundir.file(logfile(role)), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                     0o600)
        try:
            pid = (fork_detached(main, fd, f"vmstate-{role}", () if listen_fd is None else (listen_fd,))
                   if main is not None
                   else start_detached(argv, fd, ids, listen_fd=listen_fd))
        except OSError as e:
            raise ManagedProcessError(f"{role}: cannot run {argv[0]}: {e.strerror}") from None
        finally:
            os.close(fd)
        start = _start_time(pid)
        record = ProcessRecord(role, pid, start if start is not None else -1, argv[0])
        self.rundir.write(pidfile(role), record.encode())
        log.info("started %s (pid %d%s): %s", role, pid, ", forked" if main else "", " ".join(argv))
        return record

    def start_bus(self) -> str:
        """Start the domain's private helper bus unless it is already running; its address.

        Nothing waits for the dbus-daemon to come up: its socket listens before it runs, so
        a helper or the proxy may connect at once, and is answered as soon as it is ready."""
        if not self.running("bus"):
            owners = self.config.security.helper_users
            from ..core.busconfig import bus_config_xml
            with self._listen(BUS_SOCKET, "bus") as listener:
                conf = bus_config_xml(None, qemu_user=self.config.security.qemu_user, helper_users=owners)
                conf_path = self.rundir.write(bus_config_file("bus"), conf.encode())
                self._spawn("bus", [self.config.bus.dbus_daemon, f"--config-file={conf_path}", "--nofork",
                                    "--nopidfile"], listen_fd=listener.fileno())
        return self.bus_address

    def _listen(self, socket_name: str, role: str) -> socket.socket:
        """A socket bound at ``socket_name`` in the runtime dir, listening, for ``role`` to take
        as systemd passes one: connections made before it runs wait in the backlog."""
        socket_path = os.path.join(self.rundir.path, socket_name)
        if len(socket_path.encode()) > SOCKET_PATH_MAX:
            raise ManagedProcessError(
                f"{role}: the socket path {socket_path} is {len(socket_path.encode())} bytes, over the "
                f"{SOCKET_PATH_MAX} the kernel allows",
                hint=f"set [paths] runtime_dir in {self.config.source} to a directory of at most "
                     f"{RUNTIME_DIR_MAX} characters, such as the default /run/virt-vmstate")
        return listening_socket(socket_path)

    def start_stream(self, dom: DomainXML, incoming: str | None, deadline: float) -> None:
        """The proxy: what a dbus-vmstate object needs before QEMU creates it."""
        if self.spawn_proxy(dom, incoming):
            self.wait_for_proxy(deadline)

    def stop_stream(self) -> None:
        self.stop_roles(("proxy",))
        self.rundir.discard(proxy_socket(self.rundir.uuid))

    def spawn_proxy(self, dom: DomainXML, incoming: str | None,
                    run_here: Callable[[ProxySpec, HostConfig], int] | None = None) -> bool:
        """Start the domain's proxy on its socket, bound here, unless it runs (False);
        ``wait_for_proxy`` waits until it serves.  QEMU may connect at once: it is answered
        when the proxy is up.  With ``run_here`` (the proxy's main), it runs in a copy of this
        process, not a new Python: see ``fork_detached``."""
        from ..core.proxyspec import ProxySpec, proxy_argv
        assert dom.config is not None
        if self.running("proxy"):
            return False
        if self.config.security.qemu_user != "root":
            self.rundir.allow_traverse()  # QEMU, as the qemu user, reaches the socket by path
        self.rundir.discard(READY_FILE)
        config = self.config
        with self._listen(proxy_socket(self.rundir.uuid), "proxy") as listener:
            fd = listener.fileno()
            spec = ProxySpec(dom.name, dom.uuid, bus_address(dom, self.config), proxy_address(dom, self.config),
                             dom.config.required_ids, incoming)
            main = None if run_here is None else (lambda: run_here(spec.replace(listen_fd=fd), config))
            self._spawn("proxy", proxy_argv(sys.executable, self.config.path, spec), main=main, listen_fd=fd)
        return True

    def proxy_forget_incoming(self) -> None:
        """Tell a running proxy started for an incoming migration that none comes: QEMU
        was started without -incoming, so it is to serve Save, not wait for a Load."""
        record = self.running("proxy")
        if record is not None:
            import signal
            os.kill(record.pid, signal.SIGUSR1)

    def wait_for_proxy(self, deadline: float) -> None:
        """Wait until the proxy serves (it writes its PID to ``proxy.ready``); fail as soon
        as it exits, or at ``deadline``.  Nothing to wait for without a proxy record."""

        records = self.records()  # the same processes all along: read once
        record = next((r for r in records if r.role == "proxy"), None)
        if record is None:
            return
        ready = f"{record.pid}\n".encode()

        def written() -> bool:
            try:
                return self.rundir.read(READY_FILE, 64) == ready
            except VMStateError:
                return False  # not written yet
        started = time.monotonic()
        try:
            while True:
                self._check_daemons_alive(records)
                if not is_running(record):
                    raise ManagedProcessError(f"the virt-vmstate proxy exited: {self._log_tail(record)}")
                if written():
                    return
                if time.monotonic() >= deadline:
                    raise DeadlineExceeded(f"the virt-vmstate proxy did not come up in time: "
                                           f"{self._log_tail(record)}")
                time.sleep(0.002)
        finally:
            WaitingTime.seconds += time.monotonic() - started

    def _log_tail(self, record: ProcessRecord) -> str:
        return _tail(self.rundir.file(logfile(record.role)))

    def _check_daemons_alive(self, records: Sequence[ProcessRecord]) -> None:
        """Fail at once if a dbus-daemon among ``records`` exited: the proxy and helpers
        connected to it would never come up, and a wait for them would last until its deadline."""
        for record in records:
            if record.role in DAEMON_ROLES and not is_running(record):
                raise ManagedProcessError(
                    f"the managed dbus-daemon ({record.role}) exited: {self._log_tail(record)}",
                    hint=f"check bus.dbus_daemon in the host config, and the daemon's log "
                         f"{self.rundir.file(logfile(record.role))}")

    def stop_roles(self, roles: Sequence[str], grace: float = 3.0) -> None:
        """Stop the processes of these roles (for ``disable``), by PID."""
        self._stop([r for r in self.records() if r.role in roles], grace)
        for role in roles:
            self.rundir.discard(pidfile(role))

    def start_helpers(self, dom: DomainXML, profiles: dict[str, Profile], incoming: bool) -> None:
        """Start each helper that names a profile, unless it is already running."""
        assert dom.config is not None
        running = {r.role for r in self.records() if is_running(r)}
        if any(spec.profile and profiles[spec.profile].user not in (None, "root")
               for spec in dom.config.helpers):
            self.rundir.allow_traverse()
        for index, spec in enumerate(dom.config.helpers):
            role = helper_role(index)
            if spec.profile is None or role in running:
                continue
            profile = profiles[spec.profile]
            # argv is never parsed by a shell: only what a profile puts into it (often a
            # path) is checked, so a domain name with a space starts as long as no
            # profile uses {name}.
            used = profile.placeholders()
            values = {"bus": self.bus_address, "rundir": self.rundir.path, "uuid": dom.uuid,
                      "id": _check_arg("helper Id", spec.id) if "id" in used else spec.id,
                      "name": _check_arg("domain name", dom.name) if "name" in used else dom.name}
            self._spawn(role, profile.argv(values, incoming), profile.user)

    def wait_for_helpers(self, dom: DomainXML, ids: Sequence[str], deadline: float) -> None:
        """Wait until every Id in ``ids`` is on the bus; fail early if a managed helper of
        ``dom`` died."""
        self.open_when_helpers_up(dom, ids, deadline)[0].close()

    def open_when_helpers_up(self, dom: DomainXML, ids: Sequence[str], deadline: float, *,
                             call_timeout: float | None = None, state_cap: int | None = None,
                             ) -> tuple[HelperBus, list[Helper]]:
        """``wait_for_helpers``, keeping the bus open: it, and the helpers found on it."""
        from ..bus.vmstate1 import DEFAULT_CALL_TIMEOUT, DEFAULT_STATE_CAP, open_when_present
        started = time.monotonic()
        try:
            return open_when_present(self.bus_address, ids, deadline,
                                     check=lambda: self._check_helpers_alive(dom),
                                     call_timeout=DEFAULT_CALL_TIMEOUT if call_timeout is None else call_timeout,
                                     state_cap=DEFAULT_STATE_CAP if state_cap is None else state_cap)
        finally:
            WaitingTime.seconds += time.monotonic() - started

    def _check_helpers_alive(self, dom: DomainXML) -> None:
        assert dom.config is not None
        records = self.records()
        self._check_daemons_alive(records)  # a helper without its bus exits too: name the cause
        ids = {helper_role(index): spec.id for index, spec in enumerate(dom.config.helpers)}
        for record in records:
            if record.role in ids and not is_running(record):
                raise ManagedProcessError(
                    f"managed helper {ids[record.role]!r} ({record.argv0}) exited: {self._log_tail(record)}",
                    hint="check the profile's command in the host config, and the helper's log "
                         f"{self.rundir.file(logfile(record.role))}")

    def stop_all(self, grace: float = 3.0) -> None:
        """Stop the proxy and helpers first, then the buses; each only while its PID is still
        that process.  Their pidfiles go too."""
        roles = [r.role for r in self.records()]
        self.stop_roles([r for r in roles if r not in DAEMON_ROLES], grace)
        self.stop_roles([r for r in roles if r in DAEMON_ROLES], grace)

    def stop_helpers(self) -> None:
        """Stop the helpers; keep their bus, and the proxy (QEMU is connected to it)."""
        self.stop_roles([r.role for r in self.records() if r.role not in (*DAEMON_ROLES, "proxy")])
        # Their own sockets go with them: a helper started again needs its path free.
        import stat
        for entry in os.scandir(self.rundir.path):
            if (entry.name not in (BUS_SOCKET, proxy_socket(self.rundir.uuid))
                    and stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode)):
                os.unlink(entry.path)

    def _stop(self, records: Sequence[ProcessRecord], grace: float) -> None:
        import signal
        live = [r for r in records if is_running(r)]
        for record in live:
            log.info("stopping %s (pid %d)", record.role, record.pid)
            os.kill(record.pid, signal.SIGTERM)
        _wait_gone(live, time.monotonic() + grace)
        killed = [r for r in live if is_running(r)]
        for record in killed:
            log.warning("%s (pid %d) ignored SIGTERM; killing it", record.role, record.pid)
            os.kill(record.pid, signal.SIGKILL)
        _wait_gone(killed, time.monotonic() + 1.0)  # SIGKILL takes effect a moment later


def listening_socket(path: str) -> socket.socket:
    """A socket bound at ``path`` (replacing a stale one) and listening, that any user may
    connect to: who may is for the runtime dir's permissions and the process behind it to
    say (the bus's policy, the proxy's uid check), as dbus-daemon leaves the sockets it binds."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(path)
        os.chmod(path, 0o777)
        listener.listen(SOCKET_BACKLOG)
    except BaseException:
        listener.close()
        raise
    return listener
