"""start_detached: what a managed process gets from the hook, and what it does not."""

from __future__ import annotations

import errno
import os
import time

import pytest

from virt_vmstate.managed import start_detached


def wait_for(path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().endswith("END\n"):
            return path.read_text()
        time.sleep(0.01)
    raise AssertionError(f"{path} was not written")


def test_detached_process_has_its_own_session_root_cwd_and_only_the_fds_it_is_given(tmp_path):
    log = tmp_path / "out.log"
    kept_r, kept_w = os.pipe()
    leaked = os.open(tmp_path, os.O_RDONLY)
    os.set_inheritable(leaked, True)  # even an inheritable descriptor of the hook must not leak
    fd = os.open(log, os.O_WRONLY | os.O_CREAT, 0o600)
    script = ('import os; print(os.getsid(0) == os.getpid(), os.readlink("/proc/self/fd/0"), os.getcwd(),'
              f'sorted(os.listdir("/proc/self/fd"))); os.write({kept_w}, b"ok"); print("END")')
    try:
        pid = start_detached(["/usr/bin/python3", "-c", script], fd, pass_fds=(kept_w,))
    finally:
        for d in (fd, kept_w, leaked):
            os.close(d)
    try:
        session, stdin, cwd, fds = wait_for(log).splitlines()[0].split(" ", 3)
        assert (session, stdin, cwd) == ("True", "/dev/null", "/")
        # stdin, stdout, stderr, the passed pipe, and the listing's own descriptor
        assert fds == repr(sorted(["0", "1", "2", str(kept_w), "3" if kept_w != 3 else "4"]))
        assert os.read(kept_r, 2) == b"ok"
    finally:
        os.close(kept_r)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def test_a_program_that_cannot_run_is_an_oserror_not_a_child(tmp_path):
    fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as info:
            start_detached([str(tmp_path / "absent")], fd)
        assert info.value.errno == errno.ENOENT
    finally:
        os.close(fd)


def test_stopping_ends_each_process_by_pid_and_kills_one_that_ignores_sigterm(tmp_path):
    from virt_vmstate.config import HostConfig
    from virt_vmstate.managed import ManagedProcesses, is_running
    from virt_vmstate.rundir import RunDir
    rundir = RunDir(str(tmp_path / "run"), "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0").create()
    managed = ManagedProcesses(rundir, HostConfig(runtime_dir=str(tmp_path / "run")))
    stubborn = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('END', flush=True); time.sleep(60)")
    polite = "import sys, time; print('END', flush=True); time.sleep(60)"
    records = [managed._spawn("helper-stubborn", ["/usr/bin/python3", "-c", stubborn]),
               managed._spawn("helper-polite", ["/usr/bin/python3", "-c", polite])]
    for role in ("helper-stubborn", "helper-polite"):
        wait_for(tmp_path / "run" / rundir.uuid / f"{role}.log")  # SIGTERM is ignored from here on
    try:
        managed.stop_roles(["helper-stubborn", "helper-polite"], grace=0.5)
        for record in records:
            assert not is_running(record)  # gone, or a zombie
            os.waitpid(record.pid, 0)  # our children here: reaped now
        assert managed.records() == []
    finally:
        for record in records:
            if is_running(record):
                os.kill(record.pid, 9)
