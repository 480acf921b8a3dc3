"""The migration's phases, as libvirt's hook calls on each host drive them.

    migrate begin    destination  receive_migration: pick the carrier; stream: this host's
                                  object for QEMU; pre-copy: verify and keep the carried state
    restore begin    local        receive_restore: the stream, or refuse to start empty
    prepare begin    destination  start_processes: a clean runtime dir; start the helper bus,
                                  the proxy on its socket (stream) and the helpers (in
                                  incoming mode when state comes); none is waited for
    start begin      destination  before_qemu: label the proxy's socket with the domain's
                                  SELinux label, now known; wait for the helpers QEMU may
                                  need (the bash hook answers alone when neither is to do)
    started begin    destination  load_before_guest_runs: wait for the proxy and the other
                                  helpers; pre-copy: Load every helper; refuse a live migration
                                  that carries no state; stream: the proxy Loads when QEMU's
                                  stream arrives (the bash hook answers alone once it is up)
    stopped end      either       stop_domain: set the runtime dir aside and answer; a forked
                                  process stops the proxy, helpers and buses and removes it
    release end      either       stop_domain (again; nothing is left)
    reconnect begin  either       reconnect: keep what runs, start nothing

``receive`` writes an incoming record with a fresh token and puts the same
token into the XML it prints, so the later hooks of that one migration (or
restore) find their state, and a start that merely follows a refused migration
never does.  The source's pre-copy Save is not a hook: libvirt gives the source
no hook when a migration starts, so ``virt-vmstate migrate`` does it; with the
stream carrier QEMU asks the proxy at switchover.
"""

from __future__ import annotations

import os
import time

from ..core.layout import (INCOMING_BUNDLE, INCOMING_FILES, INCOMING_RECORD, INCOMING_SPOOL, LIBVIRT_QEMU_RUN,
                           START_WAIT, STARTED_WAIT)
from ..core.values import Value
from ..errors import BundleError, VMStateError
from ..host.addresses import allowed_uids, bus_address, proxy_address
from ..host.managed import ManagedProcesses, is_running, run_detached
from ..host.rundir import UsedStates
from ..logs import log

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..core.config import HostConfig
    from ..core.domxml import DomainXML
    from ..host.rundir import RunDir


# An incoming record is used by the hooks that follow within moments; an older one
# is left from a migration libvirt refused after our 'migrate begin', or from an
# offline migration (whose XML, token included, became the definition).
INCOMING_MAX_AGE = 30.0


class MigrationRefused(VMStateError):
    """The destination will not run the domain without its helpers' state."""


class HookContext(Value):
    """What every phase gets: the domain, its XML as libvirt gave it, and the run's deadline."""

    __slots__ = ("dom", "xml", "config", "rundir", "deadline")

    def __init__(self, dom: DomainXML, xml: bytes, config: HostConfig, rundir: RunDir,
                 deadline: float) -> None:
        self.dom = dom
        self.xml = xml
        self.config = config
        self.rundir = rundir
        self.deadline = deadline

    @property
    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


class IncomingRecord(Value):
    """``incoming.record``: one line ``TOKEN KIND CARRIER CREATED``."""

    __slots__ = ("token", "kind", "carrier", "created")

    def __init__(self, token: str, kind: str, carrier: str, created: float) -> None:
        self.token = token
        self.kind = kind        # "migration" or "restore"
        self.carrier = carrier  # "stream", "xml", "spool", or "none" (nothing carried)
        self.created = created

    def encode(self) -> bytes:
        return f"{self.token} {self.kind} {self.carrier} {self.created!r}\n".encode()

    @classmethod
    def decode(cls, data: bytes) -> IncomingRecord:
        """Raises ValueError for anything but a record."""
        token, kind, carrier, created = data.decode().split()
        return cls(token, kind, carrier, float(created))


def check_profiles(ctx: HookContext) -> None:
    """Every profile the domain names exists in this host's config."""
    assert ctx.dom.config is not None
    for spec in ctx.dom.config.helpers:
        if spec.profile and spec.profile not in ctx.config.profiles:
            raise MigrationRefused(
                f"helper {spec.id!r} names profile {spec.profile!r}, which this host does not "
                f"define in {ctx.config.source}",
                hint="add [profiles." + spec.profile + "] to the host config, or run the domain "
                     "on a host that has it")


def check_stream_possible(dom: DomainXML) -> None:
    assert dom.config is not None
    if dom.config.bus_mode == "libvirt":
        raise MigrationRefused(
            "the domain has a dbus-vmstate object, but its helpers are on libvirt's own bus, "
            "whose dbus-vmstate object libvirt owns",
            hint="use bus mode 'managed' or 'address' for the stream carrier, or run "
                 f"'virt-vmstate disable {dom.name}'")


def no_state_refusal(dom: DomainXML, kind: str) -> MigrationRefused:
    assert dom.config is not None
    ids = ", ".join(dom.config.required_ids)
    fresh = 'to start the helpers empty instead, set <missing-state policy="fresh"/>'
    if kind == "restore":
        return MigrationRefused(
            f"the saved image carries no state for helpers {ids} (it was saved without the "
            "stream carrier)",
            hint="if its helpers may start empty, set <missing-state policy=\"fresh\"/> in the "
                 "image's XML ('virsh save-image-edit') and restore again; 'virt-vmstate enable "
                 f"{dom.name}' makes later save images carry the state")
    return MigrationRefused(
        f"the incoming migration carries no state for helpers {ids}",
        hint=f"run 'virt-vmstate enable {dom.name}' on the source to carry it in QEMU's stream, "
             f"or migrate with 'virt-vmstate migrate {dom.name} DEST_URI', or run "
             f"'virt-vmstate save --domain {dom.name} --stage' right before 'virsh migrate'; {fresh}")


# -- the incoming record ---------------------------------------------------------

def new_token() -> str:
    return os.urandom(16).hex()


def _write_record(ctx: HookContext, kind: str, carrier: str) -> str:
    token = new_token()
    ctx.rundir.create()
    ctx.rundir.write(INCOMING_RECORD, IncomingRecord(token, kind, carrier, time.time()).encode())
    return token


def incoming_for(ctx: HookContext) -> IncomingRecord | None:
    """The incoming record of the migration this hook's XML belongs to, or None.

    A record whose token is not the XML's, or that is old, is left from a
    migration that never ran here: it and its state are discarded, never used.
    """
    if not (ctx.rundir.exists() and ctx.rundir.has(INCOMING_RECORD)):
        ignore_carried_state(ctx)
        return None
    try:
        record: IncomingRecord | None = IncomingRecord.decode(ctx.rundir.read(INCOMING_RECORD, 4096))
    except (VMStateError, ValueError):
        record = None
    mine = ctx.dom.incoming
    if (record is not None and mine is not None and record.token == mine.token
            and time.time() - record.created < INCOMING_MAX_AGE):
        return record
    log.warning("discarding incoming state left by a migration that never ran here")
    discard_incoming(ctx)
    ignore_carried_state(ctx)
    return None


def ignore_carried_state(ctx: HookContext) -> None:
    """State in the XML of a start that is not an incoming migration: never Loaded, and
    recorded, so that it is refused if a later migration carries it here again."""
    if ctx.dom.state is not None:
        log.warning("ignoring helper state found in the XML of a start that is not an incoming "
                    "migration (a staged state that reached the domain's definition)")
        used_states(ctx).add(ctx.dom.state.sha256)


def discard_incoming(ctx: HookContext) -> None:
    remove_spooled(ctx)
    for name in (INCOMING_RECORD, INCOMING_BUNDLE):
        ctx.rundir.discard(name)


# -- migrate begin / restore begin -----------------------------------------------

def receive_migration(ctx: HookContext) -> bytes:
    return receive(ctx, "migration")


def receive_restore(ctx: HookContext) -> bytes:
    return receive(ctx, "restore")


def receive(ctx: HookContext, kind: str) -> bytes:
    """Decide how this domain's helper state arrives, and bind the later hooks to it."""
    from ..core import stream
    dom = ctx.dom
    assert dom.config is not None
    check_profiles(ctx)
    if ctx.rundir.exists():
        discard_incoming(ctx)
    if dom.has_stream_object:
        check_stream_possible(dom)
        token = _write_record(ctx, kind, "stream")
        log.info("incoming %s: helper state comes in QEMU's stream", kind)
        return stream.incoming_xml(ctx.xml, dom, proxy_address(dom, ctx.config), token, kind,
                                   with_object=True)
    if kind == "migration" and dom.state is not None:
        return receive_carried(ctx)
    if dom.config.helpers and dom.config.missing_state == "refuse":
        if kind == "restore":
            raise no_state_refusal(dom, kind)
        # An offline migration also comes here, and the start that may follow it has no
        # state to wait for: the refusal waits for 'started begin', where QEMU's command
        # line tells a live migration (-incoming) from that start.
        token = _write_record(ctx, kind, "none")
        return stream.incoming_xml(ctx.xml, dom, "", token, kind, with_object=False)
    log.info("no incoming helper state; helpers start fresh (policy %s)", dom.config.missing_state)
    if dom.dbus_vmstate_args() or dom.stream_span or dom.incoming or dom.state_span:
        return stream.incoming_xml(ctx.xml, dom, "", new_token(), kind, with_object=False)
    return b""


def used_states(ctx: HookContext) -> UsedStates:
    return UsedStates(ctx.config.runtime_dir, ctx.config.limits.max_bundle_age)


def receive_carried(ctx: HookContext) -> bytes:
    """Pre-copy: verify the carried state, keep it in the runtime dir, print the XML without it."""
    from ..core import stream
    dom = ctx.dom
    assert dom.state is not None
    if dom.state.sha256 in used_states(ctx):
        raise BundleError(
            "the migration carries helper state that was already used on this host: a replay of an "
            "earlier migration's state (a staged state that reached a domain definition)",
            hint=f"on the source, run 'virt-vmstate save --domain {dom.name} --unstage' and migrate "
                 "again")
    sealed = load_carried_bundle(ctx)
    ctx.rundir.create()
    ctx.rundir.write(INCOMING_BUNDLE, sealed)
    if dom.state.spool_file:
        ctx.rundir.write(INCOMING_SPOOL, dom.state.spool_file.encode())
    token = _write_record(ctx, "migration", dom.state.carrier)
    log.info("incoming state stored: %d bytes (%s carrier)", len(sealed), dom.state.carrier)
    return stream.incoming_xml(ctx.xml, dom, "", token, "migration", with_object=False)


def load_carried_bundle(ctx: HookContext) -> bytes:
    """The carried bundle, checked against its element, the domain and the clock."""
    import hashlib

    from ..core import bundle as bundle_mod
    state = ctx.dom.state
    assert state is not None and ctx.dom.config is not None
    limits = ctx.config.limits
    if state.carrier == "spool":
        from ..host.spool import Spool
        if ctx.config.spool.dir is None:
            raise BundleError("the state comes by the spool carrier, which this host does not "
                              "configure", hint="set [carriers.spool] dir on both hosts to the "
                              "directory they share")
        raw = Spool(ctx.config.spool.dir).read(state, limits.max_bundle_size)
    else:
        raw = state.bundle
        if hashlib.sha256(raw).hexdigest() != state.sha256:
            raise BundleError("the carried state does not match the sha256 of its element")
    decoded = bundle_mod.decode(raw, max_size=limits.max_bundle_size)
    bundle_mod.check_fresh(decoded, domain_uuid=ctx.dom.uuid, now_ms=int(time.time() * 1000),
                           max_age_s=limits.max_bundle_age)
    bundle_mod.check_ids(decoded, ctx.dom.config.required_ids)
    return raw


# -- prepare begin / start begin ----------------------------------------------

def start_processes(ctx: HookContext) -> None:
    """Start everything the domain's hooks manage, all at once, before QEMU: nothing waits
    for a bus to come up (see ``ManagedProcesses.start_bus``)."""
    dom = ctx.dom
    assert dom.config is not None
    check_profiles(ctx)
    record = incoming_for(ctx)
    with_stream = bool(dom.dbus_vmstate_args())
    if record is None and dom.stream_object is not None and dom.stream_object != with_stream:
        # Only a running domain's live XML has the marker; a definition made from it says
        # something about an earlier QEMU, and a migration from this one would believe it.
        raise MigrationRefused(
            f"the domain's definition says its QEMU {'has' if dom.stream_object else 'has no'} the "
            f"dbus-vmstate object, but its command line {'has one' if with_stream else 'has none'}: "
            "the definition was made from a running domain's XML",
            hint=f"run 'virt-vmstate enable {dom.name}' or 'virt-vmstate disable {dom.name}' to set "
                 "the definition straight")
    if with_stream:
        check_stream_possible(dom)
        check_object_address(ctx)
    managed = ManagedProcesses(ctx.rundir, ctx.config)
    if managed.records():
        # 'prepare begin' is the first hook of a start: whatever runs is left from an
        # earlier run of this domain (a stop whose hook failed) and holds old state.
        log.warning("stopping processes left from an earlier run of this domain")
        managed.stop_all()
    # Nor may its files meet the new start (a helper's socket file makes its bind fail);
    # only what this start's 'migrate begin' kept stays.
    ctx.rundir.clear(keep=INCOMING_FILES if record is not None else ())
    _start_managed(ctx, managed, record)


def _start_managed(ctx: HookContext, managed: ManagedProcesses, record: IncomingRecord | None) -> None:
    """The buses, the proxy and the helpers, each unless it runs; helpers in incoming mode
    when state comes.  What must be up before QEMU starts is waited for at 'start begin'
    (``START_WAIT``), the rest at 'started begin' (``STARTED_WAIT``, which the proxy removes
    once it and those helpers are up), so that they come up while libvirt and QEMU start."""
    dom = ctx.dom
    assert dom.config is not None
    with_stream = bool(dom.dbus_vmstate_args())
    managed_bus = dom.config.bus_mode == "managed"
    if not managed_bus and not with_stream:
        return
    ctx.rundir.create()
    if managed_bus:
        managed.start_bus()
    # Written before the proxy starts: it may be up at once.
    if with_stream or helpers_up_before(ctx, "guest"):
        ctx.rundir.write(STARTED_WAIT, b"")
    if helpers_up_before(ctx, "qemu") or (with_stream and "selinux" in dom.security_models):
        ctx.rundir.write(START_WAIT, b"")
    if with_stream:
        incoming_kind = record.kind if record is not None and record.carrier == "stream" else None
        from ..proxy.service import run_proxy
        managed.spawn_proxy(dom, incoming_kind, run_here=run_proxy)
    if managed_bus:
        # Nothing comes to a record of carrier "none": its helpers start fresh, and 'started
        # begin' refuses a QEMU that waits for a migration stream.
        incoming = record is not None and record.carrier != "none"
        managed.start_helpers(dom, ctx.config.profiles, incoming)
    log.info("%s starting%s", " and ".join(
        (["the proxy at " + proxy_address(dom, ctx.config)] if with_stream else [])
        + (["the helpers on " + managed.bus_address] if managed_bus else [])),
        " (incoming)" if record is not None else "")


def check_object_address(ctx: HookContext) -> None:
    """The object QEMU will create must talk to this host's proxy of the domain."""
    from ..core import stream
    expected = proxy_address(ctx.dom, ctx.config)
    found = stream.object_address(ctx.dom)
    if found != expected:
        raise MigrationRefused(
            f"the domain's dbus-vmstate object talks to {found}, not to this host's proxy "
            f"{expected}", hint=f"run 'virt-vmstate enable {ctx.dom.name}' on this host to point it here")


def before_qemu(ctx: HookContext) -> None:
    """What must be done before QEMU connects to the proxy and to the helpers: the proxy
    socket's SELinux label (libvirt makes the domain's label after 'prepare begin'), and
    the helpers QEMU may need."""
    if not (ctx.rundir.exists() and ctx.rundir.has(START_WAIT)):
        return
    if ctx.dom.dbus_vmstate_args() and "selinux" in ctx.dom.security_models:
        from ..host.selinux import label_proxy_socket
        label_proxy_socket(ctx.rundir, ctx.dom)
    wait_before_qemu(ctx)


def wait_before_qemu(ctx: HookContext) -> None:
    """Wait for the managed helpers whose profile says they are up before QEMU starts."""
    if not (ctx.rundir.exists() and ctx.rundir.has(START_WAIT)):
        return
    now = helpers_up_before(ctx, "qemu")
    if now:
        deadline = time.monotonic() + min(ctx.config.timeouts.helper_start, ctx.remaining)
        ManagedProcesses(ctx.rundir, ctx.config).wait_for_helpers(ctx.dom, now, deadline)
        log.info("managed helpers up: %s", ", ".join(now))
    ctx.rundir.discard(START_WAIT)


def helpers_up_before(ctx: HookContext, moment: str) -> list[str]:
    """The managed helpers whose profile says they are up before ``moment``: "qemu" ('start
    begin' waits for them) or "guest" ('started begin' does)."""
    assert ctx.dom.config is not None
    if ctx.dom.config.bus_mode != "managed":
        return []
    profiles = ctx.config.profiles
    return [h.id for h in ctx.dom.config.helpers
            if h.profile in profiles and profiles[h.profile].up_before == moment]


def wait_started(ctx: HookContext) -> None:
    """Wait for what 'prepare begin' started and left to come up while QEMU does."""
    if not (ctx.rundir.exists() and ctx.rundir.has(STARTED_WAIT)):
        return
    managed = ManagedProcesses(ctx.rundir, ctx.config)
    deadline = time.monotonic() + min(ctx.config.timeouts.helper_start, ctx.remaining)
    managed.wait_for_proxy(deadline)
    up_before_guest = helpers_up_before(ctx, "guest")
    if up_before_guest:
        managed.wait_for_helpers(ctx.dom, up_before_guest, deadline)
        log.info("managed helpers up: %s", ", ".join(up_before_guest))
    ctx.rundir.discard(STARTED_WAIT)


# -- started begin ------------------------------------------------------------

def qemu_is_incoming(dom: DomainXML) -> bool | None:
    """Whether the domain's QEMU waits for an incoming stream (None: cannot tell).

    Read from its command line, through the pidfile libvirt keeps; libvirt
    itself is never asked (a hook must not call back into it).
    """
    if "/" in dom.name or dom.name.startswith("."):
        return None
    try:
        with open(f"{LIBVIRT_QEMU_RUN}/{dom.name}.pid", "rb") as f:
            pid = int(f.read(32).strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read(1 << 20).split(b"\0")
    except (OSError, ValueError):
        return None
    return b"-incoming" in argv


def load_before_guest_runs(ctx: HookContext) -> None:
    """Wait for what came up while QEMU started; pre-copy: Load every helper from the kept
    state.  All before the guest can run."""
    dom, config = ctx.dom, ctx.config
    assert dom.config is not None
    record = incoming_for(ctx)
    if record is not None and record.carrier == "none":
        # Only QEMU's command line tells a live migration that carries no state (refused,
        # before the guest runs here) from the start that follows an offline migration.
        if qemu_is_incoming(dom) is not False:
            raise no_state_refusal(dom, record.kind)
        log.info("QEMU was started without -incoming: a start after an offline migration, "
                 "with fresh helpers")
        discard_incoming(ctx)
        record = None
    if record is not None and qemu_is_incoming(dom) is False:
        # A plain start that the record mistook for an incoming one: helpers waiting
        # for state that will never come would be useless, so start them afresh.
        log.warning("QEMU was started without -incoming: not an incoming %s; starting the "
                    "helpers fresh", record.kind)
        discard_incoming(ctx)
        managed = ManagedProcesses(ctx.rundir, config)
        managed.stop_helpers()
        managed.proxy_forget_incoming()  # QEMU is connected to it: it keeps running
        _start_managed(ctx, managed, None)
        wait_before_qemu(ctx)
        record = None
    wait_started(ctx)
    if record is None or record.carrier in ("stream", "none"):
        if record is not None and record.carrier == "stream":
            ctx.rundir.discard(INCOMING_RECORD)
        return  # the stream's proxy Loads when QEMU asks
    import hashlib

    from ..bus.transfer import restore
    from ..bus.vmstate1 import open_when_present
    from ..core import bundle as bundle_mod
    raw = ctx.rundir.read(INCOMING_BUNDLE, config.limits.max_bundle_size)
    sealed = bundle_mod.decode(raw, max_size=config.limits.max_bundle_size)
    wanted = sorted(set(sealed.ids) | set(dom.config.required_ids))
    wait_deadline = time.monotonic() + min(config.timeouts.helper_start, ctx.remaining)
    # The bus the wait found the helpers on is the one they are Loaded through.
    call_timeout, cap = min(config.timeouts.call, ctx.remaining), config.limits.max_state_size
    if dom.config.bus_mode == "managed":
        bus, found = ManagedProcesses(ctx.rundir, config).open_when_helpers_up(
            dom, wanted, wait_deadline, call_timeout=call_timeout, state_cap=cap)
    else:
        bus, found = open_when_present(bus_address(dom, config), wanted, wait_deadline,
                                       call_timeout=call_timeout, state_cap=cap)
    with bus:
        loaded = restore(bus, sealed, allowed_uids=allowed_uids(config), found=found)
    used_states(ctx).add(hashlib.sha256(raw).hexdigest())
    discard_incoming(ctx)
    log.info("loaded %d helpers: %s", len(loaded), ", ".join(h.id for h in loaded))


def remove_spooled(ctx: HookContext) -> None:
    """Remove the spool file this migration brought, once loaded or abandoned."""
    if not (ctx.rundir.exists() and ctx.rundir.has(INCOMING_SPOOL)):
        return
    from ..host.spool import Spool
    name = ctx.rundir.read(INCOMING_SPOOL, 256).decode("ascii", "replace")
    if ctx.config.spool.dir is not None and Spool(ctx.config.spool.dir).remove(name):
        log.info("spool file %s removed", name)
    ctx.rundir.discard(INCOMING_SPOOL)


# -- stopped end / release end / reconnect begin --------------------------------

def stop_domain(ctx: HookContext) -> None:
    """The domain is gone from this host: stop what we started and forget it.

    A state the domain carried away (staged for a migration) is recorded as used.
    """
    if ctx.dom.state is not None:
        used_states(ctx).add(ctx.dom.state.sha256)
    if not ctx.rundir.exists():
        return
    remove_spooled(ctx)
    # The domain is gone at once for every later hook (a start of it gets a runtime dir of its
    # own), and libvirt has its answer while a process of the hook's own stops what ran:
    # waiting for them to exit is most of a stop's time, and the source's 'stopped end' is
    # part of every migration's.
    aside = ctx.rundir.set_aside()
    run_detached(lambda: stop_everything(aside, ctx.config), "vmstate-stop")


def stop_everything(rundir: RunDir, config: HostConfig) -> None:
    """Stop the proxy, the helpers and the buses of a runtime dir, and remove it; also what a
    stop set aside and did not finish (its process was killed)."""
    ManagedProcesses(rundir, config).stop_all()
    rundir.remove()
    log.info("proxy, managed helpers and buses stopped, runtime dir removed")
    from ..host.rundir import abandoned_aside
    for left in abandoned_aside(config.runtime_dir):
        log.warning("stopping processes of domain %s that a stop left behind", left.uuid)
        ManagedProcesses(left, config).stop_all()
        left.remove()


def reconnect(ctx: HookContext) -> None:
    """libvirtd restarted with the domain running: keep what runs, start nothing."""
    if not ctx.rundir.exists():
        return
    records = ManagedProcesses(ctx.rundir, ctx.config).records()
    alive = [r.role for r in records if is_running(r)]
    dead = [r.role for r in records if not is_running(r)]
    log.info("reconnected: running %s%s", ", ".join(alive) or "nothing",
             f"; gone: {', '.join(dead)}" if dead else "")
