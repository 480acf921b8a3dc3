"""Per-domain runtime directory ``<runtime_dir>/<uuid>/``: private, atomic, locked.

A reader never sees a partial file: files are written to a temporary name,
synced and renamed.  Two hooks for one domain never interleave: each holds an
exclusive lock on ``<runtime_dir>/.locks/<uuid>`` (kept outside the domain's
directory so removing the directory cannot split the lock).  Only names that
pass ``is_name`` become paths; the directory itself is named by a parsed UUID.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time

from ..core.layout import ASIDE_PREFIX, LOCKS_DIR, USED_DIR
from ..core.names import canonical_uuid, is_hex, is_name
from ..errors import DeadlineExceeded, RunDirError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from os import PathLike
    from typing import BinaryIO, Union
    from uuid import UUID

    AnyPath = Union[str, PathLike[str]]


def _checked_name(name: str) -> str:
    if not is_name(name, 128):
        raise RunDirError(f"refusing to use {name!r} as a file name")
    return name


def _describe(e: OSError, path: object) -> str:
    if e.errno == errno.ENOSPC:
        return f"no space left on the filesystem of {path}"
    if e.errno == errno.EROFS:
        return f"{path} is on a read-only filesystem"
    return f"{path}: {e.strerror or e}"


def write_atomic(path: AnyPath, data: bytes, mode: int = 0o600, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    ``durable`` also syncs the data and the directory, so the file survives a crash.
    """
    path = os.fspath(path)
    parent, name = os.path.split(path)
    tmp = os.path.join(parent, f".{name}.tmp.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileExistsError:
        os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        raise RunDirError(f"cannot write {path}: {_describe(e, parent)}") from None
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise RunDirError(f"cannot write {path}: {_describe(e, parent)}",
                          hint="free space or fix the filesystem, then retry") from None
    if durable:
        _sync_dir(parent)


def sync_file(path: AnyPath) -> None:
    """Make a file written without ``durable`` survive a crash: its data, then its name.
    Raises OSError."""
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _sync_dir(os.path.dirname(path))


def _sync_dir(path: str) -> None:
    try:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # a filesystem that cannot sync a directory keeps its names anyway


def open_regular(path: AnyPath) -> tuple[BinaryIO, int] | None:
    """``path`` opened for reading and its size, or None when it is not a regular file.

    A symlink is never followed; errors of open() are raised as they are.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb"), st.st_size


def read_capped(path: AnyPath, max_size: int) -> bytes:
    """Read a regular file of at most ``max_size`` bytes (no symlinks)."""
    try:
        opened = open_regular(path)
    except OSError as e:
        raise RunDirError(f"cannot read {path}: {e.strerror}") from None
    if opened is None:
        raise RunDirError(f"{path} is not a regular file")
    f, size = opened
    with f:
        if size > max_size:
            raise RunDirError(f"{path} is {size} bytes, over the cap of {max_size}")
        return f.read(max_size + 1)


def make_private_dir(path: str) -> None:
    """``path`` as a directory private to this user, created with its parents if needed."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    _private_dir(path)


def _private_dir(path: str) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise RunDirError(f"cannot create {path}: {_describe(e, path)}") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise RunDirError(f"{path} exists and is not a directory")
    # 0711 is allowed: helpers running as other users may reach the bus socket by path.
    if st.st_uid != os.geteuid() or st.st_mode & 0o066:
        raise RunDirError(f"{path} must be a directory owned by uid {os.geteuid()} with mode 0700",
                          hint=f"remove it or run: chown {os.geteuid()} {path}; chmod 700 {path}")


def abandoned_aside(base: str) -> list[RunDir]:
    """Runtime dirs set aside by a process that is gone before it removed them."""
    found: list[RunDir] = []
    try:
        entries = [e for e in os.scandir(base) if e.name.startswith(ASIDE_PREFIX) and e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return found
    for entry in entries:
        pid = entry.name[len(ASIDE_PREFIX):]
        if not pid.isdigit() or int(pid) == os.getpid() or os.path.exists(f"/proc/{pid}"):
            continue
        try:
            names = os.listdir(entry.path)
            if not names:
                os.rmdir(entry.path)
        except OSError:
            continue  # another stop swept it meanwhile
        for name in names:
            try:
                found.append(RunDir(entry.path, name))
            except RunDirError:
                pass  # not a domain's: never removed here
    return found


class RunDir:
    """The runtime directory of one domain."""

    def __init__(self, base: str, domain_uuid: str | UUID) -> None:
        uuid = canonical_uuid(str(domain_uuid))
        if uuid is None:
            raise RunDirError(f"refusing to use {str(domain_uuid)[:40]!r} as a domain UUID")
        self.base = base
        self.uuid = uuid
        self.path = os.path.join(base, uuid)
        self._lock_fd: int | None = None

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def create(self) -> RunDir:
        make_private_dir(self.base)
        _private_dir(self.path)
        return self

    def allow_traverse(self) -> None:
        """Let other users reach known paths inside (the bus socket), never list or read."""
        for path in (self.base, self.path):
            os.chmod(path, 0o711)

    def file(self, name: str) -> str:
        return os.path.join(self.path, _checked_name(name))

    def write(self, name: str, data: bytes) -> str:
        """Atomically, never synced: nothing in a runtime dir outlives the processes it
        describes (a host crash ends them all), and /run is memory anyway."""
        target = self.file(name)
        write_atomic(target, data, durable=False)
        return target

    def read(self, name: str, max_size: int) -> bytes:
        return read_capped(self.file(name), max_size)

    def has(self, name: str) -> bool:
        return os.path.exists(self.file(name))

    def discard(self, name: str) -> None:
        try:
            os.unlink(self.file(name))
        except FileNotFoundError:
            pass

    def clear(self, keep: tuple[str, ...] = ()) -> None:
        """Remove every entry of the directory but ``keep``: what an earlier run of the domain
        left (a socket file, a pidfile) never meets a new start."""
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name in keep:
                continue
            if entry.is_dir(follow_symlinks=False):
                import shutil
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    pass

    def remove(self) -> None:
        """Forget the domain: its directory, and its lock file when this run holds the lock.
        A directory set aside goes with the one that held it."""
        import shutil
        shutil.rmtree(self.path, ignore_errors=True)
        if os.path.basename(self.base).startswith(ASIDE_PREFIX):
            try:
                os.rmdir(self.base)
            except OSError:
                pass  # gone already, or another domain's is still there
        self._forget_lock()

    def _forget_lock(self) -> None:
        if self._lock_fd is not None:
            try:
                os.unlink(self.lock_path)
            except FileNotFoundError:
                pass

    def set_aside(self) -> RunDir:
        """Move the directory out of the domain's way, to ``.stopping-PID/`` beside it (PID:
        this process), forget the lock as ``remove`` does, and return the directory's new
        place: a start of the domain makes a new one, while this one is stopped."""
        aside = RunDir(os.path.join(self.base, f"{ASIDE_PREFIX}{os.getpid()}"), self.uuid)
        _private_dir(aside.base)
        try:
            os.rename(self.path, aside.path)
        except OSError as e:
            raise RunDirError(f"cannot move {self.path} to {aside.path}: {_describe(e, self.base)}") from None
        self._forget_lock()
        return aside

    @property
    def lock_path(self) -> str:
        return os.path.join(self.base, LOCKS_DIR, self.uuid)

    def lock(self, timeout: float) -> RunDir:
        """Take the domain's exclusive lock, waiting at most ``timeout`` seconds.

        The lock file is removed when the domain is forgotten (``remove``), so a
        lock taken on a file that was unlinked meanwhile is dropped and taken anew.
        """
        path = self.lock_path
        make_private_dir(self.base)
        _private_dir(os.path.dirname(path))
        deadline = time.monotonic() + timeout
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        os.close(fd)
                        raise DeadlineExceeded(
                            f"another virt-vmstate run held the lock of domain {self.uuid} "
                            f"for over {timeout:g} s",
                            hint="wait for it to finish; a stuck one can be found with "
                                 f"'fuser {path}'") from None
                    time.sleep(0.01)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                return self
            os.close(fd)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()


class UsedStates:
    """This host's ledger of helper states already used: Loaded here, or left with a
    source that migrated.  A carried state found in it is a replay.

    One empty file per state, named by its SHA-256, under ``<runtime_dir>/.used``;
    entries older than the oldest state any host would accept are pruned.
    """

    def __init__(self, base: str, max_age: float) -> None:
        self.base = base
        self.dir = os.path.join(base, USED_DIR)
        self.max_age = max_age

    def _path(self, sha256: str) -> str | None:
        return os.path.join(self.dir, sha256) if is_hex(sha256, 64) else None

    def add(self, sha256: str) -> None:
        path = self._path(sha256)
        if path is None:
            return
        make_private_dir(self.base)
        _private_dir(self.dir)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        except OSError as e:
            raise RunDirError(f"cannot record a used state in {self.dir}: {_describe(e, self.dir)}") from None
        self.prune()

    def __contains__(self, sha256: str) -> bool:
        path = self._path(sha256)
        return path is not None and os.path.exists(path)

    def prune(self) -> None:
        cutoff = time.time() - self.max_age - 60
        try:
            entries = list(os.scandir(self.dir))
        except OSError:
            return
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
            except OSError:
                pass
