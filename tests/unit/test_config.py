from __future__ import annotations

import pytest

from virt_vmstate.core.config import HostConfig, parse_config
from virt_vmstate.errors import ConfigError
from virt_vmstate.host.configfile import load_config

SRC = "/etc/virt-vmstate/config.toml"


def test_defaults_with_no_file(monkeypatch, tmp_path):
    monkeypatch.delenv("VIRT_VMSTATE_CONFIG", raising=False)
    monkeypatch.setattr("virt_vmstate.host.configfile.CONFIG_PATH", str(tmp_path / "absent.toml"))
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
    assert profile.up_before == "qemu"  # QEMU may connect to a helper: the safe default


def test_a_profile_may_let_its_helper_come_up_while_qemu_does():
    config = parse_config('[profiles.c]\ncommand = ["/bin/c"]\nup_before = "guest"\n', SRC)
    assert config.profiles["c"].up_before == "guest"
    with pytest.raises(ConfigError, match="profiles.c.up_before: must be one of qemu, guest, not 'boot'"):
        parse_config('[profiles.c]\ncommand = ["/bin/c"]\nup_before = "boot"\n', SRC)


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
    from virt_vmstate.host.configfile import rescue_runtime_dir
    path = tmp_path / "config.toml"
    path.write_text(f"[paths]\n{line}\n[timeouts\n")
    assert rescue_runtime_dir(str(path)) == expected


@pytest.mark.parametrize("arg,fields", [
    ("plain", []), ("{bus}", ["bus"]), ("{rundir}/{id}.sock", ["rundir", "id"]),
    ("{{literal}}", []), ("x{{{id}}}y", ["id"]), ("{id!r}", ["id!r"]), ("{}", [""]),
])
def test_format_fields_reads_what_str_format_would_fill(arg, fields):
    import string

    from virt_vmstate.core.config import format_fields
    assert format_fields(arg) == fields
    reference = [name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "")
                 for _, name, spec, conv in string.Formatter().parse(arg) if name is not None]
    assert reference == fields


@pytest.mark.parametrize("arg", ["{", "}", "a{b", "{id}}", "x}y"])
def test_format_fields_refuses_a_lone_brace(arg):
    from virt_vmstate.core.config import format_fields
    with pytest.raises(ValueError):
        format_fields(arg)
    with pytest.raises(ValueError):
        arg.format(id="I")  # str.format refuses it too


def _config_file(tmp_path, body: str = ""):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    path = tmp_path / "config.toml"
    path.write_text(f'[paths]\nruntime_dir = "{runtime}"\n{body}')
    return path, runtime


def test_config_cache_spares_the_toml_parser_until_the_file_changes(tmp_path, monkeypatch):
    import virt_vmstate.host.configfile as config_mod
    path, runtime = _config_file(tmp_path, "[timeouts]\ncall = 7\n")
    first = load_config(str(path))
    assert (runtime / ".config-cache").stat().st_mode & 0o777 == 0o600
    parsed = []
    real_parse = config_mod.parse_toml
    monkeypatch.setattr(config_mod, "parse_toml", lambda text, source: parsed.append(source) or
                        real_parse(text, source))
    assert load_config(str(path)) == first and parsed == []
    path.write_text(path.read_text().replace("call = 7", "call = 8"))  # same size, maybe same mtime
    assert load_config(str(path)).timeouts.call == 8.0 and parsed == [str(path)]
    assert load_config(str(path)).timeouts.call == 8.0 and parsed == [str(path)]


def test_config_cache_serves_the_same_bytes_read_from_another_path(tmp_path, monkeypatch):
    """The hook reads /etc/virt-vmstate/config.toml, an operator may name a copy with --config:
    one parse serves both, and each config still says where it came from."""
    import virt_vmstate.host.configfile as config_mod
    path, runtime = _config_file(tmp_path, "[timeouts]\ncall = 7\n")
    first = load_config(str(path))
    copy = tmp_path / "copy.toml"
    copy.write_bytes(path.read_bytes())
    parsed = []
    real_parse = config_mod.parse_toml
    monkeypatch.setattr(config_mod, "parse_toml", lambda text, source: parsed.append(source) or
                        real_parse(text, source))
    second = load_config(str(copy))
    assert parsed == [] and second.timeouts.call == 7.0
    assert (first.source, second.source) == (str(path), str(copy))


def test_config_cache_is_validated_like_the_file(tmp_path):
    path, runtime = _config_file(tmp_path, "[timeouts]\ncall = 7\n")
    load_config(str(path))
    path.write_text(path.read_text().replace("call = 7", "call = -7"))
    with pytest.raises(ConfigError, match="timeouts.call: must be greater than 0"):
        load_config(str(path))


@pytest.mark.parametrize("spoil", ["mode", "symlink", "garbage", "dir-mode"])
def test_config_cache_that_is_not_private_or_not_ours_is_ignored(tmp_path, spoil):
    from virt_vmstate.host.configcache import ConfigCache
    path, runtime = _config_file(tmp_path)
    raw = path.read_bytes()
    cache = ConfigCache(str(runtime))
    cache.put(raw, {"paths": {"runtime_dir": "/elsewhere"}})
    assert cache.get(raw) == {"paths": {"runtime_dir": "/elsewhere"}}
    assert cache.get(raw + b"\n") is None
    entry = runtime / ".config-cache"
    if spoil == "mode":
        entry.chmod(0o644)
    elif spoil == "symlink":
        entry.rename(tmp_path / "moved")
        entry.symlink_to(tmp_path / "moved")
    elif spoil == "garbage":
        entry.write_bytes(b"\x00not marshal")
    else:
        runtime.chmod(0o777)
    assert cache.get(raw) is None


def test_reading_the_config_creates_no_runtime_dir(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(f'[paths]\nruntime_dir = "{tmp_path}/run"\n')
    assert load_config(str(path)).runtime_dir == f"{tmp_path}/run"
    assert not (tmp_path / "run").exists()
