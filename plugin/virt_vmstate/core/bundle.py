"""The state bundle: every helper's state for one domain, sealed for transport.

Pure code, no I/O.  Layout (all integers big-endian)::

    magic      8   b"\\x89VMSTATE"
    version    u16 FORMAT_VERSION
    codec      u16 Codec of the payload section
    count      u32 number of records
    domain     16  domain UUID (all zero: not bound to a domain)
    migration  16  random id of this save
    created    u64 creation time, milliseconds since the epoch
    count x record:
      id_len   u8  then id_len bytes of UTF-8 helper Id
      length   u64 length of this helper's state
      sha256   32  digest of this helper's state
    stored     u64 length of the payload section as stored
    payload    the states concatenated in record order, encoded by codec
    digest     32  SHA-256 over every byte before it

Decoding trusts no length beyond the bytes present and the caller's cap, and
names the check that failed.
"""

from __future__ import annotations

import enum
import hashlib
import struct
import zlib

from ..errors import BundleError, MissingHelpersError
from .names import canonical_uuid, uuid_bytes, uuid_text
from .values import Value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable, Sequence

MAGIC = b"\x89VMSTATE"
FORMAT_VERSION = 1
MAX_ID_BYTES = 255
DIGEST_SIZE = 32

_HEAD = struct.Struct(">8sHHI16s16sQ")
_U8 = struct.Struct(">B")
_U64 = struct.Struct(">Q")
_NIL_UUID = bytes(16)


class Codec(enum.IntEnum):
    """How the payload section is stored."""

    NONE = 0
    ZLIB = 1
    LZMA = 2


class HelperState(Value):
    """One helper's saved state."""

    __slots__ = ("id", "data")

    def __init__(self, id: str, data: bytes) -> None:
        self.id = id
        self.data = data

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def _uuid(value: str, what: str) -> str:
    """A UUID in any form libvirt accepts, in canonical form."""
    canonical = canonical_uuid(str(value))
    if canonical is None:
        raise BundleError(f"{what} {str(value)[:40]!r} is not a UUID")
    return canonical


class Bundle(Value):
    """The sealed state of a set of helpers.  UUIDs are kept in libvirt's canonical form."""

    __slots__ = ("states", "migration_id", "created_ms", "domain_uuid", "codec")

    def __init__(self, states: tuple[HelperState, ...], migration_id: str, created_ms: int,
                 domain_uuid: str | None = None, codec: Codec = Codec.NONE) -> None:
        seen: set[str] = set()
        for state in states:
            validate_id(state.id)
            if state.id in seen:
                raise BundleError(f"bundle has two records for helper {state.id!r}")
            seen.add(state.id)
        self.states = states
        self.migration_id = _uuid(migration_id, "migration id")
        self.created_ms = created_ms
        self.domain_uuid = None if domain_uuid is None else _uuid(domain_uuid, "domain UUID")
        self.codec = codec

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(s.id for s in self.states)

    @property
    def total_size(self) -> int:
        return sum(len(s.data) for s in self.states)

    def state_of(self, helper_id: str) -> HelperState | None:
        return next((s for s in self.states if s.id == helper_id), None)

    def encode(self, codec: Codec | None = None) -> bytes:
        return encode(self, self.codec if codec is None else codec)


def validate_id(helper_id: str) -> None:
    """Check a helper Id as org.qemu.VMState1 defines it: 1 to 255 bytes of UTF-8."""
    if not helper_id:
        raise BundleError("helper Id is empty")
    if len(helper_id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise BundleError(f"helper Id {helper_id[:40]!r}... is longer than {MAX_ID_BYTES} bytes")


def new_bundle(states: Iterable[HelperState], *, created_ms: int, migration_id: str,
               domain_uuid: str | None = None) -> Bundle:
    """A bundle with records sorted by Id, so equal states encode equally."""
    ordered = tuple(sorted(states, key=lambda s: s.id))
    return Bundle(ordered, migration_id, created_ms, domain_uuid)


def _compress(codec: Codec, data: bytes) -> bytes:
    if codec is Codec.NONE:
        return data
    if codec is Codec.ZLIB:
        return zlib.compress(data, 1)
    import lzma
    return lzma.compress(data, preset=0)


def _decompress(codec: Codec, stored: bytes, expected: int) -> bytes:
    if codec is Codec.NONE:
        return stored
    what = f"payload does not decompress ({codec.name.lower()})"
    if codec is Codec.ZLIB:
        inflater = zlib.decompressobj()
        try:
            data = inflater.decompress(stored, expected + 1)
        except zlib.error as e:
            raise BundleError(f"{what}: {e}") from e
        complete = inflater.eof and not inflater.unconsumed_tail
    else:
        import lzma  # here only: the proxy decodes zlib bundles inside the downtime
        decoder = lzma.LZMADecompressor()
        try:
            data = decoder.decompress(stored, expected + 1)
        except lzma.LZMAError as e:
            raise BundleError(f"{what}: {e}") from e
        complete = decoder.eof
    if len(data) != expected or not complete:
        raise BundleError(f"payload decompresses to a different size than its records declare "
                          f"({codec.name.lower()})")
    return data


def encode(bundle: Bundle, codec: Codec = Codec.NONE) -> bytes:
    """Seal a bundle into bytes."""
    domain = uuid_bytes(bundle.domain_uuid) if bundle.domain_uuid else _NIL_UUID
    parts = [_HEAD.pack(MAGIC, FORMAT_VERSION, int(codec), len(bundle.states), domain,
                        uuid_bytes(bundle.migration_id), bundle.created_ms)]
    for state in bundle.states:
        raw_id = state.id.encode("utf-8", "surrogatepass")
        parts += [_U8.pack(len(raw_id)), raw_id, _U64.pack(len(state.data)),
                  hashlib.sha256(state.data).digest()]
    if codec is Codec.NONE:
        # The states go in as they are: no joined copy of a payload that may be large.
        payload = [s.data for s in bundle.states]
    else:
        payload = [_compress(codec, b"".join(s.data for s in bundle.states))]
    parts.append(_U64.pack(sum(len(p) for p in payload)))
    parts += payload
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    parts.append(digest.digest())
    return b"".join(parts)


class _Reader:
    """Bounds-checked reads over the bytes actually present."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if n > len(self.data) - self.pos:
            raise BundleError(f"bundle is truncated: {what} needs {n} bytes at offset "
                              f"{self.pos}, only {len(self.data) - self.pos} present")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk


def decode(data: bytes, *, max_size: int) -> Bundle:
    """Check and decode a sealed bundle; raise BundleError naming the failed check."""
    if len(data) > max_size:
        raise BundleError(f"bundle is {len(data)} bytes, over the cap of {max_size} bytes")
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise BundleError("not a virt-vmstate bundle (bad magic)")
    if len(data) < _HEAD.size + _U64.size + DIGEST_SIZE:
        raise BundleError(f"bundle is truncated: {len(data)} bytes is shorter than any bundle")
    _, version, codec_num, count, domain, migration, created_ms = _HEAD.unpack_from(data)
    if version != FORMAT_VERSION:
        raise BundleError(f"bundle format version {version} is not supported "
                          f"(this virt-vmstate reads version {FORMAT_VERSION})",
                          hint="use the same virt-vmstate version on both hosts")
    try:
        codec = Codec(codec_num)
    except ValueError:
        raise BundleError(f"bundle uses unknown codec {codec_num}") from None
    body = memoryview(data)[:-DIGEST_SIZE]
    if hashlib.sha256(body).digest() != data[-DIGEST_SIZE:]:
        raise BundleError("bundle digest mismatch: the bundle was changed or cut short in transit")

    reader = _Reader(body)
    reader.pos = _HEAD.size
    records = []
    declared = 0
    for index in range(count):
        (id_len,) = _U8.unpack(reader.take(_U8.size, f"record {index} Id length"))
        raw_id = bytes(reader.take(id_len, f"record {index} Id"))
        try:
            helper_id = raw_id.decode("utf-8")
        except UnicodeDecodeError:
            raise BundleError(f"record {index} has an Id that is not UTF-8") from None
        (length,) = _U64.unpack(reader.take(_U64.size, f"record {helper_id!r} length"))
        digest = bytes(reader.take(DIGEST_SIZE, f"record {helper_id!r} digest"))
        declared += length
        if declared > max_size:
            raise BundleError(f"records declare {declared} bytes of state, over the cap of "
                              f"{max_size} bytes")
        records.append((helper_id, length, digest))
    (stored_len,) = _U64.unpack(reader.take(_U64.size, "payload length"))
    stored = reader.take(stored_len, "payload")
    if reader.pos != len(body):
        raise BundleError(f"bundle has {len(body) - reader.pos} unexpected bytes after its payload")
    if codec is Codec.NONE:
        if len(stored) != declared:
            raise BundleError(f"payload is {len(stored)} bytes, records declare {declared}")
        payload = stored
    else:
        payload = memoryview(_decompress(codec, bytes(stored), declared))

    states = []
    offset = 0
    for helper_id, length, digest in records:
        chunk = payload[offset:offset + length]
        offset += length
        if hashlib.sha256(chunk).digest() != digest:
            raise BundleError(f"state of helper {helper_id!r} does not match its digest")
        states.append(HelperState(helper_id, bytes(chunk)))
    return Bundle(tuple(states), uuid_text(bytes(migration)), created_ms,
                  None if domain == _NIL_UUID else uuid_text(bytes(domain)), codec)


def check_fresh(bundle: Bundle, *, domain_uuid: str | None, now_ms: int,
                max_age_s: float, max_skew_s: float = 60.0) -> None:
    """Refuse a bundle for another domain, or one too old (a replay) or from the future."""
    if domain_uuid is not None:
        domain_uuid = _uuid(domain_uuid, "domain UUID")
        if bundle.domain_uuid != domain_uuid:
            bound = bundle.domain_uuid or "no domain"
            raise BundleError(f"bundle belongs to {bound}, not to domain {domain_uuid}",
                              hint="save the state of this domain on its source host")
    age_s = (now_ms - bundle.created_ms) / 1000.0
    if age_s > max_age_s:
        raise BundleError(f"bundle is {age_s:.0f} s old, older than the allowed "
                          f"{max_age_s:.0f} s (limits.max_bundle_age)",
                          hint="stale state is never loaded; save the state again and migrate")
    if age_s < -max_skew_s:
        raise BundleError(f"bundle is dated {-age_s:.0f} s in the future",
                          hint="check that both hosts' clocks are synchronised")


def check_ids(bundle: Bundle, required: Sequence[str]) -> None:
    """Every required helper Id has a record."""
    missing = set(required) - set(bundle.ids)
    if missing:
        raise MissingHelpersError("bundle has no state for required helpers", missing)
