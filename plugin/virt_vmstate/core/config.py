"""Host configuration: ``/etc/virt-vmstate/config.toml``.

Only the host administrator decides what runs on a host: helper commands live
here, as named profiles, and domain XML may only name them.  Parsing is pure;
``load_config`` is the one function that reads a file, and it keeps the parsed
tables in a cache (``configcache``), so a hook run parses TOML only after the
file changed.  Every default works with no file at all.
"""

from __future__ import annotations

import os

from ..errors import ConfigError
from .layout import RUNTIME_DIR
from .names import is_name
from .values import Value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Mapping

PLACEHOLDERS = frozenset({"bus", "id", "rundir", "uuid", "name"})
# How pre-copy state travels (carrier.py); auto: the XML when it fits, else the spool.
CARRIERS = ("auto", "xml", "spool")
MiB = 1024 * 1024


class Timeouts(Value):
    __slots__ = ("call", "hook", "helper_start", "proxy")

    def __init__(self, call: float = 25.0, hook: float = 30.0, helper_start: float = 10.0,
                 proxy: float = 20.0) -> None:
        self.call = call
        self.hook = hook
        self.helper_start = helper_start
        self.proxy = proxy  # a whole Save or Load by the proxy; QEMU gives up at 25 s


class Limits(Value):
    __slots__ = ("max_state_size", "max_bundle_size", "max_bundle_age", "xml_carrier_max")

    def __init__(self, max_state_size: int = 64 * MiB, max_bundle_size: int = 1024 * MiB,
                 max_bundle_age: float = 600.0, xml_carrier_max: int = 3 * MiB) -> None:
        self.max_state_size = max_state_size
        self.max_bundle_size = max_bundle_size
        self.max_bundle_age = max_bundle_age
        self.xml_carrier_max = xml_carrier_max


class Logging(Value):
    __slots__ = ("level", "syslog")

    def __init__(self, level: str = "info", syslog: bool = True) -> None:
        self.level = level
        self.syslog = syslog


class BusSettings(Value):
    __slots__ = ("dbus_daemon",)

    def __init__(self, dbus_daemon: str = "/usr/bin/dbus-daemon") -> None:
        self.dbus_daemon = dbus_daemon


class Security(Value):
    __slots__ = ("qemu_user", "helper_users")

    def __init__(self, qemu_user: str = "root", helper_users: tuple[str, ...] = ()) -> None:
        self.qemu_user = qemu_user
        self.helper_users = helper_users


UP_BEFORE = ("qemu", "guest")


class Profile(Value):
    __slots__ = ("name", "command", "incoming_args", "user", "up_before")

    def __init__(self, name: str, command: tuple[str, ...], incoming_args: tuple[str, ...] = (),
                 user: str | None = None, up_before: str = "qemu") -> None:
        self.name = name
        self.command = command
        self.incoming_args = incoming_args
        self.user = user
        # "qemu": on its bus before QEMU starts ('start begin' waits; QEMU may connect to it);
        # "guest": before the guest runs or state is loaded ('started begin' waits), so it
        # comes up while QEMU does.
        self.up_before = up_before

    def placeholders(self) -> frozenset[str]:
        """The placeholders its command line uses (validated when the config was read)."""
        return frozenset(name for arg in self.command + self.incoming_args for name in format_fields(arg))

    def argv(self, values: Mapping[str, str], incoming: bool) -> list[str]:
        """The command line with placeholders filled in."""
        args = self.command + (self.incoming_args if incoming else ())
        return [arg.format_map(values) for arg in args]


class SpoolCarrier(Value):
    __slots__ = ("dir",)

    def __init__(self, dir: str | None = None) -> None:
        self.dir = dir


class StreamCarrier(Value):
    __slots__ = ("local_dir",)

    def __init__(self, local_dir: str = "/var/lib/virt-vmstate/stream") -> None:
        self.local_dir = local_dir


class HostConfig(Value):
    __slots__ = ("source", "runtime_dir", "timeouts", "limits", "logging", "bus", "security",
                 "profiles", "spool", "stream")

    def __init__(self, source: str = "(defaults)", runtime_dir: str = RUNTIME_DIR,
                 timeouts: Timeouts | None = None, limits: Limits | None = None,
                 logging: Logging | None = None, bus: BusSettings | None = None,
                 security: Security | None = None, profiles: dict[str, Profile] | None = None,
                 spool: SpoolCarrier | None = None, stream: StreamCarrier | None = None) -> None:
        self.source = source
        self.runtime_dir = runtime_dir
        self.timeouts = timeouts or Timeouts()
        self.limits = limits or Limits()
        self.logging = logging or Logging()
        self.bus = bus or BusSettings()
        self.security = security or Security()
        self.profiles = profiles if profiles is not None else {}
        self.spool = spool or SpoolCarrier()
        self.stream = stream or StreamCarrier()

    @property
    def path(self) -> str | None:
        """The file this config was read from; None for the built-in defaults."""
        return None if self.source == "(defaults)" else self.source


def format_fields(arg: str) -> list[str]:
    """The replacement fields of a ``str.format`` template, as written between the braces.

    ``{{`` and ``}}`` are literal braces; any other lone brace is a ValueError.
    """
    fields = []
    pos = 0
    while pos < len(arg):
        if arg.startswith(("{{", "}}"), pos):
            pos += 2
        elif arg[pos] == "{":
            end = arg.find("}", pos)
            if end < 0:
                raise ValueError("'{' without a closing '}'")
            fields.append(arg[pos + 1:end])
            pos = end + 1
        elif arg[pos] == "}":
            raise ValueError("a single '}'")
        else:
            pos += 1
    return fields


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

    def text(self, key: str, default: str | None, choices: tuple[str, ...] = ()) -> str | None:
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

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.table.pop(key, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, "must be a list of strings")
        return tuple(value)

    def table_of(self, key: str) -> dict[str, Any]:
        value = self.table.pop(key, {})
        if not isinstance(value, dict):
            raise self._bad(key, "must be a table")
        return value

    def done(self) -> None:
        if self.table:
            unknown = ", ".join(sorted(self._key(k) for k in self.table))
            raise ConfigError(f"{self.source}: unknown key {unknown}",
                              hint="check the spelling against the example config")


def _check_placeholders(source: str, key: str, args: tuple[str, ...]) -> None:
    for arg in args:
        try:
            fields = format_fields(arg)
        except ValueError as e:
            raise ConfigError(f"{source}: {key}: bad placeholder in {arg!r}: {e}",
                              hint="write a literal brace as {{ or }}") from None
        for field in fields:
            name = field.split("!", 1)[0].split(":", 1)[0]
            if name not in PLACEHOLDERS or field != name:
                raise ConfigError(f"{source}: {key}: unknown placeholder {{{name}}} in {arg!r}",
                                  hint=f"use only {', '.join('{%s}' % p for p in sorted(PLACEHOLDERS))}")


def _profile(source: str, name: str, table: Any) -> Profile:
    if not is_name(name):
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
    up_before = section.text("up_before", "qemu", UP_BEFORE) or "qemu"
    section.done()
    _check_placeholders(source, f"profiles.{name}.command", command)
    _check_placeholders(source, f"profiles.{name}.incoming_args", incoming)
    return Profile(name, command, incoming, user, up_before)


def parse_toml(text: str, source: str) -> dict[str, Any]:
    import sys
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python < 3.11
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None


def parse_config(text: str, source: str) -> HostConfig:
    """Parse and validate the TOML text of a host config."""
    return checked_runtime_dir(config_from_tables(parse_toml(text, source), source), text)


def checked_runtime_dir(config: HostConfig, text: str) -> HostConfig:
    """``config``, whose runtime dir is the one ``runtime_dir_in`` reads from its text, as
    the bash hook reads it: there is one runtime dir, however it is read."""
    if config.runtime_dir != runtime_dir_in(text):
        raise ConfigError(f"{config.source}: paths.runtime_dir: write it on one line of its own, "
                          'as runtime_dir = "/absolute/path" (the hook reads it without a TOML parser)')
    return config


def config_from_tables(data: dict[str, Any], source: str) -> HostConfig:
    """Validate the parsed TOML of a host config."""
    defaults = HostConfig()
    root = _Section(source, "", data)

    paths = _Section(source, "paths", root.table_of("paths"))
    runtime_dir = paths.text("runtime_dir", RUNTIME_DIR) or RUNTIME_DIR
    if not os.path.isabs(runtime_dir):
        raise ConfigError(f"{source}: paths.runtime_dir: must be an absolute path")
    paths.done()

    t = _Section(source, "timeouts", root.table_of("timeouts"))
    d = defaults.timeouts
    timeouts = Timeouts(t.number("call", d.call), t.number("hook", d.hook),
                        t.number("helper_start", d.helper_start), t.number("proxy", d.proxy))
    t.done()
    if timeouts.proxy >= 24.0:
        raise ConfigError(f"{source}: timeouts.proxy: must be under 24 s, not {timeouts.proxy:g}",
                          hint="QEMU gives every Save and Load 25 s; the proxy must answer first")

    lim = _Section(source, "limits", root.table_of("limits"))
    dl = defaults.limits
    limits = Limits(lim.integer("max_state_size", dl.max_state_size),
                    lim.integer("max_bundle_size", dl.max_bundle_size),
                    lim.number("max_bundle_age", dl.max_bundle_age),
                    lim.integer("xml_carrier_max", dl.xml_carrier_max))
    lim.done()

    lg = _Section(source, "logging", root.table_of("logging"))
    logging_ = Logging(lg.text("level", defaults.logging.level, ("debug", "info", "warning", "error"))
                       or "info", lg.flag("syslog", defaults.logging.syslog))
    lg.done()

    b = _Section(source, "bus", root.table_of("bus"))
    bus = BusSettings(b.text("dbus_daemon", defaults.bus.dbus_daemon) or defaults.bus.dbus_daemon)
    b.done()

    sec = _Section(source, "security", root.table_of("security"))
    security = Security(sec.text("qemu_user", defaults.security.qemu_user) or "root",
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
    local_dir = st.text("local_dir", defaults.stream.local_dir) or defaults.stream.local_dir
    if not os.path.isabs(local_dir):
        raise ConfigError(f"{source}: carriers.stream.local_dir: must be an absolute path")
    st.done()
    carriers.done()

    root.done()
    return HostConfig(source, runtime_dir, timeouts, limits, logging_, bus, security, profiles,
                      SpoolCarrier(spool_dir), StreamCarrier(local_dir))


def runtime_dir_in(text: str) -> str:
    """The ``runtime_dir`` a config's text names, read line by line as the bash hook reads
    it (for a config that no longer parses); the default when there is none."""
    found = RUNTIME_DIR
    for line in text.splitlines():
        key, equals, value = line.partition("=")
        value = value.strip()
        if (key.strip() == "runtime_dir" and equals and len(value) > 1 and value[0] in "'\""
                and value[0] in value[1:]):
            candidate = value[1:value.index(value[0], 1)]
            if os.path.isabs(candidate) and "\n" not in candidate:
                found = candidate
    return found
