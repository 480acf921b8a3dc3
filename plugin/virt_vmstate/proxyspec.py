"""How the hook starts a domain's proxy: what it serves, and its command line.  Pure code.

Apart from ``proxy`` so that the hook, which starts the proxy and waits for it,
imports neither jeepney nor the proxy's Save and Load.
"""

from __future__ import annotations

from .names import canonical_uuid
from .values import Value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Sequence

# Files in the domain's runtime dir that the hook and the proxy share.
READY_FILE = "proxy.ready"  # the proxy's PID, once it owns its name
# 'started begin' has processes to wait for.  The proxy removes it once it owns its name and
# every required helper is on the helper bus; then the bash hook answers 'started begin'.
STARTED_WAIT = "started.wait"
INCOMING_RECORD = "incoming.record"  # the incoming migration or restore; used up by the Load


class ProxySpec(Value):
    """What one domain's proxy serves: the domain, its two buses and its required helpers."""

    __slots__ = ("domain", "uuid", "helper_bus", "proxy_bus", "required", "incoming")

    def __init__(self, domain: str, uuid: str, helper_bus: str, proxy_bus: str, required: tuple[str, ...],
                 incoming: str | None = None) -> None:
        self.domain = domain
        self.uuid = uuid            # libvirt's form; bundles are bound to it
        self.helper_bus = helper_bus
        self.proxy_bus = proxy_bus
        self.required = required
        self.incoming = incoming    # "migration" or "restore": waiting for QEMU's Load


_OPTIONS = {"--domain": "domain", "--uuid": "uuid", "--helper-bus": "helper_bus",
            "--proxy-bus": "proxy_bus", "--ids": "ids", "--incoming": "incoming"}


def proxy_argv(python: str, config_path: str | None, spec: ProxySpec) -> list[str]:
    """The command line the hook starts a domain's proxy with (``spec_from_argv`` reads it back)."""
    argv = [python, "-m", "virt_vmstate"]
    if config_path:
        argv += ["--config", config_path]
    argv += ["proxy", "--domain", spec.domain, "--uuid", spec.uuid, "--helper-bus", spec.helper_bus,
             "--proxy-bus", spec.proxy_bus]
    if spec.required:
        argv += ["--ids", ",".join(spec.required)]
    if spec.incoming:
        argv += ["--incoming", spec.incoming]
    return argv


def spec_from_argv(args: Sequence[str]) -> tuple[ProxySpec, str | None] | None:
    """The spec and config path of ``[--config PATH] proxy --OPTION VALUE...``, the form
    ``proxy_argv`` writes; None for anything else, which the command-line parser then
    answers with its help or its errors."""
    config_path = None
    if args[:1] == ["--config"] and len(args) > 1:
        config_path, args = args[1], args[2:]
    if args[:1] != ["proxy"] or len(args) % 2 == 0:
        return None
    values: dict[str, str] = {}
    for option, value in zip(args[1::2], args[2::2]):
        if option not in _OPTIONS or _OPTIONS[option] in values:
            return None
        values[_OPTIONS[option]] = value
    dom_uuid = canonical_uuid(values.get("uuid", ""))
    if (dom_uuid is None or not {"domain", "helper_bus", "proxy_bus"} <= values.keys()
            or values.get("incoming", "migration") not in ("migration", "restore")):
        return None
    ids = tuple(i.strip() for i in values.get("ids", "").split(",") if i.strip())
    if "ids" in values and not ids:
        return None
    return ProxySpec(values["domain"], dom_uuid, values["helper_bus"], values["proxy_bus"], ids,
                     values.get("incoming")), config_path
