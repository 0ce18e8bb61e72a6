"""Sharpness files (format ``landscape.sharpness``, version 1; see docs/FORMAT.md): the Hessian
eigenvalues, trace and epsilon-sharpness of checkpoints, one row per checkpoint.

Written whole and renamed into place, so a file at the requested path is always complete. While
the checkpoints are computed, ``NAME.partial`` keeps the results of those done (JSON, replaced whole
after each): an interrupted computation goes on from them.

Example::

    s = open_sharpness("sharpness.h5")
    for r in s.results:
        print(r["checkpoint"], r["eigenvalues"][0], r["trace"], r["epsilon_sharpness"])
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import FileFormatError, StalePartialError
from .files import (check_dtype, check_task, check_version, claim_output, interrupts_deferred, is_complete, json_attr,
                    open_read, partial_path, prepare_output, publish, reason, sha256, to_json, what_failed, write_failed)

FORMAT = "landscape.sharpness"
VERSION = 1
PROGRESS_FORMAT = "landscape.sharpness.partial"
# (N,) float64 datasets, one value per checkpoint
SCALARS = ("epoch", "loss", "trace", "trace_stderr", "epsilon_sharpness", "eigenvector_sharpness",
           "epsilon_ratio", "lanczos_steps", "seconds")
# (N, ...) float64 datasets
ARRAYS = ("eigenvalues", "residuals", "trace_probes", "density_nodes", "density_weights")
# and /metrics/NAME, float64 (N,): the evaluator's values of the trajectory's task (train_loss, train_err,
# test_loss, test_err for classification; train_mae, ... for regression)


@dataclass
class SharpnessFile:
    path: Path | None
    spec: dict
    results: list = field(default_factory=list)  # one dict per checkpoint, in the order computed
    trajectory: str | None = None
    trajectory_sha256: str | None = None
    source_sha256: str | None = None  # the trajectory's own source (an averaged file's input), when it has one
    seconds: float = float("nan")

    @property
    def num_params(self) -> int | None:
        """The parameters of the model the checkpoints are of (None in a file that does not say)."""
        return self.spec.get("num_params")

    @property
    def epsilon(self) -> float:
        return float(self.spec["sharpness"]["epsilon"])

    @property
    def test_metric(self) -> str:
        """The test value that tables and figures show: ``test_<primary>`` of the task the file records
        (``test_err`` for classification, and for files written before tasks were recorded)."""
        return f"test_{(self.spec.get('task') or {}).get('primary', 'err')}"

    def format_test_metric(self, value: float) -> str:
        """``value`` of :attr:`test_metric` as tables show it: ``4.90 %`` for a metric in percent."""
        percent = (self.spec.get("task") or {"percent": ["err"]}).get("percent", ())
        return f"{value:.2f} %" if self.test_metric.removeprefix("test_") in percent else f"{value:.4g}"

    def save(self, path, overwrite: bool = False) -> "SharpnessFile":
        """Write these numbers as a sharpness file (docs/FORMAT.md), the file ``landscape sharpness`` writes;
        return it as read back (:func:`open_sharpness`)."""
        return write_sharpness(path, self.spec, self.results, overwrite=overwrite, source_sha256=self.source_sha256,
                               recorded=(self.trajectory, self.trajectory_sha256), inputs=(self.path, self.trajectory))

    def summary(self) -> list:
        """Per checkpoint, the numbers ``landscape sharpness --json`` prints."""
        out = []
        for r in self.results:
            d = {"checkpoint": r["checkpoint"], "epoch": r["epoch"],
                 "eigenvalues": [float(v) for v in r["eigenvalues"]], "trace": r["trace"],
                 "trace_stderr": r["trace_stderr"], "epsilon": self.epsilon,
                 "epsilon_sharpness": r["epsilon_sharpness"], "eigenvector_sharpness": r["eigenvector_sharpness"],
                 "train_loss": r["metrics"]["train_loss"], self.test_metric: r["metrics"][self.test_metric]}
            out.append(d)
        return out


class SharpnessProgress:
    """``NAME.partial`` of a sharpness computation: the results of the checkpoints done so far, keyed
    by their weights' identity, under the spec they were computed with. Replaced whole after every
    checkpoint (written beside, synced, renamed), so an interrupted run goes on from what it holds;
    one of another spec is refused (``overwrite`` discards it)."""

    def __init__(self, out, spec: dict, overwrite: bool = False):
        self.path, self.spec = partial_path(Path(out)), json.loads(to_json(spec))
        self.done = self._read(overwrite)

    def _read(self, overwrite: bool) -> dict:
        if not self.path.exists():
            return {}
        held = read_progress(self.path)
        if held is None:
            what = "other work (not a sharpness computation's)"
        elif held.get("spec") != self.spec:
            what = "a sharpness computation of other settings"
        else:
            return held["results"]
        if overwrite:
            return {}
        raise StalePartialError(f"{self.path} holds {what}; run that command again to finish it, or pass "
                                "--overwrite to discard it")

    def add(self, key: str, result: dict) -> None:
        self.done[key] = json.loads(to_json(_plain(result)))
        tmp = self.path.with_name(self.path.name + ".tmp")
        with interrupts_deferred():  # the kept results are replaced whole or not at all
            try:
                tmp.write_text(json.dumps({"format": PROGRESS_FORMAT, "spec": self.spec, "results": self.done}))
                publish(tmp, self.path)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise write_failed(e, self.path) from None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def read_progress(path) -> dict | None:
    """What the ``NAME.partial`` of a sharpness computation holds (``{"format", "spec", "results"}``,
    the results keyed by their checkpoint's weights), or None when ``path`` is no such file."""
    try:  # (written beside and renamed: never cut off)
        held = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    ok = isinstance(held, dict) and held.get("format") == PROGRESS_FORMAT and isinstance(held.get("results"), dict)
    return held if ok else None


def _plain(value):
    """Arrays as lists, for JSON (float64 values come back exactly)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.tolist() if isinstance(value, np.ndarray) else value


def write_sharpness(path, spec: dict, results: list, trajectory=None, overwrite: bool = False,
                    source_sha256: str | None = None, prepared: bool = False, recorded=None,
                    inputs=()) -> SharpnessFile:
    """Write the results of :func:`landscape.sharpness.compute_sharpness` (a list of per-checkpoint
    dicts) into a new sharpness file; return it as read back. ``source_sha256``: the trajectory's
    source (an averaged file's input, whose runs it holds as they are); ``prepared``: the caller
    checked the output and holds its lock; ``recorded``: (path, SHA-256) of the trajectory to record
    instead of ``trajectory``'s (numbers saved from memory keep what they were computed from);
    ``inputs``: files the output must not be."""
    if not prepared:  # checked, then written holding the output's lock
        path = prepare_output(path, overwrite, inputs=((trajectory,) if trajectory else ()) + tuple(inputs))
        with claim_output(path, overwrite):
            return write_sharpness(path, spec, results, trajectory, overwrite, source_sha256, True, recorded)
    path = Path(path)
    tmp = Path(f"{partial_path(path)}.h5")  # (NAME.partial holds the computation's progress)
    try:
        f = h5py.File(tmp, "w", track_order=True)
    except OSError as e:
        raise FileFormatError(f"cannot write {path}: {reason(e)}") from None
    try:
        with f:
            f.attrs["format"] = FORMAT
            f.attrs["version"] = VERSION
            f.attrs["spec"] = to_json(spec)
            f.attrs["complete"] = True
            if trajectory is not None:
                recorded = (str(trajectory), sha256(trajectory))
            for key, value in zip(("trajectory", "trajectory_sha256"), recorded or ()):
                if value is not None:
                    f.attrs[key] = value
            if source_sha256 is not None:
                f.attrs["source_sha256"] = source_sha256
            f.create_dataset("checkpoints", data=np.array([r["checkpoint"] for r in results], dtype=object),
                             dtype=h5py.string_dtype())
            for name in SCALARS:
                f.create_dataset(name, data=np.array([float(r.get(name, np.nan)) for r in results]))
            for name in ARRAYS:
                if results and all(name in r for r in results):
                    f.create_dataset(name, data=np.stack([np.asarray(r[name], np.float64) for r in results]))
            for name in (results[0]["metrics"] if results else ()):
                f.create_dataset(f"metrics/{name}", data=np.array([r["metrics"][name] for r in results]))
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return open_sharpness(path)


def open_sharpness(path) -> SharpnessFile:
    with open_read(path, FORMAT) as f:
        if not is_complete(f.attrs):
            raise FileFormatError(f"{path} is incomplete")
        check_version(path, f.attrs.get("version"), "sharpness", VERSION)
        try:
            spec, n = _check_sharpness(f)
            names = [v.decode() if isinstance(v, bytes) else str(v) for v in f["checkpoints"][()]]
            results = [{"checkpoint": name, "metrics": {}} for name in names]
            for name in SCALARS + ARRAYS:
                values = f[name][()] if name in f else np.full(n, np.nan) if name in SCALARS else None
                for r, v in zip(results, () if values is None else values):
                    r[name] = v if np.ndim(v) else float(v)  # rows of arrays stay numpy (no Python floats)
            for name, values in (f["metrics"].items() if "metrics" in f else ()):
                for r, v in zip(results, values[()]):
                    r["metrics"][name] = float(v)
        except (KeyError, ValueError, TypeError, OSError) as e:
            what = what_failed(e)
            raise FileFormatError(f"{path} is not a valid sharpness file: {what}") from None
        return SharpnessFile(Path(path), spec, results, f.attrs.get("trajectory"), f.attrs.get("trajectory_sha256"),
                             f.attrs.get("source_sha256"))


# the options of the spec that bound the length of each axis of an array's row
ROW_AXES = {"eigenvalues": ("top_k",), "residuals": ("top_k",), "trace_probes": ("probes",),
            "density_nodes": ("density_runs", "density_steps"), "density_weights": ("density_runs", "density_steps")}
REQUIRED = ("eigenvalues", "trace", "epsilon_sharpness", "metrics/train_loss")


def _check_sharpness(f: h5py.File) -> tuple:
    """(the spec, the number of checkpoints N), once every dataset is read to hold numbers of the
    shape the format gives it: (N,), or (N, ...) no longer than the spec's options allow (else a
    ValueError, before anything is read whole)."""
    if "spec" not in f.attrs:
        raise ValueError("missing attribute 'spec'")
    spec = json_attr(f.attrs, "spec", dict)
    options = spec.get("sharpness")
    if not isinstance(options, dict):
        raise ValueError("attribute 'spec' has no 'sharpness' object")
    if not _positive(options.get("epsilon")):
        raise ValueError("the spec's epsilon is not a positive number")
    check_task(spec.get("task"))
    if "metrics" in f and not isinstance(f["metrics"], h5py.Group):
        raise ValueError("/metrics is not a group")
    checkpoints = f.get("checkpoints")
    if not isinstance(checkpoints, h5py.Dataset) or checkpoints.ndim != 1 or checkpoints.dtype.kind not in "OS":
        raise ValueError("/checkpoints is not a list of names")
    n = len(checkpoints)
    for name in REQUIRED + (f"metrics/test_{(spec.get('task') or {}).get('primary', 'err')}",):  # (tables show it)
        if name not in f:
            raise ValueError(f"missing /{name}")
    for name in SCALARS + ARRAYS + tuple(f"metrics/{m}" for m in (f["metrics"] if "metrics" in f else ())):
        if name not in f:
            continue
        check_dtype(f[name], name, np.number, "numbers")
        axes = ROW_AXES.get(name, ())
        shape = f[name].shape
        if len(shape) != 1 + len(axes) or shape[0] != n:
            wanted = f"({n}, {', '.join(['...'] * len(axes))})" if axes else f"({n},)"
            raise ValueError(f"/{name} has shape {shape}, not {wanted} for {n} checkpoints")
        for length, option in zip(shape[1:], axes):
            if not (isinstance(options.get(option), int) and length <= options[option]):
                raise ValueError(f"/{name} has rows of {length} values; the spec's {option} is {options.get(option)}")
    return spec, n


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
