"""Host configuration: ``/etc/virt-vmstate/config.toml``.

Only the host administrator decides what runs on a host: helper commands live
here, as named profiles, and domain XML may only name them.  Parsing is pure;
``load_config`` is the one function that reads a file.  Every default works
with no file at all.
"""

from __future__ import annotations

import os
import re
import string
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Set, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11
    import tomli as tomllib

from .errors import ConfigError

DEFAULT_PATH = "/etc/virt-vmstate/config.toml"
CONFIG_ENV = "VIRT_VMSTATE_CONFIG"
PLACEHOLDERS = frozenset({"bus", "id", "rundir", "uuid", "name"})
PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MiB = 1024 * 1024


@dataclass(frozen=True)
class Timeouts:
    call: float = 25.0
    hook: float = 30.0
    helper_start: float = 10.0
    proxy: float = 20.0  # a whole Save or Load by the proxy; QEMU gives up at 25 s


@dataclass(frozen=True)
class Limits:
    max_state_size: int = 64 * MiB
    max_bundle_size: int = 1024 * MiB
    max_bundle_age: float = 600.0
    xml_carrier_max: int = 3 * MiB


@dataclass(frozen=True)
class Logging:
    level: str = "info"
    syslog: bool = True


@dataclass(frozen=True)
class BusSettings:
    dbus_daemon: str = "/usr/bin/dbus-daemon"


@dataclass(frozen=True)
class Security:
    qemu_user: str = "root"
    helper_users: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Profile:
    name: str
    command: Tuple[str, ...]
    incoming_args: Tuple[str, ...] = ()
    user: Optional[str] = None

    def placeholders(self) -> FrozenSet[str]:
        """The placeholders its command line uses (validated when the config was read)."""
        used: Set[str] = set()
        for arg in self.command + self.incoming_args:
            used.update(name for _, name, _, _ in string.Formatter().parse(arg) if name)
        return frozenset(used)

    def argv(self, values: Mapping[str, str], incoming: bool) -> List[str]:
        """The command line with placeholders filled in."""
        args = self.command + (self.incoming_args if incoming else ())
        return [arg.format_map(values) for arg in args]


@dataclass(frozen=True)
class SpoolCarrier:
    dir: Optional[str] = None


@dataclass(frozen=True)
class StreamCarrier:
    local_dir: str = "/var/lib/virt-vmstate/stream"


@dataclass(frozen=True)
class HostConfig:
    source: str = "(defaults)"
    runtime_dir: str = "/run/virt-vmstate"
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    logging: Logging = field(default_factory=Logging)
    bus: BusSettings = field(default_factory=BusSettings)
    security: Security = field(default_factory=Security)
    profiles: Dict[str, Profile] = field(default_factory=dict)
    spool: SpoolCarrier = field(default_factory=SpoolCarrier)
    stream: StreamCarrier = field(default_factory=StreamCarrier)


class _Section:
    """Typed access to one TOML table that reports every unknown key."""

    def __init__(self, source: str, prefix: str, table: Any) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{prefix}] must be a table")
        self.source = source
        self.prefix = prefix
        self.table = dict(table)

    def _key(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def _bad(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self._key(key)}: {what}")

    def number(self, key: str, default: float, *, positive: bool = True) -> float:
        value = self.table.pop(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._bad(key, f"must be a number, not {type(value).__name__}")
        if positive and value <= 0:
            raise self._bad(key, f"must be greater than 0, not {value}")
        return float(value)

    def integer(self, key: str, default: int) -> int:
        value = self.table.pop(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, f"must be an integer, not {type(value).__name__}")
        if value <= 0:
            raise self._bad(key, f"must be greater than 0, not {value}")
        return value

    def text(self, key: str, default: Optional[str], choices: Tuple[str, ...] = ()) -> Optional[str]:
        value = self.table.pop(key, default)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self._bad(key, f"must be a string, not {type(value).__name__}")
        if choices and value not in choices:
            raise self._bad(key, f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.table.pop(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, f"must be true or false, not {value!r}")
        return value

    def strings(self, key: str, default: Tuple[str, ...]) -> Tuple[str, ...]:
        value = self.table.pop(key, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, "must be a list of strings")
        return tuple(value)

    def table_of(self, key: str) -> Dict[str, Any]:
        value = self.table.pop(key, {})
        if not isinstance(value, dict):
            raise self._bad(key, "must be a table")
        return value

    def done(self) -> None:
        if self.table:
            unknown = ", ".join(sorted(self._key(k) for k in self.table))
            raise ConfigError(f"{self.source}: unknown key {unknown}",
                              hint="check the spelling against the example config")


def _check_placeholders(source: str, key: str, args: Tuple[str, ...]) -> None:
    for arg in args:
        try:
            fields = list(string.Formatter().parse(arg))
        except ValueError as e:
            raise ConfigError(f"{source}: {key}: bad placeholder in {arg!r}: {e}",
                              hint="write a literal brace as {{ or }}") from None
        for _, name, spec, conversion in fields:
            if name is None:
                continue
            if name not in PLACEHOLDERS or spec or conversion:
                raise ConfigError(f"{source}: {key}: unknown placeholder {{{name}}} in {arg!r}",
                                  hint=f"use only {', '.join('{%s}' % p for p in sorted(PLACEHOLDERS))}")


def _profile(source: str, name: str, table: Any) -> Profile:
    if not PROFILE_NAME.match(name):
        raise ConfigError(f"{source}: profiles.{name}: a profile name is 1 to 64 letters, digits, "
                          "'_', '.' or '-'")
    section = _Section(source, f"profiles.{name}", table)
    command = section.strings("command", ())
    if not command:
        raise ConfigError(f"{source}: profiles.{name}.command: must be a non-empty list of strings")
    if not os.path.isabs(command[0]):
        raise ConfigError(f"{source}: profiles.{name}.command: the program must be an absolute "
                          f"path, not {command[0]!r}")
    incoming = section.strings("incoming_args", ())
    user = section.text("user", None)
    section.done()
    _check_placeholders(source, f"profiles.{name}.command", command)
    _check_placeholders(source, f"profiles.{name}.incoming_args", incoming)
    return Profile(name, command, incoming, user)


def parse_config(text: str, source: str) -> HostConfig:
    """Parse and validate the TOML text of a host config."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    root = _Section(source, "", data)

    paths = _Section(source, "paths", root.table_of("paths"))
    runtime_dir = paths.text("runtime_dir", HostConfig.runtime_dir) or HostConfig.runtime_dir
    if not os.path.isabs(runtime_dir):
        raise ConfigError(f"{source}: paths.runtime_dir: must be an absolute path")
    paths.done()

    t = _Section(source, "timeouts", root.table_of("timeouts"))
    timeouts = Timeouts(t.number("call", Timeouts.call), t.number("hook", Timeouts.hook),
                        t.number("helper_start", Timeouts.helper_start),
                        t.number("proxy", Timeouts.proxy))
    t.done()
    if timeouts.proxy >= 24.0:
        raise ConfigError(f"{source}: timeouts.proxy: must be under 24 s, not {timeouts.proxy:g}",
                          hint="QEMU gives every Save and Load 25 s; the proxy must answer first")

    lim = _Section(source, "limits", root.table_of("limits"))
    limits = Limits(lim.integer("max_state_size", Limits.max_state_size),
                    lim.integer("max_bundle_size", Limits.max_bundle_size),
                    lim.number("max_bundle_age", Limits.max_bundle_age),
                    lim.integer("xml_carrier_max", Limits.xml_carrier_max))
    lim.done()

    lg = _Section(source, "logging", root.table_of("logging"))
    logging_ = Logging(lg.text("level", Logging.level, ("debug", "info", "warning", "error")) or "info",
                       lg.flag("syslog", Logging.syslog))
    lg.done()

    b = _Section(source, "bus", root.table_of("bus"))
    bus = BusSettings(b.text("dbus_daemon", BusSettings.dbus_daemon) or BusSettings.dbus_daemon)
    b.done()

    sec = _Section(source, "security", root.table_of("security"))
    security = Security(sec.text("qemu_user", Security.qemu_user) or "root",
                        sec.strings("helper_users", ()))
    sec.done()

    profiles = {name: _profile(source, name, table)
                for name, table in root.table_of("profiles").items()}

    carriers = _Section(source, "carriers", root.table_of("carriers"))
    sp = _Section(source, "carriers.spool", carriers.table_of("spool"))
    spool_dir = sp.text("dir", None)
    if spool_dir is not None and not os.path.isabs(spool_dir):
        raise ConfigError(f"{source}: carriers.spool.dir: must be an absolute path")
    sp.done()
    st = _Section(source, "carriers.stream", carriers.table_of("stream"))
    local_dir = st.text("local_dir", StreamCarrier.local_dir) or StreamCarrier.local_dir
    if not os.path.isabs(local_dir):
        raise ConfigError(f"{source}: carriers.stream.local_dir: must be an absolute path")
    st.done()
    carriers.done()

    root.done()
    return HostConfig(source, runtime_dir, timeouts, limits, logging_, bus, security, profiles,
                      SpoolCarrier(spool_dir), StreamCarrier(local_dir))


def rescue_runtime_dir(path: Optional[str] = None) -> str:
    """The runtime dir a config names, read as leniently as possible (for cleaning up
    after a config that no longer loads); the default when it cannot be found."""
    try:
        with open(path or config_path(), "rb") as f:
            text = f.read(1 << 20).decode("utf-8", "replace")
    except OSError:
        return HostConfig.runtime_dir
    found = re.search(r'^\s*runtime_dir\s*=\s*["\']([^"\'\n]+)["\']', text, re.M)
    if found and os.path.isabs(found.group(1)):
        return found.group(1)
    return HostConfig.runtime_dir


def config_path() -> str:
    return os.environ.get(CONFIG_ENV) or DEFAULT_PATH


def load_config(path: Optional[str] = None) -> HostConfig:
    """Read the host config; defaults when the default file does not exist."""
    explicit = path is not None or CONFIG_ENV in os.environ
    path = path or config_path()
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: no such file") from None
        return HostConfig()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse_config(text, path)
