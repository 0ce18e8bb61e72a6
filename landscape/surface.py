"""Evaluate a plane or line on a grid: scheduling, resume, and sharding under torchrun.

:func:`compute_surface` writes the surface file through :class:`landscape.store.SurfaceWriter`: work
goes to ``OUT.partial`` and is flushed every ``write_every`` seconds, so a killed computation, run
again with the same arguments, computes only the points that are missing (and a different spec
pointed at the same output is refused). Points are made on the fly, ``points_per_call`` at a time,
as ``origin + a u + b v``: memory does not grow with the grid.

Under torchrun (``WORLD_SIZE > 1``) every rank builds the same geometry, rank 0 opens the file and
sends the others its grid, basis and the points still to do; chunk c of those points goes to rank
c mod world (one GPU per rank when there are GPUs, gloo on CPU); results are gathered after every
round and only rank 0 writes. With the same ``points_per_call`` the file equals the single-process one.

Example::

    traj = open_trajectory("run.h5")
    plane = Plane.through(traj, "sgd", "swa/average", "swa/iterates:0")
    surf = compute_surface(traj, plane, grid=(21, 21), bn="recompute", out="plane.h5")
    surf.values["test_err"]          # (21, 21), percent
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .device import resolve_device
from .errors import ConfigError, LandscapeError, WriteError
from .evaluate import METRICS, BatchNormPolicy, Evaluator, choose_points_per_call, resolve_policy
from .geometry import Grid, Line, Plane, buffers_at, checkpoint_file, weights_at
from .store import Surface, SurfaceWriter, Trajectory, open_surface, open_trajectory
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
                             points_per_call=None) -> None:
    """Refuse evaluation options no computation can use (None: the default), before anything starts."""
    for name, value, least in (("batch size", batch_size, 1), ("BatchNorm batch size", bn_batch_size, 2),
                               ("BatchNorm samples", bn_samples, 2), ("points per call", points_per_call, 1)):
        if value is not None and not value >= least:
            raise ConfigError(f"{name} must be at least {least}, got {value}")
    if weight_decay is not None and not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ConfigError(f"weight decay must be a non-negative number, got {weight_decay}")


def input_files(traj, geom) -> list:
    """The files a surface of ``geom`` is computed from: the trajectory and any other trajectory
    file a checkpoint was taken from (``OTHER.h5:RUN:INDEX``)."""
    others = (checkpoint_file(source) for source in getattr(geom, "sources", {}).values())
    return [traj.path] + [f for f in others if f]


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


def surface_spec(traj: Trajectory, geom, grid: Grid, policy: BatchNormPolicy, weight_decay) -> dict:
    """Everything that defines the values (compared on resume) plus ``derived`` facts for plots."""
    spec = {"kind": geom.kind, **geom.spec, "grid": grid.to_dict(), "bn": policy.to_dict(),
            "weight_decay": weight_decay, "dataset": traj.config.get("data"), "model": traj.config.get("model"),
            "derived": geom.derived}
    if getattr(geom, "rays", False):
        spec["values_shape"] = ["rays", "x"]
    return spec


# ----------------------------------------------------------------------------------------------
# ranks

class Ranks:
    """The torchrun process group (started here when WORLD_SIZE > 1), or one process."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.started = False
        if self.world > 1 and device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
            torch.cuda.set_device(device)
        self.device = device
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.started = True

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def objects(self, obj):
        """Rank 0's ``obj`` on every rank (small things: status, grid, mask)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return t
        t = t.to(self.device).contiguous()
        dist.broadcast(t, src=0)
        return t

    def gather(self, rows: torch.Tensor) -> torch.Tensor | None:
        """Stack every rank's equally shaped ``rows`` on rank 0 (None elsewhere)."""
        if not self.distributed:
            return rows
        parts = [torch.empty_like(rows) for _ in range(self.world)]
        dist.all_gather(parts, rows.contiguous())
        return torch.cat(parts) if self.rank == 0 else None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.started and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------

def compute_surface(traj, geom, grid=None, *, bn="auto", out=None, overwrite: bool = False, quiet: bool = False,
                    device="auto", margin: float = 0.2, xrange=None, yrange=None, batch_size: int | None = None,
                    bn_batch_size: int | None = None, bn_samples: int | None = None, weight_decay: float | None = None,
                    points_per_call: int | None = None, write_every: float = 2.0, on_write=None) -> Surface | None:
    """Evaluate ``geom`` (a :class:`Plane` or :class:`Line`) on ``grid`` and return the surface (read
    back from ``out``, or in memory when ``out`` is None; None on ranks other than 0 without ``out``).

    ``bn``: auto | recompute | interpolate | stored (or a BatchNormPolicy); ``bn_batch_size`` (default:
    the trajectory's eval batch size) and ``bn_samples`` refine ``recompute``. ``batch_size``: data
    batch of the metric passes. ``weight_decay``: also store ``train_loss_l2``. ``points_per_call``:
    None measures it. ``on_write(done, total)`` is called after every flush of the file."""
    check_evaluation_options(batch_size, bn_batch_size, bn_samples, weight_decay, points_per_call)
    traj = traj if isinstance(traj, Trajectory) else open_trajectory(traj)
    if not isinstance(geom, (Plane, Line)):
        raise ConfigError(f"compute_surface needs a Plane or a Line, got {type(geom).__name__}")
    grid = make_grid(geom, grid, margin, xrange, yrange)
    check_points(geom.values_shape(grid), geom.kind)
    ranks = Ranks(resolve_device(device))
    try:
        return _compute(traj, geom, grid, ranks, bn, out, overwrite, quiet, batch_size, bn_batch_size, bn_samples,
                        weight_decay, points_per_call, write_every, on_write)
    finally:
        ranks.close()


def _compute(traj, geom, grid, ranks, bn, out, overwrite, quiet, batch_size, bn_batch_size, bn_samples,
             weight_decay, points_per_call, write_every, on_write):
    device = ranks.device
    default_batch = int(traj.config.get("eval_batch_size", 1000))
    if batch_size is None:
        batch_size = default_batch
    if not isinstance(bn, BatchNormPolicy):
        bn = BatchNormPolicy(bn or "auto", default_batch if bn_batch_size is None else bn_batch_size, bn_samples)
    data = traj.build_data(device)
    model = traj.build_model(data, device)
    policy = resolve_policy(bn, model, geom.buffer_basis is not None)
    metrics = METRICS + (("train_loss_l2",) if weight_decay is not None else ())
    spec = surface_spec(traj, geom, grid, policy, weight_decay)
    shape = geom.values_shape(grid) if isinstance(geom, Line) else grid.shape
    basis = {"origin": geom.origin.numpy()}
    if isinstance(geom, Plane):
        basis.update(u=geom.u.numpy(), v=geom.v.numpy())
    else:
        basis["u"] = geom.directions.numpy() if geom.rays else geom.directions[0].numpy()

    # rank 0 opens (or resumes) the file; everyone then uses its grid, basis and done mask
    writer, failure = None, None
    if ranks.rank == 0:
        try:
            points, paths = geom.project(traj)
            if out is None:
                writer = MemorySurfaceWriter(spec, grid.x, grid.y, basis, points, paths, metrics, shape)
            else:
                writer = SurfaceWriter.create(out, spec, grid.x, grid.y, basis, points, paths, trajectory=traj.path,
                                              metrics=metrics, overwrite=overwrite, shape=shape,
                                              inputs=input_files(traj, geom)[1:])
        except LandscapeError as e:
            failure = e
    if ranks.objects(failure is not None):
        if failure is not None:
            raise failure
        raise LandscapeError("rank 0 could not open the output file")
    state = None
    if ranks.rank == 0:
        stored = writer.basis()
        state = (writer.grid(), writer.done)
        origin = torch.as_tensor(np.asarray(stored["origin"]), dtype=torch.float32)
        vecs = torch.as_tensor(np.stack([stored["u"], stored["v"]]) if "v" in stored else np.asarray(stored["u"]),
                               dtype=torch.float32)
    else:
        origin, vecs = geom.origin.clone(), geom.basis.clone()
    (x, y), done = ranks.objects(state)
    origin, vecs = ranks.tensor(origin.to(device)), ranks.tensor(vecs.to(device))
    geom = geom.with_basis(origin, vecs).to(device)  # on resume: exactly the vectors in the file
    grid = Grid((float(x[0]), float(x[-1])), len(x), None if y is None else (float(y[0]), float(y[-1])),
                None if y is None else len(y))

    todo = np.flatnonzero(~done.reshape(-1))
    interpolate = policy.policy == "interpolate"
    # on a CPU, W = torch.get_num_threads() single-threaded evaluators work on different points at once:
    # intra-op threads barely speed up the small operations of one point, separate points scale
    # (under torchrun the ranks are the workers)
    workers = max(1, torch.get_num_threads()) if device.type == "cpu" and not ranks.distributed else 1
    evaluators = [Evaluator(model, traj.layout, data, policy, batch_size, weight_decay)
                  for _ in range(workers)]
    threads_before = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) if workers > 1 else None
    total = int(np.prod(shape))
    k = None if points_per_call is None else min(points_per_call, total)  # more than every point: the same calls

    def evaluate_on(evaluator, flat: np.ndarray) -> dict:
        c = torch.as_tensor(geom.coefficients(grid, flat), device=device)
        return evaluator(weights_at(geom, c), buffers_at(geom, c, interpolate))

    def evaluate(flat: np.ndarray) -> dict:
        """Values of the points ``flat``: calls of k points each, spread over the workers (every point
        sees the same calls whatever the number of workers, so the values do not depend on it)."""
        pieces = [flat[i:i + k] for i in range(0, len(flat), k)]
        if pool is None or len(pieces) == 1:
            return evaluate_on(evaluators[0], flat)
        parts = list(pool.map(lambda j: [evaluate_on(evaluators[j], p) for p in pieces[j::workers]],
                              range(min(workers, len(pieces)))))
        ordered = [parts[i % workers][i // workers] for i in range(len(pieces))]
        return {m: np.concatenate([o[m] for o in ordered]) for m in ordered[0]}

    bar = tqdm(total=len(todo), disable=quiet or ranks.rank != 0, unit="pt", leave=False,
               desc=f"{geom.kind} {'x'.join(map(str, shape))}")
    measured = 0
    if workers > 1:
        torch.set_num_threads(1)
    try:
        if k is None:
            # rank 0 times real calls on the first points still to do and writes their values
            if ranks.rank == 0 and len(todo):
                def call(n):
                    nonlocal measured
                    idx = todo[measured:measured + n]
                    vals = evaluate_on(evaluators[0], idx)
                    writer.write(idx, {m: vals[m] for m in metrics})
                    measured += n
                    bar.update(n)

                k, _ = choose_points_per_call(call, len(todo), device)
                if on_write is not None and measured:
                    on_write(int(writer.done.sum()), total)
            k, measured = ranks.objects((k or 1, measured))
    except BaseException as e:
        bar.close()
        torch.set_num_threads(threads_before)
        if pool is not None:
            pool.shutdown()
        kept = _suspend(writer, e, total)
        if kept is not None:
            raise kept from None
        raise
    todo = todo[measured:]
    chunks = [todo[i:i + k * workers] for i in range(0, len(todo), k * workers)]
    rounds = math.ceil(len(chunks) / ranks.world)
    pending, last_write = [], time.perf_counter()
    try:
        for r in range(rounds):
            c = r * ranks.world + ranks.rank
            mine = chunks[c] if c < len(chunks) else np.zeros(0, np.int64)
            rows = torch.full((k * workers, 1 + len(metrics)), -1.0, dtype=torch.float64)
            if len(mine):
                vals = evaluate(mine)
                rows[:len(mine), 0] = torch.from_numpy(mine.astype(np.float64))
                rows[:len(mine), 1:] = torch.from_numpy(np.stack([vals[m] for m in metrics], 1))
            rows = ranks.gather(rows.to(device if ranks.distributed else "cpu"))
            if ranks.rank != 0:
                continue
            rows = rows.cpu().numpy()
            rows = rows[rows[:, 0] >= 0]
            pending.append(rows)
            bar.update(len(rows))
            if time.perf_counter() - last_write >= write_every or r == rounds - 1:
                block = np.concatenate(pending)
                writer.write(block[:, 0].astype(np.int64), {m: block[:, 1 + i] for i, m in enumerate(metrics)})
                pending, last_write = [], time.perf_counter()
                if on_write is not None:
                    on_write(int(writer.done.sum()), total)
    except BaseException as e:
        if writer is not None and pending and isinstance(e, KeyboardInterrupt):
            block = np.concatenate(pending)  # computed but not yet flushed: keep it too
            try:
                writer.write(block[:, 0].astype(np.int64), {m: block[:, 1 + i] for i, m in enumerate(metrics)})
            except WriteError:
                pass  # the points of the last write stay
        kept = _suspend(writer, e, total)  # what was written stays resumable in OUT.partial
        if kept is not None:
            raise kept from None
        raise
    finally:
        bar.close()
        torch.set_num_threads(threads_before)
        if pool is not None:
            pool.shutdown()
    surface = None
    if ranks.rank == 0:
        try:
            result = writer.close()
        except WriteError as e:
            raise WriteError(f"{e}; {writer.saved} of {total} points kept in {writer.tmp}; run the same command "
                             "again to finish") from None
        surface = result if isinstance(result, Surface) else open_surface(result)
    ranks.barrier()
    if surface is None and out is not None:
        surface = open_surface(out)
    return surface


def _suspend(writer, error: BaseException, total: int) -> BaseException | None:
    """Close a failed computation's writer, its saved points kept in OUT.partial (none: no partial is
    left). For an interruption (Ctrl-C, SIGTERM) or a failed write of a file, return the error to raise
    instead: it says how many points were kept where, and how to finish."""
    if writer is None:
        return None
    saved = writer.saved if isinstance(writer, SurfaceWriter) else None
    writer.suspend()
    if saved is None or not isinstance(error, (KeyboardInterrupt, WriteError)):
        return None
    kept = (f"{saved} of {total} points kept in {writer.tmp}; run the same command again to finish" if saved
            else "no point was saved yet, nothing kept")
    return KeyboardInterrupt(kept) if isinstance(error, KeyboardInterrupt) else WriteError(f"{error}; {kept}")
