"""Logging to syslog for the processes libvirt starts: the hook and the proxy."""

from __future__ import annotations

import logging
import logging.handlers
import os

from .config import HostConfig

ROOT_LOGGER = "virt_vmstate"


def setup_logging(config: HostConfig, ident: str = "virt-vmstate", *, stderr: bool = False) -> None:
    """Log at the configured level to syslog (daemon facility), and to stderr if asked."""
    root = logging.getLogger(ROOT_LOGGER)
    root.setLevel(getattr(logging, config.logging.level.upper()))
    root.propagate = False
    if root.handlers:
        return
    if config.logging.syslog and os.path.exists("/dev/log"):
        try:
            handler = logging.handlers.SysLogHandler(address="/dev/log",
                                                     facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            handler.setFormatter(logging.Formatter(f"{ident}[{os.getpid()}]: %(message)s"))
            root.addHandler(handler)
        except OSError:
            pass
    if stderr:
        to_stderr = logging.StreamHandler()
        to_stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(to_stderr)
    if not root.handlers:
        root.addHandler(logging.NullHandler())
