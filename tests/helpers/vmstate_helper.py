#!/usr/bin/env python3
"""A helper process that serves org.qemu.VMState1 on a bus, for tests and the demo.

It owns org.qemu.VMState1 in queued mode like a real helper, keeps its state in
memory, returns it from Save and replaces it on Load.  Knobs make it misbehave
on purpose (delay, D-Bus error, oversized state, exit mid-call, never answer).
It also serves org.virtvmstate.Counter1 (Increment, Get) so the demo has a
state to change and to query, LastLoad (what Load received, and when) and
SetFail (make Save or Load fail from now on).  With --clock its state is the
wall clock in nanoseconds at each Save: a state that changes every moment.
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import time

from jeepney import HeaderFields, MessageType, new_error, new_method_return
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection
from jeepney.low_level import Parser

NAME = "org.qemu.VMState1"
PATH = "/org/qemu/VMState1"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bus", required=True, help="D-Bus address to connect to")
    ap.add_argument("--id", required=True, help="value of the Id property")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--state-file", help="initial state read from this file")
    src.add_argument("--random-size", type=int, help="initial state: this many random bytes")
    src.add_argument("--state-hex", help="initial state as hex")
    src.add_argument("--text-size", type=int,
                     help="initial state: this many bytes of a connection table (compressible)")
    ap.add_argument("--seed", type=int, default=0, help="seed for --random-size")
    ap.add_argument("--incoming", action="store_true",
                    help="start empty and wait for Load, like a helper started for a migration")
    ap.add_argument("--save-delay", type=float, default=0.0, help="sleep before answering Save")
    ap.add_argument("--load-delay", type=float, default=0.0, help="sleep before answering Load")
    ap.add_argument("--fail", choices=["save", "load"], action="append", default=[],
                    help="answer this method with a D-Bus error")
    ap.add_argument("--exit-in", choices=["save", "load", "get"],
                    help="exit without answering when this method is called")
    ap.add_argument("--hang-in", choices=["save", "load", "get"],
                    help="never answer this method")
    ap.add_argument("--oversize", type=int, help="Save returns this many bytes instead of the state")
    ap.add_argument("--clock", action="store_true",
                    help="Save returns the wall clock (ns, big-endian u64) followed by the state")
    ap.add_argument("--pidfile", help="write the pid here once the name is owned")
    return ap.parse_args()


def initial_state(args: argparse.Namespace) -> bytes:
    if args.incoming:
        return b""
    if args.state_file:
        with open(args.state_file, "rb") as f:
            return f.read()
    if args.random_size is not None:
        return random.Random(args.seed).randbytes(args.random_size)
    if args.state_hex is not None:
        return bytes.fromhex(args.state_hex)
    if args.text_size is not None:
        rng = random.Random(args.seed)
        rows = (b"10.0.2.%03d:%05d -> 93.184.%03d.%03d:443 established %08d\n"
                % (rng.randrange(256), rng.randrange(65536), rng.randrange(256), rng.randrange(256),
                   rng.randrange(10 ** 8)) for _ in range(args.text_size // 50 + 1))
        return b"".join(rows)[:args.text_size]
    return b""


def incoming(conn):
    """Messages from the bus, read in large chunks (jeepney's receive() reads 4 KiB at a time)."""
    parser: Parser = conn.parser  # it may hold messages read during RequestName
    yield from iter(parser.get_next_message, None)
    while True:
        data = conn.sock.recv(1 << 20)
        if not data:
            return
        yield from parser.feed(data)


def main() -> int:
    args = parse_args()
    state = initial_state(args)
    loaded = False
    last_load = (b"", 0)
    conn = open_dbus_connection(args.bus)
    conn.send_and_get_reply(message_bus.RequestName(NAME, 0), timeout=10)
    if args.pidfile:
        with open(args.pidfile + ".tmp", "w") as f:
            f.write(f"{os.getpid()}\n")
        os.rename(args.pidfile + ".tmp", args.pidfile)
    print(f"helper {args.id!r} on {args.bus} as {conn.unique_name}", file=sys.stderr, flush=True)

    for msg in incoming(conn):
        if msg.header.message_type is not MessageType.method_call:
            continue
        fields = msg.header.fields
        iface = fields.get(HeaderFields.interface)
        member = fields.get(HeaderFields.member)
        if member == "Get" and iface == "org.freedesktop.DBus.Properties":
            method = "get"
        elif member == "GetAll" and iface == "org.freedesktop.DBus.Properties":
            conn.send(new_method_return(msg, "a{sv}", ({"Id": ("s", args.id)} if msg.body[0] == NAME
                                                       else {},)))
            continue
        elif iface in (NAME, None) and member in ("Save", "Load"):
            method = member.lower()
        elif member in ("Increment", "Get", "Loaded", "LastLoad", "SetFail"):
            method = "counter"
        else:
            conn.send(new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod",
                                "s", (f"no method {member}",)))
            continue
        if method == args.exit_in:
            os._exit(3)
        if method == args.hang_in:
            continue

        if method == "get":
            if msg.body[1] == "Id":
                conn.send(new_method_return(msg, "v", (("s", args.id),)))
            else:
                conn.send(new_error(msg, "org.freedesktop.DBus.Error.UnknownProperty", "s",
                                    (f"no property {msg.body[1]}",)))
        elif method == "save":
            time.sleep(args.save_delay)
            if "save" in args.fail:
                conn.send(new_error(msg, "org.example.Helper.SaveFailed", "s",
                                    (f"{args.id}: cannot save, told to fail",)))
            elif args.oversize is not None:
                conn.send(new_method_return(msg, "ay", (bytes(args.oversize),)))
            elif args.clock:
                conn.send(new_method_return(msg, "ay", (struct.pack(">Q", time.time_ns()) + state,)))
            else:
                conn.send(new_method_return(msg, "ay", (state,)))
        elif method == "load":
            time.sleep(args.load_delay)
            if "load" in args.fail:
                conn.send(new_error(msg, "org.example.Helper.LoadFailed", "s",
                                    (f"{args.id}: cannot load, told to fail",)))
            else:
                state = bytes(msg.body[0])
                loaded = True
                last_load = (state, time.time_ns())
                if args.clock:
                    state = state[8:]
                conn.send(new_method_return(msg))
        elif member == "Increment":
            value = int.from_bytes(state[:8].ljust(8, b"\0"), "big") + 1
            state = value.to_bytes(8, "big") + state[8:]
            conn.send(new_method_return(msg, "t", (value,)))
        elif member == "Loaded":
            conn.send(new_method_return(msg, "b", (loaded,)))
        elif member == "LastLoad":
            conn.send(new_method_return(msg, "ayt", last_load))
        elif member == "SetFail":  # "save", "load", "hang-save", "hang-load", or "" for neither
            modes = [m for m in msg.body[0].split(",") if m]
            args.fail = [m for m in modes if m in ("save", "load")]
            args.hang_in = next((m[5:] for m in modes if m.startswith("hang-")), None)
            conn.send(new_method_return(msg))
        else:
            value = int.from_bytes(state[:8].ljust(8, b"\0"), "big")
            conn.send(new_method_return(msg, "t", (value,)))


if __name__ == "__main__":
    sys.exit(main())
