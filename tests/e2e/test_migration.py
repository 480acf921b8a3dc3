"""Live migration between two real libvirt daemons with real QEMU guests and helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, Tuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hosts import LibvirtHost, guest_xml, prerequisites  # noqa: E402

from virt_vmstate.domxml import DomainConfig, HelperSpec, config_element  # noqa: E402
from virt_vmstate.vmstate1 import HelperBus  # noqa: E402

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def hosts() -> Iterator[Tuple[LibvirtHost, LibvirtHost]]:
    why = prerequisites()
    if why:
        if os.environ.get("VIRT_VMSTATE_REQUIRE_E2E"):
            pytest.fail(f"end-to-end tests cannot run: {why}")
        pytest.skip(f"end-to-end tests need real libvirt: {why}")
    a, b = LibvirtHost("e2e-a", 1), LibvirtHost("e2e-b", 2)
    try:
        for host in (a, b):
            host.prepare()
            host.start()
        yield a, b
    finally:
        for host in (a, b):
            host.stop()


def states(host: LibvirtHost, dom_uuid: str) -> Dict[str, bytes]:
    with HelperBus.open(host.bus_address(dom_uuid), call_timeout=10) as bus:
        return bus.save(bus.helpers())


def wait_gone(host: LibvirtHost, dom_uuid: str, timeout: float = 10) -> None:
    """The source forgets the domain shortly after the destination resumed (stopped/release hooks)."""
    rundir = host.runtime / dom_uuid
    deadline = time.monotonic() + timeout
    while rundir.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not rundir.exists(), f"{rundir} is still there"


def destroy(host: LibvirtHost, name: str, dom_uuid: str) -> None:
    host.virsh("destroy", name)
    wait_gone(host, dom_uuid)


def virsh_migrate(src: LibvirtHost, dst: LibvirtHost, name: str) -> subprocess.CompletedProcess:
    return src.virsh("migrate", "--live", name, dst.uri, dst.migration_uri, check=False)


def start_guest(host: LibvirtHost, tmp_path: Path, name: str, config: DomainConfig) -> str:
    dom_uuid = str(uuid.uuid4())
    xml = tmp_path / f"{name}.xml"
    xml.write_text(guest_xml(name, dom_uuid, config_element(config)))
    host.virsh("create", str(xml))
    return dom_uuid


def migrate(src: LibvirtHost, dst: LibvirtHost, name: str, *extra: str) -> subprocess.CompletedProcess:
    return src.vmstate("migrate", name, dst.uri, "-c", src.uri, "--migrateuri", dst.migration_uri,
                       *extra, check=False)


THREE = DomainConfig((HelperSpec("big", "counter"), HelperSpec("empty", "counter"),
                      HelperSpec("slirp0", "slirp")))


def test_live_migration_there_and_back_keeps_every_helper_state(hosts, tmp_path):
    a, b = hosts
    dom_uuid = start_guest(a, tmp_path, "three", THREE)
    # Give "big" 1 MiB of random state through the CLI, as an operator would.
    bundle = tmp_path / "big.vmstate"
    feeder = tmp_path / "feeder"
    from procs import DBusDaemon, test_helper
    daemon = DBusDaemon(feeder)
    try:
        helper = test_helper(daemon.address, "big", feeder, "--random-size", str(1 << 20))
        a.vmstate("save", "--bus", daemon.address, "-o", str(bundle))
        helper.stop()
    finally:
        daemon.stop()
    a.vmstate("load", "--bus", a.bus_address(dom_uuid), "-i", str(bundle))
    last = states(a, dom_uuid)
    assert len(last["big"]) == 1 << 20 and last["empty"] == b"" and len(last["slirp0"]) > 0

    for src, dst in ((a, b), (b, a)):
        result = migrate(src, dst, "three", "--json")
        assert result.returncode == 0, result.stderr
        assert "running" in dst.virsh("domstate", "three").stdout
        assert states(dst, dom_uuid) == last
        wait_gone(src, dom_uuid)
        assert "three" not in src.domains()
        last = states(dst, dom_uuid)
    destroy(a, "three", dom_uuid)


def test_plain_virsh_migrate_without_state_is_refused(hosts, tmp_path):
    a, b = hosts
    dom_uuid = start_guest(a, tmp_path, "plain", DomainConfig((HelperSpec("counter", "counter"),)))
    before = states(a, dom_uuid)
    result = virsh_migrate(a, b, "plain")
    assert result.returncode != 0
    assert "virt-vmstate" in result.stderr and "carries no state" in result.stderr
    assert "virt-vmstate migrate plain" in result.stderr
    assert "running" in a.virsh("domstate", "plain").stdout
    assert states(a, dom_uuid) == before
    assert "plain" not in b.domains()
    destroy(a, "plain", dom_uuid)


def test_staged_state_travels_with_plain_virsh_migrate(hosts, tmp_path):
    a, b = hosts
    dom_uuid = start_guest(a, tmp_path, "staged", DomainConfig((HelperSpec("slirp0", "slirp"),)))
    before = states(a, dom_uuid)
    a.vmstate("save", "--domain", "staged", "-c", a.uri, "--stage")
    result = virsh_migrate(a, b, "staged")
    assert result.returncode == 0, result.stderr
    assert states(b, dom_uuid) == before
    assert "vmstate-state" not in b.virsh("dumpxml", "staged").stdout
    wait_gone(a, dom_uuid)
    destroy(b, "staged", dom_uuid)


def test_destination_missing_the_profile_aborts_and_source_keeps_running(hosts, tmp_path):
    a, b = hosts
    config = DomainConfig((HelperSpec("counter", "counter"), HelperSpec("extra", "only-on-a")))
    a.config.write_text(a.config.read_text() + f"""
[profiles.only-on-a]
command = ["{sys.executable}", "{Path(__file__).parents[1] / 'helpers' / 'vmstate_helper.py'}",
           "--bus", "{{bus}}", "--id", "{{id}}", "--state-hex", "0102"]
""")
    dom_uuid = start_guest(a, tmp_path, "noprofile", config)
    before = states(a, dom_uuid)
    result = migrate(a, b, "noprofile")
    assert result.returncode == 1
    assert "profile 'only-on-a'" in result.stderr and "does not define" in result.stderr
    assert "running" in a.virsh("domstate", "noprofile").stdout
    assert states(a, dom_uuid) == before
    destroy(a, "noprofile", dom_uuid)


def test_consistent_migration_resumes_after_load(hosts, tmp_path):
    a, b = hosts
    dom_uuid = start_guest(a, tmp_path, "consistent", DomainConfig((HelperSpec("counter", "counter"),)))
    before = states(a, dom_uuid)
    result = migrate(a, b, "consistent", "--consistent")
    assert result.returncode == 0, result.stderr
    assert "running" in b.virsh("domstate", "consistent").stdout
    assert states(b, dom_uuid) == before
    wait_gone(a, dom_uuid)
    destroy(b, "consistent", dom_uuid)
