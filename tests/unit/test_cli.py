from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from virt_vmstate.commands import cli
from virt_vmstate.commands.cli import COMMAND_NAMES as COMMANDS
from virt_vmstate.commands.cli import build_parser, command_named

# One valid command line per command: the parser built for it alone reads it as the whole one does.
SAMPLES = {
    "list": ["list", "--bus", "unix:path=/run/x/bus.sock", "--json"],
    "save": ["save", "--domain", "vm1", "-c", "qemu:///system", "--stage", "--carrier", "spool"],
    "load": ["load", "--bus", "unix:path=/run/x/bus.sock", "-i", "vm1.vmstate", "--ids", "a,b"],
    "inspect": ["inspect", "vm1.vmstate", "--json"],
    "hook": ["hook", "vm1", "prepare", "begin", "-"],
    "proxy": ["proxy", "--domain", "vm1", "--uuid", "u", "--helper-bus", "a", "--listen", "b"],
    "migrate": ["migrate", "vm1", "qemu+ssh://dest/system", "--p2p", "--timeout", "30", "--verbose"],
    "enable": ["enable", "vm1", "-c", "qemu:///system"],
    "disable": ["disable", "vm1", "--json"],
    "check": ["check", "vm1", "--dest", "qemu+ssh://dest/system", "--carrier", "xml"],
    "bus-config": ["bus-config", "--qemu-user", "libvirt-qemu", "--helper-user", "slirp"],
    "check-host": ["check-host", "--profiles", "slirp,tpm", "--json"],
}


def subcommands(parser: argparse.ArgumentParser) -> list[str]:
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)


def test_the_command_list_is_the_parsers():
    assert subcommands(build_parser()) == list(COMMANDS) == sorted(SAMPLES, key=COMMANDS.index)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_command_parsed_alone_reads_as_with_every_parser(command):
    argv = ["--config", "/etc/x.toml", "-v", *SAMPLES[command]]
    assert command_named(argv) == command
    alone = build_parser(command)
    assert subcommands(alone) == [command]
    assert vars(alone.parse_args(argv)) == vars(build_parser().parse_args(argv))


@pytest.mark.parametrize("argv,named", [
    (["migrate", "vm1", "dest"], "migrate"),
    (["--config=/x.toml", "--verbose", "check-host"], "check-host"),
    (["--config", "migrate", "list"], "list"),  # the value of --config is not the command
    (["--help", "migrate"], None),              # the top-level help lists every command
    (["--version"], None),
    (["-h"], None),
    (["migrat", "vm1"], None),                  # argparse says which commands there are
    ([], None),
    (["--config"], None),
])
def test_which_command_a_command_line_names(argv, named):
    assert command_named(argv) == named


def test_an_unknown_command_is_refused_with_the_whole_list(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser(command_named(["migrat"])).parse_args(["migrat"])
    assert exit_.value.code == 2
    # Python 3.12.8 and later write the choices without quotes.
    listed = re.search(r"choose from (.*)\)", capsys.readouterr().err)
    assert listed is not None
    assert [name.strip(" '") for name in listed.group(1).split(",")] == list(COMMANDS)


@pytest.mark.parametrize("columns", ["50", "123", "", "wide"])
def test_help_is_as_wide_as_argparse_makes_it(monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", columns)
    ours = build_parser().format_help()
    monkeypatch.setattr(cli, "HelpFormatter", argparse.RawDescriptionHelpFormatter)
    assert ours == build_parser().format_help()


def test_a_command_line_is_parsed_without_shutil():
    code = ("import sys; from virt_vmstate.commands import cli; "
            f"cli.build_parser('migrate').parse_args({SAMPLES['migrate']!r}); "
            "print(sorted({'shutil', 'bz2', 'lzma'} & set(sys.modules)))")
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[2])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "[]"
