"""The stream carrier: helper state inside QEMU's own migration stream.  Pure code, no I/O.

QEMU's ``dbus-vmstate`` object Saves every ``org.qemu.VMState1`` owner on its bus
while the vCPUs are stopped at switchover, and Loads them on the destination
before it runs; the state travels in QEMU's migration stream and save images.
virt-vmstate points that object at its proxy, which answers it as a bus of its
own on which the proxy is the only helper (``bus/peer.py``); the proxy Saves and Loads the real helpers
on the domain's helper bus, concurrently, and hands QEMU one sealed bundle.

The proxy's reply to QEMU, and its reference format past QEMU's cap, are in
``streamreply``; this module is what the hook needs: the object in the domain
XML and over QMP.
"""

from __future__ import annotations

import json

from .domxml import (DomainXML, commandline_insert, incoming_element, metadata_insert, object_edits,
                     object_json, splice)

PROXY_ID = "virt-vmstate"          # the proxy's org.qemu.VMState1 Id, QEMU's whole id-list
QOM_ID = "virt-vmstate"            # the object's id inside QEMU


def object_properties(address: str) -> dict[str, str]:
    return {"qom-type": "dbus-vmstate", "id": QOM_ID, "addr": address, "id-list": PROXY_ID}


def object_arg(address: str) -> str:
    """The ``-object`` argument that gives QEMU the object, talking to the proxy at ``address``."""
    return json.dumps(object_properties(address), separators=(",", ":"), ensure_ascii=False)


def qmp_object_add(address: str) -> str:
    return json.dumps({"execute": "object-add", "arguments": object_properties(address)})


def qmp_object_del() -> str:
    return json.dumps({"execute": "object-del", "arguments": {"id": QOM_ID}})


def qmp_error(reply: str) -> str | None:
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


def object_address(dom: DomainXML) -> str | None:
    """The ``addr`` of the domain's dbus-vmstate object on its command line, if any."""
    for _, value in dom.dbus_vmstate_args():
        text = value.value.strip()
        if text.startswith("{"):
            obj = object_json(text)
            addr = obj.get("addr") if isinstance(obj, dict) else None
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


def definition_xml(doc: bytes, dom: DomainXML, address: str | None) -> bytes:
    """A domain definition with the object pointing at ``address``, or with none (None)."""
    edits = object_edits(dom)
    if dom.incoming is not None:
        edits.append((dom.incoming.span[0], dom.incoming.span[1], b""))
    if address is not None:
        edits.append(commandline_insert(dom, doc, ["-object", object_arg(address)]))
    return splice(doc, edits)
