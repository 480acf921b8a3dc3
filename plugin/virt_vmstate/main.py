"""The ``virt-vmstate`` command's entry point.

libvirt runs the hook for every event of every domain that is ours, so
``virt-vmstate hook DOMAIN OP SUBOP EXTRA`` goes straight to the hook, without
the command line parser and the modules only other commands need.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["hook"] and 4 <= len(args) <= 5 and not any(a.startswith("--") for a in args):
        from .hook.events import main as hook_main
        return hook_main(args[1:])
    from .commands.cli import main as cli_main
    return cli_main(args)


def run() -> NoReturn:
    """The installed command: ``main``, then an exit without the interpreter's teardown.

    Freeing every module costs a command that asked libvirt anything about 5 ms
    (measured: ``virt-vmstate migrate`` of a missing domain, 52 ms with the
    teardown, 47 ms without), a tenth of what a migration with its helpers'
    state adds to a plain one.  Nothing of ours needs the teardown: the log writes
    through, files are closed where they are written, the threads still running are
    daemons, and the processes the hook starts are detached.  What is printed is
    flushed first.  A reader of stdout that went away (``virt-vmstate list | head
    -0``) makes the status 120 and no traceback, as Python's own exit does on a
    failed flush.  Other exceptions and ``sys.exit`` (the parser's usage errors)
    leave the usual way."""
    try:
        status = main()
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        status = 120
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            status = status or 120
    os._exit(status)


def _stdout_gone() -> bool:
    """Whether stdout's reader has closed its end (poll reports an error on ours)."""
    import select
    poller = select.poll()
    poller.register(1, 0)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
