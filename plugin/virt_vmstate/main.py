"""The ``virt-vmstate`` command's entry point.

libvirt runs the hook for every event of every domain that is ours, so
``virt-vmstate hook DOMAIN OP SUBOP EXTRA`` goes straight to the hook, without
the command line parser and the modules only other commands need; so does the
proxy the hook starts, ``virt-vmstate [--config PATH] proxy --OPTION VALUE...``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["hook"] and 4 <= len(args) <= 5 and not any(a.startswith("--") for a in args):
        from .hook import main as hook_main
        return hook_main(args[1:])
    if "proxy" in args[:3]:  # started by the hook for every domain with the stream carrier
        from .proxy import main as proxy_main
        status = proxy_main(args)
        if status is not None:
            return status
    from .cli import main as cli_main
    return cli_main(args)
