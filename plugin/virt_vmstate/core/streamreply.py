"""The proxy's reply to QEMU's Save: the bundle itself, or a reference to it.  Pure code.

QEMU caps each helper's reply at 1 MiB, so the proxy's reply is the bundle
itself (compressed when that pays) or, past the cap, a small *reference* to the
bundle written as a file: in the shared spool when the host has one, otherwise
in a host-local directory that a restore on the same host reads.

Reference layout (big-endian)::

    magic   8   b"\\x89VMSTREF"
    version u16
    place   u8  0 spool, 1 local
    domain  16  domain UUID
    size    u64 size of the referenced bundle file
    sha256  32  its digest
    namelen u8  then the file's name
    digest  32  SHA-256 over every byte before it
"""

from __future__ import annotations

import hashlib
import struct

from ..errors import BundleError
from .names import uuid_bytes, uuid_text
from .values import Value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .bundle import Bundle, Codec

QEMU_STATE_CAP = 1024 * 1024       # QEMU's DBUS_VMSTATE_SIZE_LIMIT for one helper's Save reply

REF_MAGIC = b"\x89VMSTREF"
REF_VERSION = 1
PLACES = ("spool", "local")
_REF_HEAD = struct.Struct(">8sHB16sQ32sB")
_DIGEST = 32


class Reference(Value):
    """Where the bundle is when it was too big for QEMU's cap."""

    __slots__ = ("place", "name", "size", "sha256", "domain_uuid")

    def __init__(self, place: str, name: str, size: int, sha256: bytes, domain_uuid: str) -> None:
        self.place = place
        self.name = name
        self.size = size
        self.sha256 = sha256
        self.domain_uuid = domain_uuid


def inline_encoding(sealed: Bundle) -> tuple[Codec, bytes]:
    """The bundle as the proxy would return it inline: zlib when a probe says it pays."""
    from .bundle import Codec
    from .precopy import worth_compressing
    sample = b"".join(s.data[:65536] for s in sealed.states)[:65536]
    codec = Codec.ZLIB if worth_compressing(sample) else Codec.NONE
    return codec, sealed.encode(codec)


def reference_file_name(sealed: Bundle) -> str:
    return f"{sealed.domain_uuid or 'unbound'}-{sealed.migration_id}.stream.vmstate"


def encode_reference(ref: Reference) -> bytes:
    name = ref.name.encode("ascii")
    head = _REF_HEAD.pack(REF_MAGIC, REF_VERSION, PLACES.index(ref.place), uuid_bytes(ref.domain_uuid),
                          ref.size, ref.sha256, len(name)) + name
    return head + hashlib.sha256(head).digest()


def is_reference(blob: bytes) -> bool:
    return blob[:len(REF_MAGIC)] == REF_MAGIC


def decode_reference(blob: bytes) -> Reference:
    if not is_reference(blob):
        raise BundleError("not a virt-vmstate state reference (bad magic)")
    if len(blob) < _REF_HEAD.size + _DIGEST:
        raise BundleError("state reference is truncated")
    body, digest = blob[:-_DIGEST], blob[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise BundleError("state reference digest mismatch")
    _, version, place, domain, size, sha, name_len = _REF_HEAD.unpack_from(body)
    if version != REF_VERSION:
        raise BundleError(f"state reference version {version} is not supported",
                          hint="use the same virt-vmstate version on both hosts")
    if place >= len(PLACES) or len(body) != _REF_HEAD.size + name_len:
        raise BundleError("state reference is malformed")
    try:
        name = body[_REF_HEAD.size:].decode("ascii")
    except UnicodeDecodeError:
        raise BundleError("state reference names a file that is not ASCII") from None
    return Reference(PLACES[place], name, size, sha, uuid_text(domain))


class Reply(Value):
    """What the proxy's Save hands QEMU for one sealed bundle."""

    __slots__ = ("inline", "codec", "bundle", "place")

    def __init__(self, inline: bool, codec: Codec, bundle: bytes, place: str | None) -> None:
        self.inline = inline    # the bundle itself; else a reference to ``bundle`` written as a file
        self.codec = codec
        self.bundle = bundle    # the encoded bundle
        self.place = place      # where a referenced bundle goes: 'spool' or 'local'

    def describe(self) -> str:
        if self.inline:
            return f"inline in QEMU's stream ({self.codec.name.lower()}, {len(self.bundle)} bytes)"
        return (f"by reference: {len(self.bundle)} bytes over QEMU's {QEMU_STATE_CAP} byte cap, "
                f"written to the {self.place} directory")


def plan_reply(sealed: Bundle, *, spool_configured: bool, max_bundle_size: int,
               domain: str) -> Reply:
    """Inline when the (compressed) bundle fits QEMU's cap; else a reference to a file."""
    from .bundle import Codec
    codec, data = inline_encoding(sealed)
    if len(data) <= QEMU_STATE_CAP:
        return Reply(True, codec, data, None)
    if codec is Codec.ZLIB:
        data = sealed.encode(Codec.NONE)  # a file gains nothing from the compression's time
        codec = Codec.NONE
    if len(data) > max_bundle_size:
        sizes = ", ".join(f"{s.id} {len(s.data)} B" for s in sealed.states)
        raise BundleError(f"domain {domain}: helper state needs {len(data)} bytes, over "
                          f"limits.max_bundle_size ({max_bundle_size} bytes) (helpers: {sizes})",
                          hint="raise limits.max_bundle_size if this size is expected")
    return Reply(False, codec, data, "spool" if spool_configured else "local")
