"""Where a domain's helpers and its proxy are, and which helpers may be trusted.

The one place that turns a domain's metadata and the host config into bus
addresses and allowed uids; the hook phases, the proxy, ``migrate`` and the
command line all ask here.
"""

from __future__ import annotations

from ..core.layout import BUS_SOCKET, LIBVIRT_DBUS_DIR, proxy_socket
from ..errors import ConfigError, DomainXMLError
from .rundir import RunDir

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..core.config import HostConfig
    from ..core.domxml import DomainXML


def bus_address(dom: DomainXML, config: HostConfig) -> str:
    """Where the domain's helpers are, by the domain's bus mode."""
    assert dom.config is not None
    if dom.config.bus_mode == "address":
        assert dom.config.bus_address is not None
        return dom.config.bus_address
    if dom.config.bus_mode == "libvirt":
        if dom.id is None:
            raise DomainXMLError("bus mode 'libvirt' needs a running domain (no domain id in the XML)")
        return f"unix:path={LIBVIRT_DBUS_DIR}/{dom.id}-{dom.name[:20]}-dbus.sock"
    return socket_address(RunDir(config.runtime_dir, dom.uuid), BUS_SOCKET)


def proxy_address(dom: DomainXML, config: HostConfig) -> str:
    """The proxy's socket of the domain on this host: what its dbus-vmstate object's addr must be."""
    return f"unix:path={proxy_socket_path(dom, config)}"


def proxy_socket_path(dom: DomainXML, config: HostConfig) -> str:
    """The path of the domain's proxy socket on this host."""
    rundir = RunDir(config.runtime_dir, dom.uuid)
    return rundir.file(proxy_socket(rundir.uuid))


def socket_address(rundir: RunDir, socket_name: str) -> str:
    """The address of a managed bus whose socket is ``socket_name`` in ``rundir``."""
    return f"unix:path={rundir.file(socket_name)}"


def qemu_uids(config: HostConfig) -> frozenset[int]:
    """The uids that may connect to a proxy's socket: root and security.qemu_user."""
    import pwd
    try:
        return frozenset({0, pwd.getpwnam(config.security.qemu_user).pw_uid})
    except KeyError:
        raise ConfigError(f"{config.source}: security.qemu_user: no user {config.security.qemu_user!r} "
                          "on this host", hint="name the user libvirt runs QEMU as (qemu.conf's user)") from None


def allowed_uids(config: HostConfig) -> frozenset[int] | None:
    """The uids whose helpers may be saved or loaded: root and security.helper_users.

    None (no check) when the host config names no helper users.
    """
    users = config.security.helper_users
    if not users:
        return None
    import pwd
    uids = {0}
    for user in users:
        try:
            uids.add(pwd.getpwnam(user).pw_uid)
        except KeyError:
            raise ConfigError(f"{config.source}: security.helper_users: no user {user!r} on this host",
                              hint="create the user or remove it from the list") from None
    return frozenset(uids)
