"""virt-vmstate list/save/load/inspect against real dbus-daemons and real helpers."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
import time

import pytest
from procs import COMMAND_ENV as ENV
from procs import ids_on_bus, vmstate


def saved_states(address: str) -> dict:
    from virt_vmstate.bus.vmstate1 import HelperBus
    with HelperBus.open(address, call_timeout=10) as bus:
        return bus.save(bus.helpers())


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("count", [1, 3, 16])
def test_save_then_load_on_another_bus_is_byte_exact(buses, helpers, workdir, count):
    rng = random.Random(count)
    sizes = [0, 4 * 1024 * 1024] + [rng.randrange(0, 4 * 1024 * 1024) for _ in range(count)]
    src, dst = buses("src"), buses("dst")
    ids = [f"helper-{i}" for i in range(count)]
    for i, helper_id in enumerate(ids):
        helpers(src.address, helper_id, "--random-size", str(sizes[i]), "--seed", str(i))
        helpers(dst.address, helper_id, incoming=True)
    before = saved_states(src.address)
    assert sorted(len(v) for v in before.values()) == sorted(sizes[:count])

    out = workdir / "state.vmstate"
    result = vmstate("save", "--bus", src.address, "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [h["id"] for h in summary["helpers"]] == sorted(ids)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600

    result = vmstate("load", "--bus", dst.address, "-i", str(out))
    assert result.returncode == 0, result.stderr
    assert saved_states(dst.address) == before


def test_list_shows_id_pid_uid_and_ignores_other_peers(buses, helpers):
    bus = buses()
    a = helpers(bus.address, "alpha")
    b = helpers(bus.address, "beta")
    # A peer on the bus that is not a helper (it owns another name) is ignored.
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection
    with open_dbus_connection(bus.address) as other:
        other.send_and_get_reply(message_bus.RequestName("org.example.NotAHelper"), timeout=5)
        result = vmstate("list", "--bus", bus.address, "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)["helpers"]
    assert [(h["id"], h["pid"], h["uid"]) for h in listed] == [
        ("alpha", a.pid, os.getuid()), ("beta", b.pid, os.getuid())]
    assert all(h["unique_name"].startswith(":") for h in listed)
    human = vmstate("list", "--bus", bus.address)
    assert "alpha" in human.stdout and str(a.pid) in human.stdout


def test_the_command_exits_without_teardown_yet_its_output_arrives_whole(workdir):
    import uuid

    from virt_vmstate.core import bundle
    states = [bundle.HelperState(f"helper-{i:04d}", bytes([i % 256]) * 8) for i in range(1500)]
    path = workdir / "many.vmstate"
    path.write_bytes(bundle.encode(bundle.new_bundle(states, created_ms=0, migration_id=str(uuid.uuid4()))))
    # Far more than Python's buffer and the pipe hold: the command blocks on a reader
    # that takes its time, and must not exit before the last byte is written.
    proc = subprocess.Popen([sys.executable, "-m", "virt_vmstate", "inspect", str(path), "--json"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.5)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert len(out) > 128 * 1024
    assert [h["id"] for h in json.loads(out)["helpers"]] == [s.id for s in states]


def test_a_reader_gone_away_is_status_120_in_silence(buses, helpers):
    bus = buses()
    helpers(bus.address, "alpha")
    proc = subprocess.Popen([sys.executable, "-m", "virt_vmstate", "list", "--bus", bus.address], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # long before the command prints
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 120, stderr
    assert stderr == b""  # Python's own exit would say "Exception ignored ... BrokenPipeError"


def test_a_broken_pipe_that_is_not_stdout_s_is_not_hidden():
    # A pipe of the command's own (to ssh, to a child) that breaks is a failure to report.
    code = ("import virt_vmstate.main as m\n"
            "def main():\n"
            "    raise BrokenPipeError(32, 'Broken pipe')\n"
            "m.main = main\n"
            "m.run()\n")
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "BrokenPipeError" in result.stderr


def test_save_ids_checked_before_any_save(buses, helpers, workdir):
    bus = buses()
    helpers(bus.address, "a", "--state-hex", "01")
    helpers(bus.address, "b", "--state-hex", "02", "--exit-in", "save")
    out = workdir / "s.vmstate"
    # "b" would exit if Save reached it; "missing" is absent, so no Save may run at all.
    line = one_line_error(vmstate("save", "--bus", bus.address, "--ids", "a,b,missing", "-o", str(out)))
    assert "missing" in line and "not on bus" in line
    assert not out.exists()
    assert ids_on_bus(bus.address) == ["a", "b"]
    # Only the listed helpers are saved; "b" is left alone.
    assert vmstate("save", "--bus", bus.address, "--ids", "a", "-o", str(out)).returncode == 0
    assert json.loads(vmstate("inspect", str(out), "--json").stdout)["helpers"][0]["id"] == "a"
    assert ids_on_bus(bus.address) == ["a", "b"]


def test_load_checks_every_record_before_any_load(buses, helpers, workdir):
    src, dst = buses("src"), buses("dst")
    helpers(src.address, "a", "--state-hex", "aa")
    helpers(src.address, "b", "--state-hex", "bb")
    out = workdir / "s.vmstate"
    assert vmstate("save", "--bus", src.address, "-o", str(out)).returncode == 0
    helpers(dst.address, "a", "--state-hex", "11")
    # "b" has a record but no helper on dst: nothing may be loaded into "a".
    line = one_line_error(vmstate("load", "--bus", dst.address, "-i", str(out)))
    assert "not on bus" in line and ": b;" in line
    assert saved_states(dst.address) == {"a": bytes.fromhex("11")}
    # With --ids a listed helper without a record fails first too.
    line = one_line_error(vmstate("load", "--bus", dst.address, "-i", str(out), "--ids", "a,zz"))
    assert "zz" in line
    assert saved_states(dst.address) == {"a": bytes.fromhex("11")}
    assert vmstate("load", "--bus", dst.address, "-i", str(out), "--ids", "a").returncode == 0
    assert saved_states(dst.address) == {"a": bytes.fromhex("aa")}


@pytest.mark.parametrize("knob,expect", [
    (("--fail", "save"), "SaveFailed: bad: cannot save, told to fail"),
    (("--exit-in", "save"), "left the bus during Save"),
    (("--hang-in", "save"), "Save did not answer within 1 s"),
    (("--oversize", "2000"), "over the cap of 1000 bytes"),
])
def test_save_failures_name_the_helper_and_change_nothing(buses, helpers, workdir, tmp_path, knob, expect):
    bus = buses()
    helpers(bus.address, "good", "--state-hex", "c0ffee")
    helpers(bus.address, "bad", *knob)
    config = tmp_path / "config.toml"
    config.write_text("[limits]\nmax_state_size = 1000\n")
    out = workdir / "s.vmstate"
    started = time.monotonic()
    result = vmstate("--config", str(config), "save", "--bus", bus.address, "--timeout", "1",
                     "-o", str(out))
    line = one_line_error(result)
    assert "helper 'bad' (:1." in line and expect in line
    assert time.monotonic() - started < 10
    assert not out.exists()
    assert "good" in ids_on_bus(bus.address)


def test_load_failures_name_the_helper(buses, helpers, workdir):
    src, dst = buses("src"), buses("dst")
    helpers(src.address, "h", "--state-hex", "01")
    out = workdir / "s.vmstate"
    assert vmstate("save", "--bus", src.address, "-o", str(out)).returncode == 0
    helpers(dst.address, "h", "--fail", "load")
    line = one_line_error(vmstate("load", "--bus", dst.address, "-i", str(out)))
    assert "helper 'h'" in line and "LoadFailed" in line


def test_duplicate_ids_are_an_error_naming_both(buses, helpers):
    bus = buses()
    helpers(bus.address, "twin")
    helpers(bus.address, "twin")
    line = one_line_error(vmstate("list", "--bus", bus.address))
    assert "two helpers on the bus use Id 'twin'" in line
    assert line.count(":1.") == 2


def test_corrupt_bundle_file_is_refused_before_the_bus(buses, helpers, workdir):
    bus = buses()
    helpers(bus.address, "h", "--state-hex", "ab")
    out = workdir / "s.vmstate"
    assert vmstate("save", "--bus", bus.address, "-o", str(out)).returncode == 0
    data = bytearray(out.read_bytes())
    data[-40] ^= 1
    out.write_bytes(bytes(data))
    line = one_line_error(vmstate("load", "--bus", bus.address, "-i", str(out)))
    assert "digest mismatch" in line
    line = one_line_error(vmstate("inspect", str(out)))
    assert "digest mismatch" in line
    assert saved_states(bus.address) == {"h": b"\xab"}


def test_bus_that_is_gone(workdir):
    line = one_line_error(vmstate("list", "--bus", f"unix:path={workdir}/nothing.sock"))
    assert "socket does not exist" in line


def test_slirp_state_moves_to_an_incoming_slirp(buses, helpers, workdir):
    src, dst = buses("src"), buses("dst")
    helpers(src.address, "slirp0", slirp=True)
    helpers(dst.address, "slirp0", slirp=True, incoming=True)
    before = saved_states(src.address)["slirp0"]
    assert len(before) > 0
    out = workdir / "s.vmstate"
    assert vmstate("save", "--bus", src.address, "-o", str(out)).returncode == 0
    assert vmstate("load", "--bus", dst.address, "-i", str(out)).returncode == 0
    assert saved_states(dst.address)["slirp0"] == before


def test_garbage_into_slirp_surfaces_its_error(buses, helpers, workdir):
    src, dst = buses("src"), buses("dst")
    # A test helper posing as slirp0; libslirp reads the first 4 bytes as a format version.
    helpers(src.address, "slirp0", "--state-hex", b"garbage!".hex())
    helpers(dst.address, "slirp0", slirp=True, incoming=True)
    out = workdir / "s.vmstate"
    assert vmstate("save", "--bus", src.address, "-o", str(out)).returncode == 0
    line = one_line_error(vmstate("load", "--bus", dst.address, "-i", str(out)))
    assert "helper 'slirp0'" in line and "Load failed with" in line
    assert "Incompatible migration data version" in line  # libslirp's own words


def test_help_teaches():
    result = vmstate("--help")
    assert result.returncode == 0
    for word in ("list", "save", "load", "inspect", "hook", "examples:", "Exit status"):
        assert word in result.stdout
    assert "--ids" in vmstate("save", "--help").stdout
