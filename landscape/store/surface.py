"""Surface files (format ``landscape.surface``, version 1; see docs/FORMAT.md).

Work in progress lives in ``NAME.partial`` (``complete = False``, a ``/done`` mask of computed points,
NaN elsewhere) and is flushed after every block of points, so an interrupted computation resumes
from it. :meth:`SurfaceWriter.close` marks it complete and renames it into place: a file at the
requested path is always finished.

Example::

    w = SurfaceWriter.create("plane.h5", spec, x, y, basis, points, paths, trajectory="run.h5")
    w.write(flat_indices, {"train_loss": ..., "train_err": ..., "test_loss": ..., "test_err": ...})
    w.close()
    surf = open_surface("plane.h5")
    surf.values["test_err"][i, j]   # belongs to (surf.x[i], surf.y[j])
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import FileFormatError, StalePartialError, WriteError
from .files import (OutputLock, PartialH5, check_dtype, check_task, check_version, claim_output, is_complete, json_attr,
                    open_read, partial_path, prepare_output, read_partial, reading_partial, sha256, to_json,
                    what_failed)

FORMAT = "landscape.surface"
VERSION = 1
METRICS = ("train_loss", "train_err", "test_loss", "test_err")
# what a surface without a recorded task holds (every file before tasks existed)
CLASSIFICATION = {"name": "classification", "metrics": ["err"], "primary": "err", "percent": ["err"]}


@dataclass
class PathData:
    """A run's checkpoints projected into the plane or onto the line."""
    coords: np.ndarray     # (T, 2) or (T, 1)
    distance: np.ndarray   # (T,) Euclidean distance from the plane/line (0 = lies on it)
    epoch: np.ndarray      # (T,)


@dataclass
class PointData:
    coords: np.ndarray     # (2,) or (1,)
    distance: float


class SurfaceWriter:
    """Creates or resumes a surface file. Use :meth:`create`; check :attr:`done` for what is left.

    The disk changes only at :meth:`write` and :meth:`close`, each all at once (see :mod:`.journal`):
    ``NAME.partial`` always holds the points of the last write, whatever moment a run dies or a disk
    fills. ``NAME.lock`` keeps a second writer of the same output out while this one lives."""

    def __init__(self, path: Path, store: PartialH5, lock: OutputLock):
        self.path, self.store, self.lock = path, store, lock
        self.tmp = partial_path(path)
        self.saved = int(self.done.sum())  # points the disk holds

    @property
    def file(self) -> h5py.File:
        return self.store.h5

    @classmethod
    def create(cls, path, spec: dict, x, y, basis: dict, points: dict, paths: dict,
               trajectory=None, metrics=METRICS, overwrite: bool = False, shape=None,
               inputs=(), recorded=None) -> "SurfaceWriter":
        """Start a new surface file, or resume ``path.partial`` when it holds the same spec (``derived``
        aside) and comes from the same trajectory file. A partial without a computed point is replaced.

        ``basis``: {"origin", "u", "v" (planes only)} float32 (P,) arrays (``u`` is (R, P) for rays);
        ``points``: name -> PointData; ``paths``: run -> PathData; ``metrics``: the value datasets to
        create; ``shape``: of the values, when not (nx,) or (nx, ny) (rays: (R, nx)); ``inputs``:
        further files the values are computed from (``trajectory`` is one), never to be written over;
        ``recorded``: (path, SHA-256) of the trajectory to record instead of ``trajectory``'s (a surface
        saved from memory keeps the fingerprint taken when it was computed)."""
        path = prepare_output(path, overwrite, inputs=(trajectory, *inputs))
        tmp = partial_path(path)
        spec_json = to_json(spec)
        if trajectory is not None:
            recorded = (str(trajectory), sha256(trajectory))
        lock = claim_output(path, overwrite)
        try:
            if not overwrite and _held_points(tmp, spec_json, trajectory):
                return cls(path, PartialH5(tmp, path, create=False), lock)
            store = PartialH5(tmp, path, create=True, track_order=True)
            try:
                _write_header(store.h5, spec_json, x, y, basis, points, paths, recorded, metrics, shape)
                store.save()
            except BaseException as e:
                store.remove()  # nothing computed: nothing left behind
                if isinstance(e, WriteError):
                    raise WriteError(f"{e}; nothing was computed yet") from None
                raise
            return cls(path, store, lock)
        except BaseException:
            lock.release()
            raise

    @property
    def shape(self) -> tuple:
        return self.file["done"].shape

    @property
    def spec(self) -> dict:
        """The spec stored in the file (on resume: the one of the first run, ``derived`` included)."""
        return json.loads(self.file.attrs["spec"])

    def grid(self) -> tuple:
        """(x, y) as stored; y is None for lines."""
        return self.file["grid/x"][()], self.file["grid/y"][()] if "grid/y" in self.file else None

    def basis(self) -> dict:
        return {k: self.file[f"basis/{k}"][()] for k in self.file["basis"]}

    @property
    def points_per_call(self) -> int | None:
        """The points per batched call the values are computed with (kept, so that a resumed
        computation uses the same and its values equal an uninterrupted one's bit for bit)."""
        k = self.file.attrs.get("points_per_call")
        return None if k is None else int(k)

    @points_per_call.setter
    def points_per_call(self, k: int) -> None:
        self.file.attrs["points_per_call"] = int(k)

    @property
    def computed_on(self) -> str | None:
        """The device the points per call were chosen for (absent in files of earlier versions)."""
        device = self.file.attrs.get("computed_on")
        return None if device is None else str(device)

    @computed_on.setter
    def computed_on(self, device: str) -> None:
        self.file.attrs["computed_on"] = str(device)

    @property
    def done(self) -> np.ndarray:
        return self.file["done"][()]

    def write(self, flat_indices, values: dict) -> None:
        """Store the values of points given by flat (C-order) indices, mark them done and put them on
        the disk (a WriteError keeps the points of the last write; :attr:`saved` counts them)."""
        flat_indices = np.asarray(flat_indices)
        for name, vals in values.items():
            ds = self.file[f"values/{name}"]
            arr = ds[()]
            arr.reshape(-1)[flat_indices] = np.asarray(vals, np.float64)
            ds[()] = arr
        done = self.file["done"][()]
        done.reshape(-1)[flat_indices] = True
        self.file["done"][()] = done
        self.store.save()
        self.saved = int(done.sum())

    def close(self) -> Path:
        """Mark complete (every point done) and move into place; otherwise keep the .partial file."""
        complete = bool(self.file["done"][()].all())
        if not complete:
            self.suspend()
            raise FileFormatError(f"{self.tmp} is missing points; run the same command again to finish it")
        self.file.attrs["complete"] = True
        try:
            return self.store.finish()
        finally:
            self.lock.release()

    def suspend(self) -> None:
        """Close without completing: computed points stay resumable in the .partial file; a partial
        without any is removed (nothing is left behind by a run that computed nothing)."""
        if self.lock.fd < 0:
            return
        try:
            if self.saved:
                self.store.suspend()
            else:
                self.store.remove()
        finally:
            self.lock.release()

    def abort(self) -> None:
        """Close and delete the .partial file (nothing in it is worth keeping)."""
        if self.lock.fd < 0:
            return
        try:
            self.store.remove()
        finally:
            self.lock.release()


def _held_points(tmp: Path, spec_json: str, trajectory) -> bool:
    """Whether ``tmp`` holds computed points of this very spec and trajectory (resume from it). A
    partial without computed points (or unreadable: nothing was saved in it) is replaced; one with
    points of another spec or trajectory is refused."""
    reading = read_partial(tmp)
    if reading is None:
        return False
    with reading as f:
        try:
            done = int(np.count_nonzero(f["done"][()]))
        except (KeyError, OSError, TypeError, ValueError):
            done = 0
        if not done:
            return False
        try:
            held, wanted = _compared(f.attrs.get("spec")), _compared(spec_json)
            same = f.attrs.get("format") == FORMAT and held == wanted
        except ValueError:
            held, wanted, same = {}, {}, False
        held_files = held.get("other_files") if isinstance(held.get("other_files"), dict) else {}
        others = [n for n, d in wanted.get("other_files", {}).items() if n in held_files and held_files[n] != d]
        if not same and others and dict(held, other_files=None) == dict(wanted, other_files=None):
            raise StalePartialError(f"{tmp} holds unfinished work from another file for checkpoint {others[0]} (its "
                                    "SHA-256 differs); delete it or pass --overwrite to discard it")
        if not same:
            raise StalePartialError(f"{tmp} holds {done} computed points for a different spec; delete it, "
                                  f"choose another output, or pass --overwrite to discard it")
        if trajectory is not None and f.attrs.get("trajectory_sha256") not in (None, sha256(trajectory)):
            raise StalePartialError(f"{tmp} holds unfinished work from another version of {trajectory} "
                                  f"(its SHA-256 differs); delete it or pass --overwrite to discard it")
    return True


def _write_header(f: h5py.File, spec_json, x, y, basis, points, paths, recorded, metrics, shape) -> None:
    """Everything of a new surface file but its values: NaN, none done. ``recorded``: (path, SHA-256)
    of the trajectory the values come from, or None."""
    f.attrs["format"] = FORMAT
    f.attrs["version"] = VERSION
    f.attrs["spec"] = spec_json
    f.attrs["complete"] = False
    if recorded is not None and recorded[0] is not None:
        f.attrs["trajectory"], f.attrs["trajectory_sha256"] = recorded
    x = np.asarray(x, np.float64)
    shape = tuple(shape) if shape is not None else ((len(x),) if y is None else (len(x), len(y)))
    f.create_dataset("grid/x", data=x, track_times=False)
    if y is not None:
        f.create_dataset("grid/y", data=np.asarray(y, np.float64), track_times=False)
    for m in metrics:
        f.create_dataset(f"values/{m}", data=np.full(shape, np.nan), track_times=False)
    f.create_dataset("done", data=np.zeros(shape, bool), track_times=False)
    for k, v in basis.items():
        f.create_dataset(f"basis/{k}", data=np.asarray(v, np.float32), track_times=False)
    for name, p in points.items():
        ds = f.create_dataset(f"points/{name}", data=np.asarray(p.coords, np.float64), track_times=False)
        ds.attrs["distance"] = float(p.distance)
    for run, p in paths.items():
        f.create_dataset(f"paths/{run}", data=np.asarray(p.coords, np.float64), track_times=False)
        f.create_dataset(f"path_distances/{run}", data=np.asarray(p.distance, np.float64), track_times=False)
        f.create_dataset(f"path_epochs/{run}", data=np.asarray(p.epoch, np.float64), track_times=False)


def _compared(spec) -> dict:
    """The part of a spec that must match for a computation to resume: everything but ``derived``
    (values computed from the inputs, which may differ in the last bits between machines)."""
    try:
        d = json.loads(spec) if isinstance(spec, str) else dict(spec or {})
    except RecursionError:
        raise ValueError("the spec is nested too deep") from None
    if not isinstance(d, dict):
        raise ValueError("the spec is not a JSON object")
    d.pop("derived", None)
    return d


class MemorySurfaceWriter:
    """The SurfaceWriter interface without a file (``compute_surface(..., out=None)``)."""

    def __init__(self, spec: dict, x, y, basis: dict, points: dict, paths: dict, metrics=METRICS, shape=None,
                 trajectory=None):
        x = np.asarray(x, np.float64)
        shape = tuple(shape) if shape is not None else ((len(x),) if y is None else (len(x), len(y)))
        self.spec, self.x, self.y, self._basis = spec, x, None if y is None else np.asarray(y, np.float64), basis
        self.points, self.paths, self.path = points, paths, None
        self.points_per_call = self.computed_on = None
        self.values = {m: np.full(shape, np.nan) for m in metrics}
        self._done = np.zeros(shape, bool)
        self.trajectory = None if trajectory is None else str(trajectory)
        self.trajectory_sha256 = None if trajectory is None else sha256(trajectory)

    @property
    def shape(self) -> tuple:
        return self._done.shape

    @property
    def done(self) -> np.ndarray:
        return self._done.copy()

    def grid(self) -> tuple:
        return self.x, self.y

    def basis(self) -> dict:
        return self._basis

    def write(self, flat_indices, values: dict) -> None:
        flat_indices = np.asarray(flat_indices)
        for name, vals in values.items():
            self.values[name].reshape(-1)[flat_indices] = np.asarray(vals, np.float64)
        self._done.reshape(-1)[flat_indices] = True

    def close(self) -> "Surface":
        return Surface(None, json.loads(to_json(self.spec)), self.x, self.y, self.values, self._done,
                       self.points, self.paths, self.trajectory, self.trajectory_sha256,
                       {k: np.asarray(v, np.float32) for k, v in self._basis.items()}, self.points_per_call,
                       self.computed_on)

    def suspend(self) -> None:
        pass


@dataclass
class Surface:
    """A surface file read into memory (everything but the basis, which is read on demand)."""
    path: Path
    spec: dict
    x: np.ndarray
    y: np.ndarray | None
    values: dict
    done: np.ndarray
    points: dict = field(default_factory=dict)  # name -> PointData
    paths: dict = field(default_factory=dict)   # run -> PathData
    trajectory: str | None = None
    trajectory_sha256: str | None = None
    vectors: dict | None = field(default=None, repr=False)  # the basis, held when not read from a file
    points_per_call: int | None = None
    computed_on: str | None = None  # the kind of device the points per call were chosen for

    @property
    def kind(self) -> str:
        return "line" if self.y is None else "plane"

    @property
    def task(self) -> dict:
        """The task that scored the values (``spec["task"]``; a surface that names none is
        classification's: loss and error in percent)."""
        return self.spec.get("task") or CLASSIFICATION

    @property
    def primary_metric(self) -> str:
        """The test value figures show beside the train loss: ``test_err`` for classification,
        ``test_mae`` for regression (``test_loss`` when the task has no other metric)."""
        name = f"test_{self.task.get('primary', 'err')}"
        return name if name in self.values else "test_loss"

    def in_percent(self, metric: str) -> bool:
        """Whether the task gives ``metric`` in percent (``test_err``; a user's task names its own)."""
        return metric.split("_", 1)[-1] in self.task.get("percent", ())

    def maximized(self, metric: str) -> bool:
        """Whether larger values of ``metric`` (``test_acc``) are better: the task names it in ``maximize``."""
        return metric.split("_", 1)[-1] in self.task.get("maximize", ())

    @property
    def rays(self) -> bool:
        """A line file holding several rays: values are (R, nx), ``values[m][r]`` is ray r."""
        return self.y is None and np.ndim(self.done) == 2

    def info(self) -> dict:
        """What ``landscape info`` shows of a surface, as plain data."""
        def span(v):
            finite = v[np.isfinite(v)]
            return [float(finite.min()), float(finite.max())] if finite.size else None
        return {"path": str(self.path), "format": FORMAT, "version": VERSION, "kind": "rays" if self.rays else self.kind,
                "shape": list(self.done.shape), "done": int(self.done.sum()),
                "x": [float(self.x[0]), float(self.x[-1])], "y": None if self.y is None else [float(self.y[0]), float(self.y[-1])],
                "task": self.task.get("name"), "values": {k: span(v) for k, v in self.values.items()},
                "points": {n: [float(c) for c in p.coords] for n, p in self.points.items()},
                "trajectory": self.trajectory, "trajectory_sha256": self.trajectory_sha256,
                "points_per_call": self.points_per_call, "spec": self.spec}

    @property
    def num_params(self) -> int | None:
        """The parameters of the model the surface is of (its origin's length; None for a surface made
        in memory without its basis)."""
        if self.vectors is not None:
            return int(self.vectors["origin"].shape[-1])
        try:
            with open_read(self.path, FORMAT) as f:
                return int(f["basis/origin"].shape[-1])
        except (TypeError, FileFormatError, KeyError):  # no file (any more): not known
            return None

    def basis(self) -> dict:
        """origin, u, v (planes) or u (lines): float32 (P,) vectors ((R, P) for rays)."""
        if self.vectors is not None:
            return self.vectors
        with open_read(self.path, FORMAT) as f:
            return {k: f[f"basis/{k}"][()] for k in f["basis"]}

    def save(self, path, overwrite: bool = False) -> Path:
        """Write this surface as a surface file (docs/FORMAT.md), the file ``landscape plane`` or
        ``line`` writes for the same values; returns its path. :func:`open_surface` reads it back."""
        if not self.done.all():
            raise FileFormatError(f"this surface misses {int((~self.done).sum())} points; a saved file is complete")
        writer = SurfaceWriter.create(path, self.spec, self.x, self.y, self.basis(), self.points, self.paths,
                                      metrics=tuple(self.values), overwrite=overwrite, shape=self.done.shape,
                                      inputs=[self.path, self.trajectory],
                                      recorded=(self.trajectory, self.trajectory_sha256))
        try:
            writer.write(np.arange(self.done.size), {k: v.reshape(-1) for k, v in self.values.items()})
            if self.points_per_call is not None:
                writer.points_per_call = self.points_per_call
            if self.computed_on is not None:
                writer.computed_on = self.computed_on
        except BaseException:
            writer.abort()
            raise
        return writer.close()


def _walk(group: h5py.Group) -> dict:
    out = {}
    group.visititems(lambda name, obj: out.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
    return out


def open_surface(path) -> Surface:
    with open_read(path, FORMAT) as f:
        if not is_complete(f.attrs):
            raise FileFormatError(f"{path} is incomplete; run the command that made it again to finish it")
        return _read_surface(path, f)


def open_partial_surface(tmp) -> Surface:
    """The points an interrupted computation's ``NAME.partial`` holds (its last save), for a look
    (``landscape info``): a :class:`Surface` whose ``done`` mask is not all true."""
    with reading_partial(Path(tmp)) as f:
        if f.attrs.get("format") != FORMAT:
            raise FileFormatError(f"{tmp} is not a partial surface file")
        return _read_surface(tmp, f)


def _read_surface(path, f: h5py.File) -> Surface:
    check_version(path, f.attrs.get("version"), "surface", VERSION)
    try:
        spec = _check_surface(f)
        points = {n: PointData(ds[()], float(ds.attrs.get("distance", 0.0)))
                  for n, ds in _walk(f["points"]).items()} if "points" in f else {}
        paths = {}
        if "paths" in f:
            for run, ds in _walk(f["paths"]).items():
                coords = ds[()]
                dist = f[f"path_distances/{run}"][()] if f"path_distances/{run}" in f else np.zeros(len(coords))
                ep = (f[f"path_epochs/{run}"][()] if f"path_epochs/{run}" in f
                      else np.arange(len(coords), dtype=float))
                paths[run] = PathData(coords, dist, ep)
        return Surface(Path(path), spec, f["grid/x"][()], f["grid/y"][()] if "grid/y" in f else None,
                       {k: f[f"values/{k}"][()] for k in f["values"]}, f["done"][()], points, paths,
                       f.attrs.get("trajectory"), f.attrs.get("trajectory_sha256"),
                       points_per_call=int(f.attrs["points_per_call"]) if "points_per_call" in f.attrs else None,
                       computed_on=str(f.attrs["computed_on"]) if "computed_on" in f.attrs else None)
    except (KeyError, ValueError, TypeError, AttributeError, OSError) as e:
        what = what_failed(e)
        raise FileFormatError(f"{path} is not a valid surface file: {what}") from None


def _check_surface(f: h5py.File) -> dict:
    """The spec, once the grid, the values and the done mask agree in shape and kind with each other
    and with the spec (else a ValueError)."""
    spec = json_attr(f.attrs, "spec", dict)
    check_task(spec.get("task"))
    for name in ("grid/x", "done", "values"):
        if name not in f:
            raise ValueError(f"missing /{name}")
    kind = "plane" if "grid/y" in f else "line"
    if spec.get("kind", kind) != kind:  # e.g. a plane whose /grid/y is gone would read as rays
        raise ValueError(f"spec says {spec['kind']!r} but /grid/y is {'present' if 'grid/y' in f else 'missing'}")
    axes = ["grid/x"] + (["grid/y"] if "grid/y" in f else [])
    for name in axes:
        _check_axis(f[name], name)
    grid = tuple(f[name].shape[0] for name in axes)
    check_dtype(f["done"], "done", np.bool_, "booleans")
    done = f["done"].shape
    rays = len(axes) == 1 and len(done) == 2
    if done != grid and not (rays and done[1:] == grid and done[0] >= 1):
        raise ValueError(f"/done has shape {list(done)}, the grid {' x '.join(map(str, grid))}")
    for name, ds in f["values"].items():
        check_dtype(ds, f"values/{name}", np.floating, "floats")
        if ds.shape != done:
            raise ValueError(f"/values/{name} has shape {list(ds.shape)}, the grid is {list(done)}")
    # what the spec says is there: every value its task lists (the train and test loss at least), its grid
    named = (spec.get("task") or {}).get("values") or ("train_loss", "test_loss")
    missing = [n for n in named if n not in f["values"]]
    if missing:
        raise ValueError(f"missing /values/{missing[0]}, which the spec lists")
    said = spec.get("grid") or {}
    for axis, n in zip("xy", grid):
        if axis in said and (not isinstance(said[axis], list) or len(said[axis]) != 3 or said[axis][2] != n):
            raise ValueError(f"the spec's grid {axis} {said[axis]} disagrees with /grid/{axis} of {n} points")
    _check_points(f, len(axes))
    return spec


def _check_points(f: h5py.File, dims: int) -> None:
    """Checkpoints and paths in the surface's coordinates: a point (dims,), a path (T, dims) with T
    distances and epochs."""
    for group in ("points", "paths", "path_distances", "path_epochs"):
        if group in f and not isinstance(f[group], h5py.Group):
            raise ValueError(f"/{group} is not a group")
        for name, ds in (_walk(f[group]).items() if group in f else ()):
            check_dtype(ds, f"{group}/{name}", np.floating, "floats")
            if group == "points" and ds.shape != (dims,):
                raise ValueError(f"/points/{name} has shape {list(ds.shape)}, not the {dims} coordinate(s) of "
                                 "the surface")
            if group == "paths" and (ds.ndim != 2 or ds.shape[1] != dims):
                raise ValueError(f"/paths/{name} has shape {list(ds.shape)}, not (checkpoints, {dims})")
            if group != "points" and group != "paths":
                path = f"paths/{name}"
                if path not in f or ds.shape != f[path].shape[:1]:
                    raise ValueError(f"/{group}/{name} has shape {list(ds.shape)}, not one value per checkpoint "
                                     f"of /{path}")


def _check_axis(ds, name: str) -> None:
    """A grid axis: non-empty, 1-D, finite floats in increasing order (what figures and the explorer
    draw against)."""
    check_dtype(ds, name, np.floating, "floats")
    if ds.ndim != 1 or ds.shape[0] < 1:
        raise ValueError(f"/{name} has shape {list(ds.shape)}; a grid axis is a non-empty 1-D dataset")
    x = ds[()]
    if not np.isfinite(x).all():
        raise ValueError(f"/{name} holds NaN or infinite coordinates")
    if np.any(np.diff(x) <= 0):
        raise ValueError(f"/{name} is not in increasing order")


def export_loss_landscape(surface: Surface, out, overwrite: bool = False, inputs=()) -> Path:
    """Write ``surface`` in the layout tomgoldstein/loss-landscape's plotting scripts read: root
    datasets ``xcoordinates``, ``ycoordinates`` (planes), ``train_loss``, ``train_acc``,
    ``test_loss``, ``test_acc`` (accuracy in %, written only for a task with an error in percent),
    2-D arrays shaped (ny, nx) and indexed [iy, ix].
    ``inputs``: files that ``out`` must not be (the surface file itself is always one)."""
    if surface.y is None and np.ndim(surface.done) != 1:
        raise FileFormatError("loss-landscape files hold one line or one plane; this file holds "
                              f"{surface.done.shape[0]} rays")
    out = prepare_output(out, overwrite, inputs=(surface.path, *inputs))
    with claim_output(out, overwrite):
        store = PartialH5(partial_path(out), out, create=True)
        try:
            f = store.h5
            f.create_dataset("xcoordinates", data=surface.x)
            if surface.y is not None:
                f.create_dataset("ycoordinates", data=surface.y)
            for split in ("train", "test"):
                if f"{split}_loss" not in surface.values:
                    continue
                # accuracy only where the task has an error in percent (classification, token error)
                err = surface.values.get(f"{split}_err") if "err" in surface.task.get("percent", ()) else None
                for name, v in ((f"{split}_loss", surface.values[f"{split}_loss"]),
                                (f"{split}_acc", None if err is None else 100.0 - err)):
                    if v is not None:  # ours is [ix, iy]; theirs is [iy, ix]
                        f.create_dataset(name, data=v.T if surface.y is not None else v)
            return store.finish()
        except BaseException:
            store.remove()
            raise
