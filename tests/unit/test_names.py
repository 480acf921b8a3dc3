from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virt_vmstate.core.config import Timeouts
from virt_vmstate.core.domxml import DomainConfig, HelperSpec
from virt_vmstate.core.names import canonical_uuid, is_hex, is_name, random_uuid, uuid_bytes, uuid_text


@pytest.mark.parametrize("text,ok", [
    ("slirp", True), ("a", True), ("A.b_c-9", True), ("x" * 64, True), ("x" * 65, False),
    ("", False), (".hidden", False), ("-opt", False), ("a/b", False), ("a..b", False),
    ("a b", False), ("abc\n", False), ("é", False), ("a:b", False),
])
def test_is_name(text, ok):
    assert is_name(text) is ok


def test_is_name_with_other_punctuation_and_length():
    assert is_name("user@host:1", 255, "_.:@+-") and not is_name("user@host", 64)
    assert is_name("y" * 128, 128) and not is_name("y" * 129, 128)


@given(st.text(max_size=70))
def test_is_name_never_admits_a_path(text):
    if is_name(text):
        assert "/" not in text and ".." not in text and text.isascii() and text[0].isalnum()


def test_is_hex():
    assert is_hex("0" * 64, 64) and is_hex("deadbeef", 8)
    assert not is_hex("DEADBEEF", 8) and not is_hex("0" * 63, 64) and not is_hex("g" * 8, 8)


@given(st.uuids())
def test_canonical_uuid_is_libvirts_form(value):
    assert canonical_uuid(str(value)) == str(value)
    assert canonical_uuid(str(value).upper()) == str(value)
    assert canonical_uuid(value.hex) == str(value)


@pytest.mark.parametrize("text", ["", "not-a-uuid", "1234", str(uuid.uuid4())[:-1], "../" + "0" * 32])
def test_canonical_uuid_refuses(text):
    assert canonical_uuid(text) is None


def test_values_compare_show_and_replace_by_field():
    spec = DomainConfig((HelperSpec("a", "p"),), "address", "unix:path=/x")
    assert spec == DomainConfig((HelperSpec("a", "p"),), "address", "unix:path=/x")
    assert spec != DomainConfig((HelperSpec("a"),), "address", "unix:path=/x")
    assert HelperSpec("a") != ("a", None)
    assert repr(HelperSpec("a")) == "HelperSpec(id='a', profile=None)"
    assert hash(HelperSpec("a", "p")) == hash(HelperSpec("a", "p"))
    changed = Timeouts().replace(call=3.0)
    assert (changed.call, changed.hook) == (3.0, Timeouts().hook) and Timeouts().call == 25.0
    with pytest.raises(TypeError, match="no field 'bogus'"):
        Timeouts().replace(bogus=1)


@given(st.uuids())
def test_uuid_bytes_and_text_agree_with_the_uuid_module(value):
    assert uuid_bytes(str(value)) == value.bytes
    assert uuid_bytes(value.hex.upper()) == value.bytes
    assert uuid_text(value.bytes) == str(value)


def test_uuid_conversions_refuse_what_is_not_one():
    with pytest.raises(ValueError, match="not a UUID"):
        uuid_bytes("5f0e1a3c-8b1e-4c2a-9d55")
    with pytest.raises(ValueError, match="16 bytes"):
        uuid_text(bytes(15))


def test_random_uuids_are_version_4_and_differ():
    drawn = {random_uuid() for _ in range(64)}
    assert len(drawn) == 64
    for text in drawn:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122
