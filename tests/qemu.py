"""Bare QEMU processes with a QMP socket, for tests of the stream carrier without libvirt."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from procs import stop_pid

QEMU = "/usr/bin/qemu-system-x86_64"


class Qmp:
    """A minimal QMP client: one command at a time, events kept."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rb")
        self.events: List[Dict[str, Any]] = []
        self.serial = 0
        self._read()  # greeting
        self.command("qmp_capabilities")

    def _read(self) -> Dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise ConnectionError("QMP closed")
        msg: Dict[str, Any] = json.loads(line)
        if "event" in msg:
            msg["received"] = time.time()
        return msg

    def command(self, name: str, **arguments: Any) -> Any:
        self.serial += 1
        msg: Dict[str, Any] = {"execute": name, "id": self.serial}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != self.serial:
                continue  # a late reply to an earlier command
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error']}")
            return reply.get("return")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class QemuProcess:
    """A small TCG machine with no disk, paused or running, with an optional dbus-vmstate object."""

    def __init__(self, workdir: Path, name: str, *, object_addr: Optional[str] = None,
                 id_list: str = "virt-vmstate", incoming: Optional[str] = None,
                 extra: List[str] = ()) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.qmp_path = workdir / f"{name}.qmp"
        self.log = workdir / f"{name}.log"
        argv = [QEMU, "-machine", "pc", "-accel", "tcg", "-m", "64", "-nodefaults", "-display", "none",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if object_addr:
            argv += ["-object", json.dumps({"qom-type": "dbus-vmstate", "id": "vmstate0",
                                            "addr": object_addr, "id-list": id_list})]
        if incoming:
            argv += ["-incoming", incoming]
        argv += list(extra)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True)
        try:
            self.qmp = Qmp(self.qmp_path)
        except Exception:
            self.stop()
            raise

    def status(self) -> str:
        return str(self.qmp.command("query-status")["status"])

    def migrate(self, uri: str, timeout: float = 60) -> Dict[str, Any]:
        """Migrate and wait for the outcome; the final query-migrate."""
        self.qmp.command("migrate", uri=uri)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.qmp.command("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                return dict(info)
            time.sleep(0.02)
        raise TimeoutError("migration did not end")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        stop_pid(self.proc)
