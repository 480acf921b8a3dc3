"""``virt-vmstate check``: will this domain's migration carry its helpers' state?

Nothing is changed: the helpers are asked to Save (which leaves their state as
it is) only to measure it, and the probe file written to the spool is removed.
The destination's side (profiles, spool) is checked by running ``virt-vmstate
check-host`` there: over ssh for a ``+ssh`` URI, as a local command for a
local URI, or as the operator's ``--dest-command``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from hashlib import sha256
from urllib.parse import urlsplit

from ..bus.transfer import capture
from ..bus.vmstate1 import HelperBus
from ..core.config import HostConfig
from ..core.confinement import Verdict
from ..core.domxml import DomainXML, parse_domain, strip_state
from ..core.names import random_uuid
from ..core.precopy import CarrierError, choose_for_host
from ..core.values import Value
from ..errors import VMStateError
from ..host.addresses import bus_address
from ..host.spool import Spool

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Sequence

DEST_TIMEOUT = 60.0


class Check(Value):
    __slots__ = ("name", "ok", "detail")

    def __init__(self, name: str, ok: bool | None, detail: str) -> None:
        self.name = name
        self.ok = ok  # None: could not be checked, which does not fail the preflight
        self.detail = detail

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail}


class Report(Value):
    __slots__ = ("domain", "checks", "carrier", "state_bytes", "bundle_bytes", "last_failure")

    def __init__(self, domain: str) -> None:
        self.domain = domain
        self.checks: list[Check] = []
        self.carrier: str | None = None
        self.state_bytes: int | None = None
        self.bundle_bytes: int | None = None
        self.last_failure: str | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok is not False for c in self.checks)

    def add(self, name: str, ok: bool | None, detail: str) -> bool:
        self.checks.append(Check(name, ok, detail))
        return ok is not False

    def as_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "ok": self.ok, "carrier": self.carrier,
                "state_bytes": self.state_bytes, "bundle_bytes": self.bundle_bytes,
                "last_failure": self.last_failure,
                "checks": [c.as_dict() for c in self.checks]}


def check_domain(name: str, uri: str | None, config: HostConfig, *, dest_uri: str | None,
                 dest_command: str | None, carrier: str) -> Report:
    from .migrate import snapshot
    report = Report(name)
    try:
        snap = snapshot(name, uri)
    except VMStateError as e:
        report.add("domain", False, str(e))
        return report
    if snap.state == "not running":
        report.add("domain", False, "not running: there is nothing to migrate")
        _last_start(report, name, snap.migratable_xml, config)
        return report
    report.add("domain", True, snap.state)
    try:
        parsed = parse_domain(snap.migratable_xml)
    except VMStateError as e:
        report.add("metadata", False, str(e))
        return report
    if parsed.config is None:
        report.add("metadata", False, "no virt-vmstate metadata: migrate it with plain 'virsh migrate'")
        return report
    required = parsed.config.required_ids
    report.add("metadata", True, f"bus {parsed.config.bus_mode}, helpers "
               f"{', '.join(required) or '(any on the bus)'}, missing state: "
               f"{parsed.config.missing_state}")
    helpers = parsed.config.helpers
    parsed = parsed.replace(id=snap.id)
    probe = _source_side(report, parsed, snap.migratable_xml, config, carrier)
    if parsed.has_stream_object:
        _stream_status(report, parsed, config)
        _confinement(report, parsed, config)
    if dest_uri:
        _dest_libvirt(report, parsed, dest_uri)
        profiles = sorted({h.profile for h in helpers if h.profile})
        _dest_host(report, dest_uri, dest_command, profiles, probe, config)
    if probe is not None and config.spool.dir:
        Spool(config.spool.dir).remove(probe[0])
    return report


def _source_side(report: Report, dom: DomainXML, xml: bytes, config: HostConfig,
                 carrier: str) -> tuple[str, str] | None:
    """Bus, helpers, state size and carrier; returns the spool probe (name, sha256) if any."""
    assert dom.config is not None
    required = dom.config.required_ids
    step = "bus"
    try:
        address = bus_address(dom, config)
        with HelperBus.open(address, call_timeout=config.timeouts.call,
                            state_cap=config.limits.max_state_size) as bus:
            report.add("bus", True, address)
            step = "helpers"
            found = bus.helpers()
            ids = {h.id for h in found}
            missing = [i for i in required if i not in ids]
            extra = sorted(ids - set(required)) if required else []
            if missing:
                report.add("helpers", False, f"required helpers not on the bus: {', '.join(missing)}")
                return None
            report.add("helpers", True, f"{len(required or ids)} present"
                       + (f"; not listed in the metadata, not saved: {', '.join(extra)}" if extra else ""))
            step = "state"
            sealed = capture(bus, required or None, domain_uuid=dom.uuid)
    except VMStateError as e:
        report.add(step, False, str(e))
        return None
    report.state_bytes = sealed.total_size
    sizes = ", ".join(f"{s.id} {len(s.data)} B" for s in sealed.states)
    report.add("state", True, f"{sealed.total_size} bytes ({sizes})")
    if dom.has_stream_object:
        _stream_side(report, dom, sealed, config)
        return None
    try:
        # Sized as the migration sends it: without any state staged earlier.
        carried = choose_for_host(sealed, config, requested=carrier,
                                  base_xml_size=len(strip_state(xml, dom)), domain=dom.name)
    except CarrierError as e:
        report.add("carrier", False, e.message)
        return None
    report.carrier, report.bundle_bytes = carried.carrier, len(carried.data)
    report.add("carrier", True, f"{carried.carrier} ({carried.codec.name.lower()}, "
               f"{len(carried.data)} bytes)")
    if config.spool.dir is None:
        return None
    name = f"check-{random_uuid()}.probe"
    data = os.urandom(64)
    try:
        Spool(config.spool.dir).write(name, data)
    except VMStateError as e:
        report.add("spool", False if carried.carrier == "spool" else None, str(e))
        return None
    report.add("spool", True, f"{config.spool.dir} is writable")
    return (name, sha256(data).hexdigest())


def _stream_side(report: Report, dom: DomainXML, sealed: Any, config: HostConfig) -> None:
    """The stream carrier: how the state would travel, whether the proxy is there, its last failure."""
    from ..core import streamreply
    try:
        reply = streamreply.plan_reply(sealed, spool_configured=config.spool.dir is not None,
                                  max_bundle_size=config.limits.max_bundle_size, domain=dom.name)
    except VMStateError as e:
        report.add("carrier", False, f"stream: {e.message}")
        return
    report.carrier, report.bundle_bytes = "stream", len(reply.bundle)
    why = "the running QEMU has the dbus-vmstate object (virt-vmstate enable)"
    if not reply.inline and config.spool.dir is None:
        report.add("carrier", False, f"stream, {reply.describe()}: a migration needs "
                   "[carriers.spool] dir on both hosts (save images work)")
    else:
        report.add("carrier", True, f"stream, because {why}; state goes {reply.describe()}")


def _stream_status(report: Report, dom: DomainXML, config: HostConfig) -> None:
    """Whether the proxy is there, and its last failure (also after a failed plain virsh migrate)."""
    from ..host.managed import ManagedProcesses
    from ..host.rundir import RunDir
    from ..proxy.service import last_failure
    rundir = RunDir(config.runtime_dir, dom.uuid)
    proxy = ManagedProcesses(rundir, config).running("proxy") if rundir.exists() else None
    if proxy is None:
        report.add("proxy", False, "the virt-vmstate proxy is not running: a migration or save "
                   f"would fail; run 'virt-vmstate disable {dom.name}' and 'virt-vmstate enable "
                   f"{dom.name}' to restart it")
    else:
        report.add("proxy", True, f"running (pid {proxy.pid})")
    failure = last_failure(rundir)
    if failure:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(str(failure.get("time", 0)))))
        report.last_failure = str(failure.get("detail"))
        report.add("last failure", None, f"{when}: {failure.get('detail')}")


def _last_start(report: Report, name: str, xml: bytes, config: HostConfig) -> None:
    """Why the domain's last start failed, when its QEMU could not reach the proxy."""
    from ..core.confinement import confining_models, connect_failure, last_start_error
    from ..core.layout import LIBVIRT_QEMU_LOG
    from ..host.addresses import proxy_socket_path
    if "/" in name or name.startswith("."):
        return
    try:
        dom = parse_domain(xml)
        with open(os.path.join(LIBVIRT_QEMU_LOG, f"{name}.log"), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            error = last_start_error(f.read().decode("utf-8", "replace"))
    except (OSError, VMStateError):
        return
    if error is not None:
        path = proxy_socket_path(dom, config)
        report.add("last start", False, connect_failure(error, confining_models(dom.security_models), path)
                   or error)


def confinement_verdict(dom: DomainXML) -> Verdict:
    """Whether the domain's QEMU is confined, and whether it may reach its proxy socket,
    from its <seclabel>s and this host's AppArmor files."""
    from ..core.confinement import confining_models, stream_verdict
    from ..core.layout import APPARMOR_RULE, LIBVIRT_QEMU_ABSTRACTION
    try:
        with open(LIBVIRT_QEMU_ABSTRACTION, encoding="utf-8", errors="replace") as f:
            includes = "abstractions/libvirt-qemu.d" in f.read()
    except OSError:
        includes = False
    return stream_verdict(confining_models(dom.security_models), apparmor_rule=os.path.exists(APPARMOR_RULE),
                          includes_drop_ins=includes)


def _confinement(report: Report, dom: DomainXML, config: HostConfig) -> None:
    verdict = confinement_verdict(dom)
    report.add("confinement", verdict.ok, verdict.detail)
    if "selinux" not in dom.security_models:
        return
    from ..host.addresses import proxy_socket_path
    from ..host.selinux import label_of
    path = proxy_socket_path(dom, config)
    found = label_of(path)
    if found is not None and found == dom.selinux_image_label:
        report.add("socket label", True, f"{path}: {found}, the domain's <imagelabel>")
    else:
        # QEMU connected when it started (or it would not run): only a new object's connect,
        # after 'disable' and 'enable', would meet the wrong label.
        report.add("socket label", None, f"{path} is labelled {found or 'nothing'}, not the domain's "
                   f"<imagelabel> {dom.selinux_image_label or '(none in the XML)'}; run 'virt-vmstate "
                   f"disable {dom.name}' and 'virt-vmstate enable {dom.name}' to label it again")


def _dest_libvirt(report: Report, dom: DomainXML, dest_uri: str) -> None:
    from .migrate import destination_status
    try:
        hostname, active = destination_status(dest_uri, str(dom.uuid))
    except VMStateError as e:
        report.add("destination libvirt", False, str(e))
        return
    if active:
        report.add("destination libvirt", False, f"domain {dom.uuid} is already running on {dest_uri}")
        return
    report.add("destination libvirt", True, f"{hostname} reachable")


def dest_runner(dest_uri: str, dest_command: str | None) -> list[str] | None:
    """The command that runs virt-vmstate on the destination host, if one can be found."""
    if dest_command:
        return shlex.split(dest_command)
    parts = urlsplit(dest_uri)
    transport = parts.scheme.partition("+")[2]
    if not parts.hostname:
        return [sys.executable, "-m", "virt_vmstate"]
    if transport in ("ssh", "libssh", "libssh2"):
        ssh = ["ssh", "-o", "BatchMode=yes"]
        if parts.port:
            ssh += ["-p", str(parts.port)]
        target = f"{parts.username}@{parts.hostname}" if parts.username else parts.hostname
        return ssh + [target, "virt-vmstate"]
    return None


def _dest_host(report: Report, dest_uri: str, dest_command: str | None, profiles: Sequence[str],
               probe: tuple[str, str] | None, config: HostConfig) -> None:
    runner = dest_runner(dest_uri, dest_command)
    if runner is None:
        report.add("destination host", None, f"cannot run a command on the host of {dest_uri}; "
                   "pass --dest-command 'ssh HOST virt-vmstate' to check profiles and spool there")
        return
    argv = runner + ["check-host", "--json"]
    if profiles:
        argv += ["--profiles", ",".join(profiles)]
    if probe is not None:
        argv += ["--spool-file", probe[0], "--spool-sha256", probe[1]]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=DEST_TIMEOUT, start_new_session=True)
    except (OSError, subprocess.TimeoutExpired) as e:
        report.add("destination host", False, f"{shlex.join(argv)}: {e}")
        return
    try:
        remote = json.loads(done.stdout)
        checks = remote["checks"]
    except (ValueError, KeyError, TypeError):
        report.add("destination host", False, f"{shlex.join(runner)} check-host failed "
                   f"(exit {done.returncode}): {done.stderr.strip()[-300:]}")
        return
    for c in checks:
        report.add(f"destination {c.get('check')}", c.get("ok"), str(c.get("detail")))


def check_host(config: HostConfig, profiles: Sequence[str], spool_file: str | None,
               spool_sha256: str | None) -> Report:
    """This host's side of a migration: profiles, the bus daemon, the spool."""
    report = Report("")
    report.add("config", True, config.source)
    for name in profiles:
        profile = config.profiles.get(name)
        if profile is None:
            report.add("profile " + name, False, f"not defined in {config.source}")
        elif not os.access(profile.command[0], os.X_OK):
            report.add("profile " + name, False, f"{profile.command[0]} is not an executable")
        else:
            report.add("profile " + name, True, profile.command[0])
    daemon = config.bus.dbus_daemon
    report.add("dbus-daemon", os.access(daemon, os.X_OK), daemon)
    if spool_file:
        if config.spool.dir is None:
            report.add("spool", False, "[carriers.spool] dir is not configured on this host")
        else:
            try:
                path = Spool(config.spool.dir).path(spool_file)
                with open(path, "rb") as f:
                    seen = sha256(f.read(1 << 20)).hexdigest()
            except (OSError, VMStateError) as e:
                report.add("spool", False, f"cannot read the source's probe file in "
                           f"{config.spool.dir}: {e}")
            else:
                report.add("spool", seen == spool_sha256,
                           f"{config.spool.dir} shows the source's probe file"
                           if seen == spool_sha256 else
                           f"{config.spool.dir} holds a different probe file: not the same storage")
    return report
