"""libvirt's qemu hook: ``DOMAIN OP SUBOP EXTRA`` and the domain XML on stdin.

libvirt runs the hook for every event of every domain and has no timeout for
it, so a domain that is not ours costs one substring search, and every run
that is ours has an overall deadline.  Only the filtered XML of ``migrate
begin`` ever goes to stdout; errors go to stderr (libvirt shows them to the
user) and to syslog.  The hook never calls back into libvirt.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from ..core.config import HostConfig
from ..core.domxml import MARKER, parse_domain
from ..errors import DeadlineExceeded, VMStateError
from ..host.rundir import RunDir
from ..logs import log, setup_logging
from . import phases

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO, Callable, Sequence

    Handler = Callable[[phases.HookContext], "bytes | None"]

MAX_XML = 64 * 1024 * 1024

HANDLERS: dict[tuple[str, str], Handler] = {
    ("migrate", "begin"): phases.receive_migration,
    ("restore", "begin"): phases.receive_restore,
    ("prepare", "begin"): phases.start_processes,
    ("start", "begin"): phases.before_qemu,
    ("started", "begin"): phases.load_before_guest_runs,
    ("stopped", "end"): phases.stop_domain,
    ("release", "end"): phases.stop_domain,
    ("reconnect", "begin"): phases.reconnect,
}

# Failing these hooks aborts the operation; only they get the cleanup on failure.
_ABORTING = {("prepare", "begin"), ("start", "begin"), ("started", "begin")}


def _on_deadline(signum: int, frame: object) -> None:
    raise DeadlineExceeded("the hook ran past its deadline (timeouts.hook)",
                           hint="look for a stuck helper or bus; raise timeouts.hook if it is just slow")


def read_xml(stdin: BinaryIO) -> bytes:
    """The domain XML libvirt writes to stdin; one byte over MAX_XML tells it is too big."""
    return stdin.read(MAX_XML + 1)


def handler_for(op: str, subop: str, xml: bytes) -> Handler | None:
    """The phase to run, or None: an event with nothing to do, or a domain that is not ours
    (a stop is looked at even then: the metadata may have been removed while it ran)."""
    handler = HANDLERS.get((op, subop))
    if handler is None or (MARKER not in xml and handler is not phases.stop_domain):
        return None
    return handler


def run_hook(argv: Sequence[str], xml: bytes, stdout: BinaryIO, config: HostConfig) -> int:
    """One hook run: ``xml`` is stdin as read by ``read_xml``."""
    domain, op, subop = argv[0], argv[1], argv[2] if len(argv) > 2 else "-"
    handler = handler_for(op, subop, xml)
    if handler is None:
        return 0
    setup_logging(config)
    started = time.monotonic()
    prefix = f"domain {domain}"
    try:
        if len(xml) > MAX_XML:
            raise VMStateError(f"domain XML on stdin is over {MAX_XML} bytes")
        dom = parse_domain(xml)
        if dom.config is None and handler is not phases.stop_domain:
            return 0
        rundir = RunDir(config.runtime_dir, dom.uuid)
        if handler is phases.stop_domain and not rundir.exists() and dom.state is None:
            return 0  # nothing of ours to stop; not even the lock is needed
        prefix = f"domain {dom.name} ({dom.uuid})"
        log.context = f"{prefix} {op} {subop}"  # every record of this run names them
        ctx = phases.HookContext(dom, xml, config, rundir, started + config.timeouts.hook)
        signal.signal(signal.SIGALRM, _on_deadline)
        signal.setitimer(signal.ITIMER_REAL, config.timeouts.hook)
        try:
            # Give up on the lock before the overall deadline, to say why.
            with ctx.rundir.lock(max(0.1, config.timeouts.hook - 0.5)):
                try:
                    output = handler(ctx)
                except BaseException:
                    if (op, subop) in _ABORTING:
                        _abort_cleanup(ctx)
                    raise
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if output:
            stdout.write(output)
            stdout.flush()
        elapsed = (time.monotonic() - started) * 1000
        from ..host.managed import WaitingTime
        log.debug("done in %.0f ms, %.0f ms of it waiting for processes", elapsed, WaitingTime.seconds * 1000)
        if os.environ.get("VIRT_VMSTATE_HOOK_TIMING"):  # benchmarks/hook_overhead.py
            sys.stderr.write(f"virt-vmstate timing: {elapsed:.2f} ms, waiting {WaitingTime.seconds * 1000:.2f} ms\n")
        return 0
    except VMStateError as e:
        log.error("%s", e)
        print(f"virt-vmstate: {prefix}: {op} {subop}: {e}", file=sys.stderr)
        return 1


def load_config_for(op: str, domain: str, path: str | None = None) -> HostConfig:
    """The host config; a domain that stops is cleaned up even when the config is broken."""
    from ..host.configfile import load_config
    try:
        return load_config(path)
    except VMStateError as e:
        if op not in ("stopped", "release"):
            raise
        from ..host.configfile import rescue_runtime_dir
        print(f"virt-vmstate hook: {e}; cleaning up domain {domain} from its runtime dir's "
              "own records", file=sys.stderr)
        return HostConfig(source=f"{e.message} (rescue)", runtime_dir=rescue_runtime_dir(path))


def main(argv: Sequence[str]) -> int:
    """``virt-vmstate hook DOMAIN OP SUBOP [EXTRA]``, as libvirt runs it: the config is read
    only for an event with work."""
    xml = read_xml(sys.stdin.buffer)
    domain, op = argv[0], argv[1]
    if handler_for(op, argv[2] if len(argv) > 2 else "-", xml) is None:
        return 0
    try:
        config = load_config_for(op, domain)
    except VMStateError as e:
        print(f"virt-vmstate hook: {e}", file=sys.stderr)
        return 1
    return run_hook(list(argv), xml, sys.stdout.buffer, config)


def _abort_cleanup(ctx: phases.HookContext) -> None:
    """A failed start: libvirt aborts it, so stop what this domain's hooks started."""
    signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        phases.stop_domain(ctx)
    except (VMStateError, OSError) as e:
        log.warning("cleanup after failure: %s", e)
