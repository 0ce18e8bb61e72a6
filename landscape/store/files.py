"""What every file we write shares: refusing to clobber, one writer per output (``NAME.lock``),
journaled partial files, atomic completion, read-only opens, one wording of write failures."""
from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import math
import os
import signal
import socket
import threading
import time
from pathlib import Path

import h5py
import numpy as np

from ..errors import FileFormatError, WriteError
from .journal import JournaledFile, journal_path


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
        raise FileFormatError(f"output {path} already exists; pass --overwrite (in Python: overwrite=True) to replace it")
    if not path.parent.exists():
        raise FileFormatError(f"cannot write {path}: directory {path.parent} does not exist")
    if not path.parent.is_dir():
        raise FileFormatError(f"cannot write {path}: {path.parent} is not a directory")
    if not os.access(path.parent, os.W_OK):
        raise FileFormatError(f"cannot write {path}: directory {path.parent} is not writable")
    probe_writable(path.parent, str(path))
    check_unlocked(path)
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
        kind = expected_format.split(".")[-1]
        raise FileFormatError(f"{path} is a directory, not a {'' if kind == 'file' else kind + ' '}file")
    if not path.is_file():  # a FIFO or a device: HDF5 would wait on it for ever
        raise FileFormatError(f"{path} is not a regular file")
    try:
        try:
            f = h5py.File(path, "r", locking=False)
        except OSError as e:
            if "locking flag" not in str(e):
                raise
            # open in this process already, with HDF5's file locking (h5py's default, say in a notebook
            # cell): HDF5 shares one open file, which must keep its flags
            f = h5py.File(path, "r")
    except OSError as e:
        if not os.access(path, os.R_OK):
            raise FileFormatError(f"cannot read {path}: {reason(e)}") from None
        raise FileFormatError(f"{path} is not an HDF5 file (or it is truncated)") from None
    try:
        fmt = f.attrs.get("format")
        if fmt != expected_format:
            raise FileFormatError(f"{path} is not a {expected_format.split('.')[-1]} file "
                                  f"(format attribute is {fmt!r}, expected {expected_format!r})")
        check_self_contained(f, path)
    except (RuntimeError, SystemError, KeyError, OSError):  # what h5py raises on damaged metadata
        f.close()
        raise FileFormatError(f"{path} is damaged: its HDF5 metadata cannot be read (a broken or cut-off copy?)") from None
    except BaseException:
        f.close()
        raise
    return f


def format_of(path) -> str | None:
    """The ``format`` attribute of an HDF5 file (which of our files it is): "" when it has none, None
    when it cannot be read (:func:`open_read` then names the problem); a missing file gets its error."""
    path = Path(path)
    if not path.is_file():
        open_read(path, "landscape.file")  # (raises the error that names the problem)
    try:
        with h5py.File(path, "r", locking=False) as f:
            fmt = f.attrs.get("format")
    except (OSError, RuntimeError, SystemError, KeyError):
        return None
    return fmt.decode() if isinstance(fmt, bytes) else fmt if isinstance(fmt, str) else ""


# A dataset we write may declare rows it never wrote (metrics read NaN there, unfinished surfaces), so
# its declared size may exceed what the file holds, by far less than this.
UNWRITTEN_ALLOWANCE = 1 << 30

# Files this process found self-contained, by identity: device, inode, size and change times of the
# opened file. Rewriting a file changes its change time, so it is checked again; an unchanged one
# (a trajectory read checkpoint by checkpoint) is checked once, not at every open.
_SELF_CONTAINED: set = set()


def check_self_contained(f: h5py.File, path) -> None:
    """Refuse a file that reaches outside itself (external links, external raw storage, virtual
    datasets: each reads another file, which a file handed to us may name at will) or declares a
    dataset larger than it can hold, before anything is read or allocated."""
    st = _opened_stat(f)
    identity = None if st is None else _identity(st)
    if identity in _SELF_CONTAINED:
        return
    problems = _walk(f, Path(path).stat().st_size if st is None else st.st_size)
    if problems:
        raise FileFormatError(f"{path} is refused: {problems[0]}"
                              + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    if identity is not None and _settled(st):
        if len(_SELF_CONTAINED) > 1024:
            _SELF_CONTAINED.clear()
        _SELF_CONTAINED.add(identity)


# Datasets readers take a row at a time (a trajectory's weights): compressed ones count against memory
# one by one, not together.
READ_BY_ROW = ("params", "buffers")


def _walk(f: h5py.File, file_size: int) -> list:
    """What reaches outside the file: every link of every group, once; objects are opened only for
    datasets (the low-level calls cost a tenth of h5py's object layer). Compressed datasets read whole
    must fit in memory together (each alone may, while several are read at once)."""
    problems, expanded = [], []

    def visit(name: bytes, info) -> None:
        if info.type == h5py.h5l.TYPE_EXTERNAL:
            filename, target = f.id.links.get_val(name)
            problems.append(f"/{name.decode()} is an external link to {filename.decode()}:{target.decode()}")
        elif info.type == h5py.h5l.TYPE_HARD and h5py.h5o.get_info(f.id, name).type == h5py.h5o.TYPE_DATASET:
            ds = h5py.h5d.open(f.id, name)
            problems.extend(_dataset_problems(ds, name.decode(), file_size))
            if ds.get_create_plist().get_nfilters() > 0 and name.decode().rsplit("/", 1)[-1] not in READ_BY_ROW:
                expanded.append(_declared(ds))

    f.id.links.visit(visit, info=True)
    if not problems and len(expanded) > 1 and sum(expanded) > available_memory():
        problems.append(f"its {len(expanded)} compressed datasets declare {_size(sum(expanded))} together, more "
                        f"than memory can take ({_size(available_memory())})")
    return problems


def _declared(ds: h5py.h5d.DatasetID) -> int:
    """Bytes the dataset declares (what reading it whole takes)."""
    itemsize = ds.get_type().get_size()
    return int(np.prod(ds.shape, dtype=np.float64) * itemsize) if ds.shape else itemsize


def _identity(st: os.stat_result) -> tuple:
    """Device, inode, size and change times: a file apart from any other, and from a rewritten self
    (once :func:`_settled`)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


# A file changed this recently may change again without its times moving: many filesystems keep them
# to the second (FAT to two), and a freed inode number is soon reused (a file replaced by rename).
_SETTLED_NS = 2_000_000_000


def _settled(st: os.stat_result) -> bool:
    """Whether the file's last change is old enough that a new one would show in its times: only then
    is what was learnt of it kept under its :func:`_identity`."""
    return time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _SETTLED_NS


def _opened_stat(f: h5py.File):
    """The status of the file ``f`` opened (not of whatever its path names now): device, inode, size
    and change times tell it apart from any other file or version of it. None when the driver has no
    file descriptor to ask."""
    try:
        return os.fstat(f.id.get_vfd_handle())
    except (OSError, RuntimeError, ValueError):  # e.g. a file opened through a Python file object
        return None


def _dataset_problems(ds: h5py.h5d.DatasetID, name: str, file_size: int) -> list:
    dcpl = ds.get_create_plist()
    if dcpl.get_layout() == h5py.h5d.VIRTUAL:
        return [f"/{name} is a virtual dataset (it reads other files)"]
    if dcpl.get_external_count() > 0:
        return [f"/{name} keeps its data in an external file ({dcpl.get_external(0)[0].decode()!r})"]
    declared = _declared(ds)
    filtered = dcpl.get_nfilters() > 0  # compressed: may legitimately hold less
    limit = available_memory() if filtered else file_size + UNWRITTEN_ALLOWANCE
    if declared > limit:
        return [f"/{name} declares {ds.shape} values ({_size(declared)}), more than the file "
                f"{'could expand to in memory' if filtered else 'holds'} ({_size(limit)})"]
    return []


def available_memory() -> int:
    """Bytes of memory available now (Linux: MemAvailable, and no more than the memory cgroup's limit
    leaves: a container's), else the physical memory."""
    available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    room = cgroup_room()
    return available if room is None else min(available, room)


CGROUP = Path("/sys/fs/cgroup")
# (limit, usage, statistics, the statistic of reclaimable page cache) of the process's memory cgroup, as
# a container sees it: version 2, then version 1
_CGROUP_MEMORY = (("memory.max", "memory.current", "memory.stat", "inactive_file"),
                  ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat",
                   "total_inactive_file"))


def cgroup_room(root: Path | None = None) -> int | None:
    """Bytes the memory cgroup's limit still leaves, or None where there is no limit: the limit less the
    usage, whose inactive page cache counts as free (the kernel reclaims it before it refuses memory)."""
    root = CGROUP if root is None else Path(root)
    for limit_name, usage_name, stat_name, cache_name in _CGROUP_MEMORY:
        try:
            limit = (root / limit_name).read_text().strip()
            usage = int((root / usage_name).read_text())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:  # v1 writes "no limit" as ~2**63
            return None
        return max(int(limit) - usage + _stat(root / stat_name, cache_name), 0)
    return None


def _stat(path: Path, key: str) -> int:
    """The value of ``key`` in a cgroup statistics file (lines "key value"), 0 where it is missing."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def check_version(path, value, kind: str, version: int) -> int:
    """The ``version`` attribute of a file, which must be one this landscape writes."""
    try:
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and int(value) == version
    except (TypeError, ValueError):
        ok = False
    if not ok:
        shown = int(value) if isinstance(value, (int, np.integer)) else repr(value.item() if hasattr(value, "item") else value)
        raise FileFormatError(f"{path} has {kind} format version {shown}; this landscape reads version "
                              f"{version}" + (" (a newer landscape wrote it)" if _newer(value, version) else ""))
    return version


def check_dtype(ds: h5py.Dataset, name: str, kind, what: str) -> None:
    """Raise a ValueError unless the dataset ``/name`` holds numbers of ``kind`` (a numpy abstract
    type such as ``np.floating``, or a tuple of them); ``what`` names them in the message. A file
    edited by hand or by another tool may hold strings or integers where the format says floats."""
    if not isinstance(ds, h5py.Dataset):
        raise ValueError(f"/{name} is a group, not a dataset of {what}")
    if any(np.issubdtype(ds.dtype, k) for k in (kind if isinstance(kind, tuple) else (kind,))):
        return
    held = "strings" if ds.dtype.kind in "SUO" else str(ds.dtype)
    raise ValueError(f"/{name} holds {held}, not {what}")


def what_failed(e: Exception) -> str:
    """The first line of what a reader's exception says, for "FILE is not a valid ... file: WHAT"
    (a KeyError's name without its quotes; an OSError of HDF5's, damaged bytes, as it words them)."""
    text = str(e) if isinstance(e, OSError) or not e.args else str(e.args[0])
    return (text or type(e).__name__).splitlines()[0]


def is_complete(attrs) -> bool:
    """Whether a file's ``complete`` attribute says it is: a boolean true only (a string "false" a hand
    wrote there is true to Python, and read so a partial file as a finished one)."""
    value = attrs.get("complete", False)
    return isinstance(value, (bool, np.bool_)) and bool(value)


def json_attr(attrs, name: str, kind: type | None = None):
    """The attribute ``name`` of ``attrs`` (an HDF5 object's) read as JSON, of type ``kind`` (``dict``:
    "a JSON object") when given; a ValueError naming the attribute when it is not (other text, a
    number, bytes that do not decode, nesting too deep to read), a KeyError when it is missing."""
    try:
        value = attrs[name]
    except OSError:  # damaged bytes
        raise ValueError(f"attribute {name!r} cannot be read") from None
    try:
        parsed = json.loads(value.decode() if isinstance(value, bytes) else value)
    except (TypeError, ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
        detail = f" ({e.msg})" if isinstance(e, json.JSONDecodeError) else ""
        raise ValueError(f"attribute {name!r} is not JSON{detail}") from None
    if kind is not None and not isinstance(parsed, kind):
        raise ValueError(f"attribute {name!r} is not a JSON {_JSON_KINDS.get(kind, kind.__name__)}")
    return parsed


_JSON_KINDS = {dict: "object", list: "list", str: "string"}


def check_task(task) -> None:
    """Raise a ValueError unless a spec's ``task`` is absent or as FORMAT.md gives it: an object whose
    ``name`` and ``primary`` are text and whose ``metrics``, ``percent``, ``maximize`` and ``values`` are
    lists of text (what figures and tables read)."""
    texts = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)  # noqa: E731
    if task is not None and not (isinstance(task, dict)
                                 and all(isinstance(task.get(k, ""), str) for k in ("name", "primary"))
                                 and all(texts(task.get(k, [])) for k in ("metrics", "percent", "maximize", "values"))):
        raise ValueError("the spec's task is not an object of the task's name and metrics")


def _newer(value, version: int) -> bool:
    try:
        return int(value) > version
    except (TypeError, ValueError):
        return False


# SHA-256 digests this process computed, by the file's identity as in _SELF_CONTAINED: a file read
# twice unchanged (an npz fingerprinted, then checked as it is loaded) is hashed once, not twice.
_DIGESTS: dict = {}


def sha256(path) -> str:
    """The hex SHA-256 of a file's bytes, read once per process while the file is unchanged (its
    device, inode, size and change times, taken before and after the read, are the key), from the
    moment its last change is old enough that a new one would show in its times (:func:`_settled`)."""
    known = _DIGESTS.get(_identity(os.stat(path)))
    if known is not None:
        return known
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        before, settled = _identity(st), _settled(st)
        h = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        digest, unchanged = h.hexdigest(), _identity(os.fstat(f.fileno())) == before
    if unchanged and settled:  # (one written meanwhile, or just before, is hashed again next time)
        if len(_DIGESTS) > 1024:
            _DIGESTS.clear()
        _DIGESTS[before] = digest
    return digest


def publish(tmp, final) -> None:
    """Move the finished file or folder ``tmp`` to ``final`` so that a crash or power cut leaves the
    old ``final`` or the whole new one, never a named file with missing bytes: what ``tmp`` holds is
    synced to the disk before the rename, and the folder after it."""
    tmp, final = Path(tmp), Path(final)
    for path in (sorted(tmp.rglob("*")) + [tmp]) if tmp.is_dir() else [tmp]:
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        else:
            sync_folder(path)
    os.replace(tmp, final)
    sync_folder(final.parent)


def sync_folder(folder) -> None:
    """fsync a folder, so that a rename inside it is on the disk (where the system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not sync folders
        pass
    finally:
        os.close(fd)


def to_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default)


def finite_json(obj):
    """``obj`` (dicts, lists, numbers, numpy values) with NaN and infinities as None: JSON null, since
    strict JSON readers (JavaScript's ``JSON.parse``, ``jq``) refuse Python's ``NaN``."""
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


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


# ----------------------------------------------------------------------------------------------
# one writer per output

def lock_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".lock")


class OutputLock:
    """``NAME.lock``, held (``flock``) by the one process writing ``NAME`` and its ``NAME.partial``.

    The kernel releases the lock when its process dies, however it dies, so a lock file left by a dead
    process is taken over without asking; the file names its holder for the message another writer
    gets. Released (and the file removed) by :meth:`release`."""

    def __init__(self, path, reading: bool = False):
        self.path = Path(path)
        self.file = lock_path(self.path)
        while True:
            try:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise WriteError(f"cannot {'read a partial file of' if reading else 'write'} {self.path}: "
                                 f"{reason(e)} (writing {self.file.name})") from None
            if not _try_lock(fd):
                holder = _holder(fd)
                os.close(fd)
                raise FileFormatError(f"{self.path} is being written by {holder}; wait for it to finish"
                                      + ("" if reading else " or choose another output"))
            if _is_current(fd, self.file):  # not a file its last holder removed while we opened it
                break
            os.close(fd)
        self.fd = fd
        try:  # who holds it, for the message of a second writer; a full disk may refuse even this
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {_now()}\n".encode(), 0)
        except OSError:
            pass

    def release(self) -> None:
        if self.fd >= 0:
            self.file.unlink(missing_ok=True)  # removed while still held: no one can lock a stale file
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def claim_output(path: Path, overwrite: bool) -> OutputLock:
    """Take ``NAME.lock`` and check again, now that no one else can write it, that ``NAME`` may be
    written (another run may have finished it since :func:`prepare_output` looked)."""
    lock = OutputLock(path)
    if Path(path).exists() and not overwrite:
        lock.release()
        raise FileFormatError(f"output {path} already exists; pass --overwrite (in Python: overwrite=True) to replace it")
    return lock


def check_unlocked(path) -> None:
    """Refuse, before any work, an output that another live process is writing."""
    file = lock_path(Path(path))
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError:
        return
    try:
        if not _try_lock(fd, shared=True):
            raise FileFormatError(f"{path} is being written by {_holder(fd)}; wait for it to finish or "
                                  f"choose another output")
    finally:
        os.close(fd)


def _try_lock(fd: int, shared: bool = False) -> bool:
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks: one writer per output cannot be enforced there
        return True


def _holder(fd: int) -> str:
    try:
        pid, host, since = os.pread(fd, 200, 0).decode().split(maxsplit=2)
        where = "" if host == socket.gethostname() else f" on {host}"
        return f"process {int(pid)}{where} since {since.strip()}"
    except (OSError, ValueError):
        return "another process"


def _is_current(fd: int, file: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(file)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


# ----------------------------------------------------------------------------------------------
# writing

def write_failed(e: OSError, path) -> WriteError:
    """The one wording of a failed write: "no space left on device writing OUT"; the caller adds
    what was kept where."""
    return WriteError(f"{reason(e)[:1].lower()}{reason(e)[1:]} writing {path}")


def remove_partial(tmp: Path) -> None:
    """Delete a partial file and its journal (nothing in them is worth keeping)."""
    tmp.unlink(missing_ok=True)
    journal_path(tmp).unlink(missing_ok=True)


class ResumeStates:
    """The resume states of a partial file (opaque bytes by key), kept beside it, in
    ``NAME.partial.N.state``, not in it: HDF5 never gives back the space of a deleted dataset to the
    disk, so a state dropped when its part finished stayed in the file as dead bytes (gigabytes for a
    15 M-parameter model), after being written twice through the partial's journal.

    Save point N writes and fsyncs file N *before* the partial's commit that names N (its
    ``progress_state`` attribute), and deletes the older files after it: whatever moment a process
    dies or a disk fills, the generation the partial names is on the disk, whole, and matches its rows."""

    def __init__(self, tmp: Path):
        self.tmp = Path(tmp)

    def path(self, n: int) -> Path:
        return self.tmp.with_name(f"{self.tmp.name}.{n}.state")

    def write(self, n: int, states: dict) -> None:
        header = json.dumps([[key, len(value)] for key, value in states.items()]).encode() + b"\n"
        path = self.path(n)
        try:
            with open(path, "wb") as f:
                f.write(header)
                for value in states.values():
                    f.write(value)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            path.unlink(missing_ok=True)
            raise write_failed(e, self.tmp) from None

    def read(self, n: int) -> dict:
        path = self.path(n)
        try:
            with open(path, "rb") as f:
                sizes, states = json.loads(f.readline()), {}
                for key, size in sizes:
                    states[key] = f.read(size)
                    if len(states[key]) != size:
                        raise ValueError("truncated")
        except (OSError, ValueError, TypeError) as e:
            what = "is missing" if isinstance(e, FileNotFoundError) else "is unreadable"
            raise FileFormatError(f"{self.tmp}: its resume state {path.name} {what}; delete {self.tmp.name} "
                                  "or pass --overwrite to start afresh") from None
        return states

    def remove(self, keep: int | None = None) -> None:
        """Delete every generation but ``keep``."""
        for path in self.tmp.parent.glob(f"{glob.escape(self.tmp.name)}.*.state"):
            if path != (self.path(keep) if keep is not None else None):
                path.unlink(missing_ok=True)


class PartialH5:
    """An HDF5 file ``NAME.partial`` written through a :class:`JournaledFile`: the disk holds the state
    of the last :meth:`save`, whatever happens after it (a kill, a full disk).

    ``reopen``: :meth:`save` closes and reopens the HDF5 file around the commit, so that the file goes
    on from the very state a resumed run opens: the two write the same bytes if they also read the
    same things after opening (HDF5's placement of new data depends even on what it has read)."""

    def __init__(self, tmp: Path, final: Path, create: bool, reopen: bool = False, mode: str | None = None,
                 **kwargs):
        self.tmp, self.final, self.reopen = Path(tmp), Path(final), reopen
        try:
            self.raw = JournaledFile(self.tmp, create=create)
        except OSError as e:
            raise write_failed(e, self.final) from None
        self.h5 = h5py.File(self.raw, mode or ("w" if create else "r+"), **kwargs)

    def save(self) -> None:
        """Put everything written so far on the disk at once; a WriteError leaves the last save."""
        with interrupts_deferred():  # the file is closed in between: no interruption there
            if self.reopen:
                self.h5.close()
            else:
                self.h5.flush()
            try:
                self.raw.commit()
            except OSError as e:
                raise write_failed(e, self.final) from None
            finally:
                if self.reopen:
                    self.h5 = h5py.File(self.raw, "r+")

    def finish(self) -> Path:
        """Save, close and move ``NAME.partial`` to ``NAME`` (the folder synced after the rename)."""
        with interrupts_deferred():
            self.h5.close()
            try:
                self.raw.commit()
                self.raw.close()
                os.replace(self.tmp, self.final)
                sync_folder(self.final.parent)  # the rename itself survives a power cut
            except OSError as e:
                self.raw.close()
                raise write_failed(e, self.final) from None
        return self.final

    def suspend(self) -> None:
        """Close, forgetting what was written since the last save."""
        if self.h5.id.valid:
            self.h5.close()
        self.raw.discard()
        self.raw.close()

    def remove(self) -> None:
        if self.h5.id.valid:
            self.h5.close()
        self.raw.close()
        remove_partial(self.tmp)


def read_partial(tmp: Path, strict: bool = False):
    """An earlier run's ``NAME.partial`` opened read-only (an interrupted commit finished first), or
    None when there is none or it cannot be read (work is saved whole or not at all: an unreadable
    partial holds none); ``strict``: the OSError of one that cannot be opened (it needs write access,
    for the commit) is raised. One that reaches outside itself is refused (:func:`check_self_contained`)."""
    if not tmp.exists():
        return None
    try:
        raw = JournaledFile(tmp)
    except OSError:
        if strict:
            raise
        return None
    try:
        h5 = h5py.File(raw, "r")
    except (OSError, ValueError):
        raw.close()
        return None
    try:  # a partial is a file like any other: it may not reach outside itself
        check_self_contained(h5, tmp)
    except FileFormatError:
        h5.close()
        raw.close()
        raise
    return _Reading(raw, h5)


@contextlib.contextmanager
def reading_partial(tmp: Path):
    """An interrupted run's ``NAME.partial`` opened read-only for a look (``landscape info``): its last
    save, an interrupted commit replayed first as a resumed run would (so it needs write access, as
    resuming does). ``NAME.lock`` is held meanwhile, so no writer starts; a partial that a running
    command writes is refused in one line (between its saves the file on the disk is rewritten)."""
    tmp = Path(tmp)
    if not tmp.is_file():
        open_read(tmp, "landscape.file")  # (raises the error that names the problem)
    lock = OutputLock(tmp.with_name(tmp.name[:-len(".partial")]), reading=True)
    try:
        try:
            reading = read_partial(tmp, strict=True)
        except OSError as e:
            raise FileFormatError(f"cannot read {tmp}: {e.strerror or e} (a partial is read as a resumed run reads "
                                  "it, which may finish its last save: it needs write access)") from None
        if reading is None:
            raise FileFormatError(f"{tmp} is not an HDF5 file (or it is truncated)")
        with reading as f:
            yield f
    finally:
        lock.release()


class _Reading:
    def __init__(self, raw, h5):
        self.raw, self.h5 = raw, h5

    def __enter__(self):
        return self.h5

    def __exit__(self, *exc):
        self.h5.close()
        self.raw.close()
        return False


@contextlib.contextmanager
def interrupts_deferred(drop: bool = False):
    """Hold back Ctrl-C (SIGINT) and SIGTERM while bookkeeping that must not be half done is written;
    they are raised right after. ``drop``: dropped instead (the block winds up work that is stopping
    already and says what was kept: a second Ctrl-C, or torchrun's SIGTERM after a process of its group
    died, would only cut that short). Outside the main thread signals cannot be handled: nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {s: signal.signal(s, lambda *args: caught.append(args)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        # SIGINT back last: a Ctrl-C that its own handler raises from here leaves nothing unrestored
        for s, handler in reversed(previous.items()):
            signal.signal(s, handler)
        if caught and not drop:
            handler = previous[caught[0][0]]
            if callable(handler):
                handler(*caught[0])
            elif handler == signal.SIG_DFL:
                signal.raise_signal(caught[0][0])
