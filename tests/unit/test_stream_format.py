"""The stream carrier's pure parts: the object in the XML, the proxy's reply, libvirt's messages."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from virt_vmstate.commands.migrate import libvirt_message
from virt_vmstate.core import stream, streamreply
from virt_vmstate.core.bundle import Codec, HelperState, new_bundle
from virt_vmstate.core.domxml import (DomainConfig, HelperSpec, config_element, is_dbus_vmstate, parse_domain,
                                      stream_element)
from virt_vmstate.errors import BundleError, DomainXMLError

UUID = "6b1a8a5e-0000-4000-8000-000000000001"
HERE = ("unix:path=/run/virt-vmstate/6b1a8a5e-0000-4000-8000-000000000001/"
        "libvirt-6b1a8a5e-0000-4000-8000-000000000001")
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def domain(extra_meta: str = "", commandline: str = "") -> bytes:
    meta = config_element(DomainConfig((HelperSpec("slirp0", "slirp"),)))
    return (f"<domain type='qemu' xmlns:qemu='{QEMU_NS}'><name>vm</name><uuid>{UUID}</uuid>"
            f"<metadata>{meta}{extra_meta}</metadata><memory>65536</memory>{commandline}</domain>").encode()


def test_incoming_xml_gives_this_hosts_object_and_a_token():
    elsewhere = stream.object_arg("unix:path=/other/host/qemu.sock")
    doc = domain(commandline=f"<qemu:commandline><qemu:arg value='-device'/><qemu:arg value='x'/>"
                             f"<qemu:arg value='-object'/><qemu:arg value='{elsewhere}'/></qemu:commandline>")
    out = stream.incoming_xml(doc, parse_domain(doc), HERE, "ab" * 16, "migration", with_object=True)
    parsed = parse_domain(out)
    assert [a.value for a in parsed.qemu_args] == ["-device", "x", "-object", stream.object_arg(HERE)]
    assert stream.object_address(parsed) == HERE and parsed.has_stream_object
    assert parsed.incoming is not None and parsed.incoming.token == "ab" * 16
    assert parsed.config == parse_domain(doc).config


def test_a_hot_added_object_is_injected_and_a_deleted_one_removed():
    hot = domain(extra_meta=stream_element(True))
    assert parse_domain(hot).has_stream_object and not parse_domain(hot).dbus_vmstate_args()
    out = parse_domain(stream.incoming_xml(hot, parse_domain(hot), HERE, "cd" * 16, "restore",
                                           with_object=True))
    assert out.stream_object is None and stream.object_address(out) == HERE

    arg = stream.object_arg(HERE)
    gone = domain(extra_meta=stream_element(False),
                  commandline=f"<qemu:commandline><qemu:arg value='-object'/><qemu:arg value='{arg}'/>"
                              "</qemu:commandline>")
    assert not parse_domain(gone).has_stream_object  # the marker says what the running QEMU has
    out = parse_domain(stream.incoming_xml(gone, parse_domain(gone), "", "ef" * 16, "migration",
                                           with_object=False))
    assert not out.dbus_vmstate_args() and not out.has_stream_object


def test_definition_xml_adds_replaces_and_removes_the_object():
    doc = domain()
    added = stream.definition_xml(doc, parse_domain(doc), HERE)
    assert stream.object_address(parse_domain(added)) == HERE
    again = stream.definition_xml(added, parse_domain(added), "unix:path=/x/qemu.sock")
    assert len(parse_domain(again).dbus_vmstate_args()) == 1
    removed = stream.definition_xml(again, parse_domain(again), None)
    assert not parse_domain(removed).dbus_vmstate_args()


@pytest.mark.parametrize("value,expected", [
    ('{"qom-type":"dbus-vmstate","id":"v","addr":"unix:path=/x"}', True),
    ('{ "qom-type" : "dbus-vmstate" }', True),
    ("dbus-vmstate,id=v,addr=unix:path=/x", True),
    ('{"qom-type":"memory-backend-ram"}', False),
    ("{not json", False),
    ("memory-backend-ram,id=m", False),
])
def test_dbus_vmstate_objects_are_recognised_in_both_forms(value, expected):
    assert is_dbus_vmstate(value) is expected


def test_incoming_marker_must_be_well_formed():
    bad = domain(extra_meta='<i:incoming xmlns:i="urn:x-virt-vmstate:incoming:1" token="x" kind="migration"/>')
    with pytest.raises(DomainXMLError):
        parse_domain(bad)


def sealed(*sizes: int, compressible: bool = False):
    data = [(b"a" * n if compressible else os.urandom(n)) for n in sizes]
    return new_bundle([HelperState(f"h{i}", d) for i, d in enumerate(data)], created_ms=1,
                      migration_id=str(uuid.uuid4()), domain_uuid=UUID)


def test_reply_is_inline_under_qemus_cap_and_a_reference_past_it():
    small = streamreply.plan_reply(sealed(4096), spool_configured=False, max_bundle_size=1 << 30, domain="vm")
    assert small.inline and small.codec is Codec.NONE
    squeezed = streamreply.plan_reply(sealed(3 << 20, compressible=True), spool_configured=False,
                                 max_bundle_size=1 << 30, domain="vm")
    assert squeezed.inline and squeezed.codec is Codec.ZLIB and len(squeezed.bundle) <= streamreply.QEMU_STATE_CAP
    big = streamreply.plan_reply(sealed(600_000, 600_000), spool_configured=True, max_bundle_size=1 << 30,
                            domain="vm")
    assert not big.inline and big.place == "spool" and big.codec is Codec.NONE
    local = streamreply.plan_reply(sealed(2 << 20), spool_configured=False, max_bundle_size=1 << 30, domain="vm")
    assert local.place == "local" and "cap" in local.describe()
    with pytest.raises(BundleError, match="max_bundle_size"):
        streamreply.plan_reply(sealed(2 << 20), spool_configured=True, max_bundle_size=1 << 20, domain="vm")


def test_reference_round_trip_and_damage():
    ref = streamreply.Reference("spool", "x-1.stream.vmstate", 123, bytes(range(32)), UUID)
    blob = streamreply.encode_reference(ref)
    assert streamreply.is_reference(blob) and streamreply.decode_reference(blob) == ref
    for damaged in (blob[:-1], blob[:20], blob[:30] + bytes([blob[30] ^ 1]) + blob[31:]):
        with pytest.raises(BundleError):
            streamreply.decode_reference(damaged)


def test_qmp_errors_are_found_in_the_json():
    assert stream.qmp_error('{"return": {}, "id": "libvirt-1"}') is None
    assert stream.qmp_error('{"error": {"class": "GenericError", "desc": "There is already an '
                            'instance of dbus-vmstate"}}') == ("GenericError: There is already an "
                                                               "instance of dbus-vmstate")
    assert "not a QMP reply" in stream.qmp_error("<html>")
    added = json.loads(stream.qmp_object_add(HERE))
    assert added["arguments"]["addr"] == HERE and added["arguments"]["id-list"] == stream.PROXY_ID


def test_a_hook_refusal_relayed_by_libvirt_becomes_one_line():
    relayed = ("Hook script execution failed: internal error: Child process (LC_ALL=C PATH=/usr/bin "
               "HOME=/root /etc/libvirt/hooks/qemu vm prepare begin -) unexpected exit status 1: "
               "virt-vmstate: domain vm (u): prepare begin: no state; do this\n")
    assert libvirt_message(relayed) == ("the destination's hook refused: virt-vmstate: domain vm (u): "
                                        "prepare begin: no state; do this")
    assert libvirt_message("operation failed:\n  job failed") == "operation failed: job failed"
