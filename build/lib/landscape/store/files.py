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
    try:
        fmt = f.attrs.get("format")
        if fmt != expected_format:
            raise FileFormatError(f"{path} is not a {expected_format.split('.')[-1]} file "
                                  f"(format attribute is {fmt!r}, expected {expected_format!r})")
        check_self_contained(f, path)
    except BaseException:
        f.close()
        raise
    return f


# A dataset we write may declare rows it never wrote (metrics read NaN there, unfinished surfaces), so
# its declared size may exceed what the file holds, by far less than this.
UNWRITTEN_ALLOWANCE = 1 << 30


def check_self_contained(f: h5py.File, path) -> None:
    """Refuse a file that reaches outside itself (external links, external raw storage, virtual
    datasets: each reads another file, which a file handed to us may name at will) or declares a
    dataset larger than it can hold, before anything is read or allocated."""
    problems = []

    def visit(name, link):
        if isinstance(link, h5py.ExternalLink):
            problems.append(f"/{name} is an external link to {link.filename}:{link.path}")
        elif isinstance(link, h5py.HardLink) and isinstance(f.get(name), h5py.Dataset):
            problems.extend(_dataset_problems(f[name], name, path))

    f.visititems_links(visit)
    if problems:
        raise FileFormatError(f"{path} is refused: {problems[0]}"
                              + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def _dataset_problems(ds: h5py.Dataset, name: str, path) -> list:
    if ds.is_virtual:
        return [f"/{name} is a virtual dataset (it reads other files)"]
    if ds.external:
        return [f"/{name} keeps its data in an external file ({ds.external[0][0]!r})"]
    declared = int(np.prod(ds.shape, dtype=np.float64) * ds.dtype.itemsize) if ds.shape else ds.dtype.itemsize
    filtered = ds.id.get_create_plist().get_nfilters() > 0  # compressed: may legitimately hold less
    limit = available_memory() if filtered else Path(path).stat().st_size + UNWRITTEN_ALLOWANCE
    if declared > limit:
        return [f"/{name} declares {ds.shape} values ({_size(declared)}), more than the file "
                f"{'could expand to in memory' if filtered else 'holds'} ({_size(limit)})"]
    return []


def available_memory() -> int:
    """Bytes of memory available now (Linux: MemAvailable), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


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
