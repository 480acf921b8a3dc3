"""``virt-vmstate serve``: the hook's modules, imported once and kept warm.

libvirt runs the hook for every event of every domain, and a hook run of a domain
that is ours spends most of its time starting Python and importing what it needs.
With the server running, the bash hook does not start Python: it leaves its
request in ``<runtime_dir>/.hook-server/`` and a worker the server forked ahead of
it runs the very same hook code, already imported.  The server is an accelerator, never a
dependency: when it is not running, or goes away before a worker took the request,
the bash hook runs ``virt-vmstate hook`` itself.

The rendezvous, a directory private to root:

    pid            the server's PID and the protocol it speaks, ``PID 2`` (the bash
                   hook checks both)
    requests       a FIFO; a hook writes its own PID and a newline (atomic: one write
                   under PIPE_BUF)
    PID.req        the hook's request: NUL-separated
                   ``2 OUT ERR REPLY ARGC ARGS... ENVC ENV... XML``

OUT and ERR are the hook's own copies of libvirt's stdout and stderr pipes, REPLY a
pipe of its own that it reads a line at a time: ``claimed WORKER_PID``, ``deadline
SECONDS`` (how long it may take), ``exit STATUS``; or ``fallback``: the hook runs
itself.  The worker opens all three through ``/proc/PID/fd/``, so ``migrate begin``'s
filtered XML and every error reach libvirt as before, and the hook makes no file
(nor runs ``mkfifo``) to hear back.

A request is claimed by renaming ``PID.req``; a hook whose server went away takes
its request back the same way, so a request runs at most once.

The server never calls libvirt, never reads a domain's files, and holds no state
between requests: each worker loads the host config anew, so an edited config
counts from the next event, as it does without the server.
"""

from __future__ import annotations

import os
import sys
import time

from .errors import VMStateError
from .logs import log
from .values import Value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable

    from .config import HostConfig

SERVER_DIR = ".hook-server"
REQUESTS = "requests"
PID_FILE = "pid"
PROTOCOL = "2"  # in the pid file and first in each request; the bash hook checks it
_ENV_PASSED = ("VIRT_VMSTATE_CONFIG", "VIRT_VMSTATE_HOOK_TIMING")
_MAX_REQUEST = 64 * 1024 * 1024 + 64 * 1024  # the hook's MAX_XML, and room for the rest

# Everything a hook run may import, so that no worker pays for it.
WARM = ("virt_vmstate.hook", "virt_vmstate.phases", "virt_vmstate.managed",
        "virt_vmstate.config", "virt_vmstate.domxml", "virt_vmstate.flatjson",
        "virt_vmstate.stream", "virt_vmstate.carrier", "virt_vmstate.spool",
        "virt_vmstate.bundle", "virt_vmstate.streamreply", "virt_vmstate.transfer",
        "virt_vmstate.vmstate1", "virt_vmstate.busconn", "virt_vmstate.busconfig",
        "virt_vmstate.proxyspec", "virt_vmstate.proxy", "virt_vmstate.configcache",
        "base64", "binascii", "hashlib", "json", "lzma", "pwd", "select", "shutil",
        "signal", "stat", "syslog", "traceback")


class Request(Value):
    """A hook's request, as the bash hook wrote it: where its output goes (its copies of
    libvirt's stdout and stderr pipes) and its replies (a pipe of its own), its arguments,
    environment and the domain XML."""

    __slots__ = ("stdout_fd", "stderr_fd", "reply_fd", "argv", "env", "xml")

    def __init__(self, stdout_fd: int, stderr_fd: int, reply_fd: int, argv: list[str],
                 env: dict[str, str], xml: bytes) -> None:
        self.stdout_fd = stdout_fd
        self.stderr_fd = stderr_fd
        self.reply_fd = reply_fd
        self.argv = argv
        self.env = env
        self.xml = xml

    @staticmethod
    def reply_fd_of(data: bytes) -> int | None:
        """Where to reply to a request, even one that :meth:`decode` refuses."""
        parts = data.split(b"\0", 4)
        if len(parts) < 5 or parts[0] != PROTOCOL.encode() or not parts[3].isdigit():
            return None
        fd = int(parts[3])
        return fd if 2 < fd < 1 << 20 else None

    @classmethod
    def decode(cls, data: bytes) -> Request:
        """Raises ValueError for anything but a request."""
        parts = data.split(b"\0")
        if len(parts) < 7 or parts[0] != PROTOCOL.encode():
            raise ValueError("not a hook request")
        stdout_fd, stderr_fd, reply_fd, argc = int(parts[1]), int(parts[2]), int(parts[3]), int(parts[4])
        if not min(stdout_fd, stderr_fd, reply_fd) > 2:
            raise ValueError("a hook request without its own copies of stdout and stderr, or its reply pipe")
        if not 3 <= argc <= 4 or len(parts) < argc + 7:
            raise ValueError("a hook request with a wrong argument count")
        argv = [p.decode("utf-8", "surrogateescape") for p in parts[5:5 + argc]]
        envc = int(parts[5 + argc])
        entries = parts[6 + argc:6 + argc + envc]
        rest = parts[6 + argc + envc:]
        if len(entries) != envc or len(rest) != 2 or rest[1] != b"":
            raise ValueError("a hook request that is cut short")
        env = {}
        for entry in entries:
            name, equals, value = entry.decode("utf-8", "surrogateescape").partition("=")
            if not equals or name not in _ENV_PASSED:
                raise ValueError(f"a hook request passing {name!r}")
            env[name] = value
        return cls(stdout_fd, stderr_fd, reply_fd, argv, env, rest[0])


def server_dir(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, SERVER_DIR)


def serve(runtime_dir: str, config_path: str | None = None) -> int:
    """Run until SIGTERM or SIGINT; 0 then.  ``config_path`` is the host config the
    server was started with (None: the default)."""
    import signal

    from .rundir import make_private_dir, write_atomic
    directory = server_dir(runtime_dir)
    make_private_dir(runtime_dir)
    make_private_dir(directory)
    other = running_server(directory)
    if other is not None:
        raise VMStateError(f"another 'virt-vmstate serve' (PID {other}) serves {directory}",
                           hint="stop it first ('systemctl stop virt-vmstate' if systemd runs it)")
    for name in os.listdir(directory):  # a previous server's, and requests nobody will answer
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass
    fifo_path = os.path.join(directory, REQUESTS)
    os.mkfifo(fifo_path, 0o600)
    # Read-write: the FIFO never reports EOF when a hook closes it.  Non-blocking: a spare
    # waits for it in select(), and a stray line without its newline cannot hold it.
    fifo = os.open(fifo_path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    for name in WARM:
        __import__(name)

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped by the kernel
    pid_path = os.path.join(directory, PID_FILE)
    write_atomic(pid_path, f"{os.getpid()} {PROTOCOL}\n".encode(), durable=False)
    log.info("serving hooks from %s", directory)
    # A spare worker, forked ahead of the next event, waits for it on the FIFO; the
    # server forks the next one as soon as it is told that one took a request.  The
    # spares watch ``alive`` (its write end stays here) to end with the server.
    alive_r, alive_w = os.pipe2(os.O_CLOEXEC)
    try:
        while True:
            if not _run_spare(directory, config_path, fifo, alive_r, alive_w):
                time.sleep(1)  # a spare that cannot start or dies at once: not in a loop
    finally:
        for path in (pid_path, fifo_path):
            try:
                os.unlink(path)
            except OSError:
                pass
        log.info("no longer serving hooks from %s", directory)
    return 0


def running_server(directory: str) -> int | None:
    """The PID of the server that serves ``directory``, if one runs."""
    try:
        with open(os.path.join(directory, PID_FILE), "rb") as f:
            pid = int(f.read(32).split()[0])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid != os.getpid() and b"serve" in argv else None


def _run_spare(directory: str, config_path: str | None, fifo: int, alive_r: int, alive_w: int) -> bool:
    """Fork a spare worker and wait until it took a request (True) or ended without one."""
    taken_r, taken_w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError as e:
        log.error("cannot fork a worker: %s (hooks take their events back within 10 s and "
                  "run them themselves)", e.strerror)
        os.close(taken_r)
        os.close(taken_w)
        return False
    if pid == 0:  # pragma: no cover - the worker; it never returns
        status = 1
        try:
            os.close(taken_r)
            os.close(alive_w)
            status = _spare(directory, config_path, fifo, alive_r, taken_w)
        finally:
            os._exit(status)
    os.close(taken_w)
    try:
        took = os.read(taken_r, 1) == b"t"  # blocks; SIGTERM's SystemExit comes through
    finally:
        os.close(taken_r)
    if not took:
        log.error("a spare worker (PID %d) ended before it took a request", pid)
    return took


def _spare(directory: str, config_path: str | None, fifo: int, alive_r: int, taken_w: int) -> int:
    """Wait for the next request line, tell the server, and run it; the exit status."""
    import select
    import signal
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    _rehearse(config_path)
    while True:
        readable, _, _ = select.select([fifo, alive_r], [], [])
        if alive_r in readable:
            return 0  # the server is gone: so is its spare
        line = _read_line(fifo)
        if line.isdigit() and 0 < len(line) < 11:
            break
        log.warning("ignoring a request line that is not a PID: %r", line[:40])
    os.write(taken_w, b"t")
    os.close(taken_w)
    os.close(fifo)
    os.close(alive_r)
    return _work(directory, int(line))


def _rehearse(config_path: str | None) -> None:
    """Read the server's host config and parse a domain XML of ours once, ahead of the
    event: the pages a fresh fork copies as it first touches that code are copied now,
    not while a hook waits.  The worker reads the config anew all the same."""
    from .config import load_config
    from .domxml import parse_domain
    try:
        load_config(config_path)
        parse_domain(_REHEARSAL_XML)
    except Exception as e:  # noqa: BLE001 - never a reason for a spare not to serve
        log.debug("spare worker: the rehearsal ahead of the event failed: %s", e)


# A domain XML as a hook of ours gets it: the config, the stream marker and object, an
# incoming token.
_REHEARSAL_XML = (
    b"<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>rehearsal</name>"
    b"<uuid>00000000-0000-4000-8000-000000000000</uuid><metadata>"
    b'<vmstate:vmstate xmlns:vmstate="urn:x-virt-vmstate:domain:1"><vmstate:bus mode="managed"/>'
    b'<vmstate:missing-state policy="refuse"/><vmstate:helper id="h" profile="p"/></vmstate:vmstate>'
    b'<s:stream xmlns:s="urn:x-virt-vmstate:stream:1" object="yes"/>'
    b'<i:incoming xmlns:i="urn:x-virt-vmstate:incoming:1" token="' + b"0" * 32 + b'" kind="migration"/>'
    b"</metadata><devices><serial type='pty'><target port='0'/></serial></devices>"
    b"<qemu:commandline><qemu:arg value='-object'/><qemu:arg value='dbus-vmstate,id=x,addr=unix:path=/x'/>"
    b"</qemu:commandline></domain>")


def _read_line(fifo: int) -> bytes:
    """One line a hook wrote (one write under PIPE_BUF, so it is there whole), byte by byte:
    what follows it is the next spare's.  A line cut short ends where the FIFO runs dry."""
    line = b""
    while len(line) <= 16:
        try:
            byte = os.read(fifo, 1)
        except BlockingIOError:
            break
        if byte in (b"\n", b""):
            break
        line += byte
    return line


def _work(directory: str, client: int) -> int:
    """Claim and run hook process ``client``'s request; its exit status."""
    data = _claim(os.path.join(directory, f"{client}.req"))
    if data is None:
        return 0  # the hook took it back
    reply_fd = Request.reply_fd_of(data)
    try:
        if reply_fd is None:
            raise OSError(0, "no reply pipe named")
        reply = _open_reply(client, reply_fd)
    except OSError as e:
        # It cannot be told: after its claim wait it says so and fails the event.
        log.error("cannot answer hook process %d (%s): its event is not run", client, e.strerror)
        return 1
    try:
        request = Request.decode(data)
    except ValueError as e:
        log.error("hook process %d sent a request that cannot be read (%s); it runs itself", client, e)
        _write(reply, "fallback\n")
        return 0
    log.debug("worker %d: %s for hook process %d", os.getpid(), " ".join(request.argv), client)
    try:
        _take_stdio(client, request)
    except OSError as e:
        log.warning("cannot reach hook process %d's output (%s); it runs itself", client, e.strerror)
        _write(reply, "fallback\n")
        return 0
    _write(reply, f"claimed {os.getpid()}\n")
    status = 1
    later: list[Callable[[], None]] = []
    try:
        status = _run(request, reply, later)
    except BaseException:  # a bug: told where the hook's errors go, as the hook would
        import traceback
        traceback.print_exc()
        later.clear()
    finally:
        _let_go_of_stdio()
        _write(reply, f"exit {status}\n")
    if later:
        os.close(reply)
        _run_later(later)
    return status


def _let_go_of_stdio() -> None:
    """Flush the hook's output and let go of libvirt's pipes: libvirt waits for their end,
    which would otherwise also wait for this process's exit (tearing down a large process
    takes a while) or for the work after the answer."""
    sys.stdout.flush()
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)


def _run_later(later: list[Callable[[], None]]) -> None:
    """The work an event left for after its answer, once libvirt has it; whatever goes
    wrong is logged."""
    for work in later:
        try:
            work()
        except Exception as e:  # noqa: BLE001 - no one is left to tell but the log
            log.error("after the answer to libvirt: %s", e)


def _claim(path: str) -> bytes | None:
    """The request at ``path``, which no one else can claim after this; None if it is gone."""
    claimed = path + ".claimed"
    try:
        os.rename(path, claimed)
    except OSError:
        return None
    try:
        fd = os.open(claimed, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_uid != os.geteuid():
                return b""
            chunks = []
            size = 0
            while size <= _MAX_REQUEST:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)
    finally:
        os.unlink(claimed)


def _open_reply(client: int, fd: int) -> int:
    """The write end of hook process ``client``'s reply pipe; it holds one itself, so this
    never blocks and the hook never sees EOF."""
    import stat
    reply = os.open(f"/proc/{client}/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISFIFO(os.fstat(reply).st_mode):
        os.close(reply)
        raise OSError(0, f"its descriptor {fd} is not a pipe")
    return reply


def _take_stdio(client: int, request: Request) -> None:
    """The hook's own stdout and stderr (libvirt reads them), stdin from /dev/null, and its
    umask (what the processes it starts create, sockets included, is as without a server)."""
    with open(f"/proc/{client}/status", "rb") as f:
        for line in f:
            if line.startswith(b"Umask:"):
                os.umask(int(line.split()[1], 8))
    for target, fd in ((1, request.stdout_fd), (2, request.stderr_fd)):
        # O_APPEND: a regular file reopened here would otherwise be written from its start.
        out = os.open(f"/proc/{client}/fd/{fd}", os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        os.dup2(out, target)
        os.close(out)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


def _run(request: Request, reply: int, later: list[Callable[[], None]]) -> int:
    """The hook, as ``virt-vmstate hook`` runs it; ``reply`` learns when it starts, and
    ``later`` gets what may run after the answer."""
    from .hook import run_event
    for name in _ENV_PASSED:
        os.environ.pop(name, None)
    os.environ.update(request.env)

    def starting(config: HostConfig) -> None:
        # The hook gives up at its own deadline; the bash hook waits a little longer.
        _write(reply, f"deadline {int(config.timeouts.hook) + 5}\n")
    return run_event(request.argv, request.xml, sys.stdout.buffer, starting, fork_proxy=True, later=later)


def _write(fd: int, text: str) -> None:
    try:
        os.write(fd, text.encode())
    except OSError:
        pass  # the hook is gone; the work is done all the same


def run_server(config: HostConfig) -> int:
    """``virt-vmstate serve``: serve the hooks of the runtime dir ``config`` names."""
    from .logs import setup_logging
    setup_logging(config, "virt-vmstate-serve", stderr=True)
    return serve(config.runtime_dir, config.path)
