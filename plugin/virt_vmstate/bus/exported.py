"""The serving side of D-Bus, for an object of our own (the proxy's): the method calls it
receives, its replies and errors, owning its name, and following other names' owners."""

from __future__ import annotations

from jeepney import HeaderFields, Message, MessageType, new_error, new_method_return
from jeepney.bus_messages import MatchRule, message_bus

from ..core.values import Value

DO_NOT_QUEUE = 4     # RequestName's flag: fail rather than wait in the queue
PRIMARY_OWNER = 1    # RequestName's answer: the name is ours


class MethodCall(Value):
    """A method call addressed to us, and the message to answer."""

    __slots__ = ("interface", "member", "path", "signature", "body", "message")

    def __init__(self, interface: str | None, member: str | None, path: str | None,
                 signature: str | None, body: tuple[object, ...], message: Message) -> None:
        self.interface = interface
        self.member = member
        self.path = path
        self.signature = signature
        self.body = body
        self.message = message


def method_call(msg: Message) -> MethodCall | None:
    """The call ``msg`` makes; None for a message that is not a method call."""
    if msg.header.message_type is not MessageType.method_call:
        return None
    fields = msg.header.fields
    return MethodCall(fields.get(HeaderFields.interface), fields.get(HeaderFields.member),
                      fields.get(HeaderFields.path), fields.get(HeaderFields.signature),
                      tuple(msg.body), msg)


def method_return(call: MethodCall, signature: str | None = None, body: tuple[object, ...] = ()) -> Message:
    return new_method_return(call.message, signature, body)


def error_reply(call: MethodCall, name: str, text: str) -> Message:
    return new_error(call.message, name, "s", (text,))


def request_name(name: str) -> Message:
    """Ask the bus for ``name``, never to wait in its queue: the reply's body is
    ``(PRIMARY_OWNER,)`` when it is ours."""
    return message_bus.RequestName(name, DO_NOT_QUEUE)


def watch_name_owners() -> Message:
    """Ask the bus to signal every change of a name's owner (NameOwnerChanged)."""
    return message_bus.AddMatch(MatchRule(type="signal", sender="org.freedesktop.DBus",
                                          member="NameOwnerChanged"))
