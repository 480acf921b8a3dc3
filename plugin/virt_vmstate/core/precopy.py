"""How a sealed bundle travels with a migration: inside the domain XML, or by spool.

Pure code, no I/O.  The XML carrier is simplest and needs nothing shared, but
libvirt caps a whole domain XML at 4 MiB and the bundle goes in as base64, so
it is compressed first.  Codec choice, measured on helper-like states
(``benchmarks/codecs.py``): zlib level 1 compresses at 70-124 MiB/s to 30-36 %;
lzma preset 0 reaches 23-25 % in 4-6 times as long.  zlib is tried first and
lzma only when zlib alone does not fit.  Incompressible state (a 64 KiB probe that
does not shrink) is stored as is, so random bytes cost no compression time.
Beyond the XML carrier, the spool carrier moves the bundle as a file on
storage both hosts see; it stores the payload uncompressed (zlib spends
30-40 MiB/s on random state for nothing, far below the storage).
"""

from __future__ import annotations

import hashlib
import zlib

from ..errors import VMStateError
from .bundle import Bundle, Codec
from .config import CARRIERS, HostConfig
from .domxml import StateElement
from .values import Value

LIBVIRT_XML_MAX = 4 * 1024 * 1024  # libvirt's RPC cap on one string: the whole domain XML
XML_HEADROOM = 64 * 1024           # the destination's live XML grows (~700 B); keep well clear
PROBE_SIZE = 64 * 1024
PROBE_MIN_SAVING = 0.05


class CarrierError(VMStateError):
    """No configured carrier can take this state; nothing was moved."""


class Carried(Value):
    """The sealed bundle as it will travel, and the element that describes it."""

    __slots__ = ("carrier", "codec", "data", "element")

    def __init__(self, carrier: str, codec: Codec, data: bytes, element: StateElement) -> None:
        self.carrier = carrier
        self.codec = codec
        self.data = data
        self.element = element


def worth_compressing(payload: bytes) -> bool:
    """Whether a quick zlib pass over a sample shrinks it noticeably."""
    probe = payload[:PROBE_SIZE]
    if len(probe) < 256:
        return len(payload) > 0
    return len(zlib.compress(probe, 1)) < len(probe) * (1 - PROBE_MIN_SAVING)


def xml_encoding(sealed: Bundle) -> tuple[Codec, bytes]:
    """The XML carrier's first try: zlib, or as is when a probe shows no gain."""
    payload_sample = b"".join(s.data[:PROBE_SIZE] for s in sealed.states)[:PROBE_SIZE]
    codec = Codec.ZLIB if worth_compressing(payload_sample) else Codec.NONE
    return codec, sealed.encode(codec)


def xml_room(base_xml_size: int, xml_carrier_max: int) -> int:
    """The largest encoded bundle the XML carrier takes for a domain XML of this size.

    The element adds its tags and attributes (under 300 bytes) to the base64.
    """
    room_b64 = LIBVIRT_XML_MAX - XML_HEADROOM - base_xml_size - 300
    return max(0, min(xml_carrier_max, room_b64 // 4 * 3))


def _state(carrier: str, data: bytes, spool_file: str | None = None) -> StateElement:
    digest = hashlib.sha256(data).hexdigest()
    if carrier == "xml":
        return StateElement("xml", len(data), digest, bundle=data)
    return StateElement("spool", len(data), digest, spool_file=spool_file)


def spool_file_name(sealed: Bundle) -> str:
    """The spool file of one save: unique per domain and migration, a plain file name."""
    domain = sealed.domain_uuid or "unbound"
    return f"{domain}-{sealed.migration_id}.vmstate"


def choose(sealed: Bundle, *, requested: str, base_xml_size: int, xml_carrier_max: int,
           spool_configured: bool, max_bundle_size: int, domain: str) -> Carried:
    """Pick the carrier and encoding, or refuse before anything moves."""
    if requested not in CARRIERS:
        raise CarrierError(f"carrier {requested!r} is not one of {', '.join(CARRIERS)}")
    room = xml_room(base_xml_size, xml_carrier_max)
    best: tuple[Codec, bytes] | None = None
    if requested in ("auto", "xml"):
        best = xml_encoding(sealed)
        if len(best[1]) <= room:
            return Carried("xml", best[0], best[1], _state("xml", best[1]))
        # lzma is slower but smaller: worth it only when zlib missed the room and
        # there is no spool to fall back on.
        if best[0] is Codec.ZLIB and (requested == "xml" or not spool_configured):
            data = sealed.encode(Codec.LZMA)
            if len(data) <= room:
                return Carried("xml", Codec.LZMA, data, _state("xml", data))
            best = (Codec.LZMA, data)
    if requested in ("auto", "spool") and spool_configured:
        data = sealed.encode(Codec.NONE)
        if len(data) > max_bundle_size:
            raise _too_big(sealed, domain, f"the bundle cap (limits.max_bundle_size, "
                                           f"{max_bundle_size} bytes)", len(data))
        name = spool_file_name(sealed)
        return Carried("spool", Codec.NONE, data, _state("spool", data, name))
    if requested == "spool":
        raise CarrierError(f"domain {domain}: the spool carrier is not configured on this host",
                           hint="set [carriers.spool] dir to a directory both hosts mount")
    size = len(best[1]) if best else sealed.total_size
    raise _too_big(sealed, domain, f"the XML carrier's room of {room} bytes (libvirt caps the "
                                   "domain XML at 4 MiB)", size,
                   hint=None if spool_configured else
                   "configure [carriers.spool] dir on both hosts for state this large")


def choose_for_host(sealed: Bundle, config: HostConfig, *, requested: str, base_xml_size: int,
                    domain: str) -> Carried:
    """``choose`` with this host's limits and spool."""
    return choose(sealed, requested=requested, base_xml_size=base_xml_size,
                  xml_carrier_max=config.limits.xml_carrier_max,
                  spool_configured=config.spool.dir is not None,
                  max_bundle_size=config.limits.max_bundle_size, domain=domain)


def _too_big(sealed: Bundle, domain: str, what: str, size: int,
             hint: str | None = None) -> CarrierError:
    sizes = ", ".join(f"{s.id} {len(s.data)} B" for s in
                      sorted(sealed.states, key=lambda s: -len(s.data)))
    return CarrierError(f"domain {domain}: helper state needs {size} bytes, over {what} "
                        f"(helpers: {sizes})",
                        hint=(hint + "; " if hint else "") +
                        "nothing was migrated, the source guest and helpers are untouched")

