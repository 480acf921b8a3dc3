from __future__ import annotations

import os
import random
import uuid

import pytest

from virt_vmstate.core import precopy as C
from virt_vmstate.core.bundle import Codec, HelperState, decode, new_bundle

MiB = 1024 * 1024
DOMAIN = "5f0e1a3c-8b1e-4c2a-9d55-0a3b9c1e2f40"


def sealed(**states: bytes):
    return new_bundle([HelperState(k, v) for k, v in states.items()], created_ms=1,
                      migration_id=str(uuid.UUID(int=9)), domain_uuid=DOMAIN)


def table(size: int) -> bytes:
    """Helper-like structured state: compressible, not trivially."""
    rng = random.Random(size)
    rows = (b"10.0.2.%03d:%05d -> 93.184.216.%03d:443 established %08d\n"
            % (rng.randrange(256), rng.randrange(65536), rng.randrange(256), rng.randrange(10**8))
            for _ in range(size // 60 + 1))
    return b"".join(rows)[:size]


def pick(bundle, requested="auto", spool=False, base=4096, xml_max=3 * MiB):
    return C.choose(bundle, requested=requested, base_xml_size=base, xml_carrier_max=xml_max,
                    spool_configured=spool, max_bundle_size=1024 * MiB, domain="vm1")


def test_random_state_is_stored_uncompressed_in_the_xml():
    carried = pick(sealed(a=os.urandom(MiB)))
    assert (carried.carrier, carried.codec) == ("xml", Codec.NONE)
    assert carried.element.bundle == carried.data and carried.element.size == len(carried.data)


def test_three_mib_of_compressible_state_fits_the_xml_compressed():
    state = table(3 * MiB)
    carried = pick(sealed(conntrack=state))
    assert carried.carrier == "xml" and carried.codec is Codec.ZLIB
    assert len(carried.data) < MiB
    assert decode(carried.data, max_size=64 * MiB).state_of("conntrack").data == state


def test_lzma_is_used_when_zlib_alone_misses_the_room():
    state = table(MiB)
    zlib_size = len(sealed(t=state).encode(Codec.ZLIB))
    lzma_size = len(sealed(t=state).encode(Codec.LZMA))
    assert lzma_size < zlib_size
    carried = pick(sealed(t=state), xml_max=(zlib_size + lzma_size) // 2)
    assert carried.codec is Codec.LZMA and carried.carrier == "xml"


def test_too_big_for_the_xml_without_spool_is_refused_naming_helpers_and_sizes():
    with pytest.raises(C.CarrierError) as e:
        pick(sealed(big=os.urandom(4 * MiB), small=b"x" * 10))
    text = str(e.value)
    assert "vm1" in text and f"big {4 * MiB} B" in text and "small 10 B" in text
    assert "[carriers.spool]" in text and "untouched" in text


def test_too_big_for_the_xml_goes_by_spool_when_configured():
    bundle = sealed(big=os.urandom(4 * MiB))
    carried = pick(bundle, spool=True)
    assert (carried.carrier, carried.codec) == ("spool", Codec.NONE)
    assert carried.element.spool_file == f"{DOMAIN}-{bundle.migration_id}.vmstate"
    assert carried.element.bundle == b"" and carried.element.size == len(carried.data)


def test_requested_carriers_are_honoured_or_refused():
    small = sealed(a=b"abc")
    assert pick(small, "spool", spool=True).carrier == "spool"
    with pytest.raises(C.CarrierError, match="spool carrier is not configured"):
        pick(small, "spool")
    with pytest.raises(C.CarrierError, match="XML carrier"):
        pick(sealed(a=os.urandom(4 * MiB)), "xml", spool=True)
    with pytest.raises(C.CarrierError, match="not one of"):
        pick(small, "pigeon")


def test_spool_refuses_over_the_bundle_cap():
    with pytest.raises(C.CarrierError, match="max_bundle_size"):
        C.choose(sealed(a=os.urandom(1000)), requested="spool", base_xml_size=0,
                 xml_carrier_max=MiB, spool_configured=True, max_bundle_size=500, domain="vm1")


@pytest.mark.parametrize("base", [0, 4096, 500_000, 3 * MiB, 4 * MiB])
def test_xml_room_keeps_the_whole_xml_under_libvirts_cap(base):
    room = C.xml_room(base, 64 * MiB)
    b64 = 4 * ((room + 2) // 3)
    assert room >= 0
    if room:
        assert base + b64 + 300 + C.XML_HEADROOM <= C.LIBVIRT_XML_MAX
    assert C.xml_room(base, 1000) <= 1000


def test_worth_compressing_probes_a_sample():
    assert C.worth_compressing(table(200_000))
    assert not C.worth_compressing(os.urandom(200_000))
