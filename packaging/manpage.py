#!/usr/bin/env python3
"""Write virt-vmstate(8) in roff from the command's own argument parser.

The synopsis, every subcommand and every option come from ``build_parser()``,
the same object that prints ``--help``, so the page cannot drift from it.  The
sections argparse does not know (the hook, files, the metadata element) come
from ``SECTIONS`` below and from the example config shipped with the packages.

    PYTHONPATH=plugin python3 packaging/manpage.py > virt-vmstate.8
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "plugin"))

from virt_vmstate import __version__  # noqa: E402
from virt_vmstate.commands.cli import EPILOG, build_parser  # noqa: E402

SECTIONS = {
    "THE HOOK": """\
Installed as /etc/libvirt/hooks/qemu.d/virt-vmstate (or /etc/libvirt/hooks/qemu), the hook
is run by libvirt for every event of every domain with the domain XML on stdin. It returns at
once, without starting Python, for any domain whose XML lacks virt-vmstate's namespace.
For domains that have it, on the destination of a migration: at "migrate begin" it verifies
the carried state and prints the XML without it; at "prepare begin" it starts the domain's
private bus, its proxy (stream carrier) and the helpers named by host profiles (in incoming
mode when state arrived); at "start begin" it waits for the helpers whose profile says
up_before = "qemu" (the default), and under SELinux gives the proxy's socket the domain's
<imagelabel>; at "started begin" it waits for the proxy and the other
helpers, and Loads every helper (pre-copy carriers) before the guest runs; at "stopped end"
and "release end" it stops what it started and removes the runtime dir.
A failure exits 1 with one line on stderr, which libvirt shows in the migration's error;
libvirt then aborts the migration and the source keeps running.
libvirt notices a first hook only when it starts or reloads: run "systemctl reload libvirtd"
(or virtqemud) once after installing.
.PP
Events with nothing to do for a domain that is ours (a start whose helpers are up, a stop
of a domain with no runtime dir) are answered by the bash hook alone. The hook forks a
stream-enabled domain's proxy rather than starting Python for it: it shows as
vmstate-proxy in "ps -o pid,comm,args", with the hook's command line. A stop answers
libvirt at once; a process of its own (vmstate-stop) stops the domain's processes.""",
    "DOMAIN METADATA": """\
A domain opts in with one element in its <metadata>:
.PP
.nf
<vmstate:vmstate xmlns:vmstate="urn:x-virt-vmstate:domain:1">
  <vmstate:bus mode="managed"/>
  <vmstate:missing-state policy="refuse"/>
  <vmstate:helper id="slirp0" profile="slirp"/>
</vmstate:vmstate>
.fi
.PP
bus mode is "managed" (virt-vmstate runs the bus), "libvirt" (libvirt's own per-domain
D-Bus) or "address" with address="unix:path=...". missing-state policy "refuse" refuses
an incoming migration without state; "fresh" starts the helpers empty. Each helper names
its Id and optionally a profile of the host config. The XML may only name helpers and
profiles; any other attribute or element is refused. In flight, state travels in a second
element, <vmstate-state:state xmlns:vmstate-state="urn:x-virt-vmstate:state:1">, carrying
the bundle in base64 (carrier "xml") or naming a file in the spool (carrier "spool").""",
    "FILES": """\
.TP
/etc/virt-vmstate/config.toml
Host config ($VIRT_VMSTATE_CONFIG overrides it). Every key has a default; the shipped file
is a commented example.
.TP
/etc/libvirt/hooks/qemu.d/virt-vmstate
The hook.
.TP
/etc/apparmor.d/abstractions/libvirt-qemu.d/virt-vmstate
The AppArmor rule that lets a QEMU confined by libvirt reach its own domain's proxy socket
(libvirt 9.6 and later include it).
.TP
/run/virt-vmstate/UUID/
A domain's runtime dir (mode 0700): the managed bus socket (bus.sock), the proxy's
socket (libvirt-UUID), helper logs and pidfiles, incoming state.""",
    "EXIT STATUS": "0 on success, 1 when the operation failed, 2 on a usage error.",
}


REQUESTS = (".PP", ".TP", ".nf", ".fi")


def roff(text: str) -> str:
    """Plain text as roff: requests in SECTIONS pass, everything else is escaped."""
    out = []
    for line in text.splitlines():
        if line in REQUESTS:
            out.append(line)
            continue
        line = line.replace("\\", "\\e").replace("-", "\\-")
        if line.startswith((".", "'")):
            line = "\\&" + line
        out.append(line)
    return "\n".join(out)


def options(parser: argparse.ArgumentParser) -> List[str]:
    lines = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            names = ", ".join(action.option_strings)
            if action.nargs != 0:
                names += " " + (action.metavar or action.dest.upper())
        else:
            names = action.metavar or action.dest
        help_text = action.help or ""
        if action.choices and action.option_strings:
            help_text += f" (one of: {', '.join(map(str, action.choices))})"
        lines += [".TP", f".B {roff(str(names))}", roff(help_text)]
    return lines


def render() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    date = time.strftime("%Y-%m-%d", time.gmtime(int(os.environ.get("SOURCE_DATE_EPOCH",
                                                                  time.time()))))
    page = [f'.TH VIRT-VMSTATE 8 "{date}" "virt-vmstate {__version__}" "System Administration"',
            ".SH NAME", "virt-vmstate \\- carry VM helper process state across libvirt live migrations",
            ".SH SYNOPSIS"]
    for child in sub.choices.values():
        usage = child.format_usage().replace("usage: ", "").strip()
        page += [".PP", roff(" ".join(usage.split()))]
    page += [".SH DESCRIPTION", roff(parser.description or ""), ".SH GLOBAL OPTIONS",
             *options(parser), ".SH COMMANDS"]
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, child in sub.choices.items():
        page += [f".SS {name}", roff(helps.get(name) or ""), ".PP",
                 roff(child.description or ""), *options(child)]
    for title, body in SECTIONS.items():
        page += [f".SH {title}", roff(body)]
    config = HERE / "config.toml"
    page += [".SH CONFIGURATION", "The shipped /etc/virt-vmstate/config.toml:", ".PP", ".nf",
             roff(config.read_text()), ".fi"]
    page += [".SH EXAMPLES", ".nf", roff(EPILOG.split("examples:", 1)[1].split("\n\n")[0]), ".fi",
             ".SH SEE ALSO", "virsh(1), libvirtd(8), dbus\\-daemon(1)", ""]
    return "\n".join(page)


if __name__ == "__main__":
    sys.stdout.write(render())
