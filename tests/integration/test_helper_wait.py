"""Waiting for helpers on a real dbus-daemon: the bus the wait ends on is the one a Load uses."""

from __future__ import annotations

import threading
import time

import pytest

from virt_vmstate.bus.transfer import capture, restore
from virt_vmstate.bus.vmstate1 import open_when_present, wait_for_ids
from virt_vmstate.core.bundle import HelperState, new_bundle
from virt_vmstate.core.names import random_uuid
from virt_vmstate.errors import DeadlineExceeded, VMStateError


def later(seconds: float, start) -> threading.Thread:
    def run() -> None:
        time.sleep(seconds)
        start()
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_the_wait_returns_the_open_bus_and_the_helpers_it_found(buses, helpers):
    bus = buses()
    first = helpers(bus.address, "first", "--random-size", "4096", "--seed", "1")
    starting = later(0.3, lambda: helpers(bus.address, "second", "--random-size", "4096", "--seed", "2"))
    try:
        opened, found = open_when_present(bus.address, ["first", "second"], time.monotonic() + 15)
    finally:
        starting.join()
    with opened:
        assert [(h.id, h.pid) for h in found][:1] == [("first", first.pid)]
        assert [h.id for h in found] == ["first", "second"]
        # The same connection Saves and Loads, byte for byte, with the helpers it found:
        # each helper gets the other's state.
        saved = {s.id: s.data for s in capture(opened, ["first", "second"]).states}
        assert saved["first"] != saved["second"]
        swapped = new_bundle([HelperState("first", saved["second"]), HelperState("second", saved["first"])],
                             created_ms=0, migration_id=random_uuid())
        loaded = restore(opened, swapped, allowed_uids={0}, found=found)
        assert [h.unique_name for h in loaded] == [h.unique_name for h in found]
        now = {s.id: s.data for s in capture(opened, ["first", "second"]).states}
        assert now == {"first": saved["second"], "second": saved["first"]}


def test_a_bus_that_comes_up_during_the_wait_is_found(buses, helpers, workdir):
    made = {}

    def start() -> None:
        made["bus"] = buses("late")
        helpers(made["bus"].address, "only")
    starting = later(0.3, start)
    address = f"unix:path={workdir / 'late' / 'bus.sock'}"
    try:
        opened, found = open_when_present(address, ["only"], time.monotonic() + 15)
    finally:
        starting.join()
    with opened:
        assert made["bus"].address == address
        assert [h.id for h in found] == ["only"]


def test_a_bad_helper_nobody_waits_for_is_not_in_the_way(buses, helpers):
    bus = buses()
    helpers(bus.address, "twin")
    helpers(bus.address, "twin")
    helpers(bus.address, "wanted")
    opened, found = open_when_present(bus.address, ["wanted"], time.monotonic() + 5)
    opened.close()
    assert [h.id for h in found] == ["wanted"]
    with pytest.raises(DeadlineExceeded, match="did not appear on bus .* in time .*two helpers on the "
                                               "bus use Id 'twin'"):
        wait_for_ids(bus.address, ["twin"], time.monotonic() + 0.5)


def test_the_deadline_names_what_is_missing_and_a_check_stops_the_wait(buses, helpers):
    bus = buses()
    helpers(bus.address, "here")
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="helpers absent did not appear"):
        wait_for_ids(bus.address, ["here", "absent"], started + 0.4)
    assert time.monotonic() - started >= 0.4

    def died() -> None:
        raise VMStateError("helper 'absent' exited")
    started = time.monotonic()
    with pytest.raises(VMStateError, match="exited"):
        wait_for_ids(bus.address, ["absent"], started + 10, check=died)
    assert time.monotonic() - started < 5
