"""Reading the host config file: where it is, the cached parse, a lenient read for a stop."""

from __future__ import annotations

import os

from ..core.config import HostConfig, checked_runtime_dir, config_from_tables, parse_toml, runtime_dir_in
from ..core.layout import CONFIG_ENV, CONFIG_PATH, RUNTIME_DIR
from ..errors import ConfigError


def rescue_runtime_dir(path: str | None = None) -> str:
    """The runtime dir a config names, read as leniently as possible (for cleaning up
    after a config that no longer loads); the default when it cannot be found."""
    try:
        with open(path or config_path(), "rb") as f:
            return runtime_dir_in(f.read(1 << 20).decode("utf-8", "replace"))
    except OSError:
        return RUNTIME_DIR


def config_path() -> str:
    return os.environ.get(CONFIG_ENV) or CONFIG_PATH


def load_config(path: str | None = None) -> HostConfig:
    """Read the host config; defaults when the default file does not exist."""
    from . import configcache
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
    cache = configcache.ConfigCache(runtime_dir_in(text))
    cached = cache.get(raw)
    tables = parse_toml(text, path) if cached is None else cached
    config = checked_runtime_dir(config_from_tables(tables, path), text)
    if cached is None:
        cache.put(raw, tables)  # only tables that made a valid config
    return config
