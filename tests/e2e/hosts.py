"""Two libvirt "hosts" on one machine, for end-to-end tests and the demo.

Each host is a libvirtd in its own mount and UTS namespace, with private
/run/libvirt, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt, /etc/libvirt
and /etc/virt-vmstate bind-mounted from a directory of its own, virt-vmstate
installed as its qemu hook, and tini as child subreaper.  Everything is
stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from procs import helper_profiles_toml, write_hook_script  # noqa: E402

BASE = Path("/run/vmst-e2e")
SPOOL = BASE / "spool"  # both hosts see it, as both would mount shared storage

PRIVATE = {
    "run/libvirt": "/run/libvirt",
    "lib/libvirt": "/var/lib/libvirt",
    "log/libvirt": "/var/log/libvirt",
    "cache/libvirt": "/var/cache/libvirt",
    "etc/libvirt": "/etc/libvirt",
    "etc/virt-vmstate": "/etc/virt-vmstate",
}


def prerequisites() -> Optional[str]:
    """Why end-to-end tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (libvirtd, namespaces, bind mounts)"
    for tool in ("libvirtd", "qemu-system-x86_64", "tini", "unshare", "dbus-daemon",
                 "libslirp-helper"):
        if not shutil.which(tool):
            return f"{tool} is not installed (run 'make deps')"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "libvirt-python is not importable (python3-libvirt)"
    probe = subprocess.run(["unshare", "--mount", "--uts", "--propagation", "private", "true"],
                           capture_output=True)
    if probe.returncode != 0:
        return f"cannot create mount namespaces: {probe.stderr.decode().strip()}"
    return None


def virt_vmstate_command() -> str:
    """This tree's virt-vmstate, as the packages install it (``installed_command``)."""
    command = BASE / "virt-vmstate"
    write_launcher(command, installed_command())
    return str(command)


def write_launcher(path: Path, text: str) -> None:
    """``path``, an executable of ``text``, written only when it differs and by a rename: a
    command started from it a moment before may still be reading it."""
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    new = path.with_name(f".{path.name}.{os.getpid()}")
    new.write_text(text)
    new.chmod(0o755)
    new.replace(path)


def installed_command(before_run: str = "") -> str:
    """The packages' /usr/bin/virt-vmstate (packaging/virt-vmstate), run by the Python that
    runs the tests, on this tree's package, with ``before_run`` before it runs: what a
    host's hook runs (libvirt clears the environment), without the extra imports of the
    entry point pip generates."""
    launcher = (ROOT / "packaging" / "virt-vmstate").read_text().splitlines()
    body = "\n".join(line for line in launcher[1:] if not line.startswith("run()"))
    return (f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(ROOT / 'plugin')!r})\n{body}\n"
            f"{before_run}run()\n")


class LibvirtHost:
    def __init__(self, name: str, index: int) -> None:
        self.name = name
        self.dir = BASE / name
        self.index = index
        self.proc: Optional[subprocess.Popen] = None
        self.socket = self.dir / "run/libvirt/libvirt-sock"
        self.uri = f"qemu+unix:///system?socket={self.socket}"
        # The host's runtime dir: short, as a proxy socket's path must fit under 107 bytes.
        self.runtime = self.dir / "rt"
        self.events_log = self.dir / "python-events.log"
        self.config = self.dir / "etc/virt-vmstate/config.toml"
        self.migration_port = 49200 + 100 * index
        # migration_address may not be loopback, so every migration names it.
        self.migration_uri = f"tcp://127.0.0.1:{self.migration_port}"

    def prepare(self, extra_config: str = "", spool: Optional[Path] = SPOOL,
                proxy_timeout: float = 20.0) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        for sub in PRIVATE:
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        shutil.copytree("/etc/libvirt", self.dir / "etc/libvirt", dirs_exist_ok=True)
        etc = self.dir / "etc/libvirt"
        (etc / "libvirtd.conf").write_text(
            f'host_uuid = "{uuid.UUID(int=0xE2E0 + self.index)}"\n'
            'auth_unix_rw = "none"\nauth_unix_ro = "none"\nunix_sock_rw_perms = "0700"\n'
            'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n')
        (etc / "qemu.conf").write_text(
            'user = "root"\ngroup = "root"\nsecurity_driver = "none"\nnamespaces = [ ]\n'
            'cgroup_controllers = [ ]\nstdio_handler = "file"\nremember_owner = 0\n'
            f"migration_port_min = {self.migration_port}\nmigration_port_max = {self.migration_port + 99}\n")
        hooks = etc / "hooks"
        shutil.rmtree(hooks, ignore_errors=True)
        hooks.mkdir()
        # The hook's virt-vmstate notes each event it is run for: the events bash answered alone
        # are missing there.
        command = self.dir / "virt-vmstate"
        write_launcher(command, installed_command(f'with open("{self.events_log}", "a") as log:\n'
                                                  '    log.write(" ".join(sys.argv[1:]) + "\\n")\n'))
        write_hook_script(hooks / "qemu", command)
        self.runtime.mkdir(mode=0o700, exist_ok=True)
        if spool is not None:
            spool.mkdir(mode=0o700, parents=True, exist_ok=True)
            extra_config += f'\n[carriers.spool]\ndir = "{spool}"\n'
        self.config.write_text(f"""
[paths]
runtime_dir = "{self.runtime}"
[timeouts]
call = 10
helper_start = 10
hook = 30
proxy = {proxy_timeout}
{helper_profiles_toml()}
{extra_config}
""")

    def start(self, timeout: float = 30) -> None:
        """libvirtd in the host's namespaces, up and answering."""
        mounts = " && ".join(f"mount --bind {self.dir / sub} {target}" for sub, target in PRIVATE.items())
        targets = " ".join(PRIVATE.values())
        script = (f"mkdir -p {targets} && {mounts} && hostname {self.name} && "
                  "exec tini -s -- libvirtd -f /etc/libvirt/libvirtd.conf -p /run/libvirt/libvirtd.pid")
        log = open(self.dir / "libvirtd.out", "ab")
        self.proc = subprocess.Popen(["unshare", "--mount", "--uts", "--propagation", "private",
                                      "sh", "-c", script],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"libvirtd of {self.name} exited: "
                                   f"{(self.dir / 'libvirtd.out').read_text()[-2000:]}")
            if self.socket.exists() and self.virsh("version", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"libvirtd of {self.name} did not start")

    def python_events(self, name: str) -> List[str]:
        """The hook events of domain ``name`` that ran virt-vmstate ("migrate begin", ...)."""
        try:
            lines = self.events_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [" ".join(line.split()[2:4]) for line in lines if line.split()[1:2] == [name]]

    def virsh(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)} on {self.name}: {result.stderr.strip()}")
        return result

    def vmstate_argv(self) -> List[str]:
        return [virt_vmstate_command(), "--config", str(self.config)]

    def vmstate(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
        result = subprocess.run([*self.vmstate_argv(), *args],
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"virt-vmstate {' '.join(args)}: {result.stderr.strip()}")
        return result

    def bus_address(self, dom_uuid: str) -> str:
        return f"unix:path={self.runtime / dom_uuid / 'bus.sock'}"

    def counter_call(self, dom_uuid: str, helper_id: str, method: str, times: int = 1,
                     signature: Optional[str] = None, body: tuple = ()) -> object:
        """Call the test helper's org.virtvmstate.Counter1 ``method``; the last reply's value
        (its only value, or a tuple of them)."""
        from jeepney import DBusAddress, new_method_call
        from jeepney.io.blocking import open_dbus_connection

        from virt_vmstate.bus.vmstate1 import HelperBus
        address = self.bus_address(dom_uuid)
        with HelperBus.open(address, call_timeout=5) as bus:
            name = next(h.unique_name for h in bus.helpers() if h.id == helper_id)
        obj = DBusAddress("/org/qemu/VMState1", bus_name=name, interface="org.virtvmstate.Counter1")
        value = None
        with open_dbus_connection(address) as conn:
            for _ in range(times):
                reply = conn.send_and_get_reply(new_method_call(obj, method, signature, body), timeout=5)
                value = reply.body[0] if len(reply.body) == 1 else (tuple(reply.body) or None)
        return value

    def states(self, dom_uuid: str) -> Dict[str, bytes]:
        """Every helper's state on the domain's managed bus, by a Save of each."""
        from virt_vmstate.bus.vmstate1 import HelperBus
        with HelperBus.open(self.bus_address(dom_uuid), call_timeout=10) as bus:
            return bus.save(bus.helpers())

    def wait_gone(self, dom_uuid: str, timeout: float = 10) -> None:
        """The domain's runtime dir goes (its stopped/release hooks ran) within ``timeout``."""
        rundir = self.runtime / dom_uuid
        deadline = time.monotonic() + timeout
        while rundir.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not rundir.exists(), f"{rundir} is still there"

    def domains(self) -> List[str]:
        out = self.virsh("list", "--all", "--name", check=False).stdout
        return [line for line in out.splitlines() if line]  # one a line; a name may have spaces

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            for name in self.domains():
                self.virsh("destroy", name, check=False, timeout=30)
                self.virsh("undefine", name, check=False, timeout=30)
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None


class LifecycleEvents:
    """libvirt's lifecycle events (suspended, resumed...) on some hosts, with when each arrived."""

    _loop_started = False

    def __init__(self, hosts: List["LibvirtHost"]) -> None:
        import libvirt
        if not LifecycleEvents._loop_started:
            libvirt.virEventRegisterDefaultImpl()
            threading.Thread(target=self._loop, daemon=True).start()
            LifecycleEvents._loop_started = True
        self.seen: List[Tuple[str, str, int, float]] = []
        self.conns = {}
        self.callbacks = []
        for host in hosts:
            conn = libvirt.open(host.uri)
            self.callbacks.append((conn, conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._seen, host.name)))
            self.conns[host.name] = conn

    def _seen(self, conn: Any, dom: Any, event: int, detail: int, host: str) -> None:
        self.seen.append((host, dom.name(), event, time.time()))

    @staticmethod
    def _loop() -> None:
        import libvirt
        while True:
            libvirt.virEventRunDefaultImpl()

    def first(self, host: str, name: str, event: str, since: float, wait: float = 5.0) -> Optional[float]:
        """When ``event`` ('SUSPENDED', 'RESUMED'...) first reached us for the domain after ``since``."""
        import libvirt
        code = getattr(libvirt, f"VIR_DOMAIN_EVENT_{event}")
        deadline = time.time() + wait
        while True:
            for h, n, e, at in list(self.seen):
                if (h, n, e) == (host, name, code) and at >= since:
                    return at
            if time.time() >= deadline:
                return None
            time.sleep(0.01)

    def close(self) -> None:
        for conn, callback in self.callbacks:
            try:
                conn.domainEventDeregisterAny(callback)
                conn.close()
            except Exception:
                pass


RAM_FILE = BASE / "ram.bin"


def busy_ram_commandline(mib: int = 40) -> str:
    """A <qemu:commandline> that fills guest RAM with random bytes: at a set bandwidth
    the RAM phase of a migration then takes seconds (zero pages would take none)."""
    if not RAM_FILE.exists() or RAM_FILE.stat().st_size != mib << 20:
        RAM_FILE.write_bytes(os.urandom(mib << 20))
    return ("<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
            "<qemu:arg value='-device'/>"
            f"<qemu:arg value='loader,file={RAM_FILE},addr=0x1000000,force-raw=on'/>"
            "</qemu:commandline>\n")


def clock_saved_at(loaded: bytes) -> float:
    """When a --clock test helper's state was Saved (seconds since the epoch)."""
    return struct.unpack(">Q", bytes(loaded[:8]))[0] / 1e9


def guest_xml(name: str, dom_uuid: str, metadata: str) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{dom_uuid}</uuid>
  <metadata>
{metadata}
  </metadata>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='pty'/>
    <console type='pty'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def benchmark_hosts(argv: Sequence[str]) -> Optional[Tuple[int, "LibvirtHost", "LibvirtHost"]]:
    """A benchmark's rounds (its first argument, 5 by default) and its two libvirt hosts;
    None, said on stderr, when they cannot run here."""
    why = prerequisites()
    if why:
        print(f"benchmark cannot run: {why}", file=sys.stderr)
        return None
    rounds = int(argv[1]) if len(argv) > 1 else 5
    return rounds, LibvirtHost("bench-a", 1), LibvirtHost("bench-b", 2)
