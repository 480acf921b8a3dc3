"""Everything virt-vmstate asks libvirt, over libvirt-python.  Never imported by the hook.

enable / disable: put QEMU's dbus-vmstate object into the domain's definition and
                 hot-add it to (or delete it from) the running QEMU, so the helpers'
                 state travels in QEMU's own stream (the stream carrier).
migrate, stream: a plain migration; QEMU asks the proxy at switchover.
migrate, pre-copy: Save every helper on the domain's bus, seal a bundle bound to
                 the domain's UUID, put it into the migratable XML's metadata and
                 migrate with that XML as VIR_MIGRATE_PARAM_DEST_XML, so the
                 destination's hooks receive it (prepare) and Load it (finish).
"""

from __future__ import annotations

import re
import sys
import threading
import time

from ..core import stream
from ..core.config import HostConfig
from ..core.domxml import (NS_STATE, NS_STREAM, DomainXML, insert_state, parse_domain, state_element,
                           stream_element, strip_state)
from ..core.values import Value
from ..errors import LibvirtError, MigrationInterrupted, VMStateError
from ..host.addresses import allowed_uids, bus_address, proxy_address, proxy_socket_path
from ..host.managed import ManagedProcesses
from ..host.rundir import RunDir
from ..logs import log

# The pre-copy carriers' modules (bundle, carrier, spool, streamreply) are imported where
# they are used: a stream-enabled domain's migration needs none of them.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

    from ..core import streamreply
    from ..core.bundle import Bundle
    from ..core.precopy import Carried


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError:
        raise LibvirtError("libvirt-python is not installed",
                           hint="install python3-libvirt (Debian) or the libvirt-python package") from None
    libvirt.registerErrorHandler(lambda ctx, err: None, None)  # errors come as exceptions
    return libvirt


class Migration(Value):
    """What a ``migrate`` did, for its report."""

    __slots__ = ("domain", "dest_uri", "phases", "helpers", "state_bytes", "bundle_bytes", "carrier",
                 "codec")

    def __init__(self, domain: str, dest_uri: str) -> None:
        self.domain = domain
        self.dest_uri = dest_uri
        self.phases: dict[str, float] = {}
        self.helpers: list[dict[str, Any]] = []
        self.state_bytes = 0
        self.bundle_bytes = 0
        self.carrier = ""
        self.codec = ""

    def as_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "destination": self.dest_uri,
                "seconds": {k: round(v, 4) for k, v in self.phases.items()},
                "helpers": self.helpers, "state_bytes": self.state_bytes,
                "bundle_bytes": self.bundle_bytes, "carrier": self.carrier, "codec": self.codec}


_HOOK_FAILED = re.compile(r"Hook script execution failed: .*? unexpected exit status \d+: (.*)", re.S)


def libvirt_message(text: str) -> str:
    """libvirt's error as one line: a hook's refusal becomes the hook's own message.

    libvirt wraps it as 'Hook script execution failed: internal error: Child
    process (LC_ALL=C PATH=... /etc/libvirt/hooks/qemu ...) unexpected exit
    status 1: <stderr>', environment and line breaks included.
    """
    found = _HOOK_FAILED.search(text)
    if found:
        text = "the destination's hook refused: " + found.group(1)
    return " ".join(text.split())


def _open(uri: str | None) -> Any:
    libvirt = _libvirt()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise LibvirtError(f"cannot connect to libvirt at {uri or 'the default URI'}: "
                           f"{e.get_error_message()}") from None


def _lookup(conn: Any, name: str) -> Any:
    libvirt = _libvirt()
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as e:
        raise LibvirtError(f"domain {name}: {e.get_error_message()}") from None


def _parse_live(dom: Any, flags: int = 0) -> tuple[str, DomainXML]:
    xml: str = dom.XMLDesc(flags)
    parsed = parse_domain(xml.encode())
    if parsed.config is None:
        raise VMStateError(f"domain {parsed.name} has no virt-vmstate metadata",
                           hint="migrate it with plain 'virsh migrate'")
    return xml, parsed


def bus_address_for_domain(name: str, uri: str | None, config: HostConfig) -> str:
    """The helper bus of a running domain, from its metadata (read-only libvirt access)."""
    dom = _lookup(_open(uri), name)
    _, parsed = _parse_live(dom)
    if parsed.id is None:
        parsed = parsed.replace(id=dom.ID())
    return bus_address(parsed, config)


def _save(parsed: DomainXML, config: HostConfig) -> Bundle:
    """Save every helper of a running domain into a bundle bound to its UUID."""
    from ..bus.transfer import capture
    from ..bus.vmstate1 import HelperBus  # jeepney: a stream-enabled domain's migration needs none
    assert parsed.config is not None
    with HelperBus.open(bus_address(parsed, config), call_timeout=config.timeouts.call,
                        state_cap=config.limits.max_state_size) as bus:
        return capture(bus, parsed.config.required_ids or None, domain_uuid=parsed.uuid,
                       allowed_uids=allowed_uids(config))


def _save_required(parsed: DomainXML, config: HostConfig) -> Bundle:
    """Save every helper of a running domain; every helper the metadata requires is in it."""
    assert parsed.config is not None
    from ..core.bundle import check_ids
    sealed = _save(parsed, config)
    check_ids(sealed, parsed.config.required_ids)
    return sealed


def save_domain(dom: Any, config: HostConfig) -> Bundle:
    return _save_required(_parse_live(dom)[1], config)


class Concurrent:
    """One call run in a thread of its own while the caller goes on; ``result`` waits for it.

    libvirt-python lets go of the GIL inside every libvirt call, so a Save of the
    helpers (D-Bus) runs while libvirt answers the caller's requests.
    """

    def __init__(self, call: Callable[[], Any], name: str) -> None:
        self.seconds = 0.0
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), name=name, daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        started = time.monotonic()
        try:
            self._value = call()
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread by result()
            self._error = e
        self.seconds = time.monotonic() - started

    def result(self) -> Any:
        self._thread.join()  # bounded: every D-Bus call of a Save has its deadline
        if self._error is not None:
            raise self._error
        return self._value


def carry(sealed: Bundle, config: HostConfig, domain: str, requested: str,
          base_xml_size: int) -> Carried:
    """Choose the carrier for a sealed bundle and, for the spool, write the file."""
    from ..core.precopy import choose_for_host
    from ..host.spool import Spool
    carried = choose_for_host(sealed, config, requested=requested, base_xml_size=base_xml_size,
                              domain=domain)
    if carried.carrier == "spool":
        assert config.spool.dir is not None and carried.element.spool_file is not None
        Spool(config.spool.dir).write(carried.element.spool_file, carried.data)
    return carried


def discard(carried: Carried, config: HostConfig) -> None:
    """Remove the spool file of a migration that did not happen."""
    if carried.element.spool_file and config.spool.dir:
        from ..host.spool import Spool
        Spool(config.spool.dir).remove(carried.element.spool_file)


def stage(name: str, uri: str | None, config: HostConfig,
          carrier: str = "auto") -> tuple[Bundle, Carried]:
    """Save the helpers and put the bundle into the running domain's live metadata."""
    libvirt = _libvirt()
    dom = _lookup(_open(uri), name)
    sealed = save_domain(dom, config)
    _, base_size = _migratable_xml(dom)
    carried = carry(sealed, config, name, carrier, base_size)
    element = state_element(carried.element, bare=True)
    try:
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, element, "vmstate-state", NS_STATE,
                        libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError as e:
        discard(carried, config)
        raise LibvirtError(f"domain {name}: cannot stage state: {e.get_error_message()}") from None
    return sealed, carried


def unstage(name: str, uri: str | None, config: HostConfig) -> None:
    libvirt = _libvirt()
    dom = _lookup(_open(uri), name)
    staged = parse_domain(dom.XMLDesc(0).encode()).state
    try:
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, NS_STATE,
                        libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError as e:
        raise LibvirtError(f"domain {name}: cannot remove staged state: {e.get_error_message()}") from None
    if staged is not None and staged.spool_file and config.spool.dir:
        from ..host.spool import Spool
        Spool(config.spool.dir).remove(staged.spool_file)


def _migratable_xml(dom: Any) -> tuple[str, int]:
    """The migratable XML without any staged state, and its size in bytes."""
    libvirt = _libvirt()
    xml, parsed = _parse_live(dom, libvirt.VIR_DOMAIN_XML_MIGRATABLE)
    stripped = strip_state(xml.encode(), parsed)
    return stripped.decode(), len(stripped)


class DomainSnapshot(Value):
    """What the preflight needs from the source's libvirt, read-only."""

    __slots__ = ("state", "migratable_xml", "id")

    def __init__(self, state: str, migratable_xml: bytes, id: int | None) -> None:
        self.state = state  # "running", "paused" or "not running"
        self.migratable_xml = migratable_xml
        self.id = id


def snapshot(name: str, uri: str | None) -> DomainSnapshot:
    libvirt = _libvirt()
    dom = _lookup(_open(uri), name)
    code = dom.info()[0]
    state = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused"}.get(
        code, "not running")
    if state == "not running":  # its definition: what its next start would be
        return DomainSnapshot(state, dom.XMLDesc(0).encode(), None)
    return DomainSnapshot(state, dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE).encode(), dom.ID())


def destination_status(dest_uri: str, domain_uuid: str) -> tuple[str, bool]:
    """The destination's hostname, and whether the domain already runs there."""
    libvirt = _libvirt()
    conn = _open(dest_uri)
    try:
        active = bool(conn.lookupByUUIDString(domain_uuid).isActive())
    except libvirt.libvirtError:
        active = False
    return conn.getHostname(), active


# -- the stream carrier: enable / disable ---------------------------------------

class StreamChange(Value):
    """What ``enable`` or ``disable`` changed."""

    __slots__ = ("domain", "enabled", "running", "live_changed", "definition_changed", "address",
                 "reply", "confinement", "warnings")

    def __init__(self, domain: str, enabled: bool, *, running: bool = False, address: str = "") -> None:
        self.domain = domain
        self.enabled = enabled
        self.running = running
        self.live_changed = False
        self.definition_changed = False
        self.address = address
        self.reply = ""   # how the state would travel, measured on a running domain
        self.confinement: dict[str, Any] | None = None  # whether QEMU may reach its proxy (enable)
        self.warnings: list[str] = []

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def _qmp(dom: Any, command: str, name: str, what: str, adding: tuple[DomainXML, str] | None = None) -> None:
    """Run a QMP command through libvirt.  ``adding``: the domain and its proxy socket's path,
    when the command adds the object: its failure to reach the proxy is then explained."""
    libvirt = _libvirt()
    try:
        import libvirt_qemu
        reply = libvirt_qemu.qemuMonitorCommand(dom, command, 0)
    except ImportError:
        raise LibvirtError("libvirt_qemu (part of libvirt-python) is not installed") from None
    except libvirt.libvirtError as e:
        raise LibvirtError(f"domain {name}: cannot {what}: {e.get_error_message()}") from None
    error = stream.qmp_error(reply)
    if error and adding is not None:
        from ..core.confinement import confining_models, connect_failure
        parsed, path = adding
        cause = connect_failure(error, confining_models(parsed.security_models), path)
        if cause:
            raise LibvirtError(f"domain {name}: QEMU could not {what}: {cause}")
    if error:
        raise LibvirtError(f"domain {name}: QEMU refused to {what}: {error}",
                           hint="a QEMU without dbus-vmstate, or a domain whose object libvirt "
                                "already owns (its slirp-helper), cannot use the stream carrier; "
                                "'virt-vmstate migrate' still carries the state before the copy")


def _set_stream_marker(dom: Any, name: str, present: bool) -> None:
    libvirt = _libvirt()
    try:
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, stream_element(present, bare=True),
                        "vmstate-stream", NS_STREAM, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError as e:
        raise LibvirtError(f"domain {name}: cannot record the stream carrier in the live XML: "
                           f"{e.get_error_message()}") from None


def _measure_reply(parsed: DomainXML, config: HostConfig) -> streamreply.Reply:
    """How the running domain's state would travel in QEMU's stream, by a real Save."""
    from ..core import streamreply
    sealed = _save(parsed, config)
    return streamreply.plan_reply(sealed, spool_configured=config.spool.dir is not None,
                             max_bundle_size=config.limits.max_bundle_size, domain=parsed.name)


def enable(name: str, uri: str | None, config: HostConfig) -> StreamChange:
    """Make the domain carry its helpers' state in QEMU's stream, from now and from every start."""
    libvirt = _libvirt()
    conn = _open(uri)
    dom = _lookup(conn, name)
    running = bool(dom.isActive())
    _, parsed = _parse_live(dom)
    assert parsed.config is not None
    if parsed.config.bus_mode == "libvirt":
        raise VMStateError(f"domain {name}: its helpers are on libvirt's own bus, whose "
                           "dbus-vmstate object libvirt owns: the stream carrier cannot be used",
                           hint="use bus mode 'managed' or 'address', or migrate with "
                                "'virt-vmstate migrate'")
    address = proxy_address(parsed, config)
    change = StreamChange(name, True, running=running, address=address)
    from .check import confinement_verdict
    verdict = confinement_verdict(parsed)
    change.confinement = {"ok": verdict.ok, "detail": verdict.detail}
    if running:
        if parsed.id is None:
            parsed = parsed.replace(id=dom.ID())
        reply = _measure_reply(parsed, config)
        change.reply = reply.describe()
        if not reply.inline and config.spool.dir is None:
            change.warnings.append(
                "the state is over QEMU's 1 MiB cap even compressed: save images keep it in "
                f"{config.stream.local_dir}, but a migration needs [carriers.spool] dir on both hosts")
        if not parsed.has_stream_object:
            rundir = RunDir(config.runtime_dir, parsed.uuid).create()
            managed = ManagedProcesses(rundir, config)
            with rundir.lock(config.timeouts.hook):
                managed.start_stream(parsed, None, time.monotonic() + config.timeouts.helper_start)
                added = False
                try:
                    if "selinux" in parsed.security_models:
                        from ..host.selinux import label_proxy_socket
                        label_proxy_socket(rundir, parsed)
                    _qmp(dom, stream.qmp_object_add(address), name, "add the dbus-vmstate object",
                         adding=(parsed, proxy_socket_path(parsed, config)))
                    added = True
                    _set_stream_marker(dom, name, True)
                except BaseException:
                    if added:  # QEMU must not keep an object whose proxy is gone
                        try:
                            _qmp(dom, stream.qmp_object_del(), name, "delete the dbus-vmstate object")
                        except VMStateError as e:
                            log.warning("%s", e)
                    managed.stop_stream()
                    raise
            change.live_changed = True
    if dom.isPersistent():
        inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
        defined = parse_domain(inactive.encode())
        if (stream.object_address(defined) != address or len(defined.dbus_vmstate_args()) != 1
                or defined.stream_span is not None):
            _define(conn, name, stream.definition_xml(inactive.encode(), defined, address))
            change.definition_changed = True
    return change


def disable(name: str, uri: str | None, config: HostConfig) -> StreamChange:
    """Take the dbus-vmstate object out of the running QEMU and out of the definition."""
    libvirt = _libvirt()
    conn = _open(uri)
    dom = _lookup(conn, name)
    running = bool(dom.isActive())
    change = StreamChange(name, False, running=running)
    if running:
        _, parsed = _parse_live(dom)
        if parsed.has_stream_object:
            rundir = RunDir(config.runtime_dir, parsed.uuid)
            with rundir.lock(config.timeouts.hook):
                _qmp(dom, stream.qmp_object_del(), name, "delete the dbus-vmstate object")
                # The command line QEMU started with still shows the object: say it is gone.
                _set_stream_marker(dom, name, False)
                if rundir.exists():
                    ManagedProcesses(rundir, config).stop_stream()
            change.live_changed = True
    if dom.isPersistent():
        inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
        defined = parse_domain(inactive.encode())
        if defined.dbus_vmstate_args() or defined.stream_span is not None:
            _define(conn, name, stream.definition_xml(inactive.encode(), defined, None))
            change.definition_changed = True
    return change


def _define(conn: Any, name: str, xml: bytes) -> None:
    libvirt = _libvirt()
    try:
        conn.defineXML(xml.decode())
    except libvirt.libvirtError as e:
        raise LibvirtError(f"domain {name}: cannot update its definition: {e.get_error_message()}") from None


class MigrateOptions(Value):
    """How ``migrate`` asks libvirt to migrate."""

    __slots__ = ("live", "p2p", "persistent", "undefinesource", "suspend", "consistent", "carrier",
                 "migrateuri", "timeout", "verbose", "bandwidth")

    def __init__(self, *, live: bool = True, p2p: bool = False, persistent: bool = False,
                 undefinesource: bool = False, suspend: bool = False, consistent: bool = False,
                 carrier: str = "auto", migrateuri: str | None = None, timeout: float | None = None,
                 verbose: bool = False, bandwidth: int | None = None) -> None:
        self.live = live
        self.p2p = p2p
        self.persistent = persistent
        self.undefinesource = undefinesource
        self.suspend = suspend
        self.consistent = consistent
        self.carrier = carrier
        self.migrateuri = migrateuri
        self.timeout = timeout
        self.verbose = verbose
        self.bandwidth = bandwidth  # MiB/s


def _progress(dom: Any, done: threading.Event) -> None:
    while not done.wait(0.2):
        try:
            info = dom.jobInfo()
        except Exception:
            return
        total, processed = info[3], info[4]
        if total:
            pct = min(100, processed * 100 // total)
            sys.stderr.write(f"\rMigration: [{'#' * (pct // 4):<25}] {pct:3d} %")
            sys.stderr.flush()
    sys.stderr.write("\rMigration: [" + "#" * 25 + "] 100 %\n")


def _suspend_after(dom: Any, seconds: float, done: threading.Event) -> None:
    if not done.wait(seconds):
        log.info("migration still running after %g s: suspending the guest", seconds)
        try:
            dom.suspend()
        except Exception as e:
            log.warning("cannot suspend: %s", e)


def migrate(name: str, dest_uri: str, uri: str | None, config: HostConfig,
            opts: MigrateOptions) -> Migration:
    libvirt = _libvirt()
    result = Migration(name, dest_uri)
    started = time.monotonic()
    conn = _open(uri)
    dom = _lookup(conn, name)
    paused_here = False
    carried: Carried | None = None
    _, live = _parse_live(dom)
    if live.has_stream_object:
        return _migrate_stream(dom, live, dest_uri, config, opts, result, started)
    if opts.consistent and dom.info()[0] == libvirt.VIR_DOMAIN_RUNNING:
        dom.suspend()
        paused_here = True
    try:
        saving = Concurrent(lambda: _save_required(live, config), "save")
        xml, base_size = _migratable_xml(dom)
        dest_conn = None if opts.p2p else _open(dest_uri)
        sealed: Bundle = saving.result()
        result.phases["save"] = saving.seconds
        t0 = time.monotonic()
        carried = carry(sealed, config, name, opts.carrier, base_size)
        dest_xml = insert_state(xml.encode(), carried.element).decode()
        result.phases["carry"] = time.monotonic() - t0
        result.carrier = carried.carrier
        result.codec = carried.codec.name.lower()
        result.state_bytes = sealed.total_size
        result.bundle_bytes = len(carried.data)
        result.helpers = [{"id": s.id, "size": len(s.data), "sha256": s.sha256} for s in sealed.states]
        log.info("saved %d helpers (%d bytes) in %.0f ms; %s carrier, %d bytes", len(sealed.states),
                 sealed.total_size, result.phases["save"] * 1000, carried.carrier, len(carried.data))

        t1 = time.monotonic()
        dest_dom = _run_migration(dom, name, dest_uri, opts, dest_xml, dest_conn)
        result.phases["migration"] = time.monotonic() - t1
    except BaseException:
        if carried is not None:
            discard(carried, config)
        if paused_here:
            try:
                dom.resume()
            except libvirt.libvirtError:
                pass
        raise
    if opts.consistent and not opts.suspend:
        target = dest_dom or _lookup(_open(dest_uri), name)
        target.resume()
    result.phases["total"] = time.monotonic() - started
    return result


def _migrate_stream(dom: Any, live: DomainXML, dest_uri: str, config: HostConfig,
                    opts: MigrateOptions, result: Migration, started: float) -> Migration:
    """A plain libvirt migration: QEMU asks the proxy for the helpers' state at switchover."""
    result.carrier = "stream"
    name = live.name
    measuring = None
    if config.spool.dir is None:
        # Refuse before anything moves what the destination could not read.
        if live.id is None:
            live = live.replace(id=dom.ID())
        measured = live
        measuring = Concurrent(lambda: _measure_reply(measured, config), "measure")
    dest_conn = None if opts.p2p else _open(dest_uri)
    if measuring is not None:
        reply: streamreply.Reply = measuring.result()
        result.phases["measure"] = measuring.seconds
        if not reply.inline:
            raise VMStateError(f"domain {name}: the helpers' state ({len(reply.bundle)} bytes) is "
                               "over QEMU's 1 MiB cap even compressed, and no spool is configured "
                               "to carry it", hint="set [carriers.spool] dir on both hosts; nothing "
                               "was migrated")
    t1, wall_start = time.monotonic(), time.time()
    rundir = RunDir(config.runtime_dir, live.uuid)
    # The stream is consistent by itself: the state is taken with the vCPUs stopped.
    opts = opts.replace(consistent=False)
    try:
        _run_migration(dom, name, dest_uri, opts, dest_conn=dest_conn)
    except LibvirtError as e:
        from ..proxy.service import last_failure
        failure = last_failure(rundir)
        if failure and float(str(failure.get("time", 0))) >= wall_start:
            raise LibvirtError(f"domain {name}: migration to {dest_uri} failed: {failure['detail']}",
                               hint="the source domain and its helpers keep running with their "
                                    "state") from None
        raise LibvirtError(f"{e.message}; the destination's reason is in its syslog "
                           "(virt-vmstate-proxy)", hint=e.hint) from None
    result.phases["migration"] = time.monotonic() - t1
    result.phases["total"] = time.monotonic() - started
    return result


def _run_migration(dom: Any, name: str, dest_uri: str, opts: MigrateOptions,
                   dest_xml: str | None = None, dest_conn: Any = None) -> Any:
    """libvirt's migration with our options; the destination domain (None for p2p).
    ``dest_conn``: the destination's connection, when the caller opened it already."""
    flags, params = _migration_call(opts, dest_xml)
    done = threading.Event()
    watchers = _start_watchers(dom, opts, done)
    try:
        outcome, interrupted = _migrate_abortably(dom, name, dest_uri, flags, params, opts.p2p, dest_conn)
    finally:
        done.set()
        for watcher in watchers:
            watcher.join()
    return _reported(dom, name, dest_uri, outcome, interrupted)


def _migration_call(opts: MigrateOptions, dest_xml: str | None) -> tuple[int, dict[str, Any]]:
    """The flags and typed parameters of libvirt's migration call for ``opts``."""
    libvirt = _libvirt()
    flags = libvirt.VIR_MIGRATE_PEER2PEER if opts.p2p else 0
    flags |= libvirt.VIR_MIGRATE_LIVE if opts.live else 0
    flags |= libvirt.VIR_MIGRATE_PERSIST_DEST if opts.persistent else 0
    flags |= libvirt.VIR_MIGRATE_UNDEFINE_SOURCE if opts.undefinesource else 0
    flags |= libvirt.VIR_MIGRATE_PAUSED if (opts.suspend or opts.consistent) else 0
    params: dict[str, Any] = {}
    if dest_xml is not None:
        params[libvirt.VIR_MIGRATE_PARAM_DEST_XML] = dest_xml
    if opts.migrateuri:
        params[libvirt.VIR_MIGRATE_PARAM_URI] = opts.migrateuri
    if opts.bandwidth:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = opts.bandwidth
    return flags, params


def _start_watchers(dom: Any, opts: MigrateOptions, done: threading.Event) -> list[threading.Thread]:
    """The threads that print progress (--verbose) and suspend the guest past --timeout,
    until ``done`` is set."""
    watchers = []
    if opts.verbose:
        watchers.append(threading.Thread(target=_progress, args=(dom, done), daemon=True))
    if opts.timeout:
        watchers.append(threading.Thread(target=_suspend_after, args=(dom, opts.timeout, done), daemon=True))
    for watcher in watchers:
        watcher.start()
    return watchers


def _migrate_abortably(dom: Any, name: str, dest_uri: str, flags: int, params: dict[str, Any], p2p: bool,
                       dest_conn: Any) -> tuple[dict[str, Any], bool]:
    """libvirt's blocking call, in a thread so that Ctrl-C is seen at once and becomes
    libvirt's job abort; its outcome ("dest" or "error"), and whether Ctrl-C came."""
    libvirt = _libvirt()
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            if p2p:
                dom.migrateToURI3(dest_uri, params, flags)
                outcome["dest"] = None
            else:
                outcome["dest"] = dom.migrate3(dest_conn or _open(dest_uri), params, flags)
        except libvirt.libvirtError as e:
            outcome["error"] = libvirt_message(e.get_error_message() or str(e))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = f"{type(e).__name__}: {e}"

    worker = threading.Thread(target=call, name="migration", daemon=True)
    interrupted = False
    next_abort = 0.0
    worker.start()
    while worker.is_alive():
        try:
            worker.join(0.2)
        except KeyboardInterrupt:
            if not interrupted:
                interrupted = True
                sys.stderr.write(f"virt-vmstate migrate: interrupted: asking libvirt to abort the "
                                 f"migration of {name}...\n")
        # An abort before QEMU's transfer began (the destination is still preparing)
        # cancels nothing: ask again until the migration has failed or completed.
        if interrupted and time.monotonic() >= next_abort:
            _abort(dom, name)
            next_abort = time.monotonic() + 0.5
    return outcome, interrupted


def _reported(dom: Any, name: str, dest_uri: str, outcome: dict[str, Any], interrupted: bool) -> Any:
    """The destination domain of a migration that happened; the error, told as it really
    went, of one that did not."""
    if interrupted and "error" not in outcome and _still_here(dom):
        outcome["error"] = "the domain still runs on this host"
    if "error" in outcome or "dest" not in outcome:
        outcome.setdefault("error", "libvirt's migration call ended without an outcome")
        if interrupted:
            raise MigrationInterrupted(
                f"domain {name}: migration to {dest_uri} aborted on Ctrl-C ({outcome['error']})",
                hint="the source domain and its helpers keep running with their state")
        raise LibvirtError(f"domain {name}: migration to {dest_uri} failed: {outcome['error']}",
                           hint="the source domain and its helpers keep running with their state")
    if interrupted:
        sys.stderr.write(f"virt-vmstate migrate: Ctrl-C came too late to abort: domain {name} "
                         f"was migrated to {dest_uri}\n")
    return outcome.get("dest")


def _still_here(dom: Any) -> bool:
    """Whether the domain still runs on the source (a migration that did not happen)."""
    libvirt = _libvirt()
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False  # gone from the source: it was migrated


def _abort(dom: Any, name: str) -> None:
    libvirt = _libvirt()
    try:
        dom.abortJob()
        log.debug("asked libvirt to abort the migration of %s", name)
    except libvirt.libvirtError as e:
        log.debug("abort of the migration of %s: %s", name, e.get_error_message())
