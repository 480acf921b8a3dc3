"""Client for the helpers on a VM's bus that implement ``org.qemu.VMState1``.

Each helper owns the well-known name ``org.qemu.VMState1`` in queued mode, so
the helpers are the queued owners of that name, and each one is called by its
unique name.  Calling the well-known name would reach only the primary owner.
"""

from __future__ import annotations

import time

from jeepney import DBusAddress, HeaderFields, Message, new_method_call
from jeepney.bus_messages import message_bus

from ..core.values import Value
from ..errors import (BusError, DeadlineExceeded, HelperCallError, HelperError, HelperIdError, HelperTimeout,
                      HelperUnauthorized, HelperVanished, MissingHelpersError, StateTooLarge, VMStateError)
from ..logs import log
from .connection import BusConnection, CallTimedOut, error_text, is_error

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Collection, Iterable, Mapping, Sequence

    from .connection import Reply

WELL_KNOWN_NAME = "org.qemu.VMState1"
OBJECT_PATH = "/org/qemu/VMState1"
INTERFACE = "org.qemu.VMState1"
MAX_ID_BYTES = 255
DEFAULT_STATE_CAP = 64 * 1024 * 1024
DEFAULT_CALL_TIMEOUT = 25.0

# dbus-daemon answers a call to a peer that disconnected before replying with
# one of these instead of a reply from the helper.
_GONE_ERRORS = {
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.Disconnected",
}


class Helper(Value):
    """A helper found on the bus."""

    __slots__ = ("id", "unique_name", "pid", "uid")

    def __init__(self, id: str, unique_name: str, pid: int | None, uid: int | None) -> None:
        self.id = id
        self.unique_name = unique_name
        self.pid = pid
        self.uid = uid

    def as_dict(self) -> dict[str, object]:
        return {"id": self.id, "unique_name": self.unique_name, "pid": self.pid, "uid": self.uid}


def _helper_object(unique_name: str) -> DBusAddress:
    return DBusAddress(OBJECT_PATH, bus_name=unique_name, interface=INTERFACE)


def _check_reply(reply: Reply, helper_id: str | None, unique_name: str, method: str) -> Message:
    if isinstance(reply, CallTimedOut):
        raise HelperTimeout(helper_id, unique_name,
                            f"{method} did not answer within {reply.seconds:g} s")
    if is_error(reply):
        name, text = error_text(reply)
        if name in _GONE_ERRORS:
            raise HelperVanished(helper_id, unique_name, f"left the bus during {method} ({text or name})")
        raise HelperCallError(helper_id, unique_name, method, name, text)
    return reply


def validate_helper_id(value: object, unique_name: str) -> str:
    if not isinstance(value, str):
        raise HelperError(None, unique_name, f"Id property is not a string: {value!r}")
    if not value:
        raise HelperIdError(f"helper {unique_name} has an empty Id")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise HelperIdError(f"helper {unique_name} has an Id longer than {MAX_ID_BYTES} bytes: "
                            f"{value[:40]!r}...")
    return value


class HelperBus:
    """The helpers on one bus, and Save/Load across all of them."""

    def __init__(self, conn: BusConnection, *, call_timeout: float = DEFAULT_CALL_TIMEOUT,
                 state_cap: int = DEFAULT_STATE_CAP) -> None:
        self.conn = conn
        self.call_timeout = call_timeout
        self.state_cap = state_cap

    @classmethod
    def open(cls, address: str, *, call_timeout: float = DEFAULT_CALL_TIMEOUT,
             state_cap: int = DEFAULT_STATE_CAP) -> "HelperBus":
        return cls(BusConnection.open(address, call_timeout),
                   call_timeout=call_timeout, state_cap=state_cap)

    @property
    def address(self) -> str:
        return self.conn.address

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "HelperBus":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _bus_call(self, msg: Message, what: str) -> Message:
        reply = self.conn.call(msg, self.call_timeout)
        if isinstance(reply, CallTimedOut):
            raise BusError(self.address, f"the bus daemon did not answer {what} within "
                                         f"{self.call_timeout:g} s")
        return reply

    def helpers(self, wanted: Collection[str] | None = None) -> list[Helper]:
        """Every helper on the bus, with its Id, pid and uid, sorted by Id.

        A helper whose Id is invalid, or is shared with another helper, fails
        the listing only when that Id is ``wanted`` (or ``wanted`` is None, which
        wants every helper); otherwise it is left out and named in ``ignored``.
        """
        self.ignored: list[str] = []
        reply = self._bus_call(message_bus.ListQueuedOwners(WELL_KNOWN_NAME), "ListQueuedOwners")
        if is_error(reply):
            return []  # NameHasNoOwner: no helper on the bus
        owners: list[str] = list(reply.body[0])
        calls: list[Message] = []
        for name in owners:
            calls += [
                new_method_call(_helper_object(name).with_interface("org.freedesktop.DBus.Properties"),
                                "Get", "ss", (INTERFACE, "Id")),
                message_bus.GetConnectionUnixProcessID(name),
                message_bus.GetConnectionUnixUser(name),
            ]
        replies = self.conn.call_many(calls, self.call_timeout)
        found: list[Helper] = []
        for index, name in enumerate(owners):
            id_reply, pid_reply, uid_reply = replies[3 * index:3 * index + 3]
            try:
                msg = _check_reply(id_reply, None, name, "Properties.Get(Id)")
            except HelperVanished:
                log.debug("owner %s left the bus while being listed", name)
                continue
            except HelperError as e:
                if wanted is None:
                    raise
                self._ignore(f"{name}: {e}")
                continue
            signature, value = msg.body[0] if msg.body else ("", None)
            try:
                if signature != "s":
                    raise HelperError(None, name, f"Id property has D-Bus type {signature!r}, not 's'")
                helper_id = validate_helper_id(value, name)
            except VMStateError as e:
                if wanted is None:
                    raise
                self._ignore(str(e))
                continue
            found.append(Helper(helper_id, name, _uint_or_none(pid_reply), _uint_or_none(uid_reply)))
        found = _check_unique(found, wanted, self._ignore)
        return sorted(found, key=lambda h: h.id)

    def _ignore(self, what: str) -> None:
        log.warning("ignoring a helper nobody asked for: %s", what)
        self.ignored.append(what)

    def select(self, helpers: Sequence[Helper], ids: Collection[str] | None,
               allowed_uids: Collection[int] | None = None) -> list[Helper]:
        """The helpers with the given Ids (all when ``ids`` is None); every Id must be there,
        and every chosen helper must run as an allowed uid."""
        if ids is None:
            chosen = list(helpers)
        else:
            by_id = {h.id: h for h in helpers}
            missing = set(ids) - set(by_id)
            if missing:
                raise MissingHelpersError(f"required helpers are not on bus {self.address}", missing,
                                          hint="start them, or check their Ids with 'virt-vmstate list'")
            chosen = [by_id[i] for i in sorted(set(ids))]
        if allowed_uids is not None:
            for h in chosen:
                if h.uid not in allowed_uids:
                    raise HelperUnauthorized(h.id, h.unique_name,
                                             f"runs as uid {h.uid}, not an allowed helper user",
                                             hint="check security.helper_users in the host config")
        return chosen

    def save(self, helpers: Sequence[Helper]) -> dict[str, bytes]:
        """Save every helper concurrently; the state of each, by Id."""
        started = time.monotonic()
        calls = [new_method_call(_helper_object(h.unique_name), "Save") for h in helpers]
        replies = self.conn.call_many(calls, self.call_timeout)
        states: dict[str, bytes] = {}
        for helper, reply in zip(helpers, replies):
            msg = _check_reply(reply, helper.id, helper.unique_name, "Save")
            if msg.header.fields.get(HeaderFields.signature) != "ay":
                raise HelperError(helper.id, helper.unique_name,
                                  f"Save returned D-Bus type {msg.header.fields.get(HeaderFields.signature)!r}, "
                                  "not 'ay'")
            data = bytes(msg.body[0])
            if len(data) > self.state_cap:
                raise StateTooLarge(helper.id, helper.unique_name,
                                    f"state is {len(data)} bytes, over the cap of {self.state_cap} bytes")
            states[helper.id] = data
        log.debug("saved %d helpers in %.1f ms", len(helpers), (time.monotonic() - started) * 1000)
        return states

    def load(self, helpers: Sequence[Helper], states: Mapping[str, bytes]) -> None:
        """Load each helper from its own state, concurrently."""
        for helper in helpers:
            if len(states[helper.id]) > self.state_cap:
                raise StateTooLarge(helper.id, helper.unique_name,
                                    f"state is {len(states[helper.id])} bytes, over the cap of "
                                    f"{self.state_cap} bytes")
        calls = [new_method_call(_helper_object(h.unique_name), "Load", "ay", (states[h.id],))
                 for h in helpers]
        replies = self.conn.call_many(calls, self.call_timeout)
        errors: list[HelperError] = []
        for helper, reply in zip(helpers, replies):
            try:
                _check_reply(reply, helper.id, helper.unique_name, "Load")
            except HelperError as e:
                errors.append(e)
        if errors:
            raise errors[0]


def open_when_present(address: str, ids: Collection[str], deadline: float, *,
                      check: Callable[[], None] | None = None,
                      call_timeout: float = DEFAULT_CALL_TIMEOUT,
                      state_cap: int = DEFAULT_STATE_CAP) -> tuple[HelperBus, list[Helper]]:
    """Poll the bus until every Id in ``ids`` is there, or raise at ``deadline``.

    Returns the open bus (the caller closes it) and the helpers the last poll
    found, so that a Load right after the wait asks the bus nothing twice.
    ``check`` runs before each poll and may raise to stop waiting early (a
    managed helper that died will never appear).  A helper with a bad Id is in
    the way only when its Id is one of ``ids``.
    """
    wanted = set(ids)
    last_error: VMStateError | None = None
    bus: HelperBus | None = None
    try:
        while True:
            if check is not None:
                check()
            try:
                if bus is None:
                    bus = HelperBus.open(address, call_timeout=max(0.05, deadline - time.monotonic()),
                                         state_cap=state_cap)
                bus.call_timeout = max(0.05, deadline - time.monotonic())
                found = bus.helpers(wanted)
                missing = wanted - {h.id for h in found}
                if not missing:
                    bus.call_timeout = call_timeout
                    ready, bus = bus, None
                    return ready, found
                last_error = None
            except VMStateError as e:
                last_error, missing = e, wanted
                if bus is not None:
                    bus.close()
                    bus = None
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(
                    f"helpers {', '.join(sorted(missing))} did not appear on bus {address} in time"
                    + (f" ({last_error})" if last_error else ""),
                    hint="check that they are started, and their logs")
            time.sleep(0.01)
    finally:
        if bus is not None:
            bus.close()


def wait_for_ids(address: str, ids: Collection[str], deadline: float, *,
                 check: Callable[[], None] | None = None) -> None:
    """Wait as ``open_when_present`` does, and close the bus."""
    open_when_present(address, ids, deadline, check=check)[0].close()


def _uint_or_none(reply: Reply) -> int | None:
    if isinstance(reply, CallTimedOut) or is_error(reply) or not reply.body:
        return None
    value = reply.body[0]
    return value if isinstance(value, int) else None


def _check_unique(helpers: Iterable[Helper], wanted: Collection[str] | None,
                  ignore: Callable[[str], None]) -> list[Helper]:
    """The helpers whose Id is theirs alone; a shared Id that is wanted is an error."""
    by_id: dict[str, list[Helper]] = {}
    for h in helpers:
        by_id.setdefault(h.id, []).append(h)
    unique: list[Helper] = []
    for helper_id, group in by_id.items():
        if len(group) == 1:
            unique.append(group[0])
            continue
        count = "two" if len(group) == 2 else str(len(group))
        what = (f"{count} helpers on the bus use Id {helper_id!r}: "
                f"{', '.join(h.unique_name for h in group)}")
        if wanted is None or helper_id in wanted:
            raise HelperIdError(what)
        ignore(what)
    return unique
