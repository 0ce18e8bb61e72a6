"""Trajectory files (format ``landscape.trajectory``, version 1; see docs/FORMAT.md).

Writing goes to ``NAME.partial`` with ``complete = False``; :meth:`TrajectoryWriter.close` marks it
complete and renames it into place, so a file at the requested path is always a finished one.

Example::

    with TrajectoryWriter("run.h5", config, layout) as w:
        w.append("sgd", params, buffers, epoch=1, step=63, test_err=4.7)
    traj = open_trajectory("run.h5")
    ckpt = traj.checkpoint("sgd:-1")
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from ..errors import CheckpointError, FileFormatError, HeldWorkError, WriteError
from ..params import Layout
from ..trust import Trust, check_recorded_config
from .files import (PartialH5, ResumeStates, check_dtype, check_version, claim_output, interrupts_deferred, is_complete,
                    json_attr, open_read, partial_path, prepare_output, read_partial, reading_partial, sha256, to_json,
                    what_failed)

FORMAT = "landscape.trajectory"
VERSION = 1
METRICS = ("train_loss", "train_err", "test_loss", "test_err")


def parse_checkpoint_name(name: str):
    """``RUN`` -> (RUN, -1); ``RUN:INDEX`` -> (RUN, INDEX)."""
    run, sep, index = name.rpartition(":")
    if sep:
        try:
            return run, int(index)
        except ValueError:
            raise CheckpointError(f"checkpoint {name!r}: index {index!r} is not an integer") from None
    return name, -1


class TrajectoryWriter:
    """Appends checkpoints row by row; a run is created on its first append.

    Work is kept across an interruption in parts (``landscape train``: one part per method, or per
    methods trained together). The disk
    changes only at :meth:`finish_part`, :meth:`save_progress`, :meth:`flush` and :meth:`close`, each
    all at once (see :mod:`.journal`): a kill or a full disk at any moment leaves ``NAME.partial`` as
    the last of them left it. A writer opened with ``resume=True`` on the same configuration and layout
    goes on from there: the finished parts' runs (:attr:`finished`) whole, the runs of the part that was
    cut short with the rows they had at its last :meth:`save_progress` (whose state :meth:`progress`
    returns), nothing else; and it writes the same bytes an uninterrupted run writes.

    ``NAME.lock`` keeps a second writer of the same output out while this one lives. Rows appended
    since the last save wait in memory (:attr:`unsaved` bytes); a writer's owner saves once they reach
    :attr:`MEMORY_BYTES`, so that memory does not grow with the file."""

    MEMORY_BYTES = 64 * 2 ** 20

    def __init__(self, path, config: dict, layout: Layout, overwrite: bool = False, resume: bool = False):
        self.path = prepare_output(path, overwrite)
        self.tmp = partial_path(self.path)
        self.layout = layout
        self.finished = {}  # part -> the runs it wrote, in order
        self._runs = []     # runs created, in order
        self._saved = False  # whether the partial on disk holds resumable work
        self._progress = {}  # key -> the state bytes of the last save point
        self._generation = 0  # the save point whose states ResumeStates holds (0: none)
        self.states = ResumeStates(self.tmp)
        self.complete = False  # a partial completed by a run killed before it was moved into place
        self._open_file, self._open_datasets = None, {}  # see _datasets
        self.unsaved = 0  # bytes of rows appended since the last save
        self.lock = claim_output(self.path, overwrite)
        try:
            self._open(to_json(config), overwrite, resume)
        except BaseException:
            self.lock.release()
            raise

    def _open(self, config_json: str, overwrite: bool, resume: bool) -> None:
        held = self._held_work(config_json)
        if held in ("same", "complete") and resume:
            self._reopen(held == "complete")
            return
        if held == "damaged" and not overwrite:
            with read_partial(self.tmp) as f:
                problem = _bookkeeping_problem(f)
            raise HeldWorkError(f"{self.tmp} is damaged: {problem}; delete it or pass --overwrite to discard it",
                                other=True, damaged=problem)
        if held is not None and not overwrite:
            other = " with another configuration" if held == "other" else ""
            raise HeldWorkError(f"{self.tmp} holds interrupted work{other}; delete it, choose another "
                                f"output, or pass --overwrite to discard it", other=held == "other")
        self.states.remove()  # those of a partial discarded (or deleted by hand)
        # space freed in the file (a resized dataset's old chunks) is reused after it is reopened
        self.store = PartialH5(self.tmp, self.path, create=True, reopen=True, track_order=True,
                               fs_strategy="fsm", fs_persist=True, fs_threshold=1)
        f = self.file
        f.attrs["format"] = FORMAT
        f.attrs["version"] = VERSION
        f.attrs["config"] = config_json
        f.attrs["complete"] = False
        g = f.create_group("layout")
        g.attrs["params"] = to_json(self.layout.to_dict()["params"])
        g.attrs["buffers"] = to_json(self.layout.to_dict()["buffers"])
        g.attrs["num_params"] = self.layout.num_params
        g.attrs["num_buffers"] = self.layout.num_buffers
        f.create_group("runs", track_order=True)

    @property
    def file(self) -> h5py.File:
        return self.store.h5

    def _held_work(self, config_json: str):
        """What ``NAME.partial`` holds: None (no partial, or no work kept: it is replaced), "same" (work
        of this very configuration and layout), "other", or "damaged" (its record of that work does not
        describe what it holds)."""
        reading = read_partial(self.tmp)
        if reading is None:
            return None
        with reading as f:
            complete = is_complete(f.attrs)  # killed between its last save and its rename
            if f.attrs.get("format") != FORMAT or not ("finished" in f.attrs or "progress_rows" in f.attrs
                                                       or complete):
                return None
            try:
                layout = _stored_layout(f)
            except (KeyError, ValueError, TypeError):
                return None
            if f.attrs.get("config") != config_json or layout != self.layout:
                return "other"
            if not complete and _bookkeeping_problem(f):
                return "damaged"
            return "complete" if complete else "same"

    def _reopen(self, complete: bool) -> None:
        """Continue ``NAME.partial``: it holds exactly what the last save point saved. A complete one is
        only moved into place: opened read-only, since even opening it for writing changes its bytes."""
        self.store = PartialH5(self.tmp, self.path, create=False, reopen=not complete,
                               mode="r" if complete else None)
        in_progress = self._read_state()
        self._runs = [r for part_runs in self.finished.values() for r in part_runs] + list(in_progress)
        if self._generation:
            self._progress = self.states.read(self._generation)
        elif "progress" in self.file:  # a partial of an earlier version: the states inside it
            self.file["progress"].visititems(lambda key, obj: self._progress.__setitem__(key, obj[()].tobytes())
                                             if isinstance(obj, h5py.Dataset) else None)
        self.states.remove(keep=self._generation)  # a generation written but never committed
        self._saved = True
        if self.complete:  # every part done: its runs are all there is; close() only moves it into place
            self._runs.extend(_run_names(self.file["runs"]))

    def _read_state(self) -> dict:
        """Read what a resumed run needs (finished parts, the generation of the resume states), and
        return the row counts of the part under way. Done after every save point too, so that an
        uninterrupted run asks HDF5 exactly what a resumed one asks, and both write the same bytes."""
        f = self.file
        finished = json.loads(f.attrs.get("finished", "{}"))  # JSON keys are sorted: order parts by their runs
        created = {name: i for i, name in enumerate(f["runs"])}  # /runs keeps creation order

        def first_run(part):
            return min((created.get(r.split("/")[0], len(created)) for r in finished[part]), default=len(created))
        self.finished = {part: finished[part] for part in sorted(finished, key=first_run)}
        self.complete = is_complete(f.attrs)
        self._generation = int(f.attrs.get("progress_state", 0))
        return json.loads(f.attrs.get("progress_rows", "{}"))

    def _unfinished_runs(self) -> list:
        done = {r for runs in self.finished.values() for r in runs}
        # by name: a resumed writer knows them from JSON (sorted keys), not in creation order, and both
        # must write the same `finished` attribute
        return sorted(r for r in self._runs if r not in done)

    def finish_part(self, part: str) -> None:
        """Mark the runs created since the last finished part as ``part``'s, kept if work stops now."""
        with interrupts_deferred():
            before = dict(self.finished), dict(self._progress)
            self.finished[part] = self._unfinished_runs()
            self.file.attrs["finished"] = to_json(self.finished)
            self._drop_progress()
            try:
                self._save()
            except WriteError:
                self.finished, self._progress = before  # what the disk holds
                raise
            self.states.remove()

    def adopt(self, source, part: str | None = None) -> None:
        """Copy every run of the complete trajectory file ``source`` (with this layout), datasets and
        attributes as they are, and with ``part`` mark them as that finished part: how methods trained
        in separate processes come together in one file, and how a file with added runs starts."""
        with open_read(source, FORMAT) as src:
            if not is_complete(src.attrs):
                raise FileFormatError(f"{source} is not a complete trajectory file")
            if _stored_layout(src) != self.layout:
                raise FileFormatError(f"{source} holds another model's weights")
            for name in src["runs"]:
                src.copy(src["runs"][name], self.file["runs"], name=name)
            self._runs.extend(_run_names(src["runs"]))
        if part is not None:
            self.finish_part(part)

    def save_progress(self, key: str, state: bytes) -> None:
        """Keep ``state`` (opaque bytes: where the part in progress stands) under ``key``, with the row
        count of every run the part has written so far; both are what a resumed writer starts from."""
        with interrupts_deferred():  # the state and the row counts change together or not at all
            states, n = dict(self._progress, **{key: bytes(state)}), self._generation + 1
            self.states.write(n, states)  # on the disk before the commit that names it
            self.file.attrs["progress_state"] = n
            self.file.attrs["progress_rows"] = to_json(
                {r: self.file[f"runs/{r}/params"].shape[0] for r in self._unfinished_runs()})
            try:
                self._save()
            except WriteError:
                self.states.remove(keep=self._generation)  # the disk holds the last save point's
                raise
            self._progress = states
            self.states.remove(keep=n)

    def _save(self) -> None:
        self.store.save()
        self._read_state()
        self._saved, self.unsaved = True, 0

    def progress(self, key: str):
        """The bytes last given to :meth:`save_progress` under ``key`` (kept by an interrupted run), or None."""
        return self._progress.get(key)

    def _drop_progress(self) -> None:
        """The part's resume states are no longer needed (its files go after the next commit)."""
        if "progress" in self.file:  # a partial of an earlier version
            del self.file["progress"]
        for name in ("progress_rows", "progress_state"):
            if name in self.file.attrs:
                del self.file.attrs[name]
        self._progress = {}

    @property
    def runs(self) -> list:
        """The runs written so far: in the order they were created, and after a resume those of each
        finished part and of the part under way by name."""
        return list(self._runs)

    def last_params(self, run: str) -> np.ndarray:
        """(P,) float32 parameters of the last row of ``run``."""
        return self.file[f"runs/{run}/params"][-1]

    def final(self, run: str) -> dict:
        """The epoch and scalar metrics of the last row of ``run``: those of classification and any
        other task's (every per-row ``train_*`` and ``test_*`` value)."""
        g = self.file[f"runs/{run}"]
        names = list(METRICS) + sorted(k for k in g if k.startswith(("train_", "test_")) and k not in METRICS)
        return dict({k: float(g[k][-1]) for k in names if k in g and g[k].ndim == 1}, epoch=float(g["epoch"][-1]))

    # ------------------------------------------------------------------------------------------
    def _run_group(self, run: str) -> h5py.Group:
        key = f"runs/{run}"
        if key in self.file:
            return self.file[key]
        g = self.file.create_group(key, track_order=True)
        self._runs.append(run)
        P, B = self.layout.num_params, self.layout.num_buffers
        for name, width in (("params", P), ("buffers", B)):  # a model without buffers has B = 0
            g.create_dataset(name, (0, width), np.float32, maxshape=(None, width or None),
                             chunks=(1, max(width, 1)), track_times=False)
        g.create_dataset("epoch", (0,), np.float64, maxshape=(None,), chunks=(256,), track_times=False)
        g.create_dataset("step", (0,), np.int64, maxshape=(None,), chunks=(256,), track_times=False)
        return g

    def append(self, run: str, params, buffers=None, epoch: float = float("nan"), step: int = -1, **metrics) -> int:
        """Add one checkpoint to ``run``; return its row index. Metrics are scalars or 1-D arrays
        (stored as (T,) or (T, k) datasets next to the weights; missing rows read NaN)."""
        datasets = self._datasets(run)
        t = datasets["params"].shape[0]
        params = _as_numpy(params).reshape(-1)
        if params.shape[0] != self.layout.num_params:
            raise FileFormatError(f"run {run}: parameter vector has {params.shape[0]} entries, layout has "
                                  f"{self.layout.num_params}")
        buffers = np.zeros(self.layout.num_buffers, np.float32) if buffers is None else _as_numpy(buffers).reshape(-1)
        row = dict(params=params, buffers=buffers, epoch=epoch, step=step)
        for name, value in metrics.items():
            try:
                row[name] = value = np.asarray(_as_numpy(value), dtype=np.float64)
            except (ValueError, TypeError) as e:
                raise FileFormatError(f"run {run}: metric {name} = {value!r} is not numbers ({e})") from None
            if name not in datasets:
                datasets[name] = self.file[f"runs/{run}"].create_dataset(
                    name, (t,) + value.shape, np.float64, maxshape=(None,) + value.shape,
                    chunks=(256,) + value.shape, fillvalue=np.nan, track_times=False)
        # every value shaped as its row before anything is written: a bad one leaves the run as it was
        rows = {name: _as_row(ds, row.get(name)) for name, ds in datasets.items()}
        for name, ds in datasets.items():  # metrics not given this time read NaN: all datasets T rows long
            _write_row(ds, t, rows[name])
        self.unsaved += params.nbytes + buffers.nbytes
        return t

    def truncate(self, run: str, rows: int) -> None:
        """Keep the first ``rows`` rows of ``run`` (none: the run goes); on the disk at the next save."""
        if rows >= self.file[f"runs/{run}/params"].shape[0]:
            return
        self._open_datasets.pop(run, None)
        if rows <= 0:
            del self.file[f"runs/{run}"]
            self._runs.remove(run)
            parent = f"runs/{run}".rpartition("/")[0]
            while parent != "runs" and not len(self.file[parent]):  # (a nested name's groups left empty)
                del self.file[parent]
                parent = parent.rpartition("/")[0]
            return
        for ds in self.file[f"runs/{run}"].values():
            ds.resize(rows, axis=0)

    def _datasets(self, run: str) -> dict:
        """``run``'s datasets by name (created with the run if new), looked up once while the file
        stays open: appending is per-row work, and h5py's lookups cost more than the writes."""
        if self._open_file is not self.file:  # a save point reopened it: the handles are closed
            self._open_file, self._open_datasets = self.file, {}
        if run not in self._open_datasets:
            g = self._run_group(run)
            self._open_datasets[run] = {name: ds for name, ds in g.items() if isinstance(ds, h5py.Dataset)}
        return self._open_datasets[run]

    def set_attrs(self, run: str, **attrs) -> None:
        """Attach JSON-able facts to a run (e.g. the layer names behind a (T, k) metric); None removes
        one. A fact the run holds already is not written again: a resumed method sets its facts a second
        time, and a rewritten attribute moves in the file, so the bytes would differ from an
        uninterrupted run's."""
        g = self._run_group(run)
        for k, v in attrs.items():
            if v is None:
                if k in g.attrs:
                    del g.attrs[k]
                continue
            value = to_json(v)
            if g.attrs.get(k) != value:
                g.attrs[k] = value

    def flush(self) -> None:
        """Put what was appended so far on the disk (``NAME.partial``)."""
        self.store.save()
        self.unsaved = 0

    def close(self) -> Path:
        """Mark the file complete and move it to its final path."""
        if not self.complete:  # (a file completed before a kill is moved as it is)
            if "finished" in self.file.attrs:  # bookkeeping of unfinished work only
                del self.file.attrs["finished"]
            self._drop_progress()
            self.file.attrs["complete"] = True
        try:
            path = self.store.finish()
            self.states.remove()
            return path
        except WriteError as e:
            kept = ", ".join(self.finished) if self._saved else ""
            raise WriteError(f"{e}; " + (f"{kept} kept in {self.tmp}; free space and run the same command again "
                                         "to finish" if kept else "nothing kept")) from None
        finally:
            self.lock.release()

    def suspend(self) -> Path:
        """Close without completing, keeping ``NAME.partial`` as the last save point left it."""
        try:
            self.store.suspend()
        finally:
            self.lock.release()
        return self.tmp

    def abort(self) -> None:
        """Drop the partial file (bad input or a failure before anything worth keeping)."""
        try:
            self.store.remove()
            self.states.remove()
        finally:
            self.lock.release()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        elif self._saved:  # worth keeping: a resumed writer starts there
            self.suspend()
        else:
            self.abort()
        return False


def _as_row(ds: h5py.Dataset, value):
    """``value`` as one row of ``ds`` (None stays None: the fill value)."""
    if value is None:
        return None
    try:
        value = np.asarray(value, ds.dtype)
    except (ValueError, TypeError, OverflowError) as e:
        raise FileFormatError(f"{ds.name}: {value!r} cannot be stored as {ds.dtype} ({e})") from None
    try:
        return np.ascontiguousarray(np.broadcast_to(value, (1,) + ds.shape[1:]))
    except ValueError:
        raise FileFormatError(f"{ds.name}: a row of shape {np.shape(value)} does not fit rows of shape "
                              f"{ds.shape[1:]}") from None


def _write_row(ds: h5py.Dataset, t: int, row) -> None:
    """Extend ``ds`` to ``t + 1`` rows and write ``row`` (None: the fill value) as row ``t``, through
    HDF5's calls themselves: for one row, h5py's indexing takes longer than the write."""
    ds.id.set_extent((t + 1,) + ds.shape[1:])
    if row is None or row.size == 0:
        return
    space = ds.id.get_space()
    space.select_hyperslab((t,) + (0,) * (row.ndim - 1), row.shape)
    ds.id.write(h5py.h5s.create_simple(row.shape), space, row)


def _as_numpy(x):
    """A tensor (on any device, with or without a gradient), an array, a number, or a list of them."""
    if torch.is_tensor(x):
        return x.detach().cpu().numpy()
    if isinstance(x, (list, tuple)):  # e.g. per-class accuracies as a list of (GPU) tensors
        return np.asarray([_as_numpy(v) for v in x])
    return np.asarray(x)


# ----------------------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    name: str  # canonical RUN:INDEX with a non-negative index
    run: str
    index: int
    params: torch.Tensor  # (P,) float32
    buffers: torch.Tensor  # (B,) float32
    epoch: float
    step: int
    metrics: dict = field(default_factory=dict)


@dataclass
class RunData:
    name: str
    epoch: np.ndarray
    step: np.ndarray
    metrics: dict  # name -> (T,) or (T, k) array
    attrs: dict

    def __len__(self):
        return len(self.epoch)


class Trajectory:
    """A trajectory file opened for reading. Cheap to create; reads on demand.

    ``trust_code`` and ``allow`` are the user's consent to run import paths the file records for its
    model and dataset (see :mod:`landscape.trust`); reading arrays never needs it."""

    def __init__(self, path, trust_code: bool = False, allow=()):
        self.path = Path(path)
        self.trust = Trust.of(trust_code, allow)
        with open_read(self.path, FORMAT) as f:
            if not is_complete(f.attrs):
                raise FileFormatError(f"{self.path} is incomplete (training did not finish)")
            self._check(f)

    def _check(self, f: h5py.File) -> None:
        missing = ([f"attribute {a!r}" for a in ("version", "config") if a not in f.attrs]
                   + [f"group /{g}" for g in ("layout", "runs") if g not in f])
        if missing:
            raise FileFormatError(f"{self.path} is not a valid trajectory file: missing {', '.join(missing)}")
        try:
            self._read_header(f)
        except (KeyError, ValueError, TypeError, AttributeError, OSError) as e:
            what = what_failed(e)
            raise FileFormatError(f"{self.path} is not a valid trajectory file: {what}") from None

    def _read_header(self, f: h5py.File) -> None:
        self.version = check_version(self.path, f.attrs["version"], "trajectory", VERSION)
        self.config = json_attr(f.attrs, "config", dict)
        for key in ("model", "data"):  # what rebuilding reads: {"name": ..., "kwargs" or "options": {...}}
            spec = self.config.get(key, {"name": ""})
            if not (isinstance(spec, dict) and isinstance(spec.get("name"), str)
                    and all(isinstance(spec.get(k, {}), dict) for k in ("kwargs", "options"))):
                raise ValueError(f"the config's {key!r} is not an object with a name and its options")
        batch = self.config.get("eval_batch_size", 1000)  # the default batch of every later evaluation
        if not (isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1):
            raise ValueError(f"the config's 'eval_batch_size' is {batch!r}, not a whole number of at least 1")
        self.layout = _stored_layout(f)
        _check_layout(self.layout)
        self.runs = _run_names(f["runs"])
        self._lengths = {r: _check_run(f[f"runs/{r}"], r, self.layout) for r in self.runs}
        self._frozen = {r: _frozen_of(f[f"runs/{r}"], r, self.layout) for r in self.runs}

    def __repr__(self):
        return f"Trajectory({str(self.path)!r}, runs={self.runs})"

    def layout_of(self, run: str) -> Layout:
        """The layout with the parameters ``run`` never trained marked frozen (its ``frozen`` attribute:
        a recorded model's parameters with ``requires_grad=False`` at every record)."""
        self._check_run(run)
        return self.layout.with_frozen(self._frozen[run]) if self._frozen[run] else self.layout

    def layout_at(self, name: str) -> Layout:
        """:meth:`layout_of` the run of checkpoint ``name`` (RUN or RUN:INDEX)."""
        return self.layout_of(self.resolve(name)[0])

    def num_checkpoints(self, run: str) -> int:
        self._check_run(run)
        return self._lengths[run]

    def _check_run(self, run: str) -> None:
        if run not in self._lengths:
            raise CheckpointError(f"run {run!r} not found in {self.path}; runs: {', '.join(self.runs) or 'none'}")

    def resolve(self, name: str):
        """Checkpoint name -> (run, non-negative index), with a clear error when out of range."""
        run, index = parse_checkpoint_name(name)
        self._check_run(run)
        n = self._lengths[run]
        if not -n <= index < n:
            raise CheckpointError(f"checkpoint {name!r} not found; {run} has {n} checkpoints")
        return run, index % n

    def checkpoint(self, name: str, device="cpu") -> Checkpoint:
        run, index = self.resolve(name)
        with open_read(self.path, FORMAT) as f:
            g = f[f"runs/{run}"]
            metrics = {k: g[k][index] for k in g if k not in ("params", "buffers", "epoch", "step")}
            _check_finite(self.path, f"{run}:{index}", g["params"][index], g["buffers"][index])
            return Checkpoint(f"{run}:{index}", run, index,
                              torch.from_numpy(g["params"][index]).to(device),
                              torch.from_numpy(g["buffers"][index]).to(device),
                              float(g["epoch"][index]), int(g["step"][index]), metrics)

    def params(self, run: str, rows=None) -> np.ndarray:
        """(T, P) parameters of a run (or the selected rows)."""
        self._check_run(run)
        with open_read(self.path, FORMAT) as f:
            ds = f[f"runs/{run}/params"]
            return ds[:] if rows is None else ds[rows]

    def buffers(self, run: str, rows=None) -> np.ndarray:
        self._check_run(run)
        with open_read(self.path, FORMAT) as f:
            ds = f[f"runs/{run}/buffers"]
            return ds[:] if rows is None else ds[rows]

    def run(self, run: str) -> RunData:
        self._check_run(run)
        with open_read(self.path, FORMAT) as f:
            g = f[f"runs/{run}"]
            metrics = {k: g[k][:] for k in g if isinstance(g[k], h5py.Dataset)
                       and k not in ("params", "buffers", "epoch", "step")}
            attrs = _facts(g)
            return RunData(run, g["epoch"][:], g["step"][:], metrics, attrs)

    @property
    def eval_batch_size(self) -> int:
        """The default data batch of every later evaluation (the config's, checked when the file was opened)."""
        return self.config.get("eval_batch_size", 1000)

    def sha256(self) -> str:
        return sha256(self.path)

    def check_trusted(self) -> None:
        """Refuse, before anything is rebuilt, import paths the file records that the user has not
        allowed (:mod:`landscape.trust`); built-in names always pass. (Rebuilding is
        :mod:`landscape.rebuild`'s: the store only reads.)"""
        check_recorded_config(self.config, file=self.path, trust=self.trust)

    def stored_bytes(self, run: str) -> int:
        """Bytes ``run``'s datasets take in the file (weights, buffers and metrics, as stored)."""
        self._check_run(run)
        with open_read(self.path, FORMAT) as f:
            return _stored_bytes(f[f"runs/{run}"])

    def info(self) -> dict:
        """Everything ``landscape info`` shows, as plain data (of each run, its last row's metrics and
        the epochs it spans: read alone, not the whole run)."""
        with open_read(self.path, FORMAT) as f:
            return self._info(f)

    def _info(self, f: h5py.File) -> dict:
        runs = {}
        for r in self.runs:
            g, n = f[f"runs/{r}"], self._lengths[r]
            last = {k: float(ds[-1]) for k, ds in g.items()
                    if k not in ("params", "buffers", "epoch", "step") and ds.ndim == 1 and n}
            runs[r] = {"checkpoints": n, "epochs": [float(g["epoch"][0]), float(g["epoch"][-1])] if n else [],
                       "bytes": _stored_bytes(g), "final": last, "frozen": self._frozen[r]}
        return {"path": str(self.path), "format": FORMAT, "version": self.version, "bytes": self.path.stat().st_size,
                "num_params": self.layout.num_params, "num_buffers": self.layout.num_buffers,
                "runs": runs, "config": self.config, "complete": is_complete(f.attrs)}


def partial_info(tmp) -> dict:
    """:meth:`Trajectory.info` of an interrupted training's ``NAME.partial``: the rows of its last
    save, which a resumed run keeps (``complete`` is False)."""
    with reading_partial(Path(tmp)) as f:
        if f.attrs.get("format") != FORMAT:
            raise FileFormatError(f"{tmp} is not a partial trajectory file")
        t = Trajectory.__new__(Trajectory)  # read from the open partial, not from a file on its own
        t.path, t.trust = Path(tmp), Trust.of(False, ())
        t._check(f)
        return t._info(f)


def _stored_bytes(g: h5py.Group) -> int:
    sizes = []
    g.visititems(lambda _, obj: sizes.append(obj.id.get_storage_size()) if isinstance(obj, h5py.Dataset) else None)
    return sum(sizes)


def _stored_layout(f: h5py.File) -> Layout:
    """The layout a trajectory file records (its ``/layout`` attributes)."""
    return Layout.from_dict({k: json_attr(f["layout"].attrs, k, list) for k in ("params", "buffers")})


def _check_finite(path, name: str, params: np.ndarray, buffers: np.ndarray) -> None:
    """Refuse a checkpoint whose weights hold NaN or infinity (training diverged there): every point
    of a plane or line through it would be NaN."""
    bad = {what: int(np.count_nonzero(~np.isfinite(v))) for what, v in (("parameters", params), ("buffers", buffers))}
    if any(bad.values()):
        counts = " and ".join(f"{n:,} of {len(v):,} {what}" for (what, n), v in zip(bad.items(), (params, buffers)) if n)
        raise CheckpointError(f"checkpoint {name!r} of {path} has non-finite weights ({counts} are NaN or "
                              f"infinite: training diverged there); choose an earlier checkpoint")


def _check_layout(layout: Layout) -> None:
    """The layout's entries tile the flat vectors: each starts where the one before it ends."""
    for kind, entries in (("parameter", layout.params), ("buffer", layout.buffers)):
        offset = 0
        for e in entries:
            if any(not isinstance(n, int) or n < 0 for n in e.shape) or e.offset != offset:
                raise ValueError(f"layout {kind} {e.name!r} (shape {list(e.shape)}, offset {e.offset}) does not "
                                 f"follow the one before it (offset {offset})")
            if not isinstance(getattr(torch, str(e.dtype), None), torch.dtype):
                raise ValueError(f"layout {kind} {e.name!r} has dtype {e.dtype!r}, not a torch dtype")
            offset += e.numel


def _bookkeeping_problem(f: h5py.File) -> str | None:
    """What is wrong with a partial file's record of its finished parts and of the part under way (which
    a resumed run goes on from), or None."""
    if not isinstance(f.get("runs"), h5py.Group):
        return "it has no /runs group"
    runs = set(_run_names(f["runs"]))
    try:
        finished = json_attr(f.attrs, "finished", dict) if "finished" in f.attrs else {}
        rows = json_attr(f.attrs, "progress_rows", dict) if "progress_rows" in f.attrs else {}
    except ValueError as e:
        return str(e)
    state = f.attrs.get("progress_state", 0)
    if not all(isinstance(part, list) and all(isinstance(r, str) and r in runs for r in part)
               for part in finished.values()):
        return "attribute 'finished' does not list runs of the file"
    held = {r: (f[f"runs/{r}/params"].shape or (0,))[0] for r in runs if f"runs/{r}/params" in f}
    if not all(r in held and isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= held[r]
               for r, n in rows.items()):
        return "attribute 'progress_rows' does not count rows its runs hold"
    if isinstance(state, bool) or not isinstance(state, (int, np.integer)) or state < 0:
        return "attribute 'progress_state' is not the number of a save point"
    return None


def _run_names(runs: h5py.Group) -> list:
    """The runs under ``/runs``, in the order HDF5 visits them (by name at every level: ``lookahead/slow``
    before ``lookahead-adam/slow``): every group that holds a dataset (one that has lost its ``params``
    is still a run, and is refused by name rather than hidden)."""
    names = {}  # a dataset's group is visited before it and its siblings' groups
    runs.visititems(lambda name, obj: names.setdefault(name.rpartition("/")[0], None)
                    if isinstance(obj, h5py.Dataset) else None)
    return [n for n in names if n]


def _check_run(g: h5py.Group, run: str, layout: Layout) -> int:
    """The number of rows of ``run``, once its datasets agree with the layout, with each other and
    with the types docs/FORMAT.md gives them."""
    missing = [k for k in ("params", "buffers", "epoch", "step") if k not in g]
    if missing:
        raise ValueError(f"run {run!r} has no {', '.join(missing)}")
    for name in g:
        kind, what = {"params": (np.float32, "float32"), "buffers": (np.float32, "float32"),
                      "step": (np.integer, "integers")}.get(name, (np.number, "numbers"))
        check_dtype(g[name], f"runs/{run}/{name}", kind, what)
    rows = g["params"].shape[0] if g["params"].ndim == 2 else -1
    for name, width in (("params", layout.num_params), ("buffers", layout.num_buffers)):
        if g[name].shape != (rows, width):
            raise ValueError(f"run {run!r}: {name} has shape {list(g[name].shape)}, but the layout has "
                             f"{width} values per row" + (f" and the run {rows} rows" if rows >= 0 else ""))
    for name, ds in g.items():
        if ds.ndim == 0 or ds.shape[0] != rows:
            raise ValueError(f"run {run!r}: {name} has {ds.shape[0] if ds.ndim else 0} rows, params has {rows}")
    return rows


def _facts(g: h5py.Group) -> dict:
    """A run's attributes: its facts, JSON (FORMAT.md), parsed; any other (a note someone added with
    h5py) as it is, a number or text."""
    facts = {}
    for name in g.attrs:
        try:
            facts[name] = json_attr(g.attrs, name)
        except ValueError:
            value = g.attrs[name]
            facts[name] = value.item() if isinstance(value, np.generic) else \
                value.decode(errors="replace") if isinstance(value, bytes) else value
    return facts


def _frozen_of(g: h5py.Group, run: str, layout: Layout) -> list:
    """The parameter names of ``run``'s ``frozen`` attribute (none when absent)."""
    if "frozen" not in g.attrs:
        return []
    names = json_attr(g.attrs, "frozen")
    known = {e.name for e in layout.params}
    if not isinstance(names, list) or not all(isinstance(n, str) and n in known for n in names):
        raise ValueError(f"run {run!r}: attribute 'frozen' is not a list of the layout's parameter names")
    return names


def open_trajectory(path, trust_code: bool = False, allow=()) -> Trajectory:
    """Open a trajectory file for reading. Import paths it records for its model and dataset run only
    with ``trust_code=True`` or when ``allow`` names them (module prefixes or exact paths); see
    :mod:`landscape.trust`."""
    return Trajectory(path, trust_code, allow)
