"""The fault matrix: every fault against real processes, nothing lost, nothing left.

Each case asserts that the operation fails (or succeeds) as it should, within
its deadline, with a message naming the domain or bus and the helper; that the
helpers' state is unchanged afterwards; and that no process, socket or file is
left behind.  Each also records a row for 'make faults'.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from procs import DBusDaemon  # noqa: E402
from test_hook import Host, domain_xml, sealed_state, states_on, stop_hosts, with_state  # noqa: E402

from virt_vmstate.bus.vmstate1 import Helper, HelperBus  # noqa: E402
from virt_vmstate.core import bundle as B  # noqa: E402
from virt_vmstate.host.configfile import load_config  # noqa: E402
from virt_vmstate.core.domxml import DomainConfig, HelperSpec, parse_domain  # noqa: E402
from virt_vmstate.host.managed import ManagedProcesses, is_running  # noqa: E402
from virt_vmstate.host.rundir import RunDir  # noqa: E402


@pytest.fixture(autouse=True)
def stop_managed_processes(workdir):
    """Whatever a hook started is stopped by PID, even when the test failed."""
    yield
    stop_hosts()


def cli(config: Path, *args: str, timeout: float = 60) -> Tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "plugin"), VIRT_VMSTATE_CONFIG=str(config))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "virt_vmstate", *args], capture_output=True,
                            text=True, env=env, timeout=timeout)
    return result, time.monotonic() - started


def summary(stderr: str) -> str:
    """The error's own words: no command or domain prefix, no hint, no temporary paths."""
    line = stderr.strip().splitlines()[-1].split("; ")[0]
    line = re.sub(r"^virt-vmstate( \w+)?: (domain \S+ \([0-9a-f-]+\): \w+ \w+: )?", "", line)
    return re.sub(r"(unix:path=)?/tmp/vmst-[^\s:]*", "…", line)


def lost(before: Dict[str, bytes], after: Dict[str, bytes]) -> str:
    changed = sorted(k for k in before if before[k] != after.get(k))
    return "none" if not changed else "CHANGED: " + ", ".join(changed)


@pytest.fixture
def source(buses, helpers, workdir):
    """A source bus with a witness helper whose state must survive every fault."""
    bus = buses("src")
    helpers(bus.address, "witness", "--random-size", "65536")
    config = workdir / "config.toml"
    config.write_text("[timeouts]\ncall = 2\n[limits]\nmax_state_size = 1048576\n[logging]\nsyslog = false\n")
    return bus, config


SAVE_FAULTS = [
    # fault, helper knobs (None: no helper of that Id), save args, expected words
    ("helper missing at Save", None, ["--ids", "witness,gone"], ["gone", "not on bus"]),
    ("helper hangs in Save", ["--hang-in", "save"], [], ["'victim'", "Save did not answer"]),
    ("helper hangs in Properties.Get", ["--hang-in", "get"], [], ["did not answer", "Id"]),
    ("helper returns a D-Bus error", ["--fail", "save"], [], ["'victim'", "told to fail"]),
    ("helper exits mid-call", ["--exit-in", "save"], [], ["'victim'", "Save"]),
    ("state over the cap", ["--oversize", str(2 << 20)], [], ["'victim'", "over the cap"]),
]


@pytest.mark.parametrize("fault,knobs,args,words", SAVE_FAULTS, ids=[f[0] for f in SAVE_FAULTS])
def test_save_faults(source, helpers, workdir, fault_table, fault, knobs, args, words):
    bus, config = source
    witness = find(bus.address, "witness")
    before = save_one(bus.address, witness)
    if knobs is not None:
        helpers(bus.address, "victim", *knobs)
    out = workdir / "out.vmstate"
    result, seconds = cli(config, "save", "--bus", bus.address, "-o", str(out), *args)
    assert result.returncode == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr
    assert seconds < 2 * 2 + 3  # two call deadlines (list, Save) plus process start
    assert not out.exists() and not list(workdir.glob(".out.vmstate*"))
    after = save_one(bus.address, witness)
    fault_table(fault, "save refused, names the helper", summary(result.stderr),
                seconds, lost(before, after))
    assert lost(before, after) == "none"


def find(address: str, helper_id: str) -> Helper:
    with HelperBus.open(address, call_timeout=5) as bus:
        return next(h for h in bus.helpers() if h.id == helper_id)


def save_one(address: str, helper: Helper) -> Dict[str, bytes]:
    """Save one helper by its unique name (listing would ask a hung helper too)."""
    with HelperBus.open(address, call_timeout=5) as bus:
        return bus.save([helper])


def test_two_helpers_with_one_id(source, helpers, workdir, fault_table):
    bus, config = source
    helpers(bus.address, "twin", "--state-hex", "01")
    helpers(bus.address, "twin", "--state-hex", "02")
    result, seconds = cli(config, "save", "--bus", bus.address, "-o", str(workdir / "o"))
    assert result.returncode == 1 and "two helpers on the bus use Id 'twin'" in result.stderr
    fault_table("two helpers with one Id", "refused, names both", "refused: both unique names named",
                seconds, "none")


def test_extra_unknown_helpers_are_ignored(source, helpers, workdir, fault_table):
    bus, config = source
    helpers(bus.address, "stranger", "--hang-in", "save")
    out = workdir / "o.vmstate"
    result, seconds = cli(config, "save", "--bus", bus.address, "--ids", "witness", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert B.decode(out.read_bytes(), max_size=1 << 30).ids == ("witness",)
    fault_table("extra unknown helpers", "ignored, save succeeds", "saved only the listed helper",
                seconds, "none")


def test_helper_with_an_invalid_id_nobody_asked_for_is_ignored(source, helpers, workdir, fault_table):
    bus, config = source
    helpers(bus.address, "x" * 256, "--state-hex", "01")
    out = workdir / "o.vmstate"
    result, seconds = cli(config, "save", "--bus", bus.address, "--ids", "witness", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert B.decode(out.read_bytes(), max_size=1 << 30).ids == ("witness",)
    assert "ignoring a helper nobody asked for" in result.stderr and "longer than 255" in result.stderr
    unasked, _ = cli(config, "save", "--bus", bus.address, "-o", str(workdir / "all.vmstate"))
    assert unasked.returncode == 1 and "longer than 255 bytes" in unasked.stderr  # all: it is asked for
    fault_table("helper with an invalid Id nobody asked for", "ignored and logged, save succeeds",
                "saved the listed helper; warning names the other", seconds, "none")


def test_bus_that_never_answers_hello(workdir, fault_table):
    import socket
    path = workdir / "mute.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    config = workdir / "c.toml"
    config.write_text("[timeouts]\ncall = 1\n")
    try:
        result, seconds = cli(config, "list", "--bus", f"unix:path={path}")
    finally:
        server.close()
    assert result.returncode == 1 and str(path) in result.stderr
    assert seconds < 4
    fault_table("bus never answers Hello", "fails within the call deadline",
                summary(result.stderr), seconds, "none")


def test_bus_daemon_killed_mid_save(workdir, helpers, fault_table):
    daemon = DBusDaemon(workdir / "doomed")
    try:
        helpers(daemon.address, "slow", "--save-delay", "2")
        config = workdir / "c.toml"
        config.write_text("[timeouts]\ncall = 10\n")
        killer = threading.Timer(0.5, lambda: os.kill(daemon.pid, signal.SIGKILL))
        killer.start()
        result, seconds = cli(config, "save", "--bus", daemon.address, "-o", str(workdir / "o"))
        killer.join()
    finally:
        daemon.stop()
    assert result.returncode == 1 and daemon.address in result.stderr, result.stderr
    assert seconds < 5 and not (workdir / "o").exists()
    fault_table("bus daemon killed mid-save", "fails at once, names the bus",
                summary(result.stderr), seconds, "none")


# -- destination faults, through the hook as libvirt runs it -----------------------

CONFIG = DomainConfig((HelperSpec("counter", "counter"),))


STARTED: Dict[str, list] = {}  # domain name -> the processes its hooks started


def destination(host: Host, name: str, xml: bytes) -> Tuple[List[subprocess.CompletedProcess], float]:
    started = time.monotonic()
    runs = []
    for event in ("migrate begin", "prepare begin", "start begin", "started begin"):
        result = host.hook(name, event, xml)
        runs.append(result)
        if result.returncode != 0:
            break
        if event == "migrate begin":
            xml = result.stdout or xml
        if event == "start begin":
            STARTED[name] = host.processes(parse_domain(xml).uuid)
    return runs, time.monotonic() - started


def still_running(name: str) -> List[str]:
    deadline = time.monotonic() + 5
    records = STARTED.pop(name, [])
    while any(is_running(r) for r in records) and time.monotonic() < deadline:
        time.sleep(0.02)
    return [f"{r.role} (pid {r.pid})" for r in records if is_running(r)]


def left_behind(host: Host, dom_uuid: uuid.UUID) -> List[str]:
    return [str(p) for p in (host.runtime / str(dom_uuid)).glob("*")]


@pytest.mark.parametrize("fault,profile,words", [
    ("helper missing at Load", None, ["absent", "did not appear"]),
    ("helper hangs in Load", "load-hangs", ["'counter'", "Load"]),
    ("helper Load returns an error", "load-fails", ["'counter'", "told to fail"]),
])
def test_load_faults(buses, helpers, workdir, fault_table, fault, profile, words):
    src = buses("src")
    helpers(src.address, "counter", "--random-size", "4096")
    dom_uuid = uuid.uuid4()
    before = states_on(src.address)
    sealed = sealed_state(src.address, dom_uuid)
    host = Host(workdir / "dst", call=2, helper_start=2)
    if profile is None:  # the state names a helper the destination never starts
        spec = DomainConfig((HelperSpec("counter", "counter"), HelperSpec("absent")))
        sealed = B.new_bundle([*B.decode(sealed, max_size=1 << 30).states, B.HelperState("absent", b"x")],
                              created_ms=int(time.time() * 1000), migration_id=str(uuid.uuid4()),
                              domain_uuid=str(dom_uuid)).encode()
    else:
        spec = DomainConfig((HelperSpec("counter", profile),))
    runs, seconds = destination(host, "vm", with_state(domain_xml("vm", dom_uuid, spec), sealed))
    failed = runs[-1]
    assert failed.returncode == 1 and len(runs) == 4
    message = failed.stderr.decode()
    assert "domain vm" in message and all(w in message for w in words), message
    assert seconds < 15
    assert left_behind(host, dom_uuid) == []
    assert len(STARTED.get("vm", [])) == 2  # the bus and the counter helper
    assert still_running("vm") == []
    fault_table(fault, "migration aborted, destination cleaned", summary(message), seconds,
                lost(before, states_on(src.address)))


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "replayed", "future-dated", "other-domain"])
def test_bad_bundles(buses, helpers, workdir, fault_table, damage):
    src = buses("src")
    helpers(src.address, "counter", "--random-size", "4096")
    dom_uuid = uuid.uuid4()
    now = int(time.time() * 1000)
    created = {"replayed": now - 3600_000, "future-dated": now + 3600_000}.get(damage)
    raw = sealed_state(src.address, uuid.uuid4() if damage == "other-domain" else dom_uuid, created)
    if damage == "corrupt":
        raw = raw[:100] + bytes([raw[100] ^ 1]) + raw[101:]
    elif damage == "truncated":
        raw = raw[:len(raw) // 2]
    host = Host(workdir / "dst")
    runs, seconds = destination(host, "vm", with_state(domain_xml("vm", dom_uuid, CONFIG), raw))
    assert runs[0].returncode == 1 and len(runs) == 1
    message = runs[0].stderr.decode()
    expected = {"corrupt": "digest mismatch", "truncated": "cut short", "replayed": "old",
                "future-dated": "in the future", "other-domain": "belongs to"}[damage]
    assert expected in message and "domain vm" in message, message
    assert not host.rundir(dom_uuid).exists()
    fault_table(f"{damage} bundle", "refused at migrate begin", summary(message), seconds, "none")


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
@pytest.mark.parametrize("fs", ["full", "read-only"])
def test_runtime_dir_on_a_broken_filesystem(buses, helpers, workdir, fault_table, fs):
    src = buses("src")
    helpers(src.address, "counter", "--random-size", str(256 * 1024))
    dom_uuid = uuid.uuid4()
    raw = sealed_state(src.address, dom_uuid)
    host = Host(workdir / "dst")
    host.runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    _mount_tmpfs(host.runtime, "size=128k,mode=0700" if fs == "full" else "size=1m,mode=0700,ro")
    try:
        runs, seconds = destination(host, "vm", with_state(domain_xml("vm", dom_uuid, CONFIG), raw))
        names = [p.name for p in host.runtime.rglob("*")]
    finally:
        subprocess.run(["umount", str(host.runtime)], check=True)
    assert runs[0].returncode == 1 and len(runs) == 1
    message = runs[0].stderr.decode()
    assert ("no space left" if fs == "full" else "read-only") in message, message
    assert not [n for n in names if "vmstate" in n or ".tmp." in n], names
    fault_table(f"runtime dir on a {fs} filesystem", "refused, no partial file",
                summary(message), seconds, "none")


def test_hook_killed_between_write_and_rename(buses, helpers, workdir, fault_table):
    src = buses("src")
    helpers(src.address, "counter", "--random-size", "4096")
    dom_uuid = uuid.uuid4()
    raw = sealed_state(src.address, dom_uuid)
    host = Host(workdir / "dst")
    rundir = RunDir(str(host.runtime), dom_uuid).create()
    # A real process writes the bundle and is SIGKILLed just before its rename.
    script = (f"import os, sys, signal; sys.path.insert(0, {str(ROOT / 'plugin')!r})\n"
              "from pathlib import Path\nfrom virt_vmstate.host import rundir\n"
              "os.rename = lambda a, b: os.kill(os.getpid(), signal.SIGKILL)\n"
              f"rundir.write_atomic(Path({str(rundir.file('incoming.vmstate'))!r}), "
              f"bytes.fromhex({raw.hex()!r}))\n")
    started = time.monotonic()
    killed = subprocess.run([sys.executable, "-c", script])
    assert killed.returncode == -signal.SIGKILL
    partial = [p.name for p in Path(rundir.path).iterdir() if ".tmp." in p.name]
    assert partial and not rundir.has("incoming.vmstate")
    xml = domain_xml("vm", dom_uuid, CONFIG)
    for event in ("prepare begin", "start begin", "started begin"):
        assert host.hook("vm", event, xml).returncode == 0
    # Nothing was loaded from the partial file: the helper started fresh and empty.
    address = f"unix:path={Path(rundir.path, 'bus.sock')}"
    assert states_on(address) == {"counter": b""}
    assert host.hook("vm", "stopped end", xml).returncode == 0
    fault_table("hook SIGKILLed between write and rename", "partial file never read",
                "no bundle seen; helpers started fresh", time.monotonic() - started, "none")


def test_ten_domains_hooks_at_once(buses, helpers, workdir, fault_table):
    src = buses("src")
    helpers(src.address, "counter", "--random-size", "8192")
    host = Host(workdir / "dst", hook=60, helper_start=20, call=20)
    domains = {f"vm{i}": uuid.uuid4() for i in range(10)}
    expected = states_on(src.address)
    results: Dict[str, List[subprocess.CompletedProcess]] = {}
    started = time.monotonic()

    def run(name: str, dom_uuid: uuid.UUID) -> None:
        xml = with_state(domain_xml(name, dom_uuid, CONFIG), sealed_state(src.address, dom_uuid))
        results[name], _ = destination(host, name, xml)

    threads = [threading.Thread(target=run, args=item) for item in domains.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - started
    for name, dom_uuid in domains.items():
        assert [r.returncode for r in results[name]] == [0, 0, 0, 0], results[name][-1].stderr
        address = f"unix:path={Path(host.rundir(dom_uuid).path, 'bus.sock')}"
        assert states_on(address) == expected
    config = load_config(str(host.config))
    for name, dom_uuid in domains.items():
        records = ManagedProcesses(host.rundir(dom_uuid), config).records()
        assert host.hook(name, "stopped end", domain_xml(name, dom_uuid, CONFIG)).returncode == 0
        assert not host.rundir(dom_uuid).exists()
        deadline = time.monotonic() + 5
        while any(is_running(r) for r in records) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(records) == 2 and not [r for r in records if is_running(r)]
    fault_table("10 domains' hooks at once", "all load their own state", "10/10 loaded, all cleaned",
                seconds, "none")
