"""Whether a domain's QEMU is confined (AppArmor, SELinux), and what that means for the
stream carrier, whose QEMU connects to the domain's proxy bus.  Pure code: the caller
reads the host's files."""

from __future__ import annotations

from .values import Value

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


def stream_verdict(models: list[str], *, apparmor_rule: bool, includes_drop_ins: bool) -> Verdict:
    """What the confinement of the domain's QEMU means for its proxy bus.  ``apparmor_rule``:
    the package's rule is installed (abstractions/libvirt-qemu.d/virt-vmstate);
    ``includes_drop_ins``: libvirt's abstraction includes that directory (libvirt 9.6 on)."""
    if not models:
        return Verdict(True, "QEMU is not confined (libvirt's security driver is none)")
    if "selinux" in models:
        return Verdict(None, "SELinux confines QEMU (svirt): virt-vmstate ships no SELinux policy module "
                             "yet, and QEMU's connection to the proxy bus is expected to be denied (see "
                             "docs/security.md); if a start fails with 'failed to connect to DBus', use "
                             "the pre-copy carrier ('virt-vmstate disable', then 'virt-vmstate migrate')")
    if not apparmor_rule:
        return Verdict(False, "AppArmor confines QEMU, and the rule that lets it reach its proxy bus is not "
                              "installed: install virt-vmstate's package, or copy packaging/apparmor/"
                              "virt-vmstate to /etc/apparmor.d/abstractions/libvirt-qemu.d/")
    if not includes_drop_ins:
        return Verdict(None, "AppArmor confines QEMU, but this libvirt's abstraction (before 9.6) does not "
                             "include abstractions/libvirt-qemu.d/: where the kernel mediates sockets, add "
                             "the line of /etc/apparmor.d/abstractions/libvirt-qemu.d/virt-vmstate to "
                             "/etc/apparmor.d/local/abstractions/libvirt-qemu")
    return Verdict(True, "AppArmor confines QEMU; its rule for its own proxy bus is installed "
                         "(verified offline only, see docs/security.md)")
