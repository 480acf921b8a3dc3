"""Whether a domain's QEMU is confined (AppArmor, SELinux), and what that means for the
stream carrier, whose QEMU connects to the domain's proxy socket.  Pure code: the caller
reads the host's files.

What a confined QEMU needs to reach its proxy, and why each domain reaches only its own:

- AppArmor: a file rule for the socket's path.  The path is ``RUNTIME_DIR/UUID/libvirt-UUID``
  and the packages' rule (``packaging/apparmor``) names ``@{profile_name}``, which libvirt's
  per-domain profile expands to ``libvirt-UUID``: one rule, each QEMU its own socket.
- SELinux: ``sock_file write`` on the socket and ``unix_stream_socket connectto`` on the
  proxy's domain.  The proxy is forked by the hook and keeps its context (RHEL 9:
  ``virtd_t``, which ``svirt_t`` may connect to).  The socket is labelled with the domain's
  own ``<imagelabel>`` (``svirt_image_t`` and the domain's MCS categories), as libvirt labels
  the files of a domain: ``svirt_t`` may write ``svirt_image_t`` sock_files, and MCS lets a
  QEMU write only those of its own categories.
- Neither needs a D-Bus rule: no dbus-daemon stands between QEMU and the proxy
  (``bus/peer.py``), so SELinux's ``dbus`` class and AppArmor's ``dbus`` rules are never
  checked for QEMU's messages.
"""

from __future__ import annotations

import re

from ..errors import DomainXMLError
from .values import Value

# user:role:type:level, the level an MLS/MCS range (s0, s0:c1,c2, s0-s0:c0.c1023).
_CONTEXT = re.compile(r"[a-z0-9_]+:[a-z0-9_]+:[a-z0-9_]+:s[0-9]+(?::c[0-9]+(?:[.,]c[0-9]+)*)?"
                      r"(?:-s[0-9]+(?::c[0-9]+(?:[.,]c[0-9]+)*)?)?")

CONFINING = ("apparmor", "selinux")


def confining_models(security_models: tuple[str, ...]) -> list[str]:
    """Of the security drivers that label a domain's QEMU (``DomainXML.security_models``),
    those that confine it."""
    return [model for model in security_models if model in CONFINING]


class Verdict(Value):
    """``ok``: True (nothing missing), False (the stream carrier will fail), None (unknown
    here: a warning); ``detail``: what was found and what to do."""

    __slots__ = ("ok", "detail")

    def __init__(self, ok: bool | None, detail: str) -> None:
        self.ok = ok
        self.detail = detail


def socket_context(image_label: str | None, domain: str) -> str:
    """The SELinux context for the proxy socket of a domain whose ``<imagelabel>`` is
    ``image_label``: that label itself, once it reads as a context."""
    if not image_label:
        raise DomainXMLError(f"domain {domain}: SELinux labels its QEMU, but the domain XML has no "
                             "<imagelabel> to label its proxy socket with",
                             hint="libvirt writes it by 'start begin' for a dynamic label; give a static "
                                  "<seclabel> an <imagelabel> too")
    if len(image_label) > 255 or not _CONTEXT.fullmatch(image_label):
        raise DomainXMLError(f"domain {domain}: its <imagelabel> {image_label[:80]!r} is not an SELinux "
                             "context (user:role:type:level)")
    return image_label


def stream_verdict(models: list[str], *, apparmor_rule: bool, includes_drop_ins: bool) -> Verdict:
    """What the confinement of the domain's QEMU means for its proxy socket.  ``apparmor_rule``:
    the package's rule is installed (abstractions/libvirt-qemu.d/virt-vmstate);
    ``includes_drop_ins``: libvirt's abstraction includes that directory (libvirt 9.6 on)."""
    if not models:
        return Verdict(True, "QEMU is not confined (libvirt's security driver is none)")
    if "selinux" in models:
        return Verdict(True, "SELinux confines QEMU (svirt): its proxy socket gets the domain's "
                             "<imagelabel> at 'start begin', and no policy module is needed "
                             "(verified offline only, see docs/security.md)")
    if not apparmor_rule:
        return Verdict(False, "AppArmor confines QEMU, and the rule that lets it reach its proxy socket is not "
                              "installed: install virt-vmstate's package, or copy packaging/apparmor/"
                              "virt-vmstate to /etc/apparmor.d/abstractions/libvirt-qemu.d/")
    if not includes_drop_ins:
        return Verdict(None, "AppArmor confines QEMU, but this libvirt's abstraction (before 9.6) does not "
                             "include abstractions/libvirt-qemu.d/: where the kernel mediates sockets, add "
                             "the line of /etc/apparmor.d/abstractions/libvirt-qemu.d/virt-vmstate to "
                             "/etc/apparmor.d/local/abstractions/libvirt-qemu")
    return Verdict(True, "AppArmor confines QEMU; its rule for its own proxy socket is installed "
                         "(verified offline only, see docs/security.md)")


def last_start_error(log_tail: str) -> str | None:
    """QEMU's "failed to connect to DBus" of the domain's last start, from the end of
    libvirt's log of its QEMU, or None when that start did not fail so.  libvirt begins
    each start's part of the log with a "starting up" line."""
    error = None
    for line in log_tail.splitlines():
        if "starting up" in line:
            error = None
        elif "failed to connect to DBus" in line:
            error = line.strip()
    return error


def connect_failure(error: str, models: list[str], socket_path: str) -> str | None:
    """What QEMU's "failed to connect to DBus" (its object's error, over QMP or in its log)
    means for a domain confined by ``models``: the cause and the fix, in one line; None
    for any other error."""
    if "failed to connect to DBus" not in error:
        return None
    if "Permission denied" in error or "Operation not permitted" in error:
        if "apparmor" in models:
            return (f"AppArmor denied QEMU its proxy socket {socket_path}: install virt-vmstate's rule "
                    "(abstractions/libvirt-qemu.d/virt-vmstate; before libvirt 9.6 its line in "
                    "local/abstractions/libvirt-qemu) and see 'journalctl -k -g apparmor=.DENIED'")
        if "selinux" in models:
            return (f"SELinux denied QEMU its proxy socket {socket_path}: its label must be the "
                    "domain's <imagelabel> ('ls -Z'; 'virt-vmstate check' shows both); see "
                    "'ausearch -m AVC -ts recent'")
        return (f"QEMU may not open its proxy socket {socket_path}: security.qemu_user must be the "
                "user libvirt runs QEMU as")
    if "No such file" in error or "Connection refused" in error:
        return (f"nothing listens on the proxy socket {socket_path}: the domain's proxy is not "
                "running ('virt-vmstate check' says why)")
    return None
