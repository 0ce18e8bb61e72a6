"""What many tests share: running the command, checking a one-line error, crafting a damaged copy of a
file. (One home for each, so that every test holds the command to the same contract.)"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py

from landscape.cli.main import main

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=ROOT, env=None, launcher=(), **kw) -> subprocess.CompletedProcess:
    """``python [LAUNCHER] -m landscape ARGS`` as a separate process (text output captured)."""
    return subprocess.run([sys.executable, *launcher, "-m", "landscape", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, **kw)


def one_line_error(capsys, argv, *words) -> str:
    """``landscape ARGV`` in this process exits 2 with exactly one stderr line, ``landscape: error: ...``,
    holding every word and no errno numbers; returns the line."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("landscape: error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    assert "Errno" not in err and "errno" not in err, err
    return err


def nothing_left(folder: Path, before: set) -> None:
    """``folder`` holds what it held before: no output, no ``.partial``, no probe file."""
    assert set(folder.iterdir()) == before, set(folder.iterdir()) ^ before
    assert not list(folder.glob("**/*.partial")) and not list(folder.glob("**/*.probe"))


def crafted_copy(source: Path, path: Path, change) -> Path:
    """A copy of the file ``source`` at ``path``, changed by ``change(h5py.File opened r+)``."""
    path.write_bytes(Path(source).read_bytes())
    with h5py.File(path, "r+") as f:
        change(f)
    return path
