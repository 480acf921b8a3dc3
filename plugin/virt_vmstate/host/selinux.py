"""The SELinux label of a domain's proxy socket: written as an extended attribute, as
``chcon`` does, without libselinux.  Which label, and why, is ``core/confinement.py``'s."""

from __future__ import annotations

import errno
import os

from ..core.confinement import socket_context
from ..core.layout import proxy_socket
from ..errors import ManagedProcessError
from ..logs import log

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..core.domxml import DomainXML
    from .rundir import RunDir

XATTR = "security.selinux"


def label_of(path: str) -> str | None:
    """A file's SELinux label, or None where it has none (no SELinux, no file)."""
    try:
        return os.getxattr(path, XATTR, follow_symlinks=False).rstrip(b"\0").decode()
    except (OSError, UnicodeDecodeError):
        return None


def label_proxy_socket(rundir: RunDir, dom: DomainXML) -> str:
    """Give the domain's proxy socket the domain's own ``<imagelabel>``, so that its QEMU,
    and no other, may connect to it; the label."""
    context = socket_context(dom.selinux_image_label, dom.name)
    path = rundir.file(proxy_socket(rundir.uuid))
    try:
        os.setxattr(path, XATTR, context.encode() + b"\0", follow_symlinks=False)
    except OSError as e:
        hint = ("the runtime dir's file system keeps no SELinux labels: keep [paths] runtime_dir on /run"
                if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) else
                "the hook's SELinux domain may not relabel files here: see the audit log (ausearch -m AVC)")
        raise ManagedProcessError(f"cannot label the proxy socket {path} {context}: {e.strerror}",
                                  hint=hint) from None
    log.info("proxy socket labelled %s for QEMU", context)
    return context
