"""dbus-daemon configuration for a VM's private helper bus.  Pure code.

The bus belongs to one VM.  Only root, the qemu user and the helper users may
connect; only helper users may own org.qemu.VMState1 or any other name (root
always may, as the bus's owner); only root and the qemu user may call them.
"""

from __future__ import annotations

from .domxml import quoteattr, xml_text

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Sequence


MAX_MESSAGE = 128 * 1024 * 1024  # the D-Bus protocol's own maximum


def bus_config_xml(socket_path: str | None, *, qemu_user: str = "root",
                   helper_users: Sequence[str] = ()) -> str:
    """A complete dbus-daemon config for a bus listening on ``socket_path``; None: on the
    socket its starter bound and passed to it (``LISTEN_FDS``, as systemd passes one)."""
    listen = "systemd:" if socket_path is None else f"unix:path={socket_path}"
    callers = sorted({"root", qemu_user})
    owners = sorted({"root", *helper_users})
    users = sorted(set(callers) | set(owners))
    lines = [
        '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"',
        ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">',
        "<busconfig>",
        f"  <listen>{xml_text(listen)}</listen>",
        "  <auth>EXTERNAL</auth>",
        '  <policy context="default">',
        *(f"    <allow user={quoteattr(user)}/>" for user in users),
        '    <deny own="*"/>',
        '    <deny send_destination="*" send_type="method_call"/>',
        '    <allow send_destination="org.freedesktop.DBus"/>',
        '    <allow send_type="method_return"/>',
        '    <allow send_type="error"/>',
        '    <allow send_type="signal"/>',
        *(f'    <allow receive_type="{kind}"/>'
          for kind in ("method_call", "method_return", "error", "signal")),
        "  </policy>",
    ]
    for user in users:
        lines.append(f"  <policy user={quoteattr(user)}>")
        if user in owners:
            # Helpers may own names of their own too (libslirp-helper owns
            # org.freedesktop.Slirp1_<pid>); only they may own any name at all.
            lines.append('    <allow own="*"/>')
        if user in callers:
            lines.append('    <allow send_destination="*" send_type="method_call"/>')
        lines.append("  </policy>")
    lines += [
        f'  <limit name="max_message_size">{MAX_MESSAGE}</limit>',
        f'  <limit name="max_incoming_bytes">{4 * MAX_MESSAGE}</limit>',
        f'  <limit name="max_outgoing_bytes">{4 * MAX_MESSAGE}</limit>',
        '  <limit name="reply_timeout">300000</limit>',
        "</busconfig>",
        "",
    ]
    return "\n".join(lines)
