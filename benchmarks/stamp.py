"""The line every benchmark table starts with: which tree, when, on what machine."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stamp() -> str:
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
        if subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD"], timeout=10).returncode:
            commit += " (with uncommitted changes)"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"commit {commit}, {time.strftime('%Y-%m-%d')}, {platform.node()}: {os.cpu_count()} cores, {cpu}, "
            f"Linux {platform.release()}, Python {platform.python_version()}")
