"""Where a benchmark ran: the CPU's name and the commit of this repository, for every script's record."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown CPU"


def commit() -> str:
    """The short hash of this repository's HEAD ("?" outside a git checkout or without git)."""
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parent)
    except OSError:
        return "?"
    return r.stdout.strip() or "?"


def machine() -> str:
    """One line for a record: the CPU, its cores, Python and the commit."""
    return f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, commit {commit()}"
