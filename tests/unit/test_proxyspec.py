"""The proxy's command line as the hook writes it, read back without the command-line parser."""

from __future__ import annotations

import pytest

from virt_vmstate.proxyspec import ProxySpec, proxy_argv, spec_from_argv

UUID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
SPEC = ProxySpec("vm 1", UUID, "unix:path=/run/x/bus.sock", "unix:path=/run/x/qemu.sock",
                 ("counter", "slirp0"), "migration")


@pytest.mark.parametrize("spec", [SPEC, SPEC.replace(incoming=None), SPEC.replace(required=()),
                                  SPEC.replace(incoming="restore")])
@pytest.mark.parametrize("config", [None, "/etc/virt-vmstate/config.toml"])
def test_the_hooks_command_line_reads_back(spec, config):
    argv = proxy_argv("/usr/bin/python3", config, spec)
    assert argv[:3] == ["/usr/bin/python3", "-m", "virt_vmstate"]
    assert spec_from_argv(argv[3:]) == (spec, config)


def test_a_domain_name_may_look_like_an_option():
    spec = SPEC.replace(domain="--uuid")
    assert spec_from_argv(proxy_argv("py", None, spec)[3:]) == (spec, None)


def test_a_uuid_is_read_in_libvirts_form():
    argv = proxy_argv("py", None, SPEC)[3:]
    argv[argv.index("--uuid") + 1] = UUID.upper().replace("-", "")
    parsed = spec_from_argv(argv)
    assert parsed is not None and parsed[0].uuid == UUID


@pytest.mark.parametrize("args", [
    ["proxy", "--help"],
    ["proxy", "-h"],
    ["proxy"],
    ["list", "--domain", "vm"],
    ["proxy", "--domain", "vm", "--uuid", UUID, "--helper-bus", "a"],              # --proxy-bus missing
    ["proxy", "--domain", "vm", "--uuid", "nope", "--helper-bus", "a", "--proxy-bus", "b"],
    ["proxy", "--domain", "vm", "--uuid", UUID, "--helper-bus", "a", "--proxy-bus", "b", "--incoming", "x"],
    ["proxy", "--domain", "vm", "--uuid", UUID, "--helper-bus", "a", "--proxy-bus", "b", "--ids", ","],
    ["proxy", "--domain", "vm", "--domain", "vm", "--uuid", UUID, "--helper-bus", "a", "--proxy-bus", "b"],
    ["proxy", "--domain", "vm", "--uuid", UUID, "--helper-bus", "a", "--proxy-bus", "b", "--verbose", "x"],
    ["proxy", "--domain", "--uuid", UUID, "--helper-bus", "a", "--proxy-bus", "b"],
    ["--config", "c", "--verbose", "proxy"],
])
def test_any_other_form_is_left_to_the_command_line_parser(args):
    assert spec_from_argv(args) is None
