"""The proxy's command line as ``proxy_argv`` writes it, read back by the command-line parser."""

from __future__ import annotations

import pytest

from virt_vmstate.commands.cli import UsageError, build_parser, proxy_spec
from virt_vmstate.core.proxyspec import ProxySpec, proxy_argv

UUID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
SPEC = ProxySpec("vm 1", UUID, "unix:path=/run/x/bus.sock", "unix:path=/run/x/qemu.sock",
                 ("counter", "slirp0"), "migration")


def read_back(argv: list[str]) -> tuple[ProxySpec, str | None]:
    args = build_parser("proxy").parse_args(argv[3:])
    return proxy_spec(args), args.config


@pytest.mark.parametrize("spec", [SPEC, SPEC.replace(incoming=None), SPEC.replace(required=()),
                                  SPEC.replace(incoming="restore")])
@pytest.mark.parametrize("config", [None, "/etc/virt-vmstate/config.toml"])
def test_the_command_line_reads_back(spec, config):
    argv = proxy_argv("/usr/bin/python3", config, spec)
    assert argv[:3] == ["/usr/bin/python3", "-m", "virt_vmstate"]
    assert read_back(argv) == (spec, config)


def test_a_uuid_is_read_in_libvirts_form():
    argv = proxy_argv("py", None, SPEC)
    argv[argv.index("--uuid") + 1] = UUID.upper().replace("-", "")
    assert read_back(argv)[0].uuid == UUID


def test_a_uuid_that_is_not_one_is_refused():
    argv = proxy_argv("py", None, SPEC.replace(uuid="nope"))
    with pytest.raises(UsageError, match="not a UUID"):
        read_back(argv)


@pytest.mark.parametrize("args", [
    ["proxy", "--domain", "vm", "--uuid", UUID, "--helper-bus", "a"],              # --listen missing
    ["proxy", "--domain", "vm", "--uuid", UUID, "--helper-bus", "a", "--listen", "b", "--incoming", "x"],
])
def test_a_malformed_command_line_is_a_usage_error(args, capsys):
    with pytest.raises(SystemExit) as exit:
        build_parser("proxy").parse_args(args)
    assert exit.value.code == 2 and "usage:" in capsys.readouterr().err
