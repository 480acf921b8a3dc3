"""The parsed host config, kept between runs: ``<runtime_dir>/.config-cache``.

Importing a TOML parser costs a hook run more than all of its own work, and
the config changes rarely.  The cache holds the config's exact bytes and the
tables TOML parsed from them (in ``marshal`` form); it is used only when they
match the file just read, so an edited config is parsed anew on its next read,
whatever its timestamps say.  Its path is no part of it: every path in a config
is absolute, so the same bytes mean the same config wherever they are read
(the hook's /etc/virt-vmstate/config.toml, or a copy an operator names with
--config).  The file is trusted only when it is
private to this user in a private directory.  It is written only into a
runtime dir that exists (a hook of a domain that is ours creates it), so
reading the config never creates anything.  A cache that cannot be read or
written is simply not used.
"""

from __future__ import annotations

import marshal
import os
import stat

from ..core.layout import CONFIG_CACHE

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_FORMAT = 2
_MAX_SIZE = 4 << 20


class ConfigCache:
    def __init__(self, runtime_dir: str) -> None:
        self.dir = runtime_dir
        self.path = os.path.join(runtime_dir, CONFIG_CACHE)

    def get(self, raw: bytes) -> dict[str, Any] | None:
        """The tables parsed from ``raw``, if this cache holds them."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if not (_only_mine(os.fstat(fd)) and _only_mine_changes(os.stat(self.dir))):
                return None
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(_MAX_SIZE + 1)
        except OSError:
            return None
        finally:
            os.close(fd)
        try:
            entry = marshal.loads(data)
        except (EOFError, ValueError, TypeError):
            return None
        if (isinstance(entry, tuple) and len(entry) == 3 and entry[:2] == (_FORMAT, raw)
                and isinstance(entry[2], dict)):
            return entry[2]
        return None

    def put(self, raw: bytes, tables: dict[str, Any]) -> None:
        """Keep ``tables`` for the next run; nothing happens when they cannot be kept."""
        from ..errors import RunDirError
        from .rundir import write_atomic
        try:
            data = marshal.dumps((_FORMAT, raw, tables))
            directory = os.stat(self.dir)
        except (ValueError, OSError):  # a TOML date or time, or no runtime dir yet
            return
        if len(data) > _MAX_SIZE or not _only_mine_changes(directory):
            return
        try:
            write_atomic(self.path, data, durable=False)
        except (RunDirError, OSError):
            pass


def _only_mine(st: os.stat_result) -> bool:
    """A regular file only this user can read or write."""
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def _only_mine_changes(st: os.stat_result) -> bool:
    """A directory only this user can change."""
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022
