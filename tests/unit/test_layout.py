"""One home per fact: the bash hook's copies of the layout match ``core/layout.py``, and
the runtime dir is read one way."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from virt_vmstate.core import layout
from virt_vmstate.core.config import parse_config, runtime_dir_in
from virt_vmstate.core.domxml import MARKER, NS_STATE
from virt_vmstate.errors import ConfigError

HOOK = (Path(__file__).resolve().parents[2] / "hooks" / "qemu").read_text()
DOMAIN_FILES = {value for name, value in vars(layout).items()
                if name.isupper() and isinstance(value, str) and "/" not in value and not value.startswith(".")}


def test_the_hooks_config_file_and_runtime_dir_are_the_layouts():
    assert f"CONFIG=${{{layout.CONFIG_ENV}:-{layout.CONFIG_PATH}}}" in HOOK
    assert re.findall(r"(?m)^\s*runtime_dir=(\S+)$", HOOK) == [layout.RUNTIME_DIR]
    assert f'"{layout.LIBVIRT_QEMU_RUN}/$name.pid"' in HOOK


def test_every_file_the_hook_looks_for_in_a_domains_dir_is_the_layouts():
    used = set(re.findall(r"\$dir/([\w.-]+)", HOOK))
    assert used == {layout.START_WAIT, layout.STARTED_WAIT, layout.INCOMING_RECORD}
    assert used <= DOMAIN_FILES


def test_the_hook_tells_our_domains_and_carried_state_as_python_does():
    patterns = re.findall(r"\$xml == \*([\w:-]+)\*", HOOK)
    assert patterns == [MARKER.decode(), NS_STATE.rsplit(":", 1)[0] + ":"]


@pytest.mark.parametrize("line", ['runtime_dir = "/srv/run"', "runtime_dir='/srv/run'", 'runtime_dir="/srv/run"  # x'])
def test_the_runtime_dir_reads_the_same_with_and_without_toml(line):
    text = f"[paths]\n{line}\n"
    assert parse_config(text, "t").runtime_dir == runtime_dir_in(text) == "/srv/run"


def test_a_runtime_dir_the_hook_would_read_otherwise_is_refused():
    with pytest.raises(ConfigError, match="runtime_dir: write it on one line"):
        parse_config('[paths]\nruntime_dir = """/srv/run"""\n', "t")
    assert parse_config("", "t").runtime_dir == runtime_dir_in("") == layout.RUNTIME_DIR
