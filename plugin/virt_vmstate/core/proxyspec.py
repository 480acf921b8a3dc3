"""How the hook starts a domain's proxy: what it serves, and its command line.  Pure code.

Apart from ``proxy`` so that the hook, which starts the proxy and waits for it,
imports neither jeepney nor the proxy's Save and Load.
"""

from __future__ import annotations

from .values import Value


class ProxySpec(Value):
    """What one domain's proxy serves: the domain, its helper bus, the address QEMU's object
    connects to, and its required helpers."""

    __slots__ = ("domain", "uuid", "helper_bus", "address", "required", "incoming", "listen_fd")

    def __init__(self, domain: str, uuid: str, helper_bus: str, address: str, required: tuple[str, ...],
                 incoming: str | None = None, listen_fd: int | None = None) -> None:
        self.domain = domain
        self.uuid = uuid            # libvirt's form; bundles are bound to it
        self.helper_bus = helper_bus
        self.address = address
        self.required = required
        self.incoming = incoming    # "migration" or "restore": waiting for QEMU's Load
        self.listen_fd = listen_fd  # the socket at ``address``, bound by the hook that forked it


def proxy_argv(python: str, config_path: str | None, spec: ProxySpec) -> list[str]:
    """The command line a domain's proxy runs with, when it is not forked from the hook."""
    argv = [python, "-m", "virt_vmstate"]
    if config_path:
        argv += ["--config", config_path]
    argv += ["proxy", "--domain", spec.domain, "--uuid", spec.uuid, "--helper-bus", spec.helper_bus,
             "--listen", spec.address]
    if spec.required:
        argv += ["--ids", ",".join(spec.required)]
    if spec.incoming:
        argv += ["--incoming", spec.incoming]
    return argv
