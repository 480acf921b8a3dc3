"""The ``virt-vmstate`` command."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .. import __version__
from ..core.config import CARRIERS, HostConfig
from ..core.values import Value
from ..errors import VMStateError
from ..host.configfile import load_config
from ..host.rundir import read_capped, write_atomic
from ..logs import log_to_stderr

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Sequence

    from ..bus.vmstate1 import HelperBus
    from ..core.bundle import Bundle
    from ..core.proxyspec import ProxySpec


EPILOG = """\
Every command that talks to helpers needs their bus: --bus ADDRESS (a D-Bus
address such as unix:path=/run/virt-vmstate/UUID/bus.sock), or --domain NAME
to find it from the domain's metadata through libvirt.

examples:
  virt-vmstate list --bus unix:path=/run/vm1/bus.sock
  virt-vmstate save --bus unix:path=/run/vm1/bus.sock -o vm1.vmstate
  virt-vmstate inspect vm1.vmstate
  virt-vmstate load --bus unix:path=/run/vm2/bus.sock -i vm1.vmstate
  virt-vmstate migrate vm1 qemu+ssh://dest/system --live --verbose
  virt-vmstate enable vm1       # then plain virsh migrate / save / restore carry the state
  virt-vmstate check vm1        # which carrier, and the last failure of the proxy

Host settings come from /etc/virt-vmstate/config.toml (or $VIRT_VMSTATE_CONFIG).
Exit status: 0 on success, 1 when the operation failed (one line on stderr
says what, for which helper, and what to do), 2 on a usage error, 130 when
Ctrl-C aborted a migration (the source keeps running).
"""


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _ids(value: str) -> list[str]:
    ids = [i.strip() for i in value.split(",") if i.strip()]
    if not ids:
        raise argparse.ArgumentTypeError("expected a comma-separated list of helper Ids")
    return ids


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return number


def terminal_columns() -> int:
    """What ``shutil.get_terminal_size`` says, without importing shutil: argparse's
    formatter imports it (and with it bz2 and lzma) for every command line it parses."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0 and sys.__stdout__ is not None:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter for descriptions we line-break ourselves, as wide as the terminal."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         terminal_columns() - 2 if width is None else width)


class UsageError(VMStateError):
    """A command was given options that do not go together."""


class Output:
    """Human text or one JSON object on stdout."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def emit(self, data: dict[str, Any], text: Callable[[], Sequence[str]]) -> None:
        if self.as_json:
            import json
            json.dump(data, sys.stdout, indent=2, sort_keys=True)
            sys.stdout.write("\n")
        else:
            for line in text():
                print(line)


def _add_bus_options(p: argparse.ArgumentParser) -> None:
    where = p.add_argument_group("which helpers")
    target = where.add_mutually_exclusive_group(required=True)
    target.add_argument("--bus", metavar="ADDRESS",
                        help="D-Bus address of the helpers' bus (unix:path=... or unix:abstract=...)")
    target.add_argument("--domain", metavar="NAME",
                        help="find the bus from this libvirt domain's virt-vmstate metadata")
    where.add_argument("-c", "--connect", metavar="URI",
                       help="libvirt connection URI for --domain (default: libvirt's default)")
    p.add_argument("--timeout", type=_positive, metavar="SECONDS",
                   help="deadline of each D-Bus call (default: timeouts.call, 25 s)")
    p.add_argument("--json", action="store_true", help="print one JSON object for scripts")


def _open_bus(args: argparse.Namespace, config: HostConfig) -> "HelperBus":
    from ..bus.vmstate1 import HelperBus
    timeout = args.timeout or config.timeouts.call
    if args.domain:
        from .migrate import bus_address_for_domain
        address = bus_address_for_domain(args.domain, args.connect, config)
    else:
        address = args.bus
    return HelperBus.open(address, call_timeout=timeout, state_cap=config.limits.max_state_size)


def cmd_list(args: argparse.Namespace, config: HostConfig) -> int:
    with _open_bus(args, config) as bus:
        found = bus.helpers()

    def text() -> list[str]:
        if not found:
            return [f"no helpers on {bus.address}"]
        rows = [("ID", "UNIQUE NAME", "PID", "UID")]
        rows += [(h.id, h.unique_name, str(h.pid or "-"), str(h.uid if h.uid is not None else "-"))
                 for h in found]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]

    Output(args.json).emit({"bus": bus.address, "helpers": [h.as_dict() for h in found]}, text)
    return 0


def _bundle_summary(b: Bundle) -> dict[str, Any]:
    from ..core import bundle as bundle_mod
    return {
        "format_version": bundle_mod.FORMAT_VERSION,
        "domain_uuid": str(b.domain_uuid) if b.domain_uuid else None,
        "migration_id": str(b.migration_id),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(b.created_ms / 1000)),
        "codec": b.codec.name.lower(),
        "total_size": b.total_size,
        "helpers": [{"id": s.id, "size": len(s.data), "sha256": s.sha256} for s in b.states],
    }


def _bundle_lines(summary: dict[str, Any]) -> list[str]:
    lines = [f"migration id  {summary['migration_id']}",
             f"domain        {summary['domain_uuid'] or '(not bound to a domain)'}",
             f"created       {summary['created']}",
             f"helpers       {len(summary['helpers'])}, {human_size(summary['total_size'])} in all"]
    for h in summary["helpers"]:
        lines.append(f"  {h['id']:<24} {human_size(h['size']):>10}  sha256 {h['sha256'][:16]}")
    return lines


def cmd_save(args: argparse.Namespace, config: HostConfig) -> int:
    started = time.monotonic()
    if args.stage or args.unstage:
        if not args.domain or args.output:
            raise UsageError("--stage and --unstage work on --domain NAME, without -o")
        from .migrate import stage, unstage
        if args.unstage:
            unstage(args.domain, args.connect, config)
            Output(args.json).emit({"domain": args.domain, "staged": False},
                                   lambda: [f"removed staged state from domain {args.domain}"])
            return 0
        sealed, carried = stage(args.domain, args.connect, config, args.carrier)
        summary = dict(_bundle_summary(sealed), domain=args.domain, staged=True,
                       carrier=carried.carrier, bundle_bytes=len(carried.data))
        Output(args.json).emit(summary, lambda: [
            f"staged {len(sealed.states)} helpers ({human_size(sealed.total_size)}, "
            f"{carried.carrier} carrier) in domain {args.domain}'s live metadata; run "
            f"'virsh migrate' within {config.limits.max_bundle_age:.0f} s",
            *_bundle_lines(summary)[4:]])
        return 0
    if not args.output:
        raise UsageError("save needs -o FILE (or --stage with --domain)")
    from ..bus.transfer import capture
    from ..host.addresses import allowed_uids
    with _open_bus(args, config) as bus:
        sealed = capture(bus, args.ids, allowed_uids=allowed_uids(config))
    encoded = sealed.encode()
    write_atomic(args.output, encoded)
    elapsed = time.monotonic() - started
    summary = dict(_bundle_summary(sealed), file=args.output, bytes=len(encoded),
                   seconds=round(elapsed, 4))
    Output(args.json).emit(summary, lambda: [
        f"saved {len(sealed.states)} helpers ({human_size(sealed.total_size)}) to {args.output} "
        f"in {elapsed * 1000:.0f} ms", *_bundle_lines(summary)[4:]])
    return 0


def _read_bundle(path: str, config: HostConfig) -> Bundle:
    from ..core import bundle as bundle_mod
    return bundle_mod.decode(read_capped(path, config.limits.max_bundle_size),
                             max_size=config.limits.max_bundle_size)


def cmd_load(args: argparse.Namespace, config: HostConfig) -> int:
    started = time.monotonic()
    sealed = _read_bundle(args.input, config)
    from ..bus.transfer import restore
    from ..host.addresses import allowed_uids
    with _open_bus(args, config) as bus:
        loaded = restore(bus, sealed, args.ids, allowed_uids=allowed_uids(config))
    elapsed = time.monotonic() - started
    Output(args.json).emit(
        {"file": args.input, "loaded": [h.id for h in loaded], "seconds": round(elapsed, 4)},
        lambda: [f"loaded {len(loaded)} helpers from {args.input} in {elapsed * 1000:.0f} ms: "
                 + ", ".join(h.id for h in loaded)])
    return 0


def cmd_inspect(args: argparse.Namespace, config: HostConfig) -> int:
    summary = dict(_bundle_summary(_read_bundle(args.file, config)), file=args.file)
    Output(args.json).emit(summary, lambda: _bundle_lines(summary))
    return 0


def cmd_migrate(args: argparse.Namespace, config: HostConfig) -> int:
    from .migrate import MigrateOptions, migrate
    opts = MigrateOptions(live=True, p2p=args.p2p,
                          persistent=args.persistent, undefinesource=args.undefinesource,
                          suspend=args.suspend, consistent=args.consistent, carrier=args.carrier,
                          migrateuri=args.migrateuri, timeout=args.timeout, verbose=args.verbose_progress,
                          bandwidth=args.bandwidth)
    result = migrate(args.domain, args.desturi, args.connect, config, opts)

    def text() -> list[str]:
        lines = [f"migrated {args.domain} to {args.desturi} with {len(result.helpers)} helpers "
                 f"({human_size(result.state_bytes)} of state, {human_size(result.bundle_bytes)} "
                 f"by the {result.carrier} carrier)"]
        lines += [f"  {phase:<10} {seconds * 1000:8.0f} ms" for phase, seconds in result.phases.items()]
        return lines
    Output(args.json).emit(result.as_dict(), text)
    return 0


def _stream_lines(change: Any) -> list[str]:
    verb = "enabled" if change.enabled else "disabled"
    lines = [f"domain {change.domain}: stream carrier {verb}"]
    if change.live_changed:
        lines.append("  running QEMU: dbus-vmstate object " + ("added" if change.enabled else "deleted")
                     + (f", talking to the proxy at {change.address}" if change.enabled else ""))
    elif change.running:
        lines.append("  running QEMU: already " + ("has" if change.enabled else "has no") +
                     " dbus-vmstate object")
    else:
        lines.append("  not running: the next start " + ("has" if change.enabled else "has no") +
                     " the object")
    if change.definition_changed:
        lines.append("  definition updated: every start, migration, save image and restore "
                     + ("carries the state" if change.enabled else "goes without the object"))
    if change.reply:
        lines.append(f"  state now: {change.reply}")
    if change.confinement:
        mark = {True: "ok", False: "FAILS", None: "warning"}[change.confinement["ok"]]
        lines.append(f"  confinement ({mark}): {change.confinement['detail']}")
    lines += [f"  warning: {w}" for w in change.warnings]
    return lines


def cmd_enable(args: argparse.Namespace, config: HostConfig) -> int:
    from .migrate import enable
    change = enable(args.domain, args.connect, config)
    Output(args.json).emit(change.as_dict(), lambda: _stream_lines(change))
    return 0


def cmd_disable(args: argparse.Namespace, config: HostConfig) -> int:
    from .migrate import disable
    change = disable(args.domain, args.connect, config)
    Output(args.json).emit(change.as_dict(), lambda: _stream_lines(change))
    return 0


def _check_lines(report: Any) -> list[str]:
    marks = {True: "ok", False: "FAIL", None: "skip"}
    lines = [f"{marks[c.ok]:<4}  {c.name:<24} {c.detail}" for c in report.checks]
    if report.domain:
        lines.append(f"domain {report.domain}: " + ("ready to migrate" if report.ok else
                                                     "NOT ready to migrate (see FAIL above)"))
    return lines


def cmd_check(args: argparse.Namespace, config: HostConfig) -> int:
    from .check import check_domain
    report = check_domain(args.domain, args.connect, config, dest_uri=args.dest,
                          dest_command=args.dest_command, carrier=args.carrier)
    Output(args.json).emit(report.as_dict(), lambda: _check_lines(report))
    return 0 if report.ok else 1


def cmd_check_host(args: argparse.Namespace, config: HostConfig) -> int:
    from .check import check_host
    report = check_host(config, args.profiles or [], args.spool_file, args.spool_sha256)
    Output(args.json).emit(report.as_dict(), lambda: _check_lines(report))
    return 0 if report.ok else 1


def cmd_bus_config(args: argparse.Namespace, config: HostConfig) -> int:
    from ..core.busconfig import bus_config_xml
    qemu_user = args.qemu_user or config.security.qemu_user
    helper_users = args.helper_users or list(config.security.helper_users)
    sys.stdout.write(bus_config_xml(args.socket, qemu_user=qemu_user, helper_users=helper_users))
    return 0


def proxy_spec(args: argparse.Namespace) -> ProxySpec:
    """The spec of ``virt-vmstate proxy``'s options (``proxyspec.proxy_argv`` writes them)."""
    from ..core.names import canonical_uuid
    from ..core.proxyspec import ProxySpec
    dom_uuid = canonical_uuid(args.uuid)
    if dom_uuid is None:
        raise UsageError(f"--uuid {args.uuid!r} is not a UUID")
    return ProxySpec(args.domain, dom_uuid, args.helper_bus, args.listen, tuple(args.ids or ()),
                     args.incoming)


def cmd_proxy(args: argparse.Namespace, config: HostConfig) -> int:
    from ..proxy.service import run_proxy
    return run_proxy(proxy_spec(args), config)


def cmd_hook(args: argparse.Namespace, config: HostConfig) -> int:
    from ..hook.events import read_xml, run_hook
    return run_hook([args.domain, args.op, args.subop, args.extra], read_xml(sys.stdin.buffer),
                    sys.stdout.buffer, config)


def _list_options(p: argparse.ArgumentParser) -> None:
    _add_bus_options(p)


def _save_options(p: argparse.ArgumentParser) -> None:
    _add_bus_options(p)
    p.add_argument("--ids", type=_ids, metavar="ID[,ID...]", help="save only these helpers")
    p.add_argument("-o", "--output", metavar="FILE", help="bundle file to write")
    p.add_argument("--stage", action="store_true",
                   help="with --domain: put the bundle into the running domain's live metadata, "
                        "so that a plain 'virsh migrate' right after carries it")
    p.add_argument("--unstage", action="store_true", help="with --domain: remove staged state")
    p.add_argument("--carrier", choices=CARRIERS, default="auto",
                   help="with --stage: how the state travels (default: auto, the XML when it "
                        "fits, else the spool)")


def _load_options(p: argparse.ArgumentParser) -> None:
    _add_bus_options(p)
    p.add_argument("--ids", type=_ids, metavar="ID[,ID...]", help="load only these helpers")
    p.add_argument("-i", "--input", required=True, metavar="FILE", help="bundle file to read")


def _inspect_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true", help="print one JSON object for scripts")


def _hook_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("op", metavar="OP")
    p.add_argument("subop", metavar="SUBOP", nargs="?", default="-")
    p.add_argument("extra", metavar="EXTRA", nargs="?", default="-")


def _proxy_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--domain", required=True, metavar="NAME", help="the domain's name, for messages")
    p.add_argument("--uuid", required=True, metavar="UUID", help="the domain's UUID: bundles are bound to it")
    p.add_argument("--helper-bus", required=True, metavar="ADDRESS", help="the helpers' bus")
    p.add_argument("--listen", required=True, metavar="ADDRESS",
                   help="the socket QEMU's object connects to (unix:path=...); bound here unless "
                        "passed as systemd passes one (LISTEN_FDS)")
    p.add_argument("--ids", type=_ids, metavar="ID[,ID...]",
                   help="the helpers to save and load (default: every helper on the bus)")
    p.add_argument("--incoming", choices=("migration", "restore"),
                   help="the helpers wait for state: accept QEMU's Load, refuse Save until then")


def _migrate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("desturi", metavar="DEST_URI", help="libvirt URI of the destination")
    p.add_argument("-c", "--connect", metavar="URI", help="libvirt URI of the source")
    p.add_argument("--live", action="store_true", default=True, help="live migration (the default)")
    p.add_argument("--p2p", action="store_true", help="peer-to-peer migration")
    p.add_argument("--persistent", action="store_true", help="persist the domain on the destination")
    p.add_argument("--undefinesource", action="store_true", help="undefine the domain on the source")
    p.add_argument("--suspend", action="store_true", help="leave the domain paused on the destination")
    p.add_argument("--consistent", action="store_true",
                   help="pause during Save; resume on the destination only after the migration")
    p.add_argument("--carrier", choices=CARRIERS, default="auto",
                   help="how the state travels: in the migration XML (compressed, up to about "
                        "3 MiB) or as a file in [carriers.spool] dir; auto picks the XML when it "
                        "fits")
    p.add_argument("--migrateuri", metavar="URI", help="migration URI, e.g. tcp://host:port")
    p.add_argument("--timeout", type=_positive, metavar="SECONDS",
                   help="suspend the guest if live migration runs longer than this")
    p.add_argument("--bandwidth", type=int, metavar="MiB/s", help="migration bandwidth limit")
    p.add_argument("--verbose", dest="verbose_progress", action="store_true",
                   help="show migration progress")
    p.add_argument("--json", action="store_true", help="print one JSON object for scripts")


def _check_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("-c", "--connect", metavar="URI", help="libvirt URI of the source")
    p.add_argument("--dest", metavar="URI", help="libvirt URI of the destination to check too")
    p.add_argument("--dest-command", metavar="COMMAND",
                   help="how to run virt-vmstate on the destination, e.g. "
                        "'ssh -p 2222 root@dest virt-vmstate'")
    p.add_argument("--carrier", choices=CARRIERS, default="auto", help="carrier to check for")
    p.add_argument("--json", action="store_true", help="print one JSON object for scripts")


def _bus_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--qemu-user", metavar="USER", help="user that may call helpers "
                   "(default: security.qemu_user, root)")
    p.add_argument("--helper-user", dest="helper_users", action="append", metavar="USER",
                   help="user that may run helpers (repeat; default: security.helper_users)")
    p.add_argument("--socket", metavar="PATH", default="/run/virt-vmstate/bus.sock",
                   help="unix socket the bus listens on (default: %(default)s)")


def _check_host_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profiles", type=_ids, metavar="NAME[,NAME...]", help="profiles that must exist")
    p.add_argument("--spool-file", metavar="NAME", help="probe file the source wrote to the spool")
    p.add_argument("--spool-sha256", metavar="HEX", help="its SHA-256")
    p.add_argument("--json", action="store_true", help="print one JSON object for scripts")


def _domain_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("-c", "--connect", metavar="URI", help="libvirt URI of this host")
    p.add_argument("--json", action="store_true", help="print one JSON object for scripts")


class Command(Value):
    """One subcommand: its name, what runs it, its help and its options."""

    __slots__ = ("name", "run", "summary", "description", "options")

    def __init__(self, name: str, run: Callable[[argparse.Namespace, HostConfig], int], summary: str,
                 description: str, options: Callable[[argparse.ArgumentParser], None]) -> None:
        self.name = name
        self.run = run
        self.summary = summary
        self.description = description
        self.options = options


COMMANDS = (
    Command("list", cmd_list, "list the helpers on a bus",
            "List every helper that owns org.qemu.VMState1 on the bus: its Id, unique "
            "name, process id and user id.",
            _list_options),
    Command("save", cmd_save, "save the helpers' state to a bundle file",
            "Call Save on every helper (concurrently) and write one sealed bundle file, "
            "atomically, mode 0600. With --ids, exactly those helpers are saved and every "
            "one must be on the bus: that is checked before any Save is called.",
            _save_options),
    Command("load", cmd_load, "load the helpers' state from a bundle file",
            "Verify a bundle, then call Load on each helper with its own record. Every "
            "record must have a helper on the bus, and with --ids every listed helper must "
            "have a record; both are checked before any Load is called.",
            _load_options),
    Command("inspect", cmd_inspect, "show what a bundle file holds",
            "Verify a bundle file and print its header and records (Id, size, SHA-256) "
            "without touching any bus.",
            _inspect_options),
    Command("hook", cmd_hook, "run as libvirt's qemu hook (what hooks/qemu calls)",
            "Run one libvirt qemu hook event, exactly as libvirt does: DOMAIN OP SUBOP EXTRA as "
            "arguments, the domain XML on stdin.  For 'migrate begin' and 'restore begin' the XML "
            "the domain should run with is printed on stdout (nothing: unchanged); errors go to "
            "stderr as one line and to syslog, and exit 1 makes libvirt abort.  Domains without "
            "virt-vmstate metadata are left alone.  The host config is --config, else "
            "$VIRT_VMSTATE_CONFIG, else /etc/virt-vmstate/config.toml.\n\n"
            "events:\n"
            "  migrate begin   incoming migration: pick the carrier, keep pre-copy state, print the XML\n"
            "  restore begin   restore of a save image: the stream carrier, or refuse to start empty\n"
            "  prepare begin   start the helper bus, the helpers (incoming mode when state comes)\n"
            "                  and, for the stream carrier, the proxy and its socket\n"
            "  start begin     wait for the helpers up before QEMU (up_before = \"qemu\")\n"
            "  started begin   pre-copy: Load every helper; stream: the proxy Loads when QEMU asks\n"
            "  stopped end, release end   stop everything the domain's hooks started\n"
            "  reconnect begin libvirtd restarted: report what still runs\n\n"
            "example: a plain start and stop of vm1 by hand, with a test config\n"
            "  virsh dumpxml vm1 > vm1.xml\n"
            "  export VIRT_VMSTATE_CONFIG=/tmp/test-config.toml\n"
            "  for event in 'prepare begin' 'start begin' 'started begin'; do\n"
            "      virt-vmstate hook vm1 $event - < vm1.xml || break; done\n"
            "  virt-vmstate list --bus unix:path=/run/virt-vmstate/$(virsh domuuid vm1)/bus.sock\n"
            "  virt-vmstate hook vm1 stopped end - < vm1.xml",
            _hook_options),
    Command("proxy", cmd_proxy, "serve a domain's helpers to QEMU's dbus-vmstate object "
            "(the hook starts it)",
            "Listen on the socket QEMU's dbus-vmstate object connects to, answer there as a bus "
            "on which only the proxy owns org.qemu.VMState1 (no dbus-daemon stands between "
            "QEMU and the proxy; only root and security.qemu_user may connect), and answer QEMU's Save and Load by saving and loading every "
            "helper on the helper bus at once, as one sealed bundle (or, past QEMU's 1 MiB cap, "
            "a reference to it in the spool or in [carriers.stream] local_dir).  Failures go "
            "back to QEMU as D-Bus errors naming the domain and the helper, to syslog, and to "
            "the domain's runtime dir, where 'virt-vmstate check' shows the last one.  The hook "
            "starts one per domain that has the object; run it by hand only to test.\n\n"
            "example:\n  virt-vmstate proxy --domain vm1 --uuid UUID --helper-bus "
            "unix:path=/run/vm1/bus.sock --listen unix:path=/run/vm1/libvirt-UUID --ids slirp0",
            _proxy_options),
    Command("migrate", cmd_migrate, "live-migrate a domain together with its helpers' state",
            "Save every helper of DOMAIN, attach the sealed state to the migration's domain "
            "XML and migrate with libvirt; the destination's hook loads each helper before the "
            "guest runs there. Any failure leaves the source guest and helpers running.\n\n"
            "In a plain live migration helper state is captured before guest memory is copied. "
            "--consistent pauses the guest for the Save and keeps the destination paused until "
            "the migration returns, so helper and guest state match exactly.",
            _migrate_options),
    Command("enable", cmd_enable, "carry a domain's helper state in QEMU's migration stream",
            "Give DOMAIN QEMU's dbus-vmstate object, talking to virt-vmstate's proxy: put it "
            "into the persistent definition, so every start, migration, save image and restore "
            "has it, and, when the domain runs, start its proxy and hot-add the object through "
            "libvirt's QMP passthrough (the domain is then tainted 'custom-monitor').  From then "
            "on helper state is Saved at switchover, with the guest's vCPUs stopped, and "
            "Loaded before the destination runs, by plain 'virsh migrate', 'virsh save' / "
            "'restore' and 'managedsave' alike.  On a running domain the state is measured "
            "once: state over QEMU's 1 MiB cap even compressed goes by reference, through "
            "[carriers.spool] dir for migrations.\n\nexample:\n  virt-vmstate enable vm1 && "
            "virsh migrate --live vm1 qemu+ssh://dest/system",
            _domain_options),
    Command("disable", cmd_disable, "stop carrying a domain's helper state in QEMU's stream",
            "Delete the dbus-vmstate object from the running QEMU, stop the proxy, and take the "
            "object out of the persistent definition.  The pre-copy carriers "
            "('virt-vmstate migrate', 'save --stage') still work.",
            _domain_options),
    Command("check", cmd_check, "preflight: can this domain migrate with its helpers' state?",
            "Report, changing nothing, whether DOMAIN's helpers are all on its bus, how big "
            "their state is and which carrier it needs, and with --dest whether the "
            "destination runs libvirt without this domain, defines every profile the domain "
            "names and sees the spool.  Helpers are asked to Save only to measure their state. "
            "The destination's side runs 'virt-vmstate check-host' there: over ssh for a "
            "+ssh URI, locally for a local URI, or as --dest-command.\n\n"
            "Exit status 0 when every check passed (or could not be made), 1 otherwise.",
            _check_options),
    Command("bus-config", cmd_bus_config, "print a dbus-daemon config for a VM's helper bus",
            "Print the dbus-daemon config virt-vmstate gives a managed bus: only root, the "
            "qemu user and the helper users may connect; only helper users (and root) may own "
            "org.qemu.VMState1 or any other name; only root and the qemu user may call "
            "helpers. Defaults come from [security] in the host config. Use it for a bus "
            "you run yourself (bus mode \"address\"); with helper users configured, Save and "
            "Load also refuse any helper whose connection belongs to another uid.\n\n"
            "example:\n  virt-vmstate bus-config --qemu-user libvirt-qemu --helper-user slirp "
            "--helper-user tpm --socket /run/vm1/bus.sock > /etc/vm1-bus.conf\n"
            "  dbus-daemon --config-file=/etc/vm1-bus.conf --nofork",
            _bus_config_options),
    Command("check-host", cmd_check_host, "this host's side of 'check' (run on a destination)",
            "Check that this host defines the named profiles with an executable program, has "
            "the bus daemon, and sees the source's spool probe file with the expected SHA-256.",
            _check_host_options),
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line; with ``only``, the parser of that one command (and the global
    options): building every command's parser is a tenth of a migration command's start."""
    parser = argparse.ArgumentParser(
        prog="virt-vmstate",
        description="Carry the state of a VM's D-Bus helper processes (org.qemu.VMState1) "
                    "across libvirt live migrations.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"virt-vmstate {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    parser.add_argument("--config", metavar="FILE",
                        help="host config file (default: $VIRT_VMSTATE_CONFIG or "
                             "/etc/virt-vmstate/config.toml)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        if only is None or command.name == only:
            p = sub.add_parser(command.name, help=command.summary, description=command.description,
                               formatter_class=HelpFormatter)
            p.set_defaults(func=command.run)
            command.options(p)
    return parser


def _config_for(args: argparse.Namespace) -> HostConfig:
    """The host config; a domain that stops is cleaned up even when the config is broken."""
    if args.command == "hook":
        from ..hook.events import load_config_for
        return load_config_for(args.op, args.domain, args.config)
    return load_config(args.config)


COMMAND_NAMES = tuple(command.name for command in COMMANDS)
_GLOBAL_FLAGS = ("-v", "--verbose")


def command_named(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names before any help or version option, if it is one: then
    only its parser is built.  None: every parser (help, an error listing the commands)."""
    args = iter(argv)
    for arg in args:
        if arg == "--config":
            next(args, None)
        elif not (arg in _GLOBAL_FLAGS or arg.startswith("--config=")):
            return arg if arg in COMMAND_NAMES else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args_given = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command_named(args_given))
    args = parser.parse_args(args_given)
    log_to_stderr(args.verbose)
    try:
        config = _config_for(args)
        result: int = args.func(args, config)
        return result
    except VMStateError as e:
        print(f"virt-vmstate {args.command}: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print(f"virt-vmstate {args.command}: interrupted", file=sys.stderr)
        return 130
