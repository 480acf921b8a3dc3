"""The one-line runtime records: pidfiles and the incoming record."""

from __future__ import annotations

import json

import pytest

from virt_vmstate.hook.phases import IncomingRecord
from virt_vmstate.host.managed import ProcessRecord


def test_pidfile_round_trip_keeps_a_program_path_with_spaces():
    record = ProcessRecord("helper-0", 4242, 987654, "/opt/my helpers/slirp helper")
    assert record.encode() == b"4242 987654 /opt/my helpers/slirp helper\n"
    assert ProcessRecord.decode("helper-0", record.encode()) == record


def test_pidfile_of_an_earlier_version_still_reads():
    old = json.dumps({"role": "bus", "pid": 7, "start_time": 11, "argv0": "/usr/bin/dbus-daemon"}).encode()
    assert ProcessRecord.decode("bus", old) == ProcessRecord("bus", 7, 11, "/usr/bin/dbus-daemon")


@pytest.mark.parametrize("data", [b"", b"7", b"seven 11 /bin/x", b"7 eleven /bin/x", b"{not json", b"\xff\xfe"])
def test_damaged_pidfile_is_a_value_error(data):
    with pytest.raises((ValueError, KeyError, TypeError)):
        ProcessRecord.decode("bus", data)


def test_incoming_record_round_trip_is_exact():
    record = IncomingRecord("0123456789abcdef0123456789abcdef", "restore", "stream", 1795000000.123456)
    assert IncomingRecord.decode(record.encode()) == record


@pytest.mark.parametrize("data", [b"", b"{}", b"a b c", b"a b c d e", b"t migration xml soon", b"\xff"])
def test_damaged_incoming_record_is_a_value_error(data):
    with pytest.raises(ValueError):
        IncomingRecord.decode(data)
