"""The migration's phases, as libvirt's hook calls on each host drive them.

    migrate begin   destination  prepare:  verify and store the incoming state, strip it from the XML
    prepare begin   destination  start the managed bus
    start begin     destination  start the managed helpers (incoming mode when state arrived)
    started begin   destination  finish:   wait for the helpers, Load each one's state
    stopped end     either       confirm:  stop managed helpers and bus, remove the runtime dir
    release end     either       confirm   (again; harmless)
    reconnect begin either       adopt what is running, restart nothing

The source's begin phase (Save and attach) is not a hook: libvirt gives the
source no hook when a migration starts, so ``virt-vmstate migrate`` does it.
"""

from __future__ import annotations

import hashlib
import logging
import pwd
import time
from dataclasses import dataclass
from typing import FrozenSet, Optional

from . import bundle as bundle_mod
from .config import HostConfig
from .domxml import DomainXML, strip_state
from .errors import BundleError, ConfigError, DomainXMLError, VMStateError
from .managed import ManagedProcesses, is_running
from .rundir import RunDir
from .spool import Spool
from .transfer import restore
from .vmstate1 import HelperBus, wait_for_ids

log = logging.getLogger(__name__)

INCOMING_BUNDLE = "incoming.vmstate"
INCOMING_SPOOL = "incoming.spool"  # name of the spool file to remove once loaded or abandoned
LIBVIRT_DBUS_DIR = "/run/libvirt/qemu/dbus"


class MigrationRefused(VMStateError):
    """The destination will not run the domain without its helpers' state."""


@dataclass
class HookContext:
    dom: DomainXML
    xml: bytes
    config: HostConfig
    rundir: RunDir
    deadline: float

    @property
    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


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
    return f"unix:path={RunDir(config.runtime_dir, dom.uuid).path / 'bus.sock'}"


def allowed_uids(config: HostConfig) -> Optional[FrozenSet[int]]:
    """The uids whose helpers may be saved or loaded: root and security.helper_users.

    None (no check) when the host config names no helper users.
    """
    users = config.security.helper_users
    if not users:
        return None
    uids = {0}
    for user in users:
        try:
            uids.add(pwd.getpwnam(user).pw_uid)
        except KeyError:
            raise ConfigError(f"{config.source}: security.helper_users: no user {user!r} on this host",
                              hint="create the user or remove it from the list") from None
    return frozenset(uids)


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


# -- migrate begin ------------------------------------------------------------

def prepare(ctx: HookContext) -> bytes:
    """Verify the incoming state, keep it in the runtime dir, return the XML without it."""
    dom = ctx.dom
    assert dom.config is not None
    check_profiles(ctx)
    if dom.state is None:
        if dom.config.helpers and dom.config.missing_state == "refuse":
            raise MigrationRefused(
                f"the incoming migration carries no state for helpers "
                f"{', '.join(dom.config.required_ids)}",
                hint=f"migrate with 'virt-vmstate migrate {dom.name} DEST_URI', or run "
                     f"'virt-vmstate save --domain {dom.name} --stage' right before 'virsh migrate'; "
                     "to start the helpers empty instead, set <missing-state policy=\"fresh\"/>")
        log.info("no incoming state; helpers start fresh (policy %s)", dom.config.missing_state)
        return b""
    sealed = load_carried_bundle(ctx)
    ctx.rundir.create()
    # Not fsynced: it is read back within seconds, and a host crash fails the migration anyway.
    ctx.rundir.write(INCOMING_BUNDLE, sealed, durable=False)
    if dom.state.spool_file:
        ctx.rundir.write(INCOMING_SPOOL, dom.state.spool_file.encode())
    log.info("incoming state stored: %d bytes (%s carrier)", len(sealed), dom.state.carrier)
    return strip_state(ctx.xml, dom)


def load_carried_bundle(ctx: HookContext) -> bytes:
    """The carried bundle, checked against its element, the domain and the clock."""
    state = ctx.dom.state
    assert state is not None and ctx.dom.config is not None
    limits = ctx.config.limits
    if state.carrier == "spool":
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

def setup_bus(ctx: HookContext) -> None:
    assert ctx.dom.config is not None
    check_profiles(ctx)
    if ctx.dom.config.bus_mode != "managed":
        return
    ctx.rundir.create()
    address = ManagedProcesses(ctx.rundir, ctx.config).start_bus(
        time.monotonic() + min(ctx.config.timeouts.helper_start, ctx.remaining))
    log.info("managed bus up at %s", address)


def setup_helpers(ctx: HookContext) -> None:
    assert ctx.dom.config is not None
    if ctx.dom.config.bus_mode != "managed":
        return
    incoming = ctx.rundir.has(INCOMING_BUNDLE) if ctx.rundir.exists() else False
    ctx.rundir.create()
    managed = ManagedProcesses(ctx.rundir, ctx.config)
    managed.start_helpers(ctx.dom, ctx.config.profiles, incoming)
    started = [h.id for h in ctx.dom.config.helpers if h.profile]
    if started:
        managed.wait_for_helpers(started, time.monotonic() + min(ctx.config.timeouts.helper_start,
                                                                 ctx.remaining))
        log.info("managed helpers up%s: %s", " (incoming)" if incoming else "", ", ".join(started))


# -- started begin ------------------------------------------------------------

def finish(ctx: HookContext) -> None:
    """Load every helper from the stored state before the guest can run."""
    dom, config = ctx.dom, ctx.config
    assert dom.config is not None
    if not (ctx.rundir.exists() and ctx.rundir.has(INCOMING_BUNDLE)):
        return
    sealed = bundle_mod.decode(ctx.rundir.read(INCOMING_BUNDLE, config.limits.max_bundle_size),
                               max_size=config.limits.max_bundle_size)
    wanted = sorted(set(sealed.ids) | set(dom.config.required_ids))
    address = bus_address(dom, config)
    wait_deadline = time.monotonic() + min(config.timeouts.helper_start, ctx.remaining)
    if dom.config.bus_mode == "managed":
        ManagedProcesses(ctx.rundir, config).wait_for_helpers(wanted, wait_deadline)
    else:
        wait_for_ids(address, wanted, wait_deadline)
    with HelperBus.open(address, call_timeout=min(config.timeouts.call, ctx.remaining),
                        state_cap=config.limits.max_state_size) as bus:
        loaded = restore(bus, sealed, allowed_uids=allowed_uids(config))
    ctx.rundir.discard(INCOMING_BUNDLE)
    remove_spooled(ctx)
    log.info("loaded %d helpers: %s", len(loaded), ", ".join(h.id for h in loaded))


def remove_spooled(ctx: HookContext) -> None:
    """Remove the spool file this migration brought, once loaded or abandoned."""
    if not (ctx.rundir.exists() and ctx.rundir.has(INCOMING_SPOOL)):
        return
    name = ctx.rundir.read(INCOMING_SPOOL, 256).decode("ascii", "replace")
    if ctx.config.spool.dir is not None and Spool(ctx.config.spool.dir).remove(name):
        log.info("spool file %s removed", name)
    ctx.rundir.discard(INCOMING_SPOOL)


# -- stopped end / release end / reconnect begin --------------------------------

def confirm(ctx: HookContext) -> None:
    """The domain is gone from this host: stop what we started and forget it."""
    if not ctx.rundir.exists():
        return
    remove_spooled(ctx)
    ManagedProcesses(ctx.rundir, ctx.config).stop_all()
    ctx.rundir.remove()
    log.info("managed helpers and bus stopped, runtime dir removed")


def adopt(ctx: HookContext) -> None:
    """libvirtd restarted with the domain running: keep what runs, start nothing."""
    if not ctx.rundir.exists():
        return
    records = ManagedProcesses(ctx.rundir, ctx.config).records()
    alive = [r.role for r in records if is_running(r)]
    dead = [r.role for r in records if not is_running(r)]
    log.info("reconnected: running %s%s", ", ".join(alive) or "nothing",
             f"; gone: {', '.join(dead)}" if dead else "")
