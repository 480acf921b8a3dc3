"""The stream carrier: helper state inside QEMU's own migration stream.  Pure code, no I/O.

QEMU's ``dbus-vmstate`` object Saves every ``org.qemu.VMState1`` owner on its bus
while the vCPUs are stopped at switchover, and Loads them on the destination
before it runs; the state travels in QEMU's migration stream and save images.
virt-vmstate gives that object a bus of its own (the proxy bus) on which the
only helper is virt-vmstate's proxy; the proxy Saves and Loads the real helpers
on the domain's helper bus, concurrently, and hands QEMU one sealed bundle.

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
import json
import struct
import uuid
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from typing import TYPE_CHECKING

from .domxml import (DomainXML, commandline_insert, incoming_element, metadata_insert, object_edits,
                     splice)
from .errors import BundleError

if TYPE_CHECKING:  # the hook's XML work needs none of the bundle code
    from .bundle import Bundle, Codec

PROXY_ID = "virt-vmstate"          # the proxy's org.qemu.VMState1 Id, QEMU's whole id-list
QOM_ID = "virt-vmstate"            # the object's id inside QEMU
QEMU_STATE_CAP = 1024 * 1024       # QEMU's DBUS_VMSTATE_SIZE_LIMIT for one helper's Save reply
QEMU_CALL_TIMEOUT = 25.0           # GDBus' default, which QEMU uses for Save and Load

REF_MAGIC = b"\x89VMSTREF"
REF_VERSION = 1
PLACES = ("spool", "local")
_REF_HEAD = struct.Struct(">8sHB16sQ32sB")
_DIGEST = 32


def object_properties(address: str) -> Dict[str, str]:
    return {"qom-type": "dbus-vmstate", "id": QOM_ID, "addr": address, "id-list": PROXY_ID}


def object_arg(address: str) -> str:
    """The ``-object`` argument that gives QEMU the object, talking to the proxy bus at ``address``."""
    return json.dumps(object_properties(address), separators=(",", ":"))


def qmp_object_add(address: str) -> str:
    return json.dumps({"execute": "object-add", "arguments": object_properties(address)})


def qmp_object_del() -> str:
    return json.dumps({"execute": "object-del", "arguments": {"id": QOM_ID}})


def qmp_error(reply: str) -> Optional[str]:
    """The error of a QMP reply (libvirt reports success either way), or None."""
    try:
        data = json.loads(reply)
    except ValueError:
        return f"not a QMP reply: {reply[:200]!r}"
    error = data.get("error") if isinstance(data, dict) else None
    if error is None:
        return None
    if isinstance(error, dict):
        return f"{error.get('class', 'Error')}: {error.get('desc', '')}"
    return str(error)


def object_address(dom: DomainXML) -> Optional[str]:
    """The ``addr`` of the domain's dbus-vmstate object on its command line, if any."""
    for _, value in dom.dbus_vmstate_args():
        text = value.value.strip()
        if text.startswith("{"):
            try:
                addr = json.loads(text).get("addr")
            except ValueError:
                return None
            return addr if isinstance(addr, str) else None
        for part in text.split(","):
            key, _, val = part.partition("=")
            if key == "addr":
                return val
    return None


def incoming_xml(doc: bytes, dom: DomainXML, address: str, token: str, kind: str,
                 *, with_object: bool) -> bytes:
    """The XML an incoming migration or restore runs with on this host.

    Any carried pre-copy state, live stream marker and earlier incoming marker
    go; the object (when ``with_object``) is this host's, pointing at its proxy
    bus; a new incoming marker binds the later hooks to this migration.
    """
    edits = object_edits(dom)
    for span in (dom.state_span, dom.incoming.span if dom.incoming else None):
        if span is not None:
            edits.append((span[0], span[1], b""))
    edits.append(metadata_insert(dom, doc, incoming_element(token, kind)))
    if with_object:
        edits.append(commandline_insert(dom, doc, ["-object", object_arg(address)]))
    return splice(doc, edits)


def definition_xml(doc: bytes, dom: DomainXML, address: Optional[str]) -> bytes:
    """A domain definition with the object pointing at ``address``, or with none (None)."""
    edits = object_edits(dom)
    if dom.incoming is not None:
        edits.append((dom.incoming.span[0], dom.incoming.span[1], b""))
    if address is not None:
        edits.append(commandline_insert(dom, doc, ["-object", object_arg(address)]))
    return splice(doc, edits)


# -- what the proxy hands QEMU --------------------------------------------------

@dataclass(frozen=True)
class Reference:
    """Where the bundle is when it was too big for QEMU's cap."""

    place: str
    name: str
    size: int
    sha256: bytes
    domain_uuid: uuid.UUID


def inline_encoding(sealed: Bundle) -> Tuple[Codec, bytes]:
    """The bundle as the proxy would return it inline: zlib when a probe says it pays."""
    from .bundle import Codec
    from .carrier import worth_compressing
    sample = b"".join(s.data[:65536] for s in sealed.states)[:65536]
    codec = Codec.ZLIB if worth_compressing(sample) else Codec.NONE
    return codec, sealed.encode(codec)


def reference_file_name(sealed: Bundle) -> str:
    return f"{sealed.domain_uuid or 'unbound'}-{sealed.migration_id}.stream.vmstate"


def encode_reference(ref: Reference) -> bytes:
    name = ref.name.encode("ascii")
    head = _REF_HEAD.pack(REF_MAGIC, REF_VERSION, PLACES.index(ref.place), ref.domain_uuid.bytes,
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
    return Reference(PLACES[place], name, size, sha, uuid.UUID(bytes=domain))


@dataclass(frozen=True)
class Reply:
    """What the proxy's Save hands QEMU for one sealed bundle."""

    inline: bool           # the bundle itself; else a reference to ``bundle`` written as a file
    codec: Codec
    bundle: bytes          # the encoded bundle
    place: Optional[str]   # where a referenced bundle goes: 'spool' or 'local'

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
