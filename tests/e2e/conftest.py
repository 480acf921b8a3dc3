"""The two libvirt hosts every end-to-end module runs on.

A module says what its hosts' configs add with ``host_config(host_index) -> str``
and may set ``PROXY_TIMEOUT``; the hosts are set up once per module and stopped
by PID at its end, even when a test failed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator, Tuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hosts import LibvirtHost, prerequisites  # noqa: E402
from procs import TEST_HELPER  # noqa: E402


def fragile_profile(host_index: int) -> str:
    """A test-helper profile whose Load fails on the second host (B) only."""
    fails = ', "--fail", "load"' if host_index == 2 else ""
    return f"""
[profiles.fragile]
command = ["{sys.executable}", "{TEST_HELPER}", "--bus", "{{bus}}", "--id", "{{id}}"{fails}]
incoming_args = ["--incoming"]
"""


@pytest.fixture(scope="module")
def hosts(request: pytest.FixtureRequest) -> Iterator[Tuple[LibvirtHost, LibvirtHost]]:
    why = prerequisites()
    if why:
        if os.environ.get("VIRT_VMSTATE_REQUIRE_E2E"):
            pytest.fail(f"end-to-end tests cannot run: {why}")
        pytest.skip(f"end-to-end tests need real libvirt: {why}")
    host_config = getattr(request.module, "host_config", lambda index: "")
    proxy_timeout = getattr(request.module, "PROXY_TIMEOUT", 20.0)
    a, b = LibvirtHost("e2e-a", 1), LibvirtHost("e2e-b", 2)
    try:
        for host in (a, b):
            host.prepare(extra_config=fragile_profile(host.index) + host_config(host.index),
                         proxy_timeout=proxy_timeout)
            host.start()
        yield a, b
    finally:
        for host in (a, b):
            host.stop()
