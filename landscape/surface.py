"""Evaluate a plane or line on a grid: the in-memory core, and files, resume and torchrun around it.

:func:`evaluate_surface` takes a live model, its data and a geometry and returns a
:class:`~landscape.store.Surface` in memory (``surface.save(path)`` writes it). :func:`compute_surface`
is the same evaluation for a trajectory file's model and data, writing the surface file through :class:`landscape.store.SurfaceWriter`: work
goes to ``OUT.partial`` and is flushed every ``write_every`` seconds, so a killed computation, run
again with the same arguments, computes only the points that are missing (and a different spec
pointed at the same output is refused). Points are made on the fly, ``points_per_call`` at a time,
as ``origin + a u + b v``: memory does not grow with the grid.

Under torchrun (``WORLD_SIZE > 1``) every rank builds the same geometry, rank 0 opens the file and
sends the others its grid, basis and the points still to do; chunk c of those points goes to rank
c mod world (one GPU per rank when there are GPUs, gloo on CPU); results are gathered after every
round and only rank 0 writes. Every batched call holds exactly ``points_per_call`` points (the file
keeps the number it started with), so a point's values do not depend on which points share its call:
the file equals the single-process one, and a resumed computation equals an uninterrupted one.

Example::

    traj = open_trajectory("run.h5")
    plane = Plane.through(traj, "sgd", "swa/average", "swa/iterates:0")
    surf = compute_surface(traj, plane, grid=(21, 21), bn="recompute", out="plane.h5")
    surf.values["test_err"]          # (21, 21), percent
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import queue
import time
from concurrent.futures import FIRST_COMPLETED, wait

import numpy as np
import torch
from tqdm import tqdm

from .data import Data, StreamData, as_data
from .device import ForkedWorkers, can_fork, device_name, resolve_device, thread_workers, torch_threads
from .dist import Group
from .errors import ConfigError, LandscapeError, ModelError, ProcessDied, WriteError
from .evaluate import BatchNormPolicy, Evaluator, choose_points_per_call, metric_names, resolve_policy
from .geometry import Grid, Line, Plane, buffers_at, checkpoint_file, weights_at
from .params import Layout, copy_module, unwrap
from .rebuild import rebuild_data, rebuild_model
from .store import Surface, SurfaceWriter, Trajectory, open_surface, open_trajectory
from .store.files import interrupts_deferred, sha256
from .store.surface import MemorySurfaceWriter


# The most points one surface may have. A surface file holds a float64 array of this many values per
# metric (five with --weight-decay) plus the done mask, and every flush reads and rewrites them whole:
# 10^7 points are 80 MB per array, about 0.5 GB in memory, and weeks of evaluation on a small model.
MAX_POINTS = 10 ** 7


def check_points(shape, what: str = "surface") -> int:
    """The number of points of values shaped ``shape``; refuses none and more than MAX_POINTS."""
    shape = tuple(int(n) for n in shape)
    if any(n < 1 for n in shape):
        raise ConfigError(f"{what} {' x '.join(map(str, shape))} has no points; give at least one point per axis")
    n = math.prod(shape)
    if n > MAX_POINTS:
        raise ConfigError(f"{what} {' x '.join(map(str, shape))} has {n:,} points, more than the limit of "
                          f"{MAX_POINTS:,} (every point is a pass over the data, and the file holds "
                          f"several float64 arrays of that size)")
    return n


def check_evaluation_options(batch_size=None, bn_batch_size=None, bn_samples=None, weight_decay=None,
                             points_per_call=None, samples=None) -> None:
    """Refuse evaluation options no computation can use (None: the default), before anything starts."""
    for name, value, least in (("batch size", batch_size, 1), ("BatchNorm batch size", bn_batch_size, 2),
                               ("BatchNorm samples", bn_samples, 2), ("points per call", points_per_call, 1),
                               ("samples", samples, 2)):
        if value is not None and not value >= least:
            raise ConfigError(f"{name} must be at least {least}, got {value}")
    if weight_decay is not None and not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ConfigError(f"weight decay must be a non-negative number, got {weight_decay}")


def input_files(traj, geom) -> list:
    """The files a surface of ``geom`` is computed from: the trajectory and any other trajectory
    file a checkpoint was taken from (``OTHER.h5:RUN:INDEX``)."""
    return [traj.path] + list(_files_of_checkpoints(geom).values())


def _files_of_checkpoints(geom) -> dict:
    """Checkpoint name -> the other trajectory file it is read from, for ``OTHER.h5:RUN:INDEX`` ones."""
    files = {name: checkpoint_file(source) for name, source in getattr(geom, "sources", {}).items()}
    return {name: file for name, file in files.items() if file}


def other_files(geom) -> dict:
    """The SHA-256 of the other trajectory file each ``OTHER.h5:RUN:INDEX`` checkpoint was read from, by
    checkpoint name: names carry the file's base name only, so a resumed computation (whose spec must
    match) cannot go on with another file of the same name."""
    files = _files_of_checkpoints(geom)
    digests = {file: sha256(file) for file in set(files.values())}
    return {name: digests[file] for name, file in files.items()}


def make_grid(geom, grid=None, margin: float = 0.2, xrange=None, yrange=None) -> Grid:
    """``grid``: a Grid, a shape ((nx, ny) for planes, (nx,) or nx for lines) or None (the default
    shape); ranges not given come from the geometry (its checkpoints plus ``margin``)."""
    if isinstance(grid, Grid):
        return grid
    if margin < 0:
        raise ConfigError(f"margin must be non-negative, got {margin}")
    shape = None if grid is None else ((grid,) if isinstance(grid, int) else tuple(int(n) for n in grid))
    if shape is not None and len(shape) != len(geom.default_shape):
        raise ConfigError(f"a {geom.kind} grid has {len(geom.default_shape)} dimension(s), got {list(shape)}")
    for r in (xrange, yrange):
        if r is not None and not (len(r) == 2 and r[0] < r[1]):
            raise ConfigError(f"range {list(r)} is empty; give LOW < HIGH")
        if r is not None and not math.isfinite(r[1] - r[0]):
            raise ConfigError(f"range {list(r)} is not finite (its width overflows); give finite LOW and HIGH")
    return geom.default_grid(shape, margin, xrange, yrange)


def surface_spec(geom, grid: Grid, policy: BatchNormPolicy, weight_decay, traj: Trajectory | None = None,
                 data=None, samples: int | None = None, seed: int = 0) -> dict:
    """Everything that defines the values (compared on resume) plus ``derived`` facts for plots; the
    trajectory's dataset and model when there is one. A task other than classification, or metric
    passes on a subset, are recorded under ``task``: its name, metrics, primary metric, the value
    names stored and the subset's size and seed (a classification surface of whole splits records
    none, as always)."""
    spec = {"kind": geom.kind, **geom.spec, "grid": grid.to_dict(), "bn": policy.to_dict(),
            "weight_decay": weight_decay, "derived": geom.derived}
    task = data.task if data is not None else None
    if task is not None and (task.name != "classification" or samples is not None):
        spec["task"] = dict(task.to_dict(), values=list(metric_names(task, weight_decay, samples is not None)),
                            samples=samples, samples_seed=seed if samples is not None else None)
    if traj is not None:
        spec.update(dataset=traj.config.get("data"), model=traj.config.get("model"))
        others = other_files(geom)
        if others:
            spec["other_files"] = others
    if getattr(geom, "rays", False):
        spec["values_shape"] = ["rays", "x"]
    return spec


# ----------------------------------------------------------------------------------------------
# the core: a live model, its data, a geometry -> values at the grid's points

def evaluate_surface(model, geom, data, grid=None, *, bn="auto", batch_size: int = 1000, bn_batch_size: int | None = None,
             bn_samples: int | None = None, weight_decay: float | None = None, points_per_call: int | None = None,
             device=None, margin: float = 0.2, xrange=None, yrange=None, checkpoints=None, paths=None,
             quiet: bool = True, task=None, samples: int | None = None, seed: int = 0) -> Surface:
    """The surface of a live model over ``geom`` (a :class:`Plane` or :class:`Line`), in memory: no
    file is read or written (``surface.save(path)`` writes the file ``landscape plane`` would).

    ``model``: an ``nn.Module`` of the geometry's architecture (wrappers such as ``AveragedModel`` are
    unwrapped); ``data``: a :class:`~landscape.data.Data`, ``(x_train, y_train, x_test, y_test)``, a
    :class:`~landscape.data.StreamData` or two data sources ``(train, test)`` (DataLoaders or functions
    returning iterables of batches, read in a fixed order, one batch in memory at a time); ``task``: a
    task name or object (:mod:`landscape.tasks`; default: the data's, classification); ``samples``:
    evaluate the metrics on a fixed random subset of that many samples of each split (drawn from
    ``seed``) and store each one's standard error beside it (``test_loss_se``, ...), BatchNorm recomputed
    from that training subset unless ``bn_samples`` asks for that many of the whole set;
    ``grid``: a shape ((nx, ny), or (nx,) for lines), a Grid, or None for the default; ``bn``: auto |
    recompute | interpolate | stored; ``checkpoints`` ({name: module, state_dict or tensor}) and
    ``paths`` ({run: [states]}) are projected for the figures, besides the geometry's own points.

    Example::

        plane = Plane.through(sgd_net, swa_model, early, names=("sgd", "swa", "early"))
        surf = evaluate_surface(sgd_net, plane, (x_train, y_train, x_test, y_test), grid=(21, 21))
        surf.values["test_err"]          # (21, 21), percent
    """
    check_evaluation_options(batch_size, bn_batch_size, bn_samples, weight_decay, points_per_call, samples)
    _check_geometry(geom)
    module = unwrap(model)[0]
    if device is None:
        device = next(module.parameters()).device if any(True for _ in module.parameters()) else "cpu"
    device = resolve_device(str(device))
    data = as_data(data, device, task)
    layout = Layout.of(module)
    if layout.num_params != geom.origin.numel():
        raise ModelError(f"the model has {layout.num_params:,} parameters; the {geom.kind} was made for "
                         f"{geom.origin.numel():,}")
    if geom.model is not None:
        _check_same_shapes(Layout.of(unwrap(geom.model)[0]), layout, geom.kind)
    grid = make_grid(geom, grid, margin, xrange, yrange)
    check_points(geom.values_shape(grid), geom.kind)
    policy = _policy(bn, bn_batch_size or batch_size, bn_samples, module, geom, data, bn_batch_size is not None)
    data, policy, bn_data = _metric_subset(data, samples, seed, policy)
    points, runs = geom.project(checkpoints=checkpoints, paths=paths)
    points_of = _PointEvaluator(copy_module(module).to(device), layout, data, geom, grid, policy, batch_size,
                                weight_decay, device, stderr=samples is not None,  # a copy: the caller's module stays
                                bn_data=bn_data)
    writer = MemorySurfaceWriter(surface_spec(geom, grid, policy, weight_decay, data=data, samples=samples, seed=seed), grid.x,
                                 grid.y, _basis(geom), points, runs, points_of.metrics, geom.values_shape(grid))
    _fill(writer, points_of, Group.single(device), points_per_call, quiet)
    return writer.close()


def _check_same_shapes(made_for: Layout, layout: Layout, kind: str) -> None:
    """Refuse a model whose parameters and buffers differ in shape, in order, from those of the model
    the geometry's live checkpoints fit (the flat weights would be read as other tensors)."""
    for what, mine, theirs in (("parameter", made_for.params, layout.params), ("buffer", made_for.buffers, layout.buffers)):
        for a, b in zip(mine, theirs):
            if a.shape != b.shape:
                raise ModelError(f"the model's {what} {b.name} is {list(b.shape)}, but the {kind} was made for a model "
                                 f"whose {what} {a.name} is {list(a.shape)}: evaluate it with that model")
        if len(mine) != len(theirs):
            raise ModelError(f"the model has {len(theirs)} {what}s; the {kind} was made for a model with {len(mine)}")


def _check_geometry(geom) -> None:
    if not isinstance(geom, (Plane, Line)):
        raise ConfigError(f"a surface needs a Plane or a Line, got {type(geom).__name__}")


def _policy(bn, bn_batch_size: int, bn_samples, model, geom, data, asked_batch: bool) -> BatchNormPolicy:
    """The BatchNorm policy; ``asked_batch``: the caller gave ``bn_batch_size``, which a data source's
    recompute pass cannot take (its BatchNorm batches are the source's own: recorded as 0), as it cannot
    take a policy's batch size other than the default."""
    given_batch = isinstance(bn, BatchNormPolicy) and bn.batch_size not in (0, BatchNormPolicy.batch_size)
    if not isinstance(bn, BatchNormPolicy):
        bn = BatchNormPolicy(bn or "auto", bn_batch_size, bn_samples)
    basis = geom.buffer_basis
    policy = resolve_policy(bn, model, basis is not None, buffers_differ=basis is not None and bool(basis.any()))
    if policy.policy == "recompute" and isinstance(data, StreamData):
        if asked_batch or given_batch:
            raise ConfigError(f"{'bn_batch_size' if asked_batch else 'a BatchNormPolicy batch_size'} does not apply "
                              "to a data source: its recompute pass takes the source's own training batches as "
                              "BatchNorm batches (give the source that batch size)")
        policy = dataclasses.replace(policy, batch_size=0)
    return policy


def _metric_subset(data, samples: int | None, seed: int, policy: BatchNormPolicy) -> tuple:
    """(the data of the metric passes, the BatchNorm policy, the data its recompute pass draws from).
    With ``samples``, the metric passes read a fixed random subset of that many samples per split, drawn
    from ``seed``, and a recompute pass without samples of its own reads that same training subset:
    recorded so in the policy (the first draw of ``seed`` over the whole training set is that subset);
    one with its own (``bn_samples``) draws them from the whole training set, as recorded."""
    if samples is None:
        return data, policy, None
    if policy.policy == "recompute" and policy.samples is None:
        policy = dataclasses.replace(policy, samples=samples, seed=seed)
    return data.subset(samples, seed), policy, data


def _basis(geom) -> dict:
    """The vectors a surface file stores: origin, u, v (planes) or u (lines; (R, P) for rays)."""
    basis = {"origin": geom.origin.cpu().numpy()}
    if isinstance(geom, Plane):
        basis.update(u=geom.u.cpu().numpy(), v=geom.v.cpu().numpy())
    else:
        basis["u"] = (geom.directions if geom.rays else geom.directions[0]).cpu().numpy()
    return basis


class _PointEvaluator:
    """Values at grid points, in calls of exactly ``k`` points each (a short call is padded with
    copies of its last point), so a point's values depend only on the point and ``k``: not on which
    points share its call, on the number of workers or ranks, or on where an interrupted computation
    resumed. On a CPU, W = torch.get_num_threads() single-threaded evaluators work on different calls
    at once (intra-op threads barely speed up the small operations of one point; separate points scale);
    each takes the next call as soon as it is free, so a slow call does not hold the others up. With
    the data in memory, on Linux, the workers are processes forked from this one (:class:`ForkedWorkers`:
    each its own interpreter, where threads wait on one another's); else threads of this one."""

    def __init__(self, model, layout, data, geom, grid, policy, batch_size, weight_decay, device, workers=None,
                 stderr: bool = False, bn_data=None):
        if workers is None:
            workers = max(1, torch.get_num_threads()) if device.type == "cpu" else 1
        self.geom, self.grid, self.device = geom.to(device), grid, device
        self.interpolate = policy.policy == "interpolate"
        self.workers = workers
        self.evaluators = [Evaluator(model, layout, data, policy, batch_size, weight_decay, stderr, bn_data)
                           for _ in range(workers)]
        # a data source is read by its own code (open files, loader processes), which a fork would share
        self.forked = workers > 1 and device.type == "cpu" and isinstance(data, Data) and can_fork()
        self.pool = None

    def __enter__(self):
        self._workers = contextlib.ExitStack()
        if self.forked:  # (this process's own calls, none when forked, on one thread as the workers are)
            self._workers.enter_context(torch_threads(1))
            try:
                self.pool = self._workers.enter_context(ForkedWorkers(lambda j, item: self.call(j, *item),
                                                                      self.workers))
            except OSError:  # no process can be started (a limit on their number): the threads of this one
                self.forked = False
        if not self.forked:
            self.pool = self._workers.enter_context(thread_workers(self.workers, 1 if self.workers > 1 else None))
        return self

    def __exit__(self, *exc):
        self._workers.__exit__(*exc)
        self.pool = None

    @property
    def metrics(self) -> tuple:
        return self.evaluators[0].metrics

    @property
    def candidates(self):
        return self.evaluators[0].points_per_call_candidates()

    def with_basis(self, origin, vecs, grid) -> None:
        """Evaluate on exactly these vectors and this grid (those of a file being resumed)."""
        self.geom, self.grid = self.geom.with_basis(origin, vecs).to(self.device), grid

    def call(self, worker: int, flat: np.ndarray, k: int) -> dict:
        padded = np.concatenate([flat, np.repeat(flat[-1:], k - len(flat))]) if len(flat) < k else flat
        c = torch.as_tensor(self.geom.coefficients(self.grid, padded), device=self.device)
        vals = self.evaluators[worker](weights_at(self.geom, c), buffers_at(self.geom, c, self.interpolate))
        return {m: v[:len(flat)] for m, v in vals.items()}

    def __call__(self, flat: np.ndarray, k: int) -> dict:
        """Values of the points ``flat`` (in their order), k a call, the calls spread over the workers."""
        by_first = {int(p[0]): v for p, v in self.stream(flat, k)}   # the points of a grid are distinct
        parts = [by_first[int(flat[i])] for i in range(0, len(flat), k)]
        return {m: np.concatenate([p[m] for p in parts]) for m in parts[0]}

    def stream(self, flat: np.ndarray, k: int):
        """``(points, values)`` of the calls of ``k`` points that ``flat`` makes, as they finish: each
        worker takes the next call when it is free, and a few calls wait ahead (memory stays small)."""
        pieces = [flat[i:i + k] for i in range(0, len(flat), k)]
        if isinstance(self.pool, ForkedWorkers):
            for (p, _), vals in self.pool.map((p, k) for p in pieces):
                yield p, vals
            return
        if self.pool is None or len(pieces) == 1:
            for p in pieces:
                yield p, self.call(0, p, k)
            return
        free = queue.SimpleQueue()
        for j in range(self.workers):
            free.put(j)

        def work(p):
            j = free.get()
            try:
                return p, self.call(j, p, k)
            finally:
                free.put(j)

        ahead = iter(pieces)
        pending = {self.pool.submit(work, p) for p in itertools.islice(ahead, 2 * self.workers)}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                pending |= {self.pool.submit(work, p) for p in itertools.islice(ahead, len(done))}
                for f in done:
                    yield f.result()
        finally:
            for f in pending:
                f.cancel()


def _fill(writer, points_of: _PointEvaluator, ranks: Group, points_per_call, quiet: bool,
          write_every: float = 2.0, on_write=None) -> None:
    """Evaluate every point ``writer`` has not done and write the values (rank 0 writes; under torchrun
    round r's chunk c goes to rank c mod world). ``points_per_call``: None takes the writer's (a file
    being resumed keeps the K it started with), else measures it on the first points. The one handler
    of interruptions: what was computed is written, and the writer is suspended."""
    grid, done = ranks.objects((writer.grid(), writer.done) if ranks.rank == 0 else None)
    total, metrics = done.size, points_of.metrics
    todo = np.flatnonzero(~done.reshape(-1))
    bar = tqdm(total=len(todo), disable=quiet or ranks.rank != 0, unit="pt", leave=False,
               desc=f"{points_of.geom.kind} {'x'.join(map(str, done.shape))}")
    pending = []

    def flush():
        if pending:
            block = np.concatenate(pending)
            writer.write(block[:, 0].astype(np.int64), {m: block[:, 1 + i] for i, m in enumerate(metrics)})
            pending.clear()
            if on_write is not None:
                on_write(int(writer.done.sum()), total)

    def keep(flat, vals):
        pending.append(np.column_stack([flat.astype(np.float64)] + [vals[m] for m in metrics]))
        bar.update(len(flat))

    try:
        with points_of:
            # a resumed computation keeps its points per call (the same values to the bit) on the device
            # they were chosen for; on another one (a smaller GPU, a CPU) they are chosen again
            here = device_name(ranks.device)
            k = points_per_call or (writer.points_per_call if ranks.rank == 0 and writer.computed_on in (None, here)
                                    else None)
            if k is None and ranks.rank == 0 and len(todo):
                k, todo = _measure(points_of, todo, keep)
                writer.points_per_call, writer.computed_on = k, here
                flush()  # the measured points are work too: on the disk before the long part starts
            k = ranks.objects(min(k or 1, total))  # more than every point would only pad calls
            todo = ranks.objects(todo)
            if ranks.rank == 0:
                writer.points_per_call, writer.computed_on = k, here
            _rounds(points_of, todo, k, ranks, keep, flush, write_every)
            flush()
    except BaseException as e:
        with interrupts_deferred(drop=True):  # stopping already: the bookkeeping below is not cut short
            bar.close()
            if ranks.rank == 0 and isinstance(e, (KeyboardInterrupt, ProcessDied)):
                try:
                    flush()  # computed but not yet written: keep it too
                except WriteError:
                    pass  # the points of the last write stay
            kept = _suspend(writer, e, total)  # what was written stays resumable in OUT.partial
        if kept is not None:
            raise kept from None
        raise
    bar.close()


def _measure(points_of: _PointEvaluator, todo: np.ndarray, keep) -> tuple:
    """(K, the points still to do): K from timing real calls on the first points (rank 0, every worker
    busy, as in the long part). The values of the calls made at the chosen K are kept; the others'
    points are evaluated again later, at K."""
    made, used = {}, 0

    def call(n):
        nonlocal used
        flat = todo[used:used + n * points_of.workers]
        made.setdefault(n, []).append((flat, points_of(flat, n)))
        used += len(flat)

    k, _ = choose_points_per_call(call, len(todo), points_of.device, points_of.candidates, workers=points_of.workers)
    for flat, vals in made.get(k, []):
        keep(flat, vals)
    kept = np.concatenate([f for f, _ in made.get(k, [])]) if k in made else np.zeros(0, np.int64)
    return k, todo[~np.isin(todo, kept)]


def _rounds(points_of, todo, k, ranks, keep, flush, write_every) -> None:
    """Evaluate ``todo``, ``k`` points a call, flushing every ``write_every`` seconds. One process: the
    workers stream through the points. Under torchrun: in rounds of one call per worker and rank,
    gathered on rank 0."""
    last_write = time.perf_counter()

    def kept(flat, vals):
        nonlocal last_write
        keep(flat, vals)
        if time.perf_counter() - last_write >= write_every:
            flush()
            last_write = time.perf_counter()

    if not ranks.distributed:
        for flat, vals in points_of.stream(todo, k):
            kept(flat, vals)
        return
    step = k * points_of.workers
    chunks = [todo[i:i + step] for i in range(0, len(todo), step)]
    metrics = points_of.metrics
    for r in range(math.ceil(len(chunks) / ranks.world)):
        c = r * ranks.world + ranks.rank
        mine = chunks[c] if c < len(chunks) else np.zeros(0, np.int64)
        rows = torch.full((step, 1 + len(metrics)), -1.0, dtype=torch.float64)
        if len(mine):
            vals = points_of(mine, k)
            rows[:len(mine), 0] = torch.from_numpy(mine.astype(np.float64))
            rows[:len(mine), 1:] = torch.from_numpy(np.stack([vals[m] for m in metrics], 1))
        rows = ranks.gather(rows.to(points_of.device))
        if ranks.rank == 0:
            rows = rows.cpu().numpy()
            rows = rows[rows[:, 0] >= 0]
            kept(rows[:, 0].astype(np.int64), {m: rows[:, 1 + i] for i, m in enumerate(metrics)})


# ----------------------------------------------------------------------------------------------
# files, resume and torchrun around the core

def compute_surface(traj, geom, grid=None, *, bn="auto", out=None, overwrite: bool = False, quiet: bool = False,
                    device="auto", margin: float = 0.2, xrange=None, yrange=None, batch_size: int | None = None,
                    bn_batch_size: int | None = None, bn_samples: int | None = None, weight_decay: float | None = None,
                    points_per_call: int | None = None, write_every: float = 2.0, on_write=None,
                    samples: int | None = None, seed: int = 0) -> Surface | None:
    """Evaluate ``geom`` (a :class:`Plane` or :class:`Line`) on ``grid`` with the model and data of the
    trajectory ``traj`` and return the surface (read back from ``out``, or in memory when ``out`` is
    None; None on ranks other than 0 without ``out``).

    ``bn``: auto | recompute | interpolate | stored (or a BatchNormPolicy); ``bn_batch_size`` (default:
    the trajectory's eval batch size) and ``bn_samples`` refine ``recompute``. ``batch_size``: data
    batch of the metric passes. ``weight_decay``: also store ``train_loss_l2``. ``points_per_call``:
    None measures it (or takes the one a resumed file started with). ``on_write(done, total)`` is
    called after every flush of the file. ``samples``/``seed``: metric passes on a fixed random
    subset, with standard errors (see :func:`evaluate_surface`). The trajectory's task (its
    configuration's ``task``, classification when it has none) scores the points."""
    check_evaluation_options(batch_size, bn_batch_size, bn_samples, weight_decay, points_per_call, samples)
    traj = traj if isinstance(traj, Trajectory) else open_trajectory(traj)
    _check_geometry(geom)
    grid = make_grid(geom, grid, margin, xrange, yrange)
    check_points(geom.values_shape(grid), geom.kind)
    with Group.join(resolve_device(device)) as ranks:
        default_batch = traj.eval_batch_size
        data = rebuild_data(traj, ranks.device)
        model = rebuild_model(traj, data, ranks.device)
        policy = _policy(bn, default_batch if bn_batch_size is None else bn_batch_size, bn_samples, model, geom, data,
                         bn_batch_size is not None)
        data, policy, bn_data = _metric_subset(data, samples, seed, policy)
        spec = surface_spec(geom, grid, policy, weight_decay, traj, data, samples, seed)
        points_of = _PointEvaluator(model, traj.layout, data, geom, grid, policy,
                                    default_batch if batch_size is None else batch_size, weight_decay, ranks.device,
                                    workers=1 if ranks.distributed else None, stderr=samples is not None,
                                    bn_data=bn_data)
        writer = _open_writer(ranks, traj, geom, grid, spec, out, overwrite, points_of.metrics)
        _agree_on_basis(ranks, writer, points_of)
        _fill(writer, points_of, ranks, points_per_call, quiet, write_every, on_write)
        surface = None
        if ranks.rank == 0:
            total = int(np.prod(writer.shape))  # read now: a failed close leaves no file to read it from
            try:
                result = writer.close()
            except WriteError as e:
                raise WriteError(f"{e}; {writer.saved} of {total} points kept in {writer.tmp}; run the "
                                 "same command again to finish") from None
            surface = result if isinstance(result, Surface) else open_surface(result)
        ranks.barrier()
        if surface is None and out is not None:
            surface = open_surface(out)
        return surface


def _open_writer(ranks, traj, geom, grid, spec, out, overwrite, metrics):
    """Rank 0 creates (or resumes) the writer; a failure there stops every rank."""
    writer, failure = None, None
    if ranks.rank == 0:
        try:
            points, paths = geom.project(traj)
            shape = geom.values_shape(grid)
            if out is None:
                writer = MemorySurfaceWriter(spec, grid.x, grid.y, _basis(geom), points, paths, metrics, shape,
                                             trajectory=traj.path)
            else:
                writer = SurfaceWriter.create(out, spec, grid.x, grid.y, _basis(geom), points, paths,
                                              trajectory=traj.path, metrics=metrics, overwrite=overwrite,
                                              shape=shape, inputs=input_files(traj, geom)[1:])
        except LandscapeError as e:
            failure = e
    if ranks.objects(failure is not None):
        if failure is not None:
            raise failure
        raise LandscapeError("rank 0 could not open the output file")
    return writer


def _agree_on_basis(ranks, writer, points_of) -> None:
    """Every rank evaluates on rank 0's grid and vectors: on resume, exactly those in the file."""
    state = None
    if ranks.rank == 0:
        stored = writer.basis()
        origin = torch.as_tensor(np.asarray(stored["origin"]), dtype=torch.float32)
        vecs = torch.as_tensor(np.stack([stored["u"], stored["v"]]) if "v" in stored else np.asarray(stored["u"]),
                               dtype=torch.float32)
        state = writer.grid()
    else:
        origin, vecs = points_of.geom.origin.cpu().clone(), points_of.geom.basis.cpu().clone()
    x, y = ranks.objects(state)
    origin, vecs = ranks.tensor(origin.to(ranks.device)), ranks.tensor(vecs.to(ranks.device))
    grid = Grid((float(x[0]), float(x[-1])), len(x), None if y is None else (float(y[0]), float(y[-1])),
                None if y is None else len(y))
    points_of.with_basis(origin, vecs, grid)


def _suspend(writer, error: BaseException, total: int) -> BaseException | None:
    """Close a failed computation's writer, its saved points kept in OUT.partial (none: no partial is
    left). For an interruption (Ctrl-C, SIGTERM, another process of the group gone) or a failed write
    of a file, return the error to raise instead: it says how many points were kept where, and how to
    finish."""
    if writer is None:
        return None
    saved = writer.saved if isinstance(writer, SurfaceWriter) else None
    writer.suspend()
    if saved is None:
        return None
    kept = (f"{saved} of {total} points kept in {writer.tmp}; run the same command again to finish" if saved
            else "no point was saved yet, nothing kept")
    if not isinstance(error, (KeyboardInterrupt, WriteError, ProcessDied)):
        if saved and isinstance(error, Exception):  # (the user's model or data raised: its own error, and what stays)
            error.add_note(kept)
        return None
    return KeyboardInterrupt(kept) if isinstance(error, KeyboardInterrupt) else type(error)(f"{error}; {kept}")
