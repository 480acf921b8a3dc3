"""The managed bus's policy and the client's uid check, with helpers run as two
different unprivileged users, a qemu user and an outsider, on a real dbus-daemon."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from procs import TEST_HELPER, DBusDaemon, HelperProcess

from virt_vmstate.bus.transfer import capture, restore
from virt_vmstate.bus.vmstate1 import HelperBus
from virt_vmstate.core.busconfig import bus_config_xml
from virt_vmstate.errors import HelperUnauthorized

USERS = ("vmst-helper1", "vmst-helper2", "vmst-qemu", "vmst-intruder")
PYTHON = "/usr/bin/python3"  # Debian's, with python3-jeepney, readable by every user


def _missing() -> str:
    if os.geteuid() != 0:
        return "running processes as other users needs root"
    for user in USERS:
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"user {user} does not exist (run 'make deps')"
    return ""


pytestmark = pytest.mark.skipif(bool(_missing()) and not os.environ.get("VIRT_VMSTATE_REQUIRE_E2E"),
                                reason=_missing() or "prerequisites present")


def as_user(user: str) -> List[str]:
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]


def uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


@pytest.fixture
def secure_bus(workdir: Path):
    assert not _missing(), _missing()
    workdir.chmod(0o755)
    bus_dir = workdir / "secure"
    daemon = DBusDaemon(bus_dir, bus_config_xml(str(bus_dir / "bus.sock"), qemu_user="vmst-qemu",
                                                helper_users=["vmst-helper1", "vmst-helper2"]))
    yield daemon
    daemon.stop()


@pytest.fixture
def user_helpers(workdir: Path, secure_bus: DBusDaemon):
    started: List[HelperProcess] = []

    def start(user: str, helper_id: str, *extra: str) -> HelperProcess:
        argv = [*as_user(user), PYTHON, str(TEST_HELPER), "--bus", secure_bus.address,
                "--id", helper_id, *extra]
        proc = HelperProcess(argv, workdir / f"{helper_id}.log", address=secure_bus.address,
                             helper_id=helper_id)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def call_as(user: str, address: str, script: str) -> subprocess.CompletedProcess:
    """Run a jeepney snippet as ``user`` against the bus; it prints what happened."""
    prelude = ("import sys\nfrom jeepney import DBusAddress, new_method_call\n"
               "from jeepney.io.blocking import open_dbus_connection\n"
               "from jeepney.bus_messages import message_bus\n"
               "from jeepney import HeaderFields\n"
               "def error(r): return r.header.fields.get(HeaderFields.error_name, '')\n"
               f"conn = open_dbus_connection({address!r})\n")
    return subprocess.run([*as_user(user), PYTHON, "-c", prelude + script], capture_output=True,
                          text=True, timeout=30)


def test_helpers_of_two_users_are_saved_and_loaded_with_their_uids(secure_bus, user_helpers):
    user_helpers("vmst-helper1", "one", "--state-hex", "0101")
    user_helpers("vmst-helper2", "two", "--state-hex", "0202")
    allowed = {0, uid("vmst-helper1"), uid("vmst-helper2")}
    with HelperBus.open(secure_bus.address, call_timeout=10) as bus:
        found = {h.id: h.uid for h in bus.helpers()}
        assert found == {"one": uid("vmst-helper1"), "two": uid("vmst-helper2")}
        sealed = capture(bus, allowed_uids=allowed)
        assert {s.id: s.data for s in sealed.states} == {"one": b"\x01\x01", "two": b"\x02\x02"}
        restore(bus, sealed, allowed_uids=allowed)


def test_client_refuses_a_helper_of_another_uid_naming_it(secure_bus, user_helpers):
    user_helpers("vmst-helper1", "one", "--state-hex", "0101")
    user_helpers("vmst-helper2", "two", "--state-hex", "0202")
    with HelperBus.open(secure_bus.address, call_timeout=10) as bus:
        with pytest.raises(HelperUnauthorized) as e:
            capture(bus, allowed_uids={0, uid("vmst-helper1")})
        assert "'two'" in str(e.value) and f"uid {uid('vmst-helper2')}" in str(e.value)
        sealed = capture(bus, allowed_uids={0, uid("vmst-helper1"), uid("vmst-helper2")})
        with pytest.raises(HelperUnauthorized, match="two"):
            restore(bus, sealed, allowed_uids={0, uid("vmst-helper1")})


def test_a_user_not_named_cannot_even_connect(secure_bus, workdir):
    log = workdir / "intruder.log"
    with open(log, "wb") as out:
        result = subprocess.run([*as_user("vmst-intruder"), PYTHON, str(TEST_HELPER), "--bus",
                                 secure_bus.address, "--id", "evil"], stdout=out, stderr=out,
                                timeout=30)
    assert result.returncode != 0
    with HelperBus.open(secure_bus.address, call_timeout=10) as bus:
        assert [h.id for h in bus.helpers()] == []


def test_the_qemu_user_may_call_helpers_but_not_own_their_name(secure_bus, user_helpers):
    user_helpers("vmst-helper1", "one", "--state-hex", "0101")
    owned = call_as("vmst-qemu", secure_bus.address,
                    "r = conn.send_and_get_reply(message_bus.RequestName('org.qemu.VMState1', 0), timeout=5)\n"
                    "print(r.header.message_type.name, error(r))\n")
    assert owned.stdout.split() == ["error", "org.freedesktop.DBus.Error.AccessDenied"], owned
    with HelperBus.open(secure_bus.address, call_timeout=10) as bus:
        name = bus.helpers()[0].unique_name
    save = ("obj = DBusAddress('/org/qemu/VMState1', bus_name=%r, interface='org.qemu.VMState1')\n"
            "r = conn.send_and_get_reply(new_method_call(obj, 'Save'), timeout=5)\n"
            "print(r.header.message_type.name, error(r) or bytes(r.body[0]).hex())\n" % name)
    assert call_as("vmst-qemu", secure_bus.address, save).stdout.split() == ["method_return", "0101"]
    denied = call_as("vmst-helper2", secure_bus.address, save)
    assert denied.stdout.split() == ["error", "org.freedesktop.DBus.Error.AccessDenied"], denied


def test_bus_config_command_prints_the_policy(tmp_path):
    result = subprocess.run([sys.executable, "-m", "virt_vmstate", "bus-config", "--qemu-user", "vmst-qemu",
                             "--helper-user", "vmst-helper1", "--helper-user", "vmst-helper2",
                             "--socket", "/run/vm1/bus.sock"], capture_output=True, text=True,
                            env=dict(os.environ, VIRT_VMSTATE_CONFIG="/dev/null",
                                     PYTHONPATH=str(Path(__file__).parents[2] / "plugin")))
    assert result.returncode == 0, result.stderr
    assert result.stdout == bus_config_xml("/run/vm1/bus.sock", qemu_user="vmst-qemu",
                                           helper_users=["vmst-helper1", "vmst-helper2"])
    assert '<policy user="vmst-helper1">\n    <allow own="*"/>' in result.stdout


def test_managed_helpers_run_as_their_profile_user_and_pass_the_uid_check(workdir):
    import time
    import uuid

    from virt_vmstate.core.config import parse_config
    from virt_vmstate.core.domxml import DomainConfig, HelperSpec, config_element, parse_domain
    from virt_vmstate.host.addresses import allowed_uids
    from virt_vmstate.host.managed import ManagedProcesses
    from virt_vmstate.host.rundir import RunDir
    assert not _missing(), _missing()
    config = parse_config(f"""
[paths]
runtime_dir = "{workdir / 'run'}"
[security]
helper_users = ["vmst-helper1"]
[profiles.mine]
command = ["{PYTHON}", "{TEST_HELPER}", "--bus", "{{bus}}", "--id", "{{id}}", "--state-hex", "abcd"]
user = "vmst-helper1"
""", "test")
    dom_uuid = uuid.uuid4()
    dom = parse_domain(f"<domain><name>vm</name><uuid>{dom_uuid}</uuid><metadata>"
                       f"{config_element(DomainConfig((HelperSpec('mine', 'mine'),)))}</metadata>"
                       "</domain>".encode())
    managed = ManagedProcesses(RunDir(config.runtime_dir, dom_uuid).create(), config)
    try:
        managed.start_bus()
        managed.start_helpers(dom, config.profiles, incoming=False)
        managed.wait_for_helpers(dom, ["mine"], time.monotonic() + 10)
        with HelperBus.open(managed.bus_address, call_timeout=10) as bus:
            [helper] = bus.helpers()
            assert helper.uid == uid("vmst-helper1")
            sealed = capture(bus, allowed_uids=allowed_uids(config))
        assert sealed.state_of("mine").data == b"\xab\xcd"
        assert (workdir / "run" / str(dom_uuid)).stat().st_mode & 0o777 == 0o711
    finally:
        managed.stop_all()
