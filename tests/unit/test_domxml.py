from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virt_vmstate.core import domxml as D
from virt_vmstate.errors import DomainXMLError

UUID = uuid.UUID("5f0e1a3c-8b1e-4c2a-9d55-0a3b9c1e2f40")
CONFIG = D.DomainConfig((D.HelperSpec("slirp0", "slirp"), D.HelperSpec("ct", None)),
                        missing_state="fresh")


def domain(meta: str = "", attrs: str = "") -> bytes:
    return (f"<domain type='qemu' id='7'{attrs}>\n  <name>vm1</name>\n  <uuid>{UUID}</uuid>\n"
            f"  <metadata>\n    <other:x xmlns:other='urn:other'>keep me</other:x>\n{meta}\n  </metadata>\n"
            "  <devices><serial type='pty'/></devices>\n</domain>\n").encode()


def test_reads_config_as_libvirt_rewrites_it():
    # libvirt re-prefixes every child and uses double quotes: both forms parse the same.
    ours = D.parse_domain(domain(D.config_element(CONFIG)))
    rewritten = domain('<vm:vmstate xmlns:vm="urn:x-virt-vmstate:domain:1"><vm:bus mode="managed"/>'
                       '<vm:missing-state policy="fresh"/><vm:helper id="slirp0" profile="slirp"/>'
                       '<vm:helper id="ct"/></vm:vmstate>')
    assert ours.config == D.parse_domain(rewritten).config == CONFIG
    assert (ours.name, ours.uuid, ours.id) == ("vm1", str(UUID), 7)


def test_not_ours_has_no_config():
    parsed = D.parse_domain(domain())
    assert parsed.config is None and parsed.state is None


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=3000))
def test_state_round_trip_and_strip_is_byte_exact(payload):
    import hashlib
    original = domain(D.config_element(CONFIG))
    state = D.StateElement("xml", len(payload), hashlib.sha256(payload).hexdigest(), payload)
    carried = D.insert_state(original, state)
    parsed = D.parse_domain(carried)
    assert parsed.state == state
    stripped = D.strip_state(carried, parsed)
    assert D.parse_domain(stripped).state is None
    # Everything that was there before is still there, byte for byte.
    assert stripped.replace(b"\n", b"") == original.replace(b"\n", b"")


@pytest.mark.parametrize("meta,expect", [
    ('<v:vmstate xmlns:v="urn:x-virt-vmstate:domain:1"><v:helper id="a" command="/bin/sh"/></v:vmstate>',
     "unknown attribute 'command'"),
    ('<v:vmstate xmlns:v="urn:x-virt-vmstate:domain:1"><v:exec>/bin/sh</v:exec></v:vmstate>',
     "unknown element <exec>"),
    ('<v:vmstate xmlns:v="urn:x-virt-vmstate:domain:1"><v:helper id=""/></v:vmstate>', "needs an id"),
    ('<v:vmstate xmlns:v="urn:x-virt-vmstate:domain:1"><v:helper id="a"/><v:helper id="a"/></v:vmstate>',
     "listed twice"),
    ('<v:vmstate xmlns:v="urn:x-virt-vmstate:domain:1"><v:helper id="a" profile="../../bin"/></v:vmstate>',
     "not a profile name"),
    ('<v:vmstate xmlns:v="urn:x-virt-vmstate:domain:1"><v:bus mode="magic"/></v:vmstate>', "bus mode"),
    ('<v:vmstate xmlns:v="urn:x-virt-vmstate:domain:1"><v:bus mode="address"/></v:vmstate>',
     "exactly when"),
    ('<v:vmstate xmlns:v="urn:x-virt-vmstate:domain:1"><v:bus mode="address" address="tcp:host=x"/>'
     '</v:vmstate>', "not a unix:"),
    ('<s:state xmlns:s="urn:x-virt-vmstate:state:1" carrier="xml" size="3" sha256="' + "0" * 64
     + '">!!!!</s:state><v:vmstate xmlns:v="urn:x-virt-vmstate:domain:1"/>', "not valid base64"),
    ('<s:state xmlns:s="urn:x-virt-vmstate:state:1" carrier="xml" size="9" sha256="' + "0" * 64
     + '">YWJj</s:state><v:vmstate xmlns:v="urn:x-virt-vmstate:domain:1"/>', "its size says 9"),
    ('<s:state xmlns:s="urn:x-virt-vmstate:state:1" carrier="spool" size="1" file="../../etc/shadow" sha256="'
     + "0" * 64 + '"/><v:vmstate xmlns:v="urn:x-virt-vmstate:domain:1"/>', "not a plain file name"),
])
def test_bad_metadata_is_refused(meta, expect):
    with pytest.raises(DomainXMLError, match=expect):
        D.parse_domain(domain(meta))


@pytest.mark.parametrize("doc,expect", [
    (b"<domain><name>x</name>", "not well-formed"),
    (b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><domain>&b;</domain>',
     "DOCTYPE"),
    (b"<network><name>x</name></network>", "not <domain>"),
    (b"<domain><name>x</name><uuid>nope</uuid></domain>", "no valid <uuid>"),
    (b"<domain>" + b"<a>" * 5000 + b"</a>" * 5000 + b"</domain>", "no <name>"),
])
def test_malformed_xml_is_a_clear_error(doc, expect):
    with pytest.raises(DomainXMLError, match=expect):
        D.parse_domain(doc)


def test_spans_end_at_the_tag_end_past_angle_brackets_and_quotes_in_attribute_values():
    # '>' may stand unescaped in an attribute value, and either quote inside the other.
    args = ["<qemu:arg value='a>b'/>", '<qemu:arg value="it\'s >"></qemu:arg>']
    doc = domain(attrs=" xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'").replace(
        b"</domain>", ("<qemu:commandline>" + "".join(args) + "</qemu:commandline></domain>").encode())
    parsed = D.parse_domain(doc)
    assert [doc[a.span[0]:a.span[1]].decode() for a in parsed.qemu_args] == args
    assert [a.value for a in parsed.qemu_args] == ["a>b", "it's >"]
