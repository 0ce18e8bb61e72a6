"""What every file we write shares: refusing to clobber, atomic completion, read-only opens."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np

from ..errors import FileFormatError


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def reason(e: OSError) -> str:
    """Why an OS call failed, in words ("No such file or directory"), without errno numbers or the
    HDF5 library's own wording."""
    if e.errno:
        return os.strerror(e.errno)
    return e.strerror or str(e) or type(e).__name__


def same_file(a, b) -> bool:
    """Whether paths ``a`` and ``b`` name one file (hard links and symlinks included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare where they would be
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def prepare_output(path, overwrite: bool, inputs=()) -> Path:
    """Check, before any work starts, that ``path`` may be written; return it as a Path.

    ``inputs``: the files the command reads; writing over one of them is refused even with
    ``overwrite`` (the input would be gone before the output is complete)."""
    path = Path(path)
    for source in inputs:
        if source is not None and same_file(path, source):
            raise FileFormatError(f"output {path} is the input {source}; choose another output")
    if path.is_dir():
        raise FileFormatError(f"output {path} is a directory")
    if path.exists() and not overwrite:
        raise FileFormatError(f"output {path} already exists; pass --overwrite to replace it")
    if not path.parent.exists():
        raise FileFormatError(f"cannot write {path}: directory {path.parent} does not exist")
    if not path.parent.is_dir():
        raise FileFormatError(f"cannot write {path}: {path.parent} is not a directory")
    if not os.access(path.parent, os.W_OK):
        raise FileFormatError(f"cannot write {path}: directory {path.parent} is not writable")
    probe_writable(path.parent, str(path))
    return path


def probe_writable(folder: Path, what: str) -> None:
    """Create and remove a file in ``folder``: whether it really takes new files, which permissions
    alone do not tell (read-only mounts, /proc, quotas, running as root)."""
    probe = Path(folder) / f".landscape.{os.getpid()}.probe"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as e:
        raise FileFormatError(f"cannot write {what}: {reason(e)}") from None
    probe.unlink(missing_ok=True)


def open_read(path, expected_format: str) -> h5py.File:
    """Open a file of ours read-only, without HDF5 file locking (which fails on many network file
    systems and blocks readers of a file still being written)."""
    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"file {path} does not exist")
    if path.is_dir():
        raise FileFormatError(f"{path} is a directory, not a {expected_format.split('.')[-1]} file")
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        if not os.access(path, os.R_OK):
            raise FileFormatError(f"cannot read {path}: {reason(e)}") from None
        raise FileFormatError(f"{path} is not an HDF5 file") from None
    fmt = f.attrs.get("format")
    if fmt != expected_format:
        f.close()
        raise FileFormatError(f"{path} is not a {expected_format.split('.')[-1]} file "
                              f"(format attribute is {fmt!r}, expected {expected_format!r})")
    return f


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def to_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (tuple, set)):
        return list(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"cannot write {type(o).__name__} as JSON")
