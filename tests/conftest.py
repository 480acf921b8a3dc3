from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Iterator, List

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "plugin"))
sys.path.insert(0, str(ROOT / "tests"))

from procs import DBusDaemon, HelperProcess, slirp_helper, test_helper  # noqa: E402


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    # Socket paths are limited to 107 bytes, and a proxy's socket takes 82 of them under
    # a runtime dir (core/layout.py): pytest's tmp_path is too long.
    import tempfile
    short = Path(tempfile.mkdtemp(prefix="v", dir=os.environ.get("VIRT_VMSTATE_TEST_TMP", "/tmp")))
    short.chmod(0o755)  # as a directory made with mkdir: helpers of other users pass through
    yield short
    if os.environ.get("VIRT_VMSTATE_KEEP_WORKDIR"):  # to read the logs of a failed test
        return
    import shutil
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def buses(workdir: Path) -> Iterator[Callable[[str], DBusDaemon]]:
    """Factory of private dbus-daemons, all stopped by PID at the end."""
    started: List[DBusDaemon] = []

    def make(name: str = "bus") -> DBusDaemon:
        daemon = DBusDaemon(workdir / name)
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        daemon.stop()


@pytest.fixture
def helpers(workdir: Path) -> Iterator[Callable[..., HelperProcess]]:
    """Factory of helper processes (test helper or libslirp-helper), stopped by PID at the end."""
    started: List[HelperProcess] = []

    def make(address: str, helper_id: str, *extra: str, slirp: bool = False,
             incoming: bool = False) -> HelperProcess:
        where = workdir / "helpers"
        if slirp:
            proc = slirp_helper(address, helper_id, where, incoming=incoming)
        else:
            proc = test_helper(address, helper_id, where, *(("--incoming",) if incoming else ()), *extra)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()


@pytest.fixture
def fault_table() -> Callable[..., None]:
    """Record one row of the fault table ('make faults' prints it from $VIRT_VMSTATE_FAULTS_REPORT)."""
    import json
    report = os.environ.get("VIRT_VMSTATE_FAULTS_REPORT")

    def record(fault: str, expected: str, happened: str, seconds: float, lost: str) -> None:
        if report:
            with open(report, "a") as f:
                f.write(json.dumps({"fault": fault, "expected": expected, "happened": happened,
                                    "seconds": round(seconds, 2), "lost": lost}) + "\n")
    return record
