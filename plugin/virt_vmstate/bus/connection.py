"""A blocking D-Bus client connection in which every step has a deadline.

Built on jeepney's I/O-free core (``Authenticator``, ``Parser``, ``Message``),
which is the same in jeepney 0.8 and 0.9.  jeepney's own blocking connection
bounds authentication but not the ``Hello`` call or a peer that stops reading,
so the socket handling lives here: one poll loop that sends and receives at
once, so many calls can be in flight (a concurrent Save of every helper) and a
large message never blocks the replies behind it.
"""

from __future__ import annotations

import select
import socket
import time

from jeepney import DBusAddress, HeaderFields, Message, MessageType, new_method_call
from jeepney.auth import BEGIN, AuthenticationError, Authenticator
from jeepney.bus import parse_addresses
from jeepney.low_level import Parser

from ..core.values import Value
from ..errors import BusError
from ..logs import log

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Sequence, Union

    Reply = Union[Message, "CallTimedOut"]


BUS_DAEMON = DBusAddress("/org/freedesktop/DBus", bus_name="org.freedesktop.DBus",
                         interface="org.freedesktop.DBus")
_RECV_SIZE = 1 << 20
_MAX_UNSOLICITED = 1024


class CallTimedOut(Value):
    """Placeholder result for a call whose reply did not arrive in time."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


def socket_address(address: str) -> str:
    """The AF_UNIX address for a D-Bus address (``unix:path=`` or ``unix:abstract=``)."""
    try:
        for transport, params in parse_addresses(address):
            if transport != "unix":
                continue
            if "path" in params:
                return str(params["path"])
            if "abstract" in params:
                return "\0" + str(params["abstract"])
    except ValueError:
        pass
    raise BusError(address, "not a usable D-Bus address",
                   hint="use unix:path=/path/to/socket or unix:abstract=NAME")


def is_error(msg: Message) -> bool:
    return msg.header.message_type is MessageType.error


def error_text(msg: Message) -> tuple[str, str]:
    """(error name, error message) of an error reply."""
    name = msg.header.fields.get(HeaderFields.error_name, "?")
    text = msg.body[0] if msg.body and isinstance(msg.body[0], str) else ""
    return name, text


class BusConnection:
    """One authenticated connection to a bus, with deadline-bound calls."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self._sock = sock
        self.address = address
        self._parser = Parser()
        self._serial = 0
        self.unique_name = ""
        # Messages that are not replies to our calls (signals, calls to us),
        # kept for the caller's own loop; bounded so a flood cannot grow it.
        self.unsolicited: list[Message] = []
        self.unsolicited_dropped = 0

    @classmethod
    def open(cls, address: str, timeout: float) -> "BusConnection":
        """Connect, authenticate and say Hello, all within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        target = socket_address(address)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        conn = cls(sock, address)
        try:
            conn._handshake(target, deadline, timeout)
            reply = conn.call(new_method_call(BUS_DAEMON, "Hello"),
                              max(0.0, deadline - time.monotonic()))
            if isinstance(reply, CallTimedOut):
                raise BusError(address, f"the bus did not answer Hello within {timeout:g} s")
            if is_error(reply):
                raise BusError(address, "Hello refused: %s: %s" % error_text(reply))
            conn.unique_name = reply.body[0]
        except BaseException:
            conn.close()
            raise
        log.debug("connected to %s as %s", address, conn.unique_name)
        return conn

    @classmethod
    def accepted(cls, sock: socket.socket, address: str, received: bytes) -> "BusConnection":
        """A client's connection to us, authenticated (``peer.ServerAuth``), with the bytes
        ``received`` after its BEGIN; those messages come first from ``receive``."""
        sock.setblocking(False)
        conn = cls(sock, address)
        if received:
            try:
                conn.unsolicited.extend(conn._parser.feed(received))
            except ValueError as e:
                raise BusError(address, f"malformed message from a client: {e}") from None
        return conn

    def _handshake(self, target: str, deadline: float, timeout: float) -> None:
        sock = self._sock
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect(target)
            auth = Authenticator()
            for line in auth:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                if line:
                    sock.sendall(line)
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                data = sock.recv(1024)
                if not data:
                    raise BusError(self.address, "the bus closed the connection during authentication")
                auth.feed(data)
            sock.sendall(BEGIN)
        except socket.timeout:
            raise BusError(self.address, f"no answer within {timeout:g} s while connecting",
                           hint="check that the bus daemon is running and not stuck") from None
        except AuthenticationError as e:
            raise BusError(self.address, f"authentication refused: {e}",
                           hint="the bus policy must allow this user") from None
        except FileNotFoundError:
            raise BusError(self.address, "the socket does not exist",
                           hint="is the domain running and its helper bus up?") from None
        except ConnectionRefusedError:
            raise BusError(self.address, "connection refused (no bus daemon is listening)",
                           hint="start the bus, or check the address") from None
        except PermissionError:
            raise BusError(self.address, "permission denied on the socket",
                           hint="run as root or as the bus's allowed user") from None
        except OSError as e:
            raise BusError(self.address, f"cannot connect: {e.strerror or e}") from None
        sock.setblocking(False)

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> "BusConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, msg: Message, timeout: float) -> None:
        """Send one message (a reply, a signal) whole within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        self._serial += 1
        outgoing = [memoryview(msg.serialise(serial=self._serial))]
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLOUT)
        while outgoing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BusError(self.address, f"the bus did not take a message within {timeout:g} s")
            if poller.poll(remaining * 1000):
                self._send_some(outgoing)

    def receive(self) -> list[Message]:
        """Every message that has arrived, without waiting (the caller polls ``fileno``).

        Messages kept aside during earlier calls come first.
        """
        messages, self.unsolicited = self.unsolicited, []
        return messages + self._receive_some()

    def _keep(self, msg: Message) -> None:
        if len(self.unsolicited) < _MAX_UNSOLICITED:
            self.unsolicited.append(msg)
        else:
            self.unsolicited_dropped += 1

    def call(self, msg: Message, timeout: float) -> Reply:
        """One method call; the reply (possibly an error reply) or CallTimedOut."""
        return self.call_many([msg], timeout)[0]

    def call_many(self, msgs: Sequence[Message], timeout: float) -> list[Reply]:
        """Send every call at once and collect the replies, in order.

        Replies that do not arrive within ``timeout`` seconds come back as
        ``CallTimedOut``.  Raises BusError when the bus itself goes away.
        """
        deadline = time.monotonic() + timeout
        pending: dict[int, int] = {}
        outgoing: list[memoryview] = []
        for index, msg in enumerate(msgs):
            self._serial += 1
            pending[self._serial] = index
            outgoing.append(memoryview(msg.serialise(serial=self._serial)))
        replies: list[Reply | None] = [None] * len(msgs)

        poller = select.poll()
        fd = self._sock.fileno()
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for index in pending.values():
                    replies[index] = CallTimedOut(timeout)
                break
            poller.register(fd, select.POLLIN | (select.POLLOUT if outgoing else 0))
            events = poller.poll(remaining * 1000)
            for _, event in events:
                if event & select.POLLOUT and outgoing:
                    self._send_some(outgoing)
                if event & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    for reply in self._receive_some():
                        serial = reply.header.fields.get(HeaderFields.reply_serial)
                        if serial in pending:
                            replies[pending.pop(serial)] = reply
                        elif reply.header.message_type in (MessageType.signal, MessageType.method_call):
                            self._keep(reply)
        return [r if r is not None else CallTimedOut(timeout) for r in replies]

    def _send_some(self, outgoing: list[memoryview]) -> None:
        try:
            sent = self._sock.send(outgoing[0])
        except BlockingIOError:
            return
        except OSError as e:
            raise BusError(self.address, f"the bus went away while sending: {e.strerror or e}") from None
        if sent == len(outgoing[0]):
            outgoing.pop(0)
        else:
            outgoing[0] = outgoing[0][sent:]

    def _receive_some(self) -> list[Message]:
        try:
            data = self._sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return []
        except OSError as e:
            raise BusError(self.address, f"the bus went away: {e.strerror or e}") from None
        if not data:
            raise BusError(self.address, "the bus closed the connection",
                           hint="the bus daemon may have exited; check the domain's helper bus")
        try:
            messages: list[Message] = self._parser.feed(data)
            return messages
        except ValueError as e:
            raise BusError(self.address, f"malformed message from the bus: {e}") from None

