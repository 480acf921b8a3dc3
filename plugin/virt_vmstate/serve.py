"""``virt-vmstate serve``: the hook's modules, imported once and kept warm.

libvirt runs the hook for every event of every domain, and a hook run of a domain
that is ours spends most of its time starting Python and importing what it needs.
With the server running, the bash hook does not start Python: it leaves its
request in ``<runtime_dir>/.hook-server/`` and the server forks a worker that runs
the very same hook code, already imported.  The server is an accelerator, never a
dependency: when it is not running, or goes away before a worker took the request,
the bash hook runs ``virt-vmstate hook`` itself.

The rendezvous, a directory private to root:

    pid            the server's PID (the bash hook checks it is alive)
    requests       a FIFO; a hook writes its own PID and a newline (atomic: one write
                   under PIPE_BUF)
    PID.req        the hook's request: NUL-separated ``1 OUT ERR ARGC ARGS... ENVC ENV... XML``,
                   OUT and ERR its own copies of libvirt's stdout and stderr pipes
    PID.reply      a FIFO the hook reads, a line at a time: ``claimed WORKER_PID``,
                   ``deadline SECONDS`` (how long it may take), ``exit STATUS``; or
                   ``fallback``: the hook runs itself

A request is claimed by renaming ``PID.req``; a hook whose server went away takes
its request back the same way, so a request runs at most once.  The worker writes
to the hook's own stdout and stderr (libvirt's pipes, opened through ``/proc/PID/fd/``)
through the copies named in the request, so ``migrate begin``'s filtered XML and
every error reach libvirt as before.

The server never calls libvirt, never reads a domain's files, and holds no state
between requests: each worker loads the host config anew, so an edited config
counts from the next event, as it does without the server.
"""

from __future__ import annotations

import os
import sys

from .errors import VMStateError
from .logs import log
from .values import Value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .config import HostConfig

SERVER_DIR = ".hook-server"
REQUESTS = "requests"
PID_FILE = "pid"
REQUEST_FORMAT = b"1"
_ENV_PASSED = ("VIRT_VMSTATE_CONFIG", "VIRT_VMSTATE_HOOK_TIMING")
_MAX_REQUEST = 64 * 1024 * 1024 + 64 * 1024  # the hook's MAX_XML, and room for the rest

# Everything a hook run may import, so that no worker pays for it.
WARM = ("virt_vmstate.hook", "virt_vmstate.phases", "virt_vmstate.managed",
        "virt_vmstate.config", "virt_vmstate.domxml", "virt_vmstate.flatjson",
        "virt_vmstate.stream", "virt_vmstate.carrier", "virt_vmstate.spool",
        "virt_vmstate.bundle", "virt_vmstate.streamreply", "virt_vmstate.transfer",
        "virt_vmstate.vmstate1", "virt_vmstate.busconn", "virt_vmstate.busconfig",
        "virt_vmstate.proxyspec", "virt_vmstate.configcache",
        "base64", "binascii", "hashlib", "json", "lzma", "pwd", "select", "shutil",
        "signal", "stat", "syslog", "traceback", "uuid")


class Request(Value):
    """A hook's request, as the bash hook wrote it: where its output goes (its copies of
    libvirt's stdout and stderr pipes), its arguments, environment and the domain XML."""

    __slots__ = ("stdout_fd", "stderr_fd", "argv", "env", "xml")

    def __init__(self, stdout_fd: int, stderr_fd: int, argv: list[str], env: dict[str, str],
                 xml: bytes) -> None:
        self.stdout_fd = stdout_fd
        self.stderr_fd = stderr_fd
        self.argv = argv
        self.env = env
        self.xml = xml

    @classmethod
    def decode(cls, data: bytes) -> Request:
        """Raises ValueError for anything but a request."""
        parts = data.split(b"\0")
        if len(parts) < 6 or parts[0] != REQUEST_FORMAT:
            raise ValueError("not a hook request")
        stdout_fd, stderr_fd, argc = int(parts[1]), int(parts[2]), int(parts[3])
        if not (stdout_fd > 2 and stderr_fd > 2):
            raise ValueError("a hook request without its own copies of stdout and stderr")
        if not 3 <= argc <= 4 or len(parts) < argc + 6:
            raise ValueError("a hook request with a wrong argument count")
        argv = [p.decode("utf-8", "surrogateescape") for p in parts[4:4 + argc]]
        envc = int(parts[4 + argc])
        entries = parts[5 + argc:5 + argc + envc]
        rest = parts[5 + argc + envc:]
        if len(entries) != envc or len(rest) != 2 or rest[1] != b"":
            raise ValueError("a hook request that is cut short")
        env = {}
        for entry in entries:
            name, equals, value = entry.decode("utf-8", "surrogateescape").partition("=")
            if not equals or name not in _ENV_PASSED:
                raise ValueError(f"a hook request passing {name!r}")
            env[name] = value
        return cls(stdout_fd, stderr_fd, argv, env, rest[0])


def server_dir(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, SERVER_DIR)


def serve(runtime_dir: str) -> int:
    """Run until SIGTERM or SIGINT; 0 then."""
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
    # Read-write: the FIFO never reports EOF when a hook closes it.
    fifo = os.open(fifo_path, os.O_RDWR | os.O_CLOEXEC)
    for name in WARM:
        __import__(name)

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped by the kernel
    pid_path = os.path.join(directory, PID_FILE)
    write_atomic(pid_path, f"{os.getpid()}\n".encode(), durable=False)
    log.info("serving hooks from %s", directory)
    pending = b""
    try:
        while True:
            pending += os.read(fifo, 4096)
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.isdigit() and 0 < len(line) < 11:
                    _fork_worker(directory, int(line), fifo)
                else:
                    log.warning("ignoring a request line that is not a PID: %r", line[:40])
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
            pid = int(f.read(32))
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if pid != os.getpid() and b"serve" in argv else None


def _fork_worker(directory: str, client: int, fifo: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError as e:
        log.error("cannot fork a worker for hook process %d: %s (the hook takes its event back "
                  "within 10 s and runs it itself)", client, e.strerror)
        return
    if pid == 0:  # pragma: no cover - the worker; it never returns
        status = 1
        try:
            os.close(fifo)
            status = _work(directory, client)
        finally:
            os._exit(status)


def _work(directory: str, client: int) -> int:
    """Claim and run hook process ``client``'s request; its exit status."""
    import signal
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    data = _claim(os.path.join(directory, f"{client}.req"))
    if data is None:
        return 0  # the hook took it back
    reply_path = os.path.join(directory, f"{client}.reply")
    try:
        # The hook holds its reply FIFO open read-write, so this open never blocks.
        reply = os.open(reply_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return 1  # the hook is gone
    os.unlink(reply_path)
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
    try:
        status = _run(request, reply)
    except BaseException:  # a bug: told where the hook's errors go, as the hook would
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        _write(reply, f"exit {status}\n")
    return status


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


def _run(request: Request, reply: int) -> int:
    """The hook, as ``virt-vmstate hook`` runs it; ``reply`` learns when it starts."""
    from .hook import run_event
    for name in _ENV_PASSED:
        os.environ.pop(name, None)
    os.environ.update(request.env)

    def starting(config: HostConfig) -> None:
        # The hook gives up at its own deadline; the bash hook waits a little longer.
        _write(reply, f"deadline {int(config.timeouts.hook) + 5}\n")
    return run_event(request.argv, request.xml, sys.stdout.buffer, starting)


def _write(fd: int, text: str) -> None:
    try:
        os.write(fd, text.encode())
    except OSError:
        pass  # the hook is gone; the work is done all the same


def run_server(config: HostConfig) -> int:
    """``virt-vmstate serve``: serve the hooks of the runtime dir ``config`` names."""
    from .logs import setup_logging
    setup_logging(config, "virt-vmstate-serve", stderr=True)
    return serve(config.runtime_dir)
