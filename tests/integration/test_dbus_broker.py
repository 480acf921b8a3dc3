"""The helpers' bus run by dbus-broker instead of dbus-daemon: the client finds,
Saves and Loads the same helpers, the real libslirp-helper among them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, List

import pytest
from procs import DBusBroker, HelperProcess, dbus_broker_binary, vmstate

from virt_vmstate.bus.vmstate1 import HelperBus

pytestmark = pytest.mark.skipif(dbus_broker_binary() is None,
                                reason="no dbus-broker binary: 'make deps' unpacks one into build/")


@pytest.fixture
def broker(workdir: Path) -> Iterator[DBusBroker]:
    bus = DBusBroker(workdir / "broker")
    yield bus
    bus.stop()


def test_save_and_load_through_dbus_broker_with_libslirp_helper(broker, helpers):
    source = helpers(broker.address, "slirp-src", slirp=True)
    target = helpers(broker.address, "slirp-dst", slirp=True, incoming=True)
    counter = helpers(broker.address, "counter", "--state-hex", "2a" * 4096)
    fresh = helpers(broker.address, "counter-dst", "--incoming")
    with HelperBus.open(broker.address, call_timeout=10) as bus:
        found = {h.id: h for h in bus.helpers()}
        assert sorted(found) == ["counter", "counter-dst", "slirp-dst", "slirp-src"]
        # The broker answers for the peer's process and user as dbus-daemon does.
        assert found["slirp-src"].pid == source.pid and found["counter"].pid == counter.pid
        assert found["slirp-dst"].pid == target.pid and found["counter-dst"].pid == fresh.pid
        assert {h.uid for h in found.values()} == {os.getuid()}
        states = bus.save([found["slirp-src"], found["counter"]])
        assert states["counter"] == bytes.fromhex("2a" * 4096)
        assert len(states["slirp-src"]) > 0
        bus.load([found["slirp-dst"], found["counter-dst"]],
                 {"slirp-dst": states["slirp-src"], "counter-dst": states["counter"]})
        again = bus.save([found["slirp-dst"], found["counter-dst"]])
    assert again["counter-dst"] == states["counter"]
    assert again["slirp-dst"] == states["slirp-src"]


def test_the_command_lists_and_saves_over_dbus_broker(broker, helpers, workdir):
    helpers(broker.address, "alpha", "--state-hex", "0102")
    helpers(broker.address, "beta", "--state-hex", "03")
    listed = vmstate("list", "--bus", broker.address, "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(h["id"] for h in json.loads(listed.stdout)["helpers"]) == ["alpha", "beta"]
    out = workdir / "vm.vmstate"
    saved = vmstate("save", "--bus", broker.address, "-o", str(out))
    assert saved.returncode == 0, saved.stderr
    inspected = json.loads(vmstate("inspect", str(out), "--json").stdout)
    assert {h["id"]: h["size"] for h in inspected["helpers"]} == {"alpha": 2, "beta": 1}


def test_a_helper_that_leaves_the_broker_is_no_longer_found(broker, helpers):
    stays = helpers(broker.address, "stays")
    leaves: HelperProcess = helpers(broker.address, "leaves")
    with HelperBus.open(broker.address, call_timeout=10) as bus:
        assert sorted(h.id for h in bus.helpers()) == ["leaves", "stays"]
        leaves.stop()
        remaining: List[str] = [h.id for h in bus.helpers()]
    assert remaining == ["stays"] and stays.proc.poll() is None
