from __future__ import annotations

import hashlib
import lzma
import struct
import uuid
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virt_vmstate.core import bundle as B
from virt_vmstate.errors import BundleError, MissingHelpersError

CAP = 64 * 1024 * 1024
NOW = 1_790_000_000_000
DOMAIN = "5f0e1a3c-8b1e-4c2a-9d55-0a3b9c1e2f40"

helper_ids = st.text(min_size=1, max_size=40).filter(lambda s: len(s.encode("utf-8", "surrogatepass")) <= 255)


def make(states: dict, domain=DOMAIN, created=NOW) -> B.Bundle:
    return B.new_bundle([B.HelperState(i, d) for i, d in states.items()], created_ms=created,
                        migration_id=str(uuid.UUID(int=7)), domain_uuid=domain)


def reseal(body: bytes) -> bytes:
    """Recompute the trailing digest, to reach the checks behind it."""
    return body + hashlib.sha256(body).digest()


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(helper_ids, st.binary(max_size=2048), max_size=6),
       st.sampled_from(list(B.Codec)), st.booleans())
def test_round_trip_any_ids_and_payloads(states, codec, bound):
    original = make(states, DOMAIN if bound else None)
    decoded = B.decode(original.encode(codec), max_size=CAP)
    assert {s.id: s.data for s in decoded.states} == states
    assert decoded.domain_uuid == (DOMAIN if bound else None)
    assert decoded.migration_id == original.migration_id
    assert decoded.created_ms == NOW
    assert decoded.codec is codec


def test_empty_state_and_empty_bundle():
    assert B.decode(make({"a": b""}).encode(), max_size=CAP).state_of("a").data == b""
    assert B.decode(make({}).encode(), max_size=CAP).states == ()


def test_equal_states_encode_equally():
    assert make({"b": b"2", "a": b"1"}).encode() == make({"a": b"1", "b": b"2"}).encode()


GOOD = make({"slirp0": b"x" * 100, "conntrack": bytes(range(256))}).encode()


@pytest.mark.parametrize("cut", [0, 1, 7, 8, 40, 60, len(GOOD) // 2, len(GOOD) - 1])
def test_truncated_is_rejected(cut):
    with pytest.raises(BundleError):
        B.decode(GOOD[:cut], max_size=CAP)


def test_padding_is_rejected():
    with pytest.raises(BundleError, match="digest mismatch"):
        B.decode(GOOD + b"\0", max_size=CAP)
    padded = reseal(GOOD[:-32] + b"\0\0\0")
    with pytest.raises(BundleError, match="unexpected bytes"):
        B.decode(padded, max_size=CAP)


@pytest.mark.parametrize("bit", range(0, len(GOOD) * 8, 13))
def test_every_bit_flip_is_rejected(bit):
    flipped = bytearray(GOOD)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(BundleError):
        B.decode(bytes(flipped), max_size=CAP)


def test_bad_magic_and_version_say_so():
    with pytest.raises(BundleError, match="bad magic"):
        B.decode(b"<domain/>" + GOOD, max_size=CAP)
    other = bytearray(GOOD)
    struct.pack_into(">H", other, 8, 99)
    with pytest.raises(BundleError, match="format version 99"):
        B.decode(bytes(other), max_size=CAP)


def test_size_caps():
    with pytest.raises(BundleError, match="over the cap"):
        B.decode(GOOD, max_size=len(GOOD) - 1)
    # A record that declares more than the cap is refused before anything is read for it.
    huge = make({"a": b"x"})
    body = bytearray(huge.encode()[:-32])
    record_len_at = struct.calcsize(">8sHHI16s16sQ") + 1 + 1
    struct.pack_into(">Q", body, record_len_at, 2**62)
    with pytest.raises(BundleError, match="over the cap"):
        B.decode(reseal(bytes(body)), max_size=CAP)


def test_lying_record_length_is_rejected():
    body = bytearray(make({"a": b"abcd"}).encode()[:-32])
    record_len_at = struct.calcsize(">8sHHI16s16sQ") + 1 + 1
    struct.pack_into(">Q", body, record_len_at, 3)
    with pytest.raises(BundleError, match="records declare"):
        B.decode(reseal(bytes(body)), max_size=CAP)


def test_payload_digest_checked_per_record():
    good = make({"a": b"abcd", "b": b"efgh"})
    body = bytearray(good.encode()[:-32])
    body[-1] ^= 0xFF  # last byte of b's state
    with pytest.raises(BundleError, match="helper 'b' does not match its digest"):
        B.decode(reseal(bytes(body)), max_size=CAP)


def test_compression_bomb_is_bounded():
    bomb = make({"a": bytes(10 * 1024 * 1024)}).encode(B.Codec.ZLIB)
    assert len(bomb) < 64 * 1024
    with pytest.raises(BundleError, match="over the cap"):
        B.decode(bomb, max_size=1024 * 1024)


def test_freshness_checks():
    b = make({"a": b"1"})
    B.check_fresh(b, domain_uuid=DOMAIN, now_ms=NOW + 5000, max_age_s=60)
    with pytest.raises(BundleError, match="not to domain"):
        B.check_fresh(b, domain_uuid=str(uuid.uuid4()), now_ms=NOW, max_age_s=60)
    with pytest.raises(BundleError, match="older than the allowed"):
        B.check_fresh(b, domain_uuid=DOMAIN, now_ms=NOW + 61_000, max_age_s=60)
    with pytest.raises(BundleError, match="in the future"):
        B.check_fresh(b, domain_uuid=DOMAIN, now_ms=NOW - 3600_000, max_age_s=60)


def test_ids_validated_and_unique():
    with pytest.raises(BundleError, match="empty"):
        make({"": b""})
    with pytest.raises(BundleError, match="longer than 255"):
        make({"x" * 256: b""})
    with pytest.raises(BundleError, match="two records"):
        B.Bundle((B.HelperState("a", b""), B.HelperState("a", b"")), str(uuid.UUID(int=1)), NOW)
    with pytest.raises(MissingHelpersError, match="c"):
        B.check_ids(make({"a": b"", "b": b""}), ["a", "c"])


def test_uuids_are_kept_canonical_and_encoded_as_the_uuid_module_would():
    shouted = DOMAIN.upper().replace("-", "")
    b = B.new_bundle([B.HelperState("a", b"1")], created_ms=NOW, migration_id=str(uuid.UUID(int=7)),
                     domain_uuid=shouted)
    assert b.domain_uuid == DOMAIN
    B.check_fresh(b, domain_uuid=shouted, now_ms=NOW, max_age_s=60)
    sealed = b.encode()
    # domain and migration id sit after magic, version, codec and count, as 16 raw bytes each
    assert sealed[16:32] == uuid.UUID(DOMAIN).bytes
    assert sealed[32:48] == uuid.UUID(int=7).bytes
    decoded = B.decode(sealed, max_size=CAP)
    assert (decoded.domain_uuid, decoded.migration_id) == (DOMAIN, str(uuid.UUID(int=7)))


@pytest.mark.parametrize("field", ["migration_id", "domain_uuid"])
def test_a_bundle_refuses_what_is_not_a_uuid(field):
    ids = {"migration_id": str(uuid.UUID(int=7)), "domain_uuid": DOMAIN, field: "../../etc"}
    with pytest.raises(BundleError, match="is not a UUID"):
        B.new_bundle([], created_ms=NOW, **ids)


def _with_payload(codec: B.Codec, declared: bytes, stored: bytes) -> bytes:
    """A sealed bundle whose one record (Id "a") declares ``declared`` and whose payload is ``stored``."""
    body = make({"a": declared}).encode(codec)[:-32]
    records_end = struct.calcsize(">8sHHI16s16sQ") + 1 + len("a") + 8 + 32
    return reseal(body[:records_end] + struct.pack(">Q", len(stored)) + stored)


@pytest.mark.parametrize("codec", [B.Codec.ZLIB, B.Codec.LZMA])
def test_a_compressed_payload_that_does_not_decompress_is_named(codec):
    garbage = bytes(range(256)) * 4
    with pytest.raises(BundleError, match=f"payload does not decompress \\({codec.name.lower()}\\)"):
        B.decode(_with_payload(codec, b"x" * 100, garbage), max_size=CAP)


@pytest.mark.parametrize("codec", [B.Codec.ZLIB, B.Codec.LZMA])
def test_a_compressed_payload_of_another_size_is_refused(codec):
    compress = zlib.compress if codec is B.Codec.ZLIB else lzma.compress
    whole = B.decode(_with_payload(codec, b"x" * 100, compress(b"x" * 100)), max_size=CAP)
    assert whole.state_of("a").data == b"x" * 100  # the same bundle, rightly compressed, decodes
    short = compress(b"x" * 50)
    with pytest.raises(BundleError, match=f"different size than its records declare \\({codec.name.lower()}\\)"):
        B.decode(_with_payload(codec, b"x" * 100, short), max_size=CAP)
