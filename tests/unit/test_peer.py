"""The proxy's side of D-Bus without a dbus-daemon: authentication and the bus's own answers.

What GDBus (QEMU's object) and jeepney send is checked here line by line; that a real QEMU
migrates through it is tests/integration/test_proxy.py's and the end-to-end tests' to show.
"""

from __future__ import annotations

import pytest
from jeepney import DBusAddress, HeaderFields, MessageType, new_method_call
from jeepney.auth import BEGIN, Authenticator

from virt_vmstate.bus.exported import method_call
from virt_vmstate.bus.peer import BUS_NAME, OWN_UNIQUE_NAME, ServerAuth, driver_reply
from virt_vmstate.bus.vmstate1 import WELL_KNOWN_NAME

GUID = "0" * 32
BUS = DBusAddress("/org/freedesktop/DBus", bus_name=BUS_NAME, interface="org.freedesktop.DBus")


def hex_uid(uid: int) -> bytes:
    return str(uid).encode().hex().encode()


def test_gdbus_handshake_lists_mechanisms_then_external_with_its_uid():
    auth = ServerAuth(107, GUID)
    assert auth.feed(b"\0AUTH\r\n") == b"REJECTED EXTERNAL\r\n"
    assert auth.feed(b"AUTH EXTERNAL " + hex_uid(107) + b"\r\n") == b"OK " + GUID.encode() + b"\r\n"
    assert auth.feed(b"NEGOTIATE_UNIX_FD\r\n").startswith(b"ERROR")
    assert not auth.done
    assert auth.feed(b"BEGIN\r\nl\1\0\1") == b""
    assert auth.done and auth.failed is None
    assert auth.leftover == b"l\1\0\1"  # the first message's bytes, sent with BEGIN


def test_external_without_an_initial_response_asks_for_it():
    auth = ServerAuth(0, GUID)
    assert auth.feed(b"\0AUTH EXTERNAL\r\n") == b"DATA\r\n"
    assert auth.feed(b"DATA\r\n").startswith(b"OK ")  # no identity: the connection's own
    auth.feed(b"BEGIN\r\n")
    assert auth.done


def test_jeepney_authenticates_byte_by_byte():
    auth, client = ServerAuth(0, GUID), Authenticator()
    for line in client:
        answer = b"".join(auth.feed(bytes([byte])) for byte in line)
        client.feed(answer)
    auth.feed(BEGIN)
    assert client.authenticated and auth.done


@pytest.mark.parametrize("lines, why", [
    ([b"AUTH EXTERNAL " + hex_uid(0) + b"\r\n"], "no NUL byte"),
    ([b"\0" + b"x" * 20000], "too long"),
])
def test_a_client_that_breaks_the_protocol_fails(lines, why):
    auth = ServerAuth(0, GUID)
    for line in lines:
        auth.feed(line)
    assert auth.failed and why in auth.failed


def test_another_identity_and_other_mechanisms_are_rejected():
    auth = ServerAuth(107, GUID)
    assert auth.feed(b"\0AUTH EXTERNAL " + hex_uid(0) + b"\r\n") == b"REJECTED EXTERNAL\r\n"
    assert auth.feed(b"AUTH ANONYMOUS\r\n") == b"REJECTED EXTERNAL\r\n"
    assert auth.feed(b"AUTH EXTERNAL zz\r\n") == b"REJECTED EXTERNAL\r\n"
    assert auth.feed(b"BEGIN\r\n").startswith(b"ERROR")  # not before OK
    assert not auth.done


def call(member: str, *args: str, destination: str = BUS_NAME):
    address = BUS if destination == BUS_NAME else DBusAddress("/org/qemu/VMState1", destination,
                                                              "org.qemu.VMState1")
    msg = new_method_call(address, member, "s" * len(args) if args else None, args)
    return method_call(msg)


def body(member: str, *args: str):
    reply = driver_reply(call(member, *args), ":1.5", (WELL_KNOWN_NAME,))
    assert reply is not None and reply.header.message_type is MessageType.method_return, reply
    return reply.body


def error(member: str, *args: str) -> str:
    reply = driver_reply(call(member, *args), ":1.5", (WELL_KNOWN_NAME,))
    assert reply is not None and reply.header.message_type is MessageType.error
    return reply.header.fields[HeaderFields.error_name]


def test_the_bus_answers_what_qemus_object_asks():
    assert body("Hello") == (":1.5",)
    assert body("AddMatch", "type='signal'") == ()
    assert body("GetNameOwner", BUS_NAME) == (BUS_NAME,)
    assert body("ListQueuedOwners", WELL_KNOWN_NAME) == ([OWN_UNIQUE_NAME],)
    assert body("GetNameOwner", WELL_KNOWN_NAME) == (OWN_UNIQUE_NAME,)
    assert body("NameHasOwner", "org.example.Other") == (False,)


def test_start_service_answers_already_running_for_the_one_name_owned():
    msg = new_method_call(BUS, "StartServiceByName", "su", (WELL_KNOWN_NAME, 0))
    reply = driver_reply(method_call(msg), ":1.5", (WELL_KNOWN_NAME,))
    assert reply is not None and reply.body == (2,)
    msg = new_method_call(BUS, "StartServiceByName", "su", ("org.example.Other", 0))
    reply = driver_reply(method_call(msg), ":1.5", (WELL_KNOWN_NAME,))
    assert reply is not None and reply.header.fields[HeaderFields.error_name].endswith("ServiceUnknown")


def test_no_other_name_exists_and_none_may_be_owned():
    assert error("ListQueuedOwners", "org.example.Other").endswith("NameHasNoOwner")
    assert error("GetNameOwner", "org.example.Other").endswith("NameHasNoOwner")
    assert error("RequestName", WELL_KNOWN_NAME).endswith("AccessDenied")
    assert error("UpdateActivationEnvironment").endswith("UnknownMethod")


def test_calls_to_the_object_are_left_to_the_proxy():
    assert driver_reply(call("Save", destination=OWN_UNIQUE_NAME), ":1.5", (WELL_KNOWN_NAME,)) is None
    assert driver_reply(call("Save", destination=WELL_KNOWN_NAME), ":1.5", (WELL_KNOWN_NAME,)) is None
