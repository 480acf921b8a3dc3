from __future__ import annotations

import pytest

from virt_vmstate.config import HostConfig, load_config, parse_config
from virt_vmstate.errors import ConfigError

SRC = "/etc/virt-vmstate/config.toml"


def test_defaults_with_no_file(monkeypatch, tmp_path):
    monkeypatch.delenv("VIRT_VMSTATE_CONFIG", raising=False)
    monkeypatch.setattr("virt_vmstate.config.DEFAULT_PATH", str(tmp_path / "absent.toml"))
    config = load_config()
    assert config == HostConfig()
    assert config.runtime_dir == "/run/virt-vmstate" and config.timeouts.hook == 30.0


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="absent.toml: no such file"):
        load_config(str(tmp_path / "absent.toml"))


def test_profiles_fill_placeholders():
    config = parse_config('''
[profiles.slirp]
command = ["/usr/bin/libslirp-helper", "--socket-path", "{rundir}/{id}.sock", "--dbus-address", "{bus}"]
incoming_args = ["--dbus-incoming"]
user = "slirp"
''', SRC)
    profile = config.profiles["slirp"]
    values = {"rundir": "/run/x", "id": "s0", "bus": "unix:path=/b", "uuid": "u", "name": "n"}
    assert profile.argv(values, incoming=True) == [
        "/usr/bin/libslirp-helper", "--socket-path", "/run/x/s0.sock", "--dbus-address",
        "unix:path=/b", "--dbus-incoming"]
    assert profile.argv(values, incoming=False)[-1] == "unix:path=/b"
    assert profile.user == "slirp"


@pytest.mark.parametrize("text,expect", [
    ("[timeouts]\ncall = 'soon'\n", "timeouts.call: must be a number, not str"),
    ("[timeouts]\nhook = 0\n", "timeouts.hook: must be greater than 0"),
    ("[limits]\nmax_state_size = 1.5\n", "limits.max_state_size: must be an integer"),
    ("[timeouts]\ncal = 1\n", "unknown key timeouts.cal"),
    ("colour = 'blue'\n", "unknown key colour"),
    ("[logging]\nlevel = 'loud'\n", "logging.level: must be one of"),
    ("[paths]\nruntime_dir = 'run'\n", "paths.runtime_dir: must be an absolute path"),
    ("[profiles.p]\ncommand = ['/bin/x', '{bogus}']\n", "profiles.p.command: unknown placeholder {bogus}"),
    ("[profiles.p]\ncommand = ['/bin/x', '{id!r}']\n", "unknown placeholder {id}"),
    ("[profiles.p]\ncommand = ['/bin/x', '{']\n", "profiles.p.command: bad placeholder"),
    ("[profiles.p]\ncommand = ['x']\n", "program must be an absolute path"),
    ("[profiles.p]\ncommand = []\n", "profiles.p.command: must be a non-empty list"),
    ("[profiles.p]\ncommand = ['/bin/x']\nshell = true\n", "unknown key profiles.p.shell"),
    ("[profiles.'../x']\ncommand = ['/bin/x']\n", "a profile name is"),
    ("[carriers.spool]\ndir = 'rel'\n", "carriers.spool.dir: must be an absolute path"),
    ("[timeouts\n", "not valid TOML"),
])
def test_errors_name_file_key_and_problem(text, expect):
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC)
    assert str(info.value).startswith(SRC + ": ")
    assert expect in str(info.value)


@pytest.mark.parametrize("line,expected", [
    ('runtime_dir = "/srv/vmstate"', "/srv/vmstate"),
    ("runtime_dir = '/srv/vmstate'", "/srv/vmstate"),
    ('# runtime_dir = "/srv/vmstate"', "/run/virt-vmstate"),
    ('runtime_dir = "relative"', "/run/virt-vmstate"),
])
def test_rescue_finds_the_runtime_dir_of_a_broken_config(tmp_path, line, expected):
    from virt_vmstate.config import rescue_runtime_dir
    path = tmp_path / "config.toml"
    path.write_text(f"[paths]\n{line}\n[timeouts\n")
    assert rescue_runtime_dir(str(path)) == expected
