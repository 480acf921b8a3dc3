"""start_detached: what a managed process gets from the hook, and what it does not."""

from __future__ import annotations

import errno
import os
import socket
import time

import pytest

from virt_vmstate.host.managed import start_detached


def wait_for(path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().endswith("END\n"):
            return path.read_text()
        time.sleep(0.01)
    raise AssertionError(f"{path} was not written")


def test_detached_process_has_its_own_session_root_cwd_and_no_fds_of_the_hook(tmp_path):
    log = tmp_path / "out.log"
    leaked = os.open(tmp_path, os.O_RDONLY)
    os.set_inheritable(leaked, True)  # even an inheritable descriptor of the hook must not leak
    fd = os.open(log, os.O_WRONLY | os.O_CREAT, 0o600)
    script = ('import os; print(os.getsid(0) == os.getpid(), os.readlink("/proc/self/fd/0"), os.getcwd(),'
              '"LISTEN_FDS" in os.environ, sorted(os.listdir("/proc/self/fd"))); print("END")')
    try:
        pid = start_detached(["/usr/bin/python3", "-c", script], fd)
    finally:
        for d in (fd, leaked):
            os.close(d)
    try:
        session, stdin, cwd, listen, fds = wait_for(log).splitlines()[0].split(" ", 4)
        assert (session, stdin, cwd, listen) == ("True", "/dev/null", "/", "False")
        assert fds == repr(["0", "1", "2", "3"])  # stdin, stdout, stderr, the listing's own
    finally:
        os.waitpid(pid, 0)


def test_a_listening_socket_is_passed_as_fd_3_as_systemd_passes_one(tmp_path):
    log = tmp_path / "out.log"
    path = str(tmp_path / "s.sock")
    leaked = os.open(tmp_path, os.O_RDONLY)
    os.set_inheritable(leaked, True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT, 0o600)
    script = ('import os, socket; s = socket.socket(fileno=3); '
              'print(os.environ["LISTEN_FDS"], os.environ["LISTEN_PID"] == str(os.getpid()), '
              's.getsockname(), sorted(os.listdir("/proc/self/fd"))); '
              'c, _ = s.accept(); c.sendall(b"hello"); print("END")')
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(4)
        # The descriptor it gets is not 3 here, whichever the hook's is.
        high = os.dup2(listener.fileno(), 37, inheritable=False)
        try:
            pid = start_detached(["/usr/bin/python3", "-c", script], fd, listen_fd=high)
        finally:
            for d in (fd, leaked, high):
                os.close(d)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)  # the child holds the only listening descriptor now
            assert client.recv(5) == b"hello"
        count, own_pid, name, fds = wait_for(log).splitlines()[0].split(" ", 3)
        assert (count, own_pid, name) == ("1", "True", path)
        assert fds == repr(["0", "1", "2", "3", "4"])  # and the listing's own
    finally:
        os.waitpid(pid, 0)


def test_a_program_that_cannot_run_is_an_oserror_not_a_child(tmp_path):
    fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as info:
            start_detached([str(tmp_path / "absent")], fd)
        assert info.value.errno == errno.ENOENT
    finally:
        os.close(fd)


def test_stopping_ends_each_process_by_pid_and_kills_one_that_ignores_sigterm(tmp_path):
    from virt_vmstate.core.config import HostConfig
    from virt_vmstate.host.managed import ManagedProcesses, is_running
    from virt_vmstate.host.rundir import RunDir
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
