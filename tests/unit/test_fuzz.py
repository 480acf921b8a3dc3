"""Fuzzing of everything that parses input from another host or process.

Any exception other than the project's own typed errors is a bug.  Bounded:
VIRT_VMSTATE_FUZZ_EXAMPLES examples per target (default 400), no deadline.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import uuid
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virt_vmstate.core import bundle as B
from virt_vmstate.core.config import parse_config
from virt_vmstate.core.domxml import (DomainConfig, HelperSpec, StateElement, config_element, insert_state,
                                      parse_domain, strip_state)
from virt_vmstate.errors import BundleError, ConfigError, DomainXMLError, VMStateError

EXAMPLES = int(os.environ.get("VIRT_VMSTATE_FUZZ_EXAMPLES", "400"))
fuzz = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DOMAIN = "5f0e1a3c-8b1e-4c2a-9d55-0a3b9c1e2f40"
EXAMPLE_CONFIG = (Path(__file__).resolve().parents[2] / "packaging" / "config.toml").read_text()
UNCOMMENTED = re.sub(r'(?m)^# (?=\[|[a-z_]+ = |\s+")', "", EXAMPLE_CONFIG)


def test_the_uncommented_example_config_parses():
    config = parse_config(UNCOMMENTED, "example")
    assert "slirp" in config.profiles and config.spool.dir is not None


def valid_bundle() -> bytes:
    return B.new_bundle([B.HelperState("a", b"x" * 100), B.HelperState("b", bytes(range(256)))],
                        created_ms=1, migration_id=str(uuid.UUID(int=1)), domain_uuid=DOMAIN).encode(B.Codec.ZLIB)


@fuzz
@given(st.binary(max_size=4096))
def test_bundle_decoder_on_random_bytes(data):
    try:
        B.decode(data, max_size=1 << 20)
    except BundleError:
        pass


@fuzz
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
       st.booleans())
def test_bundle_decoder_on_mutated_bundles(edits, reseal):
    data = bytearray(valid_bundle())
    for pos, value in edits:
        data[pos % len(data)] = value
    if reseal:  # get past the digest to the checks behind it
        data[-32:] = hashlib.sha256(bytes(data[:-32])).digest()
    try:
        B.decode(bytes(data), max_size=1 << 20)
    except BundleError:
        pass


def domain(metadata: str) -> bytes:
    return f"<domain><name>vm</name><uuid>{DOMAIN}</uuid><metadata>{metadata}</metadata></domain>".encode()


@fuzz
@given(st.binary(max_size=2048))
def test_domain_xml_reader_on_random_bytes(data):
    try:
        parse_domain(data)
    except DomainXMLError:
        pass


XML_PIECES = st.sampled_from([
    "<vmstate:vmstate xmlns:vmstate='urn:x-virt-vmstate:domain:1'>", "</vmstate:vmstate>",
    "<vmstate:helper id='a' profile='p'/>", "<vmstate:helper id=''/>", "<vmstate:bus mode='address'/>",
    "<vmstate:bus mode='address' address='unix:path=/x'/>", "<vmstate:missing-state policy='x'/>",
    "<s:state xmlns:s='urn:x-virt-vmstate:state:1' carrier='xml' size='3' sha256='" + "0" * 64 + "'>",
    "<s:state xmlns:s='urn:x-virt-vmstate:state:1' carrier='spool' size='1' sha256='" + "a" * 64
    + "' file='../x'/>", "</s:state>", "QUJD", "!!!notbase64", "<x>", "</x>", "&amp;", "&lt;", "<!-- c -->",
    "<![CDATA[<]]>", " command='/bin/sh'", "<vmstate:helper id='" + "i" * 300 + "'/>",
])


@fuzz
@given(st.lists(XML_PIECES, max_size=12))
def test_domain_xml_reader_on_assembled_metadata(pieces):
    try:
        parse_domain(domain("".join(pieces)))
    except DomainXMLError:
        pass


@fuzz
@given(st.integers(1, 5000), st.integers(1, 200_000), st.text(max_size=64))
def test_domain_xml_reader_on_deep_nesting_and_huge_attributes(depth, attr_len, junk):
    deep = "<a>" * depth + "</a>" * depth
    huge = (f"<vmstate:vmstate xmlns:vmstate='urn:x-virt-vmstate:domain:1'>"
            f"<vmstate:helper id='{'x' * attr_len}'/></vmstate:vmstate>")
    for doc in (domain(deep), domain(huge), domain(junk.replace("<", "").replace("&", ""))):
        try:
            parse_domain(doc)
        except DomainXMLError:
            pass


def test_entity_expansion_is_refused():
    laughs = ('<?xml version="1.0"?><!DOCTYPE domain [<!ENTITY a "aaaaaaaaaa">'
              + "".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(8))
              + ']><domain><name>&i;</name></domain>')
    try:
        parse_domain(laughs.encode())
    except DomainXMLError as e:
        assert "DOCTYPE" in str(e)
    else:
        raise AssertionError("entity declarations were accepted")


@fuzz
@given(st.binary(max_size=512), st.booleans())
def test_state_element_with_any_payload_round_trips_or_is_refused(payload, corrupt):
    config = config_element(DomainConfig((HelperSpec("a"),)))
    element = StateElement("xml", len(payload), hashlib.sha256(payload).hexdigest(), payload)
    doc = insert_state(domain(config), element)
    if corrupt:
        encoded = base64.b64encode(payload)
        if encoded:
            doc = doc.replace(encoded, encoded[:-1] + b"*")
    try:
        parsed = parse_domain(doc)
    except DomainXMLError:
        assert corrupt
        return
    assert parsed.state is not None and parsed.state.bundle == payload
    assert strip_state(doc, parsed) == domain(config)


@fuzz
@given(st.text(max_size=1024))
def test_config_loader_on_random_text(text):
    try:
        parse_config(text, "fuzz")
    except ConfigError:
        pass


@fuzz
@given(st.lists(st.tuples(st.integers(0, 5000), st.sampled_from(
    ["", "=", "[", "]", '"', "{", "}", "\n", "# ", "-1", "0", "1e999", "true", "[profiles.x]\n",
     'command = ["rel"]\n', 'command = ["/bin/x", "{evil}"]\n', "nan", "ö"])), max_size=6))
def test_config_loader_on_mutated_example(edits):
    text = UNCOMMENTED
    for pos, piece in edits:
        pos %= len(text) + 1
        text = text[:pos] + piece + text[pos:]
    try:
        parse_config(text, "fuzz")
    except VMStateError:
        pass
