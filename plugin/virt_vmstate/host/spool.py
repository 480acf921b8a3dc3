"""The spool carrier's files: sealed bundles on storage that both hosts mount.

The source writes ``<domain uuid>-<migration id>.vmstate`` atomically with mode
0600; the migration XML carries only that name, the size and the SHA-256.  The
destination reads the file back and checks both before anything is loaded.
Names come from another host's XML, so only plain file names become paths.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat

from ..core.domxml import StateElement, is_spool_name
from ..errors import BundleError, RunDirError
from .rundir import open_regular, write_atomic

SHARED_HINT = "check that both hosts mount the same directory as [carriers.spool] dir"


class Spool:
    """One host's view of the shared spool directory."""

    def __init__(self, directory: str) -> None:
        self.dir = directory

    def path(self, name: str) -> str:
        if not is_spool_name(name):
            raise BundleError(f"spool file name {name[:80]!r} is not a plain file name")
        return os.path.join(self.dir, name)

    def check_dir(self) -> None:
        try:
            st = os.stat(self.dir)
        except OSError as e:
            raise RunDirError(f"spool directory {self.dir}: {e.strerror}", hint=SHARED_HINT) from None
        if not stat.S_ISDIR(st.st_mode):
            raise RunDirError(f"spool directory {self.dir} is not a directory", hint=SHARED_HINT)

    def write(self, name: str, data: bytes) -> str:
        self.check_dir()
        target = self.path(name)
        # Not fsynced here: a migration's file lives only as long as the migration, which a
        # crash of either host fails anyway, and shared filesystems publish it on close.
        # The proxy syncs what may back a save image (rundir.sync_file), after the downtime.
        write_atomic(target, data, durable=False)
        return target

    def read(self, state: StateElement, max_size: int) -> bytes:
        """The spooled bundle named by ``state``, checked against its size and digest."""
        assert state.spool_file is not None
        path = self.path(state.spool_file)
        if state.size > max_size:
            raise BundleError(f"spool file {path} is said to be {state.size} bytes, over the cap "
                              f"of {max_size} bytes (limits.max_bundle_size)")
        try:
            opened = open_regular(path)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise BundleError(f"spool file {path} does not exist on this host",
                                  hint=SHARED_HINT) from None
            raise BundleError(f"cannot read spool file {path}: {e.strerror}", hint=SHARED_HINT) from None
        if opened is None:
            raise BundleError(f"spool file {path} is not a regular file")
        f, size = opened
        with f:
            if size != state.size:
                raise BundleError(f"spool file {path} is {size} bytes, the migration says "
                                  f"{state.size}: it was cut short or replaced",
                                  hint="the state was not used; migrate again")
            try:
                data = f.read(state.size + 1)
            except OSError as e:
                raise BundleError(f"cannot read spool file {path}: {e.strerror}",
                                  hint=SHARED_HINT) from None
        if len(data) != state.size or hashlib.sha256(data).hexdigest() != state.sha256:
            raise BundleError(f"spool file {path} does not match the SHA-256 the migration "
                              "carries: it was changed or replaced",
                              hint="the state was not used; migrate again")
        return data

    def remove(self, name: str) -> bool:
        try:
            os.unlink(self.path(name))
            return True
        except FileNotFoundError:
            return False
        except OSError:
            return False
