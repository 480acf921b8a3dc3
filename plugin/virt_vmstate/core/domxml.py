"""virt-vmstate's elements in a libvirt domain XML.  Pure code, no I/O.

Two elements live in the domain's ``<metadata>``, each in its own namespace,
so that ``virDomainSetMetadata`` can replace one without touching the other:

    <vmstate:vmstate xmlns:vmstate="urn:x-virt-vmstate:domain:1">
      <vmstate:bus mode="managed"/>               (or "libvirt", or "address" address="unix:...")
      <vmstate:missing-state policy="refuse"/>    (or "fresh")
      <vmstate:helper id="slirp0" profile="slirp"/>
    </vmstate:vmstate>

    <vmstate-state:state xmlns:vmstate-state="urn:x-virt-vmstate:state:1"
        carrier="xml" size="..." sha256="...">BASE64 BUNDLE</vmstate-state:state>

Two more are written by virt-vmstate itself, into a running domain's live XML:

    <vmstate-stream:stream xmlns:vmstate-stream="urn:x-virt-vmstate:stream:1" object="yes"/>
        whether the running QEMU has the dbus-vmstate object (hot-added or
        deleted since it started, so its command line no longer says)
    <vmstate-in:incoming xmlns:vmstate-in="urn:x-virt-vmstate:incoming:1" token="..." kind="migration"/>
        which incoming migration or restore this XML belongs to

and the stream carrier's object is one ``-object`` argument pair in the domain's
``<qemu:commandline>``.

The XML comes from another host: it may name helpers and host profiles, never
carry a command, and any attribute or element not listed here is refused.
Stripping the state splices bytes out of the original document, so every
other byte libvirt gave us comes back unchanged.
"""

from __future__ import annotations

import xml.parsers.expat

from ..errors import DomainXMLError
from .names import canonical_uuid, is_hex, is_name
from .values import Value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Sequence

    Span = tuple[int, int]

NS_CONFIG = "urn:x-virt-vmstate:domain:1"
NS_STATE = "urn:x-virt-vmstate:state:1"
NS_STREAM = "urn:x-virt-vmstate:stream:1"
NS_INCOMING = "urn:x-virt-vmstate:incoming:1"
NS_QEMU = "http://libvirt.org/schemas/domain/qemu/1.0"
MARKER = b"urn:x-virt-vmstate:"  # present in every domain XML that is ours

BUS_MODES = ("managed", "libvirt", "address")
POLICIES = ("refuse", "fresh")
MAX_ID_BYTES = 255
INCOMING_KINDS = ("migration", "restore")


def is_spool_name(name: str) -> bool:
    return is_name(name, 128)


class HelperSpec(Value):
    __slots__ = ("id", "profile")

    def __init__(self, id: str, profile: str | None = None) -> None:
        self.id = id
        self.profile = profile


class DomainConfig(Value):
    __slots__ = ("helpers", "bus_mode", "bus_address", "missing_state")

    def __init__(self, helpers: tuple[HelperSpec, ...] = (), bus_mode: str = "managed",
                 bus_address: str | None = None, missing_state: str = "refuse") -> None:
        self.helpers = helpers
        self.bus_mode = bus_mode
        self.bus_address = bus_address
        self.missing_state = missing_state

    @property
    def required_ids(self) -> tuple[str, ...]:
        return tuple(h.id for h in self.helpers)


class StateElement(Value):
    """The state a migration carries: the bundle itself, or where the spool holds it."""

    __slots__ = ("carrier", "size", "sha256", "bundle", "spool_file")

    def __init__(self, carrier: str, size: int, sha256: str, bundle: bytes = b"",
                 spool_file: str | None = None) -> None:
        self.carrier = carrier
        self.size = size
        self.sha256 = sha256
        self.bundle = bundle
        self.spool_file = spool_file


class QemuArg(Value):
    """One ``<qemu:arg value=.../>`` of the domain's ``<qemu:commandline>``."""

    __slots__ = ("value", "span")

    def __init__(self, value: str, span: Span) -> None:
        self.value = value
        self.span = span


class Incoming(Value):
    """The incoming migration or restore that a hook's XML belongs to."""

    __slots__ = ("token", "kind", "span")

    def __init__(self, token: str, kind: str, span: Span) -> None:
        self.token = token
        self.kind = kind
        self.span = span


class DomainXML(Value):
    """What virt-vmstate reads from a domain XML; spans are byte ranges of the document."""

    __slots__ = ("name", "uuid", "id", "config", "state", "state_span", "metadata_span",
                 "metadata_empty", "domain_end", "qemu_args", "commandline_span", "commandline_empty",
                 "stream_object", "stream_span", "incoming", "security_models", "selinux_image_label")

    def __init__(self, name: str, uuid: str, id: int | None, config: DomainConfig | None,
                 state: StateElement | None, state_span: Span | None, metadata_span: Span | None,
                 metadata_empty: bool, domain_end: int, qemu_args: tuple[QemuArg, ...] = (),
                 commandline_span: Span | None = None, commandline_empty: bool = False,
                 stream_object: bool | None = None, stream_span: Span | None = None,
                 incoming: Incoming | None = None, security_models: tuple[str, ...] = (),
                 selinux_image_label: str | None = None) -> None:
        self.name = name
        self.uuid = uuid  # lowercase 8-4-4-4-12, as libvirt writes it
        self.id = id
        self.config = config
        self.state = state
        self.state_span = state_span
        self.metadata_span = metadata_span
        self.metadata_empty = metadata_empty
        self.domain_end = domain_end
        self.qemu_args = qemu_args
        self.commandline_span = commandline_span
        self.commandline_empty = commandline_empty
        self.stream_object = stream_object  # the live marker: None when there is none
        self.stream_span = stream_span
        self.incoming = incoming
        # The security drivers that label the domain's QEMU (its <seclabel>s that are not
        # type "none"): "apparmor", "selinux", "dac".
        self.security_models = security_models
        # SELinux's label for what the domain's QEMU may use (its <imagelabel>, which libvirt
        # puts into the live XML by 'start begin'), as written: not validated.
        self.selinux_image_label = selinux_image_label

    def dbus_vmstate_args(self) -> list[tuple[QemuArg, QemuArg]]:
        """Every ``-object dbus-vmstate`` argument pair of the command line."""
        pairs = []
        for first, second in zip(self.qemu_args, self.qemu_args[1:]):
            if first.value == "-object" and is_dbus_vmstate(second.value):
                pairs.append((first, second))
        return pairs

    @property
    def has_stream_object(self) -> bool:
        """Whether the QEMU this XML describes has the dbus-vmstate object.

        The live marker, when there is one, says what the running QEMU has now;
        otherwise its command line does.
        """
        if self.stream_object is not None:
            return self.stream_object
        return bool(self.dbus_vmstate_args())


def is_dbus_vmstate(value: str) -> bool:
    """Whether a ``-object`` argument (JSON or key=value form) creates a dbus-vmstate object."""
    text = value.strip()
    if text.startswith("{"):
        obj = object_json(text)
        return isinstance(obj, dict) and obj.get("qom-type") == "dbus-vmstate"
    return text.split(",", 1)[0] in ("dbus-vmstate", "qom-type=dbus-vmstate")


def object_json(text: str) -> object:
    """A ``-object`` argument's JSON (None if it is not JSON)."""
    import json
    try:
        return json.loads(text)
    except ValueError:
        return None


def quoteattr(value: str) -> str:
    """A double-quoted XML attribute value (xml.sax.saxutils pulls in urllib and ssl)."""
    return '"' + xml_text(value).replace('"', "&quot;") + '"'


def xml_text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _tag_end(doc: bytes, start: int) -> int:
    """Index just past the '>' closing the tag that starts at ``start`` (quotes respected)."""
    pos = start
    while True:
        end = doc.find(b">", pos)
        if end < 0:
            break
        quotes = [q for q in (doc.find(b'"', pos, end), doc.find(b"'", pos, end)) if q >= 0]
        if not quotes:
            return end + 1
        opened = min(quotes)
        closed = doc.find(doc[opened:opened + 1], opened + 1)
        if closed < 0:
            break
        pos = closed + 1
    raise DomainXMLError("unterminated tag in domain XML")


_SPANNED = frozenset({"metadata", f"{NS_STATE} state", f"{NS_STREAM} stream", f"{NS_INCOMING} incoming",
                      f"{NS_QEMU} commandline", f"{NS_QEMU} arg"})


class _Reader:
    """One expat pass collecting what virt-vmstate needs from a domain XML."""

    def __init__(self, doc: bytes) -> None:
        self.doc = doc
        self.path: list[str] = []
        self.starts: list[int] = []
        self.text: list[str] = []
        self.name: str | None = None
        self.uuid: str | None = None
        self.dom_id: str | None = None
        self.config_seen = 0
        self.helpers: list[HelperSpec] = []
        self.bus: dict[str, str] = {}
        self.policy: str | None = None
        self.state_attrs: dict[str, str] | None = None
        self.state_text: list[str] = []
        self.state_span: Span | None = None
        self.metadata_span: Span | None = None
        self.metadata_empty = False
        self.domain_end = -1
        self.qemu_args: list[QemuArg] = []
        self.commandline_span: Span | None = None
        self.commandline_empty = False
        self.commandline_seen = 0
        self.stream_attrs: dict[str, str] | None = None
        self.stream_span: Span | None = None
        self.incoming_attrs: dict[str, str] | None = None
        self.incoming_span: Span | None = None
        self.arg_value: str | None = None
        self.security_models: list[str] = []
        self.selinux_image_label: str | None = None
        self.selinux_seclabel = False  # inside a <seclabel> of SELinux's
        self.parser = xml.parsers.expat.ParserCreate(namespace_separator=" ")
        p = self.parser
        p.buffer_text = True
        p.buffer_size = 1 << 20
        p.StartElementHandler = self.start
        p.EndElementHandler = self.end
        p.CharacterDataHandler = self.chars
        p.StartDoctypeDeclHandler = self.forbid
        p.EntityDeclHandler = self.forbid

    def forbid(self, *args: object) -> None:
        raise DomainXMLError("domain XML must not contain a DOCTYPE or entity declarations")

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        depth = len(self.path)
        self.path.append(tag)
        self.starts.append(self.parser.CurrentByteIndex)
        self.text = []
        if depth == 0:
            if tag != "domain":
                raise DomainXMLError(f"root element is <{tag}>, not <domain>")
            self.dom_id = attrs.get("id")
        elif depth == 1 and tag == "seclabel":
            model = attrs.get("model", "")
            self.selinux_seclabel = model == "selinux" and attrs.get("type") != "none"
            if attrs.get("type") != "none" and model and model not in self.security_models:
                self.security_models.append(model)
        elif depth == 2 and self.path[1] == "metadata":
            if tag == f"{NS_CONFIG} vmstate":
                self.config_seen += 1
                _only(attrs, (), "vmstate")
            elif tag == f"{NS_STATE} state":
                if self.state_attrs is not None:
                    raise DomainXMLError("domain XML carries two virt-vmstate state elements")
                self.state_attrs = dict(attrs)
            elif tag == f"{NS_STREAM} stream":
                if self.stream_attrs is not None:
                    raise DomainXMLError("domain XML has two virt-vmstate stream elements")
                _only(attrs, ("object",), "stream")
                self.stream_attrs = dict(attrs)
            elif tag == f"{NS_INCOMING} incoming":
                if self.incoming_attrs is not None:
                    raise DomainXMLError("domain XML has two virt-vmstate incoming elements")
                _only(attrs, ("token", "kind"), "incoming")
                self.incoming_attrs = dict(attrs)
        elif depth == 1 and tag == f"{NS_QEMU} commandline":
            self.commandline_seen += 1
        elif depth == 2 and self.path[1] == f"{NS_QEMU} commandline" and tag == f"{NS_QEMU} arg":
            self.arg_value = attrs.get("value", "")
        elif depth == 3 and self.path[2] == f"{NS_CONFIG} vmstate":
            self.config_child(tag, attrs)
        elif depth > 2 and self.path[2].startswith(NS_CONFIG + " "):
            raise DomainXMLError(f"unexpected element <{_local(tag)}> inside virt-vmstate metadata")
        elif depth == 3 and self.path[2] == f"{NS_STATE} state":
            raise DomainXMLError("unexpected element inside the virt-vmstate state element")

    def config_child(self, tag: str, attrs: dict[str, str]) -> None:
        local = _local(tag)
        if not tag.startswith(NS_CONFIG + " "):
            raise DomainXMLError(f"unexpected element <{local}> inside virt-vmstate metadata")
        if local == "helper":
            _only(attrs, ("id", "profile"), "helper")
            helper_id = attrs.get("id", "")
            if not helper_id or len(helper_id.encode("utf-8")) > MAX_ID_BYTES:
                raise DomainXMLError("every <helper> needs an id of 1 to 255 bytes")
            profile = attrs.get("profile")
            if profile is not None and not is_name(profile):
                raise DomainXMLError(f"helper {helper_id!r}: profile {profile[:64]!r} is not a "
                                     "profile name (letters, digits, '_', '.', '-')")
            self.helpers.append(HelperSpec(helper_id, profile))
        elif local == "bus":
            _only(attrs, ("mode", "address"), "bus")
            self.bus = dict(attrs)
        elif local == "missing-state":
            _only(attrs, ("policy",), "missing-state")
            self.policy = attrs.get("policy", "refuse")
        else:
            raise DomainXMLError(f"unknown element <{local}> in virt-vmstate metadata")

    def end(self, tag: str) -> None:
        depth = len(self.path) - 1
        start = self.starts.pop()
        self.path.pop()
        if depth == 1 and tag in ("name", "uuid"):
            setattr(self, tag, "".join(self.text).strip())
        elif depth == 2 and tag == "imagelabel" and self.path[1] == "seclabel" and self.selinux_seclabel:
            self.selinux_image_label = "".join(self.text).strip()
        elif depth == 0:
            self.domain_end = self.parser.CurrentByteIndex
        elif depth <= 2 and tag in _SPANNED:
            self.span_of(depth, tag, start)
        self.text = []

    def span_of(self, depth: int, tag: str, start: int) -> None:
        """Where an element that may be edited starts and stops.  Only these: finding a
        tag's end takes a scan of its bytes."""
        start_tag_end = _tag_end(self.doc, start)
        empty = self.doc[start_tag_end - 2:start_tag_end] == b"/>"
        stop = start_tag_end if empty else _tag_end(self.doc, self.parser.CurrentByteIndex)
        if depth == 1 and tag == "metadata":
            self.metadata_span = (start, stop)
            self.metadata_empty = empty
        elif depth == 2 and tag == f"{NS_STATE} state":
            self.state_span = (start, stop)
            self.state_text = self.text
        elif depth == 2 and tag == f"{NS_STREAM} stream":
            self.stream_span = (start, stop)
        elif depth == 2 and tag == f"{NS_INCOMING} incoming":
            self.incoming_span = (start, stop)
        elif depth == 1 and tag == f"{NS_QEMU} commandline":
            self.commandline_span = (start, stop)
            self.commandline_empty = empty
        elif depth == 2 and tag == f"{NS_QEMU} arg" and self.arg_value is not None:
            self.qemu_args.append(QemuArg(self.arg_value, (start, stop)))
            self.arg_value = None

    def chars(self, data: str) -> None:
        self.text.append(data)


def _local(tag: str) -> str:
    return tag.rsplit(" ", 1)[-1]


def _only(attrs: dict[str, str], allowed: tuple[str, ...], element: str) -> None:
    extra = sorted(set(attrs) - set(allowed))
    if extra:
        raise DomainXMLError(
            f"<{element}> in virt-vmstate metadata has unknown attribute {extra[0]!r}",
            hint="domain XML may only name helpers and host profiles; commands are defined "
                 "in the host config of each host")


def _config(reader: _Reader) -> DomainConfig | None:
    if reader.config_seen == 0:
        return None
    if reader.config_seen > 1:
        raise DomainXMLError("domain XML has two virt-vmstate metadata elements")
    ids = [h.id for h in reader.helpers]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise DomainXMLError(f"helper Id {dupes[0]!r} is listed twice in virt-vmstate metadata")
    mode = reader.bus.get("mode", "managed")
    if mode not in BUS_MODES:
        raise DomainXMLError(f"bus mode {mode[:40]!r} is not one of {', '.join(BUS_MODES)}")
    address = reader.bus.get("address")
    if (mode == "address") != (address is not None):
        raise DomainXMLError("a bus address is given exactly when the bus mode is 'address'")
    if address is not None and not address.startswith("unix:"):
        raise DomainXMLError(f"bus address {address[:80]!r} is not a unix: D-Bus address")
    policy = reader.policy or "refuse"
    if policy not in POLICIES:
        raise DomainXMLError(f"missing-state policy {policy[:40]!r} is not one of {', '.join(POLICIES)}")
    if mode != "managed" and any(h.profile for h in reader.helpers):
        raise DomainXMLError("helper profiles can only be started on a managed bus")
    return DomainConfig(tuple(reader.helpers), mode, address, policy)


def _state(reader: _Reader) -> StateElement | None:
    attrs = reader.state_attrs
    if attrs is None:
        return None
    _only(attrs, ("carrier", "size", "sha256", "file"), "state")
    carrier = attrs.get("carrier", "xml")
    sha = attrs.get("sha256", "")
    if not is_hex(sha, 64):
        raise DomainXMLError("the state element's sha256 is not 64 lowercase hex digits")
    try:
        size = int(attrs.get("size", ""))
    except ValueError:
        raise DomainXMLError("the state element's size is not a number") from None
    if size < 0:
        raise DomainXMLError("the state element's size is negative")
    if carrier == "xml":
        import base64
        import binascii
        text = "".join(reader.state_text)
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise DomainXMLError("the state element is not valid base64",
                                 hint="the migration XML was damaged; save and migrate again") from None
        if len(data) != size:
            raise DomainXMLError(f"the state element holds {len(data)} bytes, its size says {size}")
        return StateElement("xml", size, sha, bundle=data)
    if carrier == "spool":
        name = attrs.get("file", "")
        if not is_spool_name(name):
            raise DomainXMLError(f"spool file name {name[:80]!r} is not a plain file name")
        return StateElement("spool", size, sha, spool_file=name)
    raise DomainXMLError(f"state carrier {carrier[:40]!r} is not 'xml' or 'spool'")


def _stream_object(reader: _Reader) -> bool | None:
    if reader.stream_attrs is None:
        return None
    value = reader.stream_attrs.get("object", "")
    if value not in ("yes", "no"):
        raise DomainXMLError(f"the stream element's object is {value[:20]!r}, not 'yes' or 'no'")
    return value == "yes"


def _incoming(reader: _Reader) -> Incoming | None:
    attrs = reader.incoming_attrs
    if attrs is None or reader.incoming_span is None:
        return None
    token, kind = attrs.get("token", ""), attrs.get("kind", "")
    if not is_hex(token, 32) or kind not in INCOMING_KINDS:
        raise DomainXMLError("the incoming element needs a 32-digit hex token and a kind of "
                             f"{' or '.join(INCOMING_KINDS)}")
    return Incoming(token, kind, reader.incoming_span)


def parse_domain(doc: bytes) -> DomainXML:
    """Read name, UUID, virt-vmstate config and state from a domain XML."""
    reader = _Reader(doc)
    try:
        reader.parser.Parse(doc, True)
    except xml.parsers.expat.ExpatError as e:
        raise DomainXMLError(f"domain XML is not well-formed: {e}") from None
    except RecursionError:
        raise DomainXMLError("domain XML is nested too deeply") from None
    if not reader.name:
        raise DomainXMLError("domain XML has no <name>")
    dom_uuid = canonical_uuid(reader.uuid or "")
    if dom_uuid is None:
        raise DomainXMLError(f"domain XML has no valid <uuid> ({(reader.uuid or '')[:40]!r})")
    dom_id = int(reader.dom_id) if reader.dom_id and reader.dom_id.isdigit() else None
    if reader.commandline_seen > 1:
        raise DomainXMLError("domain XML has two <qemu:commandline> elements")
    return DomainXML(reader.name, dom_uuid, dom_id, _config(reader), _state(reader),
                     reader.state_span, reader.metadata_span, reader.metadata_empty, reader.domain_end,
                     tuple(reader.qemu_args), reader.commandline_span, reader.commandline_empty,
                     _stream_object(reader), reader.stream_span, _incoming(reader),
                     tuple(reader.security_models), reader.selinux_image_label)


def splice(doc: bytes, edits: Sequence[tuple[int, int, bytes]]) -> bytes:
    """``doc`` with each (start, stop, replacement) applied; spans must not overlap."""
    out: list[bytes] = []
    pos = 0
    for start, stop, replacement in sorted(edits, key=lambda e: (e[0], e[1])):
        if start < pos:
            raise ValueError("overlapping edits")
        out += [doc[pos:start], replacement]
        pos = stop
    out.append(doc[pos:])
    return b"".join(out)


def metadata_insert(parsed: DomainXML, doc: bytes, element: bytes) -> tuple[int, int, bytes]:
    """The edit that adds ``element`` to the metadata (creating it if needed)."""
    if parsed.metadata_span is None:
        at = parsed.domain_end
        return (at, at, b"<metadata>" + element + b"</metadata>\n")
    start, stop = parsed.metadata_span
    if parsed.metadata_empty:
        return (start, stop, b"<metadata>" + element + b"</metadata>")
    close = doc.rindex(b"</", start, stop)
    return (close, close, element)


def commandline_insert(parsed: DomainXML, doc: bytes, args: Sequence[str]) -> tuple[int, int, bytes]:
    """The edit that appends ``args`` to ``<qemu:commandline>`` (creating it if needed)."""
    inner = "".join(f"<qemu:arg value={quoteattr(a)}/>" for a in args)
    element = f'<qemu:commandline xmlns:qemu="{NS_QEMU}">{inner}</qemu:commandline>'
    if parsed.commandline_span is None:
        at = parsed.domain_end
        return (at, at, element.encode() + b"\n")
    start, stop = parsed.commandline_span
    if parsed.commandline_empty:
        return (start, stop, element.encode())
    close = doc.rindex(b"</", start, stop)
    # Inside the existing element its own prefix applies; declare ours on each arg.
    return (close, close, "".join(f'<qemu:arg xmlns:qemu="{NS_QEMU}" value={quoteattr(a)}/>'
                                  for a in args).encode())


def incoming_element(token: str, kind: str) -> bytes:
    return (f'<vmstate-in:incoming xmlns:vmstate-in="{NS_INCOMING}" token="{token}" '
            f'kind="{kind}"/>').encode()


def stream_element(present: bool, *, bare: bool = False) -> str:
    """The live marker; ``bare`` as virDomainSetMetadata wants it."""
    value = "yes" if present else "no"
    if bare:
        return f'<stream object="{value}"/>'
    return f'<vmstate-stream:stream xmlns:vmstate-stream="{NS_STREAM}" object="{value}"/>'


def object_edits(parsed: DomainXML) -> list[tuple[int, int, bytes]]:
    """The edits that remove every dbus-vmstate object and the live stream marker."""
    edits = [(arg.span[0], arg.span[1], b"") for pair in parsed.dbus_vmstate_args() for arg in pair]
    if parsed.stream_span is not None:
        edits.append((parsed.stream_span[0], parsed.stream_span[1], b""))
    return edits


def strip_state(doc: bytes, parsed: DomainXML) -> bytes:
    """The same XML without the state element, every other byte unchanged."""
    if parsed.state_span is None:
        return doc
    start, stop = parsed.state_span
    return doc[:start] + doc[stop:]


def state_element(state: StateElement, *, bare: bool = False) -> str:
    """The state element as a string.

    ``bare`` leaves out the namespace, as virDomainSetMetadata wants it (libvirt
    puts the element into the namespace it is given).
    """
    tag = "state" if bare else "vmstate-state:state"
    ns = "" if bare else f' xmlns:vmstate-state="{NS_STATE}"'
    attrs = f'carrier="{state.carrier}" size="{state.size}" sha256="{state.sha256}"'
    if state.carrier == "spool":
        return f'<{tag}{ns} {attrs} file="{state.spool_file}"/>'
    import base64
    encoded = base64.b64encode(state.bundle).decode("ascii")
    return f"<{tag}{ns} {attrs}>{encoded}</{tag}>"


def insert_state(doc: bytes, state: StateElement) -> bytes:
    """The XML with ``state`` in its metadata, replacing any state already there."""
    parsed = parse_domain(doc)
    doc = strip_state(doc, parsed)
    parsed = parse_domain(doc)
    element = state_element(state).encode("ascii")
    if parsed.metadata_span is None:
        at = parsed.domain_end
        return doc[:at] + b"<metadata>" + element + b"</metadata>\n" + doc[at:]
    start, stop = parsed.metadata_span
    if parsed.metadata_empty:
        return doc[:start] + b"<metadata>" + element + b"</metadata>" + doc[stop:]
    close = doc.rindex(b"</", start, stop)
    return doc[:close] + element + doc[close:]


def config_element(config: DomainConfig) -> str:
    """The config element as a string, for virDomainSetMetadata or a domain definition."""
    lines = [f'<vmstate:vmstate xmlns:vmstate="{NS_CONFIG}">']
    bus = f'<vmstate:bus mode="{config.bus_mode}"'
    if config.bus_address:
        bus += f" address={quoteattr(config.bus_address)}"
    lines.append(f"  {bus}/>")
    lines.append(f'  <vmstate:missing-state policy="{config.missing_state}"/>')
    for h in config.helpers:
        profile = f" profile={quoteattr(h.profile)}" if h.profile else ""
        lines.append(f"  <vmstate:helper id={quoteattr(h.id)}{profile}/>")
    lines.append("</vmstate:vmstate>")
    return "\n".join(lines)
