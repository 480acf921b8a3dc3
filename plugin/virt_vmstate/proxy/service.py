"""The proxy: the one ``org.qemu.VMState1`` helper that QEMU's dbus-vmstate object sees.

One proxy runs per domain, started and stopped by the hook.  QEMU's object
connects to the proxy's own socket, ``RUNTIME_DIR/UUID/libvirt-UUID``, where the
proxy answers as a bus on which only it owns ``org.qemu.VMState1`` (``bus/peer.py``:
no dbus-daemon stands between a confined QEMU and the proxy); the proxy keeps a
connection to the helper bus, where the real helpers are:

    QEMU --Save/Load--> proxy (its socket)  ==concurrently==>  helpers (helper bus)

Save (source, vCPUs stopped): Save every required helper at once, check their
uids, seal one bundle bound to the domain, and return it, or past QEMU's 1 MiB
cap a reference to it written as a file.  Load (destination, before the guest
runs; only when started for an incoming migration or restore): verify the
bundle and Load every helper at once.  Any failure becomes a D-Bus error whose
message names the domain and the helper, is logged to syslog, and is kept as
the domain's last failure in its runtime dir; QEMU then fails the migration
and the source keeps running.

QEMU's object reads the proxy's properties (``GetAll``) in its pre-save step,
with the vCPUs already stopped, and only then calls Save.  A Save error would
only make QEMU write a broken section (the source believes the migration or
``virsh save`` succeeded; the destination or the restore then fails), whereas a
missing ``Id`` fails pre-save itself, cleanly: the source guest resumes.  So the
proxy Saves the helpers when that ``GetAll`` arrives, keeps the result for the
Save that follows, and refuses the ``GetAll`` when the helpers cannot be saved.

The helpers are found before QEMU asks (at start, and again whenever a name
changes hands on the helper bus), so no discovery happens inside the downtime.
The proxy never calls libvirt or QMP: QEMU's monitor is blocked while it waits.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time

from ..bus.connection import CallTimedOut, is_error
from ..bus.exported import MethodCall, error_reply, method_return, watch_name_owners
from ..bus.peer import Client, PeerServer
from ..bus.vmstate1 import INTERFACE, OBJECT_PATH, WELL_KNOWN_NAME, Helper, HelperBus
from ..core import stream
from ..core.config import HostConfig
from ..core.layout import INCOMING_RECORD, LAST_FAILURE, PROXY_STATUS, READY_FILE, STARTED_WAIT
from ..core.proxyspec import ProxySpec
from ..errors import BusError, VMStateError
from ..host.addresses import allowed_uids, qemu_uids
from ..host.rundir import RunDir
from ..logs import log

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..core import streamreply
    from ..host.spool import Spool

ERROR_SAVE = "org.virtvmstate.Proxy.SaveFailed"
ERROR_LOAD = "org.virtvmstate.Proxy.LoadFailed"
_RECONNECT_EVERY = 1.0
PREPARED_TTL = 10.0  # a state saved at GetAll serves only the Save right after it

INTROSPECTION = f"""<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">
<node>
  <interface name="{INTERFACE}">
    <property name="Id" type="s" access="read"/>
    <method name="Save"><arg name="data" type="ay" direction="out"/></method>
    <method name="Load"><arg name="data" type="ay" direction="in"/></method>
  </interface>
  <interface name="org.freedesktop.DBus.Properties">
    <method name="Get">
      <arg type="s" direction="in"/><arg type="s" direction="in"/><arg type="v" direction="out"/>
    </method>
    <method name="GetAll"><arg type="s" direction="in"/><arg type="a{{sv}}" direction="out"/></method>
  </interface>
</node>
"""


class ProxyRefused(VMStateError):
    """A Save or Load the proxy would not or could not do; QEMU gets it as a D-Bus error."""


class Proxy:
    def __init__(self, spec: ProxySpec, config: HostConfig) -> None:
        self.spec = spec
        self.config = config
        self.rundir = RunDir(config.runtime_dir, spec.uuid)
        self.incoming = spec.incoming
        self.allowed = allowed_uids(config)
        self.server: PeerServer | None = None
        self.client: Client | None = None  # whom the call being answered came from
        self.helper_bus: HelperBus | None = None
        self.helpers: list[Helper] | None = None  # None: must be found again
        self.last_connect = 0.0
        self.label = f"domain {spec.domain} ({spec.uuid})"
        self.prepared: tuple[float, bytes] | None = None
        self.unsynced: list[str] = []  # reference files written, not yet synced to disk
        self.serving = False  # inside a Save or Load
        self.last_detail = ""
        self.all_up_told = False  # STARTED_WAIT removed: the proxy and every required helper are up

    # -- the helper bus ---------------------------------------------------------

    def _connect_helpers(self, timeout: float) -> HelperBus:
        if self.helper_bus is not None:
            return self.helper_bus
        self.last_connect = time.monotonic()
        bus = HelperBus.open(self.spec.helper_bus, call_timeout=timeout,
                             state_cap=self.config.limits.max_state_size)
        try:
            reply = bus.conn.call(watch_name_owners(), timeout)
            if isinstance(reply, CallTimedOut) or is_error(reply):
                raise BusError(self.spec.helper_bus, "the bus refused to report name changes")
        except BaseException:
            bus.close()
            raise
        self.helper_bus, self.helpers = bus, None
        log.info("connected to the helper bus %s", self.spec.helper_bus)
        return bus

    def _drop_helper_bus(self, why: object) -> None:
        if self.helper_bus is not None:
            log.warning("lost the helper bus %s: %s", self.spec.helper_bus, why)
            self.helper_bus.close()
        self.helper_bus, self.helpers = None, None

    def _refresh(self, bus: HelperBus) -> list[Helper]:
        started = time.monotonic()
        self.helpers = bus.helpers(self.spec.required or None)
        log.debug("helpers on the bus: %s (%.1f ms)", ", ".join(h.id for h in self.helpers) or "none",
                  (time.monotonic() - started) * 1000)
        if not self.all_up_told and set(self.spec.required) <= {h.id for h in self.helpers}:
            self._tell_all_up()
        return self.helpers

    def _tell_all_up(self) -> None:
        """This proxy serves and every required helper is on the bus: 'started begin'
        has nothing left to wait for, and the bash hook answers it without starting Python."""
        self.all_up_told = True
        try:
            self.rundir.discard(STARTED_WAIT)
        except OSError as e:
            log.warning("cannot tell the hook that the helpers are up: %s", e)

    def _note_bus_signals(self) -> None:
        """Any name changing hands on the helper bus may be a helper coming or going."""
        bus = self.helper_bus
        if bus is None:
            return
        if bus.conn.unsolicited or bus.conn.unsolicited_dropped:
            bus.conn.unsolicited.clear()
            bus.conn.unsolicited_dropped = 0
            self.helpers = None

    def _chosen(self, bus: HelperBus, deadline: float, *, wait: bool) -> list[Helper]:
        """The required helpers (every helper when none is listed), uid-checked.

        A list found earlier may be old: it is looked at once more before
        refusing, and with ``wait`` until ``deadline`` (helpers still starting).
        """
        fresh = self.helpers is None
        while True:
            bus.call_timeout = max(0.05, deadline - time.monotonic())
            helpers = self._refresh(bus) if self.helpers is None else self.helpers
            try:
                return bus.select(helpers, self.spec.required or None, self.allowed)
            except VMStateError:
                if fresh and (not wait or time.monotonic() >= deadline):
                    raise
                if fresh:
                    time.sleep(0.01)
                fresh = True
                self.helpers = None

    # -- Save and Load ----------------------------------------------------------

    def save(self) -> bytes:
        import hashlib

        from ..core import bundle as bundle_mod
        from ..core import streamreply
        from ..core.names import random_uuid
        deadline = time.monotonic() + self.config.timeouts.proxy
        if self.incoming:
            raise ProxyRefused(f"Save refused: the helpers wait for their state from the incoming "
                               f"{self.incoming} and have not been loaded yet")
        bus = self._connect_helpers(self.config.timeouts.proxy)
        self._note_bus_signals()
        chosen = self._chosen(bus, deadline, wait=False)
        bus.call_timeout = max(0.05, deadline - time.monotonic())
        states = bus.save(chosen)
        sealed = bundle_mod.new_bundle((bundle_mod.HelperState(i, d) for i, d in states.items()),
                                       created_ms=int(time.time() * 1000), migration_id=random_uuid(),
                                       domain_uuid=self.spec.uuid)
        bundle_mod.check_ids(sealed, self.spec.required)
        reply = streamreply.plan_reply(sealed, spool_configured=self.config.spool.dir is not None,
                                  max_bundle_size=self.config.limits.max_bundle_size,
                                  domain=self.spec.domain)
        self.last_detail = reply.describe()
        if reply.inline:
            return reply.bundle
        assert reply.place is not None
        name = streamreply.reference_file_name(sealed)
        self.unsynced.append(self._place(reply.place).write(name, reply.bundle))
        ref = streamreply.Reference(reply.place, name, len(reply.bundle),
                                    hashlib.sha256(reply.bundle).digest(), self.spec.uuid)
        return streamreply.encode_reference(ref)

    def _place(self, place: str) -> Spool:
        from ..host.spool import Spool
        if place == "spool":
            if self.config.spool.dir is None:
                raise ProxyRefused("the state was put in the spool, which this host does not configure",
                                   hint="set [carriers.spool] dir on both hosts to the directory they share")
            return Spool(self.config.spool.dir)
        os.makedirs(self.config.stream.local_dir, mode=0o700, exist_ok=True)
        return Spool(self.config.stream.local_dir)

    def load(self, blob: bytes) -> None:
        from ..core import bundle as bundle_mod
        from ..core import streamreply
        from ..core.domxml import StateElement
        deadline = time.monotonic() + self.config.timeouts.proxy
        if not self.incoming:
            raise ProxyRefused("Load refused: the domain was not started for an incoming migration "
                               "or restore, so its helpers are not waiting for state")
        limits = self.config.limits
        ref: streamreply.Reference | None = None
        if streamreply.is_reference(blob):
            ref = streamreply.decode_reference(blob)
            if ref.place == "local" and self.incoming == "migration":
                raise ProxyRefused(f"the source kept the state ({ref.size} bytes, over QEMU's cap) in "
                                   "a file of its own, which this host cannot read",
                                   hint="configure [carriers.spool] dir on both hosts for state this large")
            element = StateElement("spool", ref.size, ref.sha256.hex(), spool_file=ref.name)
            data = self._place(ref.place).read(element, limits.max_bundle_size)
        else:
            data = blob
        sealed = bundle_mod.decode(data, max_size=limits.max_bundle_size)
        # A save image may be restored long after it was written; a migration may not be replayed.
        max_age = limits.max_bundle_age if self.incoming == "migration" else float("inf")
        bundle_mod.check_fresh(sealed, domain_uuid=self.spec.uuid, now_ms=int(time.time() * 1000),
                               max_age_s=max_age, max_skew_s=float("inf") if self.incoming == "restore"
                               else 60.0)
        bundle_mod.check_ids(sealed, self.spec.required)
        bus = self._connect_helpers(self.config.timeouts.proxy)
        self._note_bus_signals()
        on_bus = self._chosen(bus, deadline, wait=bool(self.spec.required))
        wanted = set(sealed.ids)
        chosen = [h for h in on_bus if h.id in wanted]
        absent = wanted - {h.id for h in chosen}
        if absent:
            raise ProxyRefused(f"helpers with state in the bundle are not on the helper bus "
                               f"{self.spec.helper_bus}: {', '.join(sorted(absent))}",
                               hint="check the helpers' profiles and logs on this host")
        bus.call_timeout = max(0.05, deadline - time.monotonic())
        bus.load(chosen, {h.id: sealed.state_of(h.id).data for h in chosen})  # type: ignore[union-attr]
        kind, self.incoming = self.incoming, None
        self.last_detail = f"{len(chosen)} helpers loaded ({sealed.total_size} bytes)"
        try:  # the incoming migration or restore it recorded is over
            self.rundir.discard(INCOMING_RECORD)
        except OSError as e:
            log.warning("cannot remove the incoming record: %s", e)
        if ref is not None and kind == "migration":
            self._place(ref.place).remove(ref.name)

    # -- QEMU's side ----------------------------------------------------------------

    def _reply(self, call: MethodCall, signature: str | None = None, body: tuple[object, ...] = ()) -> None:
        assert self.client is not None
        self.client.send(method_return(call, signature, body), self.config.timeouts.call)

    def _error(self, call: MethodCall, name: str, text: str) -> None:
        assert self.client is not None
        self.client.send(error_reply(call, name, text), self.config.timeouts.call)

    def dispatch(self, client: Client, call: MethodCall) -> None:
        """Answer one call to our object from ``client``."""
        self.client = client
        try:
            self._dispatch(call)
        except VMStateError as e:  # the client went away before its answer
            log.info("cannot answer %s: %s", client.name, e)

    def _dispatch(self, call: MethodCall) -> None:
        iface, member, path = call.interface, call.member, call.path
        if path != OBJECT_PATH and member not in ("Ping", "Introspect"):
            self._error(call, "org.freedesktop.DBus.Error.UnknownObject", f"no object at {path}")
        elif iface == "org.freedesktop.DBus.Properties" and member == "Get":
            if call.body == (INTERFACE, "Id"):
                self._reply(call, "v", (("s", stream.PROXY_ID),))
            else:
                self._error(call, "org.freedesktop.DBus.Error.UnknownProperty", f"no property {call.body!r}")
        elif iface == "org.freedesktop.DBus.Properties" and member == "GetAll":
            if call.body and call.body[0] == INTERFACE:
                if self.incoming:
                    self._reply(call, "a{sv}", ({"Id": ("s", stream.PROXY_ID)},))
                else:
                    self._serve("prepare", call)
            else:
                self._reply(call, "a{sv}", ({},))
        elif member == "Introspect":
            self._reply(call, "s", (INTROSPECTION,))
        elif member == "Ping":
            self._reply(call)
        elif iface in (INTERFACE, None) and member == "Save":
            self._serve("save", call)
        elif iface in (INTERFACE, None) and member == "Load" and call.signature == "ay":
            self._serve("load", call)
        else:
            self._error(call, "org.freedesktop.DBus.Error.UnknownMethod", f"no method {iface}.{member}")

    def _serve(self, op: str, call: MethodCall) -> None:
        self.serving = True
        try:
            self._serve_one(op, call)
            if op == "save":  # QEMU has its answer: this adds nothing to the downtime
                self._sync_references()
        finally:
            self.serving = False

    def _serve_one(self, op: str, call: MethodCall) -> None:
        """Do a Save (at QEMU's pre-save GetAll, or its Save) or a Load, and answer QEMU."""
        started = time.monotonic()
        self.last_detail = ""
        try:
            if op == "prepare":
                self.prepared = None
                self.prepared = (time.monotonic(), self.save())
                self._reply(call, "a{sv}", ({"Id": ("s", stream.PROXY_ID)},))
            elif op == "save":
                prepared, self.prepared = self.prepared, None
                if prepared is not None and time.monotonic() - prepared[0] < PREPARED_TTL:
                    self._reply(call, "ay", (prepared[1],))
                    log.debug("Save answered with the state saved at pre-save")
                    return
                self._reply(call, "ay", (self.save(),))
            else:
                self.load(bytes(call.body[0]))
                self._reply(call)
        except Exception as e:  # every failure must reach QEMU as an error, never as silence
            if not isinstance(e, (VMStateError, OSError)):
                log.exception("unexpected failure in %s", op)
            if isinstance(e, BusError) and self.helper_bus is not None and e.address == self.helper_bus.address:
                self._drop_helper_bus(e)
            verb = "Load" if op == "load" else "Save"
            what = f"virt-vmstate proxy of {self.label}: {verb} failed: {e}"
            log.error("%s", what)
            # Recorded before QEMU hears of it: whoever sees the migration fail can read why.
            self._record(op, False, what, started)
            self._error(call, ERROR_LOAD if op == "load" else ERROR_SAVE, what)
            return
        # Only after QEMU has its answer: nothing below adds to the downtime.
        log.info("%s for QEMU in %.1f ms: %s", "loaded" if op == "load" else "saved",
                 (time.monotonic() - started) * 1000, self.last_detail)
        self._record(op, True, self.last_detail, started)

    def _sync_references(self) -> None:
        """Sync the reference files written for QEMU's Save to disk: one may back a save image,
        which libvirt syncs too.  Only once QEMU has its answer, so the downtime does not
        wait for it (a migration's file needs no sync; the proxy cannot tell the two apart)."""
        from ..host.rundir import sync_file
        for path in self.unsynced:
            try:
                sync_file(path)
                log.debug("synced %s to disk", path)
            except OSError as e:
                log.warning("cannot sync %s to disk (%s): a crash before the system does may lose "
                            "the state a save image refers to", path, e.strerror)
        self.unsynced.clear()

    def _record(self, op: str, ok: bool, detail: str, started: float) -> None:
        import json
        entry = {"operation": "load" if op == "load" else "save", "ok": ok, "detail": detail, "time": time.time(),
                 "ms": round((time.monotonic() - started) * 1000, 2), "pid": os.getpid()}
        try:
            data = json.dumps(entry).encode()
            self.rundir.write(PROXY_STATUS, data)
            if not ok:
                self.rundir.write(LAST_FAILURE, data)
        except VMStateError as e:
            log.warning("cannot record the proxy's status: %s", e)

    def run(self, listener: socket.socket) -> int:
        timeout = self.config.timeouts.call
        self.server = PeerServer(listener, self.spec.address, qemu_uids(self.config), (WELL_KNOWN_NAME,),
                                 timeout)
        log.info("proxy for %s up on %s (helpers on %s: %s)%s", self.label, self.spec.address,
                 self.spec.helper_bus, ", ".join(self.spec.required) or "all",
                 f", waiting for the incoming {self.incoming}" if self.incoming else "")
        try:  # the hook waits for this file, without a D-Bus client of its own
            self.rundir.write(READY_FILE, f"{os.getpid()}\n".encode())
        except VMStateError as e:
            log.warning("cannot tell the hook that the proxy is up: %s", e)
        _import_save_and_load()
        try:
            self._connect_helpers(timeout)
            self._refresh(self.helper_bus)  # type: ignore[arg-type]
        except VMStateError as e:
            log.info("helpers not ready yet: %s", e)
        while True:
            self._note_bus_signals()
            if self.helper_bus is not None and self.helpers is None:
                try:
                    self._refresh(self.helper_bus)
                except VMStateError as e:
                    log.debug("helpers not ready: %s", e)
                    if isinstance(e, BusError):
                        self._drop_helper_bus(e)
            elif self.helper_bus is None and time.monotonic() - self.last_connect >= _RECONNECT_EVERY:
                try:
                    self._connect_helpers(timeout)
                except VMStateError as e:
                    log.debug("helper bus not reachable: %s", e)
            self.server.expire()
            poller = select.poll()
            for fd in self.server.fds():
                poller.register(fd, select.POLLIN)
            helper_fd = self.helper_bus.conn.fileno() if self.helper_bus is not None else None
            if helper_fd is not None:
                poller.register(helper_fd, select.POLLIN)
            wait = self.server.wait_hint()  # seconds, None: until something arrives
            if self.helper_bus is None or self.helpers is None:  # to look for them again
                wait = 0.2 if wait is None else min(wait, 0.2)
            for fd, _ in poller.poll(None if wait is None else wait * 1000):
                if fd != helper_fd:
                    for client, call in self.server.readable(fd):
                        self.dispatch(client, call)
                elif self.helper_bus is not None:
                    try:
                        if self.helper_bus.conn.receive():  # only NameOwnerChanged is asked for
                            self.helpers = None
                    except BusError as e:
                        self._drop_helper_bus(e)


def last_failure(rundir: RunDir) -> dict[str, object] | None:
    """The proxy's last failed Save or Load for this domain on this host, if any."""
    return _read_record(rundir, LAST_FAILURE)


def last_status(rundir: RunDir) -> dict[str, object] | None:
    return _read_record(rundir, PROXY_STATUS)


def _read_record(rundir: RunDir, name: str) -> dict[str, object] | None:
    import json
    try:
        data = json.loads(rundir.read(name, 65536))
    except (VMStateError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _import_save_and_load() -> None:
    """Import what Save and Load need, once the proxy serves: not before, where it
    would delay the domain's start, and not at the first Save, inside the downtime."""
    import hashlib  # noqa: F401
    import json  # noqa: F401

    from ..core import bundle
    from ..core import precopy as carrier  # noqa: F401
    from ..core import streamreply
    from ..core.domxml import StateElement  # noqa: F401
    from ..host import spool  # noqa: F401


def take_listener(spec: ProxySpec) -> socket.socket:
    """The socket QEMU's object connects to: the one the hook bound and handed over (by
    descriptor when forked, as systemd passes one when run), or bound here."""
    if spec.listen_fd is not None:
        return socket.socket(fileno=spec.listen_fd)
    if os.environ.get("LISTEN_FDS") == "1" and os.environ.get("LISTEN_PID") == str(os.getpid()):
        return socket.socket(fileno=3)
    from ..bus.connection import socket_address
    from ..host.managed import listening_socket
    path = socket_address(spec.address)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        if probe.connect_ex(path) == 0:
            raise ProxyRefused(f"another proxy already listens on {spec.address}")
    return listening_socket(path)


def run_proxy(spec: ProxySpec, config: HostConfig) -> int:
    from ..logs import setup_logging
    setup_logging(config, "virt-vmstate-proxy", stderr=True)

    proxy = Proxy(spec, config)

    def stop(signum: int, frame: object) -> None:
        log.info("proxy for domain %s stopping (signal %d)", spec.domain, signum)
        if proxy.serving:
            raise SystemExit(0)  # unwinds, so that no half-written file is left behind
        # Idle: nothing to finish, and the hook that stops a domain waits for this exit,
        # which the interpreter's own shutdown would make some 15 ms longer.
        os._exit(0)
    def forget_incoming(signum: int, frame: object) -> None:
        if proxy.incoming:
            log.info("QEMU was started without -incoming: serving Save, not waiting for a Load")
        proxy.incoming = None
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR1, forget_incoming)
    try:
        return proxy.run(take_listener(spec))
    except VMStateError as e:
        log.error("proxy for domain %s (%s): %s", spec.domain, spec.uuid, e)
        return 1
