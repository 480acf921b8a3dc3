"""D-Bus served straight to its clients: the proxy's socket, where QEMU's dbus-vmstate
object connects as to a bus, with no dbus-daemon in between.

QEMU's object is a message-bus client (GDBus): beside its calls to our object it
asks the bus for ``Hello``, ``AddMatch``/``RemoveMatch``, ``StartServiceByName``,
``GetNameOwner`` and ``ListQueuedOwners``.  This module answers those as the bus would, with one name
owned, so the only process a QEMU reaches is the proxy.  That is the point: a
dbus-daemon checks every message against SELinux's ``dbus`` class and AppArmor's
``dbus`` rules, which libvirt's policies grant a confined QEMU nowhere; here the
kernel's checks on the socket (its path, its label) are the only ones, and they are
per domain.  Who may connect is the socket owner's uid check (``SO_PEERCRED``),
what the bus's policy used to say.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from jeepney import HeaderFields, Message, new_error, new_method_return

from ..errors import BusError
from ..logs import log
from .connection import BusConnection
from .exported import MethodCall, method_call

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Collection

BUS_NAME = "org.freedesktop.DBus"
OWN_UNIQUE_NAME = ":1.0"  # the object's owner, as QEMU's ListQueuedOwners sees it
AUTH_TIMEOUT = 5.0        # a client that has not authenticated by then is dropped
MAX_CLIENTS = 16          # QEMU needs one; `check` and tests a few more
_MAX_AUTH_LINE = 16384
_NO_REPLY_EXPECTED = 1
_ALREADY_RUNNING = 2  # StartServiceByName's answer for a name that has an owner


class ServerAuth:
    """The server's side of D-Bus authentication (SASL EXTERNAL only), without I/O:
    ``feed`` takes what the client sent and returns what to send back.  ``uid`` is the
    client's, from the kernel; an authorization identity other than it is rejected."""

    def __init__(self, uid: int, guid: str) -> None:
        self.uid = uid
        self.guid = guid
        self.done = False            # BEGIN received: from here on the bytes are messages
        self.failed: str | None = None
        self.leftover = b""          # message bytes that came with BEGIN
        self._buffer = b""
        self._nul = False
        self._state = "auth"         # auth, data (EXTERNAL without its response), ok

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        if not self._nul and self._buffer:
            if self._buffer[:1] != b"\0":
                self.failed = "no NUL byte before authentication"
                return b""
            self._buffer, self._nul = self._buffer[1:], True
        answers = []
        while not self.done and self.failed is None:
            end = self._buffer.find(b"\r\n")
            if end < 0:
                if len(self._buffer) > _MAX_AUTH_LINE:
                    self.failed = "authentication line too long"
                break
            line, self._buffer = self._buffer[:end], self._buffer[end + 2:]
            answers.append(self._answer(line))
        if self.done:
            self.leftover, self._buffer = self._buffer, b""
        return b"".join(answers)

    def _answer(self, line: bytes) -> bytes:
        command, _, argument = line.partition(b" ")
        if command == b"AUTH":
            mechanism, _, response = argument.partition(b" ")
            if mechanism != b"EXTERNAL":
                return b"REJECTED EXTERNAL\r\n"
            if not response:
                self._state = "data"
                return b"DATA\r\n"
            return self._identity(response)
        if command == b"DATA" and self._state == "data":
            return self._identity(argument)
        if command == b"BEGIN" and self._state == "ok":
            self.done = True
            return b""
        if command == b"NEGOTIATE_UNIX_FD" and self._state == "ok":
            return b"ERROR no descriptors pass here\r\n"
        if command in (b"CANCEL", b"ERROR"):
            self._state = "auth"
            return b"REJECTED EXTERNAL\r\n"
        return b"ERROR unexpected command\r\n"

    def _identity(self, response: bytes) -> bytes:
        """EXTERNAL: the identity the client asks for, hex-encoded; none means its own."""
        try:
            wanted = bytes.fromhex(response.decode("ascii")).decode("ascii") if response else ""
        except (UnicodeDecodeError, ValueError):
            wanted = "?"
        if wanted not in ("", str(self.uid)):
            self._state = "auth"
            return b"REJECTED EXTERNAL\r\n"
        self._state = "ok"
        return b"OK " + self.guid.encode() + b"\r\n"


def driver_reply(call: MethodCall, client_name: str, owned: Collection[str]) -> Message | None:
    """The bus's answer to a call addressed to it (``org.freedesktop.DBus``) or to the
    ``Peer`` interface, with ``owned`` the well-known names our object owns; None for
    a call to our object."""
    msg = call.message
    if call.interface == "org.freedesktop.DBus.Peer":
        if call.member == "Ping":
            return new_method_return(msg)
        if call.member == "GetMachineId":
            return new_method_return(msg, "s", (_machine_id(),))
    if msg.header.fields.get(HeaderFields.destination) != BUS_NAME:
        return None
    member, body = call.member, call.body
    names = {BUS_NAME: BUS_NAME, OWN_UNIQUE_NAME: OWN_UNIQUE_NAME, client_name: client_name,
             **{name: OWN_UNIQUE_NAME for name in owned}}
    name = body[0] if body and isinstance(body[0], str) else None
    if member == "Hello":
        return new_method_return(msg, "s", (client_name,))
    if member in ("AddMatch", "RemoveMatch"):
        return new_method_return(msg)
    if member == "GetNameOwner" and name is not None:
        if name in names:
            return new_method_return(msg, "s", (names[name],))
        return new_error(msg, "org.freedesktop.DBus.Error.NameHasNoOwner", "s", (f"{name} has no owner",))
    if member == "ListQueuedOwners" and name is not None:
        if name in names:
            return new_method_return(msg, "as", ([names[name]],))
        return new_error(msg, "org.freedesktop.DBus.Error.NameHasNoOwner", "s", (f"{name} has no owner",))
    if member in ("GetConnectionUnixUser", "GetConnectionUnixProcessID") and name is not None:
        if names.get(name) == OWN_UNIQUE_NAME:
            return new_method_return(msg, "u", (os.getuid() if member.endswith("User") else os.getpid(),))
        return new_error(msg, "org.freedesktop.DBus.Error.NameHasNoOwner", "s", (f"{name} is not known",))
    if member == "StartServiceByName" and name is not None:
        if name in names:
            return new_method_return(msg, "u", (_ALREADY_RUNNING,))
        return new_error(msg, "org.freedesktop.DBus.Error.ServiceUnknown", "s", (f"{name} is not here",))
    if member == "NameHasOwner" and name is not None:
        return new_method_return(msg, "b", (name in names,))
    if member == "ListNames":
        return new_method_return(msg, "as", (sorted(names),))
    if member in ("RequestName", "ReleaseName"):
        return new_error(msg, "org.freedesktop.DBus.Error.AccessDenied", "s",
                         ("no name but the proxy's is owned here",))
    return new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod", "s",
                     (f"this bus does not answer {member}",))


def _machine_id() -> str:
    try:
        with open("/etc/machine-id") as f:
            return f.read(64).strip()
    except OSError:
        return ""


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


class Client:
    """One connected client; ``conn`` is None until it has authenticated."""

    def __init__(self, sock: socket.socket, uid: int, name: str) -> None:
        self.sock = sock
        self.uid = uid
        self.name = name
        self.accepted = time.monotonic()
        self.auth: ServerAuth | None = ServerAuth(uid, os.urandom(16).hex())
        self.conn: BusConnection | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, reply: Message, timeout: float) -> None:
        """Send ``reply`` as coming from the bus's object owner, unless its call asked for none."""
        assert self.conn is not None
        fields = reply.header.fields
        fields.setdefault(HeaderFields.sender, OWN_UNIQUE_NAME)
        fields[HeaderFields.destination] = self.name
        self.conn.send(reply, timeout)

    def close(self) -> None:
        self.sock.close()


class PeerServer:
    """The listening socket and its clients: accepts those whose uid is allowed, authenticates
    them, answers the bus's own calls, and hands calls to our object to the caller."""

    def __init__(self, listener: socket.socket, address: str, allowed_uids: Collection[int],
                 owned: Collection[str], reply_timeout: float) -> None:
        listener.setblocking(False)
        self.listener = listener
        self.address = address
        self.allowed = frozenset(allowed_uids)
        self.owned = tuple(owned)
        self.reply_timeout = reply_timeout
        self.clients: dict[int, Client] = {}
        self._serial = 0

    def fds(self) -> list[int]:
        return [self.listener.fileno(), *self.clients]

    def wait_hint(self) -> float | None:
        """Seconds until a client still authenticating is to be dropped (None: none is)."""
        pending = [c.accepted + AUTH_TIMEOUT for c in self.clients.values() if c.conn is None]
        return max(0.0, min(pending) - time.monotonic()) if pending else None

    def readable(self, fd: int) -> list[tuple[Client, MethodCall]]:
        """Handle what arrived on ``fd``; the calls to our object, with whom to answer."""
        if fd == self.listener.fileno():
            self._accept()
            return []
        client = self.clients.get(fd)
        if client is None:
            return []
        try:
            return self._from(client)
        except (BusError, OSError) as e:
            self.drop(client, str(e))
            return []

    def expire(self) -> None:
        now = time.monotonic()
        for client in list(self.clients.values()):
            if client.conn is None and now - client.accepted > AUTH_TIMEOUT:
                self.drop(client, f"not authenticated within {AUTH_TIMEOUT:g} s")

    def drop(self, client: Client, why: str) -> None:
        log.info("client %s (uid %d) gone: %s", client.name, client.uid, why)
        self.clients.pop(client.fileno(), None)
        client.close()

    def close(self) -> None:
        for client in list(self.clients.values()):
            client.close()
        self.clients.clear()
        self.listener.close()

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        uid = peer_uid(sock)
        if uid not in self.allowed or len(self.clients) >= MAX_CLIENTS:
            log.warning("refused a connection to %s from uid %d%s", self.address, uid,
                        "" if uid not in self.allowed else f": {MAX_CLIENTS} clients already")
            sock.close()
            return
        self._serial += 1
        client = Client(sock, uid, f":1.{self._serial}")
        self.clients[client.fileno()] = client

    def _from(self, client: Client) -> list[tuple[Client, MethodCall]]:
        if client.conn is None:
            assert client.auth is not None
            data = client.sock.recv(4096)
            if not data:
                raise BusError(self.address, "closed the connection while authenticating")
            answer = client.auth.feed(data)
            if client.auth.failed:
                raise BusError(self.address, f"authentication failed: {client.auth.failed}")
            if answer:
                client.sock.send(answer)  # a few bytes on a fresh socket: never blocks
            if not client.auth.done:
                return []
            client.conn = BusConnection.accepted(client.sock, self.address, client.auth.leftover)
            client.auth = None
            log.debug("client %s (uid %d) authenticated", client.name, client.uid)
            messages = client.conn.receive()
        else:
            messages = client.conn.receive()
        calls = []
        for msg in messages:
            call = method_call(msg)
            if call is None:
                continue
            reply = driver_reply(call, client.name, self.owned)
            if reply is None:
                calls.append((client, call))
            elif not msg.header.flags & _NO_REPLY_EXPECTED:
                reply.header.fields[HeaderFields.sender] = BUS_NAME
                client.send(reply, self.reply_timeout)
        return calls

