"""Planes and lines through weight space, and where every checkpoint lies relative to them.

A :class:`Plane` is ``origin + x u + y v`` with ``u``, ``v`` orthonormal float32 (P,) vectors, so
``(x, y)`` are true Euclidean coordinates in weight space. A :class:`Line` is ``origin + x u`` for a
unit vector ``u``; a *rays* line holds several unit directions (one row each) and ``x`` is the distance
travelled from the origin along each of them. Ways to make them:

- ``Plane.through(traj, a, b, c)``: the plane of three checkpoints (Garipov et al. 2018): origin
  ``a``, ``u`` along ``b - a``, ``v`` by Gram-Schmidt of ``c - a``;
- ``Plane.directions(traj, origin, (end, start), (end, start))``: checkpoint differences;
- ``Plane.random(traj, origin, seed)``: Gaussian directions with filter normalization (Li et al. 2018);
- ``Plane.pca(traj, run)``: the first two principal components of a run's checkpoints (Li et al. 2018);
- ``Plane.hessian(traj, origin)``: the top two Hessian eigenvectors, from Hessian-vector products;
- ``Line.through(traj, a, b)``: the segment a -> b extended on both sides (Izmailov et al. 2018);
- ``Line.random_rays(traj, origin, n, seed)``: random directions from a checkpoint (Izmailov et al. 2018).

Live objects instead of a trajectory and names: ``Plane.through(net, swa_model, state_dict)``,
``Line.through(a, b)``, ``Plane.random(net)``, ``Line.random_rays(net)``, ``Plane.pca([states], model=net)``,
``Plane.hessian(net, data=data)`` take ``nn.Module``s (wrappers unwrapped), state_dicts or flat parameter
tensors, read against one module of their architecture (``model=``, default the first module given).

``spec`` holds the inputs that define the geometry (compared when a computation resumes); ``derived``
holds what was computed from them (lengths, eigenvalues, where the checkpoints sit), written to the
surface file for plots. A checkpoint is named ``RUN`` or ``RUN:INDEX``, or ``OTHER.h5:RUN[:INDEX]`` for
a checkpoint of another trajectory file of the same architecture.

Example::

    traj = open_trajectory("run.h5")
    plane = Plane.through(traj, "sgd", "swa/average", "swa/iterates:0")
    grid = plane.default_grid((21, 21), margin=0.2)
    points, paths = plane.project(traj)      # every checkpoint of every run, with its distance
"""
from __future__ import annotations

import contextlib
import math
import re
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import Data, as_data
from .errors import CheckpointError, ConfigError, GeometryError, ModelError
from .evaluate import check_task_fits
from .params import Layout, copy_module, match_state_dict, unwrap
from .rebuild import rebuild_data, rebuild_model, rebuild_task
from .store import PathData, PointData, Trajectory, open_trajectory
from .store.files import available_memory
from .tasks import count_units, get_task, output_tree, units_are_samples

# a direction shorter than this fraction of the weights' norm counts as zero (duplicate checkpoints)
DEGENERATE = 1e-6
PCA_MEMORY = 256 * 2 ** 20  # bytes: a run whose PCA needs more is streamed, a few rows at a time
# random rays are held in memory (and stored) as R x P float32 directions: at most 4 GiB of them
MAX_RAY_VALUES = 2 ** 30


# ----------------------------------------------------------------------------------------------
# grids

@dataclass(frozen=True)
class Grid:
    """Evenly spaced coordinates: ``x = linspace(*xrange, nx)`` and, for planes, ``y`` likewise."""
    xrange: tuple
    nx: int
    yrange: tuple | None = None
    ny: int | None = None

    def __post_init__(self):
        if self.nx < 1 or (self.yrange is not None and (self.ny is None or self.ny < 1)):
            shape = f"{self.nx} x {self.ny}" if self.yrange is not None else f"{self.nx}"
            raise ConfigError(f"grid {shape} has no points; give at least one point per axis")
        for r, n in ((self.xrange, self.nx), (self.yrange, self.ny)):
            if r is not None and not all(math.isfinite(v) for v in r):
                raise ConfigError(f"grid range {list(r)} is not finite")
            if r is not None and n > 1 and not r[0] < r[1]:  # figures and files read axes in increasing order
                raise ConfigError(f"grid range {list(r)} is empty; give LOW < HIGH")

    @property
    def shape(self) -> tuple:
        return (self.nx,) if self.yrange is None else (self.nx, self.ny)

    @property
    def x(self) -> np.ndarray:
        return np.linspace(self.xrange[0], self.xrange[1], self.nx)

    @property
    def y(self) -> np.ndarray | None:
        return None if self.yrange is None else np.linspace(self.yrange[0], self.yrange[1], self.ny)

    def to_dict(self) -> dict:
        d = {"x": [float(self.xrange[0]), float(self.xrange[1]), int(self.nx)]}
        if self.yrange is not None:
            d["y"] = [float(self.yrange[0]), float(self.yrange[1]), int(self.ny)]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        x, y = d["x"], d.get("y")
        return cls((x[0], x[1]), int(x[2]), None if y is None else (y[0], y[1]), None if y is None else int(y[2]))


def _round(v: float) -> float:
    """Grid bounds rounded to 6 significant digits: stable across machines and readable in specs."""
    return float(f"{v:.6g}")


def _padded(lo: float, hi: float, margin: float) -> tuple:
    width = hi - lo
    if width <= 0:  # all points at one coordinate: a symmetric window of width 1
        width = 1.0
        lo, hi = lo - 0.5, hi + 0.5
        return _round(lo), _round(hi)
    return _round(lo - margin * width), _round(hi + margin * width)


# ----------------------------------------------------------------------------------------------
# checkpoints

_OTHER_FILE = re.compile(r"^(?P<file>.+\.(?:h5|hdf5)):(?P<name>[^:].*)$")


def checkpoint_file(name: str):
    """The other trajectory file a checkpoint name ``OTHER.h5:RUN[:INDEX]`` points into, else None."""
    m = _OTHER_FILE.match(str(name))
    return m.group("file") if m else None


@dataclass
class _Ckpt:
    name: str              # canonical: RUN:INDEX, or FILE:RUN:INDEX for another file
    params: torch.Tensor   # (P,) float64
    buffers: torch.Tensor  # (B,) float64
    source: str = ""       # how to load it again (another file: by the path as given)


def load_checkpoint(traj: Trajectory, name: str) -> _Ckpt:
    """A checkpoint of ``traj``, or ``OTHER.h5:RUN[:INDEX]`` of another file of the same architecture."""
    m = _OTHER_FILE.match(name)
    if m and m.group("file") != str(traj.path):
        other = open_trajectory(m.group("file"))
        if other.layout.params != traj.layout.params or other.layout.buffers != traj.layout.buffers:
            raise ModelError(f"checkpoints of different architectures: {m.group('file')} has "
                             f"{other.layout.num_params:,} parameters {_first_difference(other.layout, traj.layout)}, "
                             f"{traj.path} has {traj.layout.num_params:,}")
        c = other.checkpoint(m.group("name"))
        return _Ckpt(f"{Path(m.group('file')).name}:{c.name}", c.params.double(), c.buffers.double(),
                     f"{m.group('file')}:{c.name}")
    if m:
        name = m.group("name")
    c = traj.checkpoint(name)
    return _Ckpt(c.name, c.params.double(), c.buffers.double(), c.name)


def live_checkpoint(obj, name: str, model: torch.nn.Module) -> _Ckpt:
    """A checkpoint given as a live object, read against ``model`` (the architecture, unwrapped):
    an ``nn.Module`` of that architecture (an ``AveragedModel``, ``DataParallel`` or compiled wrapper
    is unwrapped), a ``state_dict`` of it (wrapper prefixes such as ``module.`` removed), or a flat
    (P,) tensor of parameters in ``model.parameters()`` order (its buffers are then the model's)."""
    layout = Layout.of(model)
    if isinstance(obj, torch.nn.Module):
        module, _ = unwrap(obj)
        layout.check_module(module)
        # on the CPU, as from a file: checkpoints may live on different devices (an initialization kept
        # on the CPU, nets trained on a GPU); the caller moves the geometry where it evaluates
        return _Ckpt(name, layout.params_to_vector(module).double().cpu(),
                     layout.buffers_to_vector(module).double().cpu(), name)
    if isinstance(obj, Mapping):
        params, buffers, _ = match_state_dict(obj, model, f"state_dict {name!r}")
        flat = lambda d: torch.cat([t.detach().reshape(-1).double().cpu() for t in d.values()]) if d \
            else torch.zeros(0, dtype=torch.float64)  # noqa: E731
        return _Ckpt(name, flat(params), flat(buffers), name)
    if torch.is_tensor(obj) or isinstance(obj, np.ndarray):
        v = torch.as_tensor(obj).detach().reshape(-1).double().cpu()
        if len(v) != layout.num_params:
            raise ModelError(f"checkpoint {name!r} holds {len(v):,} values; the model has {layout.num_params:,} "
                             "parameters")
        return _Ckpt(name, v, layout.buffers_to_vector(model).double().cpu(), name)
    raise ConfigError(f"checkpoint {name!r} is a {type(obj).__name__}; give a checkpoint name with a trajectory, "
                      "an nn.Module, a state_dict or a flat parameter tensor")


@dataclass(frozen=True)
class Checkpoints:
    """Where a geometry's checkpoints come from: names in a trajectory file, or live objects read
    against one model (their ``names`` label them in surfaces and figures)."""
    traj: Trajectory | None
    model: torch.nn.Module | None

    @property
    def layout(self) -> Layout:
        return self.traj.layout if self.traj is not None else Layout.of(self.model)

    def load(self, obj, name: str | None = None) -> _Ckpt:
        if self.traj is not None:
            return load_checkpoint(self.traj, obj)
        return live_checkpoint(obj, name, self.model)


def checkpoints_of(args: tuple, count: int, names=None, model=None) -> tuple:
    """``(Checkpoints, the checkpoints, their names)`` from a constructor's arguments: ``(traj, name, ...)``
    or ``(obj, ...)`` of live objects, read against ``model`` (default: the first nn.Module given)."""
    if args and isinstance(args[0], Trajectory):
        traj, rest = args[0], tuple(args[1:])
        if len(rest) != count:
            raise ConfigError(f"give {count} checkpoint names after the trajectory, got {len(rest)}")
        return Checkpoints(traj, None), rest, [None] * count
    if len(args) != count:
        raise ConfigError(f"give {count} checkpoints, got {len(args)}")
    if model is None:
        model = next((unwrap(a)[0] for a in args if isinstance(a, torch.nn.Module)), None)
    if model is None:
        raise ConfigError("checkpoints given as state_dicts or tensors need model= (an nn.Module of their "
                          "architecture) to say which entries are parameters")
    names = list(names) if names is not None else [chr(ord("a") + i) for i in range(count)]
    if len(names) != count:
        raise ConfigError(f"give {count} names, got {len(names)}")
    return Checkpoints(None, unwrap(model)[0]), args, names


def _first_difference(a, b) -> str:
    for ea, eb in zip(a.params + a.buffers, b.params + b.buffers):
        if ea.name != eb.name or ea.shape != eb.shape:
            return f"(first difference: {ea.name} {list(ea.shape)} vs {eb.name} {list(eb.shape)})"
    return "(different number of tensors)"


def _orthonormalize(d1: torch.Tensor, d2: torch.Tensor, names=("u", "v"), scale: float = 1.0):
    """Gram-Schmidt in float64: returns (u, v, (n1, c, n2)) with d1 = n1 u and d2 = c u + n2 v.
    ``names`` describe d1 and d2 in errors; ``scale`` is the size of the weights (for "zero")."""
    n1 = float(d1.norm())
    if n1 <= DEGENERATE * max(scale, 1e-12):
        raise GeometryError(f"{names[0]} has zero length: the checkpoints are the same point")
    u = d1 / n1
    c = float(d2 @ u)
    r = d2 - c * u
    n2 = float(r.norm())
    if n2 <= DEGENERATE * max(scale, 1e-12):
        what = "has zero length: the checkpoints are the same point" if float(d2.norm()) <= DEGENERATE * scale \
            else f"is parallel to {names[0]}: the checkpoints are collinear"
        raise GeometryError(f"{names[1]} {what}; the plane is degenerate")
    if n2 <= DEGENERATE * float(d2.norm()):
        raise GeometryError(f"{names[1]} is parallel to {names[0]}: the checkpoints are collinear; "
                            "the plane is degenerate")
    return u, r / n2, (n1, c, n2)


# filter normalization (Li et al. 2018, loss-landscape net_plotter.normalize_directions_for_weights)
def filter_normalize(direction: torch.Tensor, weights: torch.Tensor, layout, ignore: str = "biasbn") -> torch.Tensor:
    """Scale each filter (slice along the first dimension) of ``direction`` to the norm of the same
    filter of ``weights``. Parameters with at most one dimension (biases, BatchNorm weights) are set
    to zero with ``ignore="biasbn"``, else to the weights themselves, as in the reference code."""
    d = direction.clone()
    for e, sl in layout.param_slices():
        if len(e.shape) <= 1:
            d[sl] = 0.0 if ignore == "biasbn" else weights[sl]
            continue
        dd = d[sl].view(e.shape[0], -1)
        ww = weights[sl].view(e.shape[0], -1)
        d[sl] = (dd * (ww.norm(dim=1, keepdim=True) / (dd.norm(dim=1, keepdim=True) + 1e-10))).reshape(-1)
    return d


def _zero_biasbn(d: torch.Tensor, layout) -> torch.Tensor:
    d = d.clone()
    for e, sl in layout.param_slices():
        if len(e.shape) <= 1:
            d[sl] = 0.0
    return d


def random_direction(layout, weights: torch.Tensor, generator: torch.Generator, filter_norm: bool = True,
                     ignore: str = "biasbn") -> torch.Tensor:
    """A Gaussian direction (float64), filter-normalized to ``weights`` unless ``filter_norm`` is false;
    zero at the parameters the layout marks frozen (the model does not train them)."""
    if ignore not in ("biasbn", "none"):
        raise ConfigError(f"ignore must be 'biasbn' or 'none', got {ignore!r}")
    d = torch.randn(layout.num_params, generator=generator, dtype=torch.float32).double()
    if filter_norm:
        d = filter_normalize(d, weights, layout, ignore)
    elif ignore == "biasbn":
        d = _zero_biasbn(d, layout)
    mask = layout.trainable_mask()
    return d if mask is None else d * mask


# ----------------------------------------------------------------------------------------------
# projection of checkpoints

def _project_rows(rows: torch.Tensor, origin: torch.Tensor, basis: torch.Tensor):
    """(T, P) float64 rows -> coordinates (T, k) in the orthonormal ``basis`` (k, P) and the distance of
    every row from the affine subspace."""
    diff = rows - origin
    coords = diff @ basis.T
    dist = (diff - coords @ basis).norm(dim=1)
    return coords, dist


def project_runs(traj: Trajectory, origin: torch.Tensor, basis: torch.Tensor, chunk: int = 64) -> dict:
    """Every checkpoint of every run of ``traj`` projected: run -> PathData (rows read ``chunk`` at a time)."""
    origin, basis = origin.double(), basis.double()
    paths = {}
    for run in traj.runs:
        n = traj.num_checkpoints(run)
        coords, dists = [], []
        for start in range(0, n, chunk):
            rows = torch.from_numpy(traj.params(run, slice(start, min(n, start + chunk)))).double()
            c, d = _project_rows(rows, origin, basis)
            coords.append(c)
            dists.append(d)
        paths[run] = PathData(torch.cat(coords).numpy() if coords else np.zeros((0, len(basis))),
                              torch.cat(dists).numpy() if dists else np.zeros(0), traj.run(run).epoch)
    return paths


def _last_checkpoints(traj: Trajectory) -> list:
    return [f"{r}:{traj.num_checkpoints(r) - 1}" for r in traj.runs if traj.num_checkpoints(r)]


# ----------------------------------------------------------------------------------------------
# principal components of a run

class RunPCA:
    """The top principal components of a run's checkpoints w_i, taken relative to the last one (d_i =
    w_i - w_T, centered), from ``chunks(size)``: the rows in order, ``size`` at a time, any number of
    passes. :meth:`in_memory` eigendecomposes the (T, T) Gram matrix of all rows at once;
    :meth:`streamed` runs subspace iteration on the implicit covariance, one pass over the rows per
    iteration, holding only (P, k) matrices and one chunk: memory independent of T."""

    def __init__(self, chunks, n: int, last: torch.Tensor, where: str = "", run: str = "run",
                 chunk_bytes: int = 64 * 2 ** 20):
        self.chunks, self.n, self.where, self.run = chunks, n, where, run
        self.last = last.double()  # the reference row, w_T
        self.P = self.last.numel()
        self.chunk_rows = max(1, chunk_bytes // (8 * self.P))
        self._moments()

    def _moments(self) -> None:
        """One pass: the sum of the d_i, the sum of their squared norms, and finite rows only."""
        total, squares, bad = torch.zeros(self.P, dtype=torch.float64), 0.0, []
        for start, rows in self._passes():
            bad += [start + i for i in (~torch.isfinite(rows)).any(1).nonzero().flatten().tolist()]
            d = rows - self.last
            total += d.sum(0)
            squares += float((d * d).sum())
        if bad:  # one NaN row would make every component NaN
            raise CheckpointError(f"checkpoints {', '.join(f'{self.run}:{i}' for i in bad[:3])}"
                                  f"{' ...' if len(bad) > 3 else ''}{self.where} have non-finite weights "
                                  f"(training diverged there); PCA of run {self.run!r} needs finite checkpoints")
        self.sum_d = total
        self.total_variance = squares - float(total @ total) / self.n

    def _passes(self):
        start = 0
        for rows in self.chunks(self.chunk_rows):
            yield start, rows
            start += len(rows)

    def fits(self, budget: int, block: int = 6) -> bool:
        """Whether :meth:`in_memory` needs at most ``budget`` bytes or no more than :meth:`streamed`
        does (a few rows of a large model: streaming holds more (P,)-vectors than there are rows)."""
        streamed = 8 * self.P * (4 * min(block, self.n - 1) + self.chunk_rows)
        return 8 * self.n * (self.P + self.n) <= max(budget, streamed)

    def in_memory(self, k: int = 2) -> tuple:
        """(eigenvalues (k,), components (P, k), total variance), all rows at once."""
        m = torch.cat([rows for _, rows in self._passes()])
        m.sub_(self.last)
        m.sub_(m.mean(0))  # in place: the rows are held once
        evals, evecs = torch.linalg.eigh(m @ m.T)  # (T, T): no (P, P) matrix
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        return evals[:k], (m.T @ evecs[:, :k]) / evals[:k].sqrt().clamp_min(1e-300), self.total_variance

    def streamed(self, k: int = 2, block: int = 6, tol: float = 1e-13, max_passes: int = 1000, seed: int = 0) -> tuple:
        """The same by subspace iteration on C = sum_i (d_i - mean)(d_i - mean)^T with ``block``
        vectors (the extra ones speed up convergence), to ``tol`` on the top-``k`` subspace."""
        block = min(block, self.n - 1)
        z = torch.linalg.qr(torch.randn(self.P, block, generator=torch.Generator().manual_seed(seed),
                                        dtype=torch.float64))[0]
        for _ in range(max_passes):
            cz = self._covariance_times(z)
            z_new = torch.linalg.qr(cz)[0]
            overlap = torch.linalg.svdvals(z[:, :k].T @ z_new[:, :k])
            z = z_new
            if float(overlap.min()) > 1 - tol:
                break
        ritz, rotation = torch.linalg.eigh(z.T @ self._covariance_times(z))  # Rayleigh-Ritz
        ritz, rotation = ritz.flip(0).clamp_min(0), rotation.flip(1)
        return ritz[:k], z @ rotation[:, :k], self.total_variance

    def _covariance_times(self, z: torch.Tensor) -> torch.Tensor:
        """C z in one pass: D^T (D z) minus the centering term (sum_i d_i)(mean_i d_i z)^T."""
        out, y_sum = torch.zeros_like(z), torch.zeros(z.shape[1], dtype=torch.float64)
        for _, rows in self._passes():
            d = rows - self.last
            y = d @ z
            out.addmm_(d.T, y)
            y_sum += y.sum(0)
        return out - torch.outer(self.sum_d, y_sum / self.n)


# ----------------------------------------------------------------------------------------------
# planes

@dataclass(frozen=True, eq=False)
class Plane:
    """``origin + x u + y v``. ``buffers`` are the origin's buffers (BatchNorm policy ``stored``);
    ``buffer_u``/``buffer_v`` the change of the buffers per unit step along u/v when the plane is made
    of checkpoints (policy ``interpolate``), else None."""
    origin: torch.Tensor                 # (P,) float32
    u: torch.Tensor                      # (P,) float32, unit
    v: torch.Tensor                      # (P,) float32, unit, orthogonal to u
    buffers: torch.Tensor                # (B,) float32
    buffer_u: torch.Tensor | None = None
    buffer_v: torch.Tensor | None = None
    spec: dict = field(default_factory=dict)     # inputs: method, checkpoints, seed, ...
    derived: dict = field(default_factory=dict)  # computed: points, lengths, eigenvalues, ...
    extent: tuple = ((-1.0, 1.0), (-1.0, 1.0))   # region the default grid covers (before the margin)
    pad: bool = True                             # whether the default grid adds the margin to ``extent``
    sources: dict = field(default_factory=dict, repr=False)  # checkpoint name -> how to load it again
    live: dict = field(default_factory=dict, repr=False)     # live checkpoints: name -> (P,) weights
    model: torch.nn.Module | None = field(default=None, repr=False)  # the module live checkpoints fit

    kind = "plane"
    default_shape = (21, 21)

    @property
    def basis(self) -> torch.Tensor:
        return torch.stack([self.u, self.v])

    @property
    def buffer_basis(self) -> torch.Tensor | None:
        return None if self.buffer_u is None else torch.stack([self.buffer_u, self.buffer_v])

    def default_grid(self, shape=None, margin: float = 0.2, xrange=None, yrange=None) -> Grid:
        nx, ny = shape or self.default_shape
        (x0, x1), (y0, y1) = self.extent
        if self.pad:
            (x0, x1), (y0, y1) = _padded(x0, x1, margin), _padded(y0, y1, margin)
        return Grid(tuple(xrange or (x0, x1)), int(nx), tuple(yrange or (y0, y1)), int(ny))

    def coefficients(self, grid: Grid, flat: np.ndarray) -> np.ndarray:
        """(n, 2) coordinates of the points with flat (C-order) indices ``flat``."""
        i, j = np.divmod(np.asarray(flat), grid.ny)
        return np.stack([grid.x[i], grid.y[j]], axis=1)

    def project(self, traj: Trajectory | None = None, checkpoints=None, paths=None) -> tuple:
        """(points, paths): the checkpoints that made the plane and every run's last checkpoint, and
        every checkpoint of every run, with coordinates and distance from the plane. Made of live
        objects: the checkpoints that made it, plus ``checkpoints`` ({name: module, state_dict or
        tensor}) and ``paths`` ({run: [states in order]})."""
        return _project(self, traj, checkpoints, paths)

    def values_shape(self, grid: Grid) -> tuple:
        return grid.shape

    def with_basis(self, origin, basis) -> "Plane":
        """The same plane with its vectors replaced (by those stored in a file being resumed)."""
        return _replace(self, origin=origin, u=basis[0], v=basis[1])

    def to(self, device) -> "Plane":
        return _replace(self, **_moved(self, ("origin", "u", "v", "buffers", "buffer_u", "buffer_v"), device))

    # ways to make one ---------------------------------------------------------------------------
    @classmethod
    def through(cls, *checkpoints, names=None, model=None) -> "Plane":
        """The plane through three checkpoints: origin a, u along b - a, v by Gram-Schmidt of c - a.
        ``Plane.through(traj, "sgd", "swa/average", "swa/iterates:0")`` names them in a trajectory;
        ``Plane.through(sgd_net, swa_model, early_state, names=("sgd", "swa", "early"))`` takes live
        modules, state_dicts or flat tensors (read against ``model``, default the first module given)."""
        src, objs, labels = checkpoints_of(checkpoints, 3, names, model)
        ca, cb, cc = (src.load(o, n) for o, n in zip(objs, labels))
        _distinct(ca, cb, cc)
        u, v, (n1, cu, n2) = _orthonormalize(cb.params - ca.params, cc.params - ca.params,
                                             (f"{cb.name} - {ca.name}", f"{cc.name} - {ca.name}"),
                                             float(ca.params.norm()))
        bu, bv = _buffer_map(cb.buffers - ca.buffers, cc.buffers - ca.buffers, n1, cu, n2)
        points = {ca.name: [0.0, 0.0], cb.name: [n1, 0.0], cc.name: [cu, n2]}
        xs, ys = [p[0] for p in points.values()], [p[1] for p in points.values()]
        spec = {"method": "through", "origin": ca.name, "checkpoints": {"a": ca.name, "b": cb.name, "c": cc.name}}
        derived = {"points": points, "lengths": {"b-a": n1, "c-a": float((cc.params - ca.params).norm()),
                                                 "c-b": float((cc.params - cb.params).norm())}}
        return _sourced(cls(ca.params.float(), u.float(), v.float(), ca.buffers.float(), bu, bv, spec, derived,
                            ((min(xs), max(xs)), (min(ys), max(ys)))), [ca, cb, cc], src)

    @classmethod
    def directions(cls, traj: Trajectory, origin: str, d1, d2) -> "Plane":
        """Origin plus two checkpoint differences ``d = (end, start)`` (``start`` defaults to the
        origin); u along d1, v by Gram-Schmidt of d2. The default grid is centred on the origin."""
        co = load_checkpoint(traj, origin)
        ends = []
        for d in (d1, d2):
            d = (d,) if isinstance(d, str) else tuple(d)
            if len(d) not in (1, 2):
                raise ConfigError(f"a direction is END or END START, got {list(d)}")
            end = load_checkpoint(traj, d[0])
            start = load_checkpoint(traj, d[1]) if len(d) == 2 else co
            ends.append((end, start))
        (e1, s1), (e2, s2) = ends
        u, v, (n1, cu, n2) = _orthonormalize(e1.params - s1.params, e2.params - s2.params,
                                             (f"{e1.name} - {s1.name}", f"{e2.name} - {s2.name}"),
                                             float(co.params.norm()))
        bu, bv = _buffer_map(e1.buffers - s1.buffers, e2.buffers - s2.buffers, n1, cu, n2)
        basis = torch.stack([u, v])
        points = {co.name: [0.0, 0.0]}
        for c in (e1, s1, e2, s2):
            points[c.name] = ((c.params - co.params) @ basis.T).tolist()
        hx = max(n1, max(abs(p[0]) for p in points.values()))
        hy = max(n2, max(abs(p[1]) for p in points.values()))
        spec = {"method": "directions", "origin": co.name,
                "directions": [[e1.name, s1.name], [e2.name, s2.name]]}
        derived = {"points": points, "lengths": {"d1": n1, "d2": float((e2.params - s2.params).norm())}}
        return _sourced(cls(co.params.float(), u.float(), v.float(), co.buffers.float(), bu, bv, spec, derived,
                            ((-hx, hx), (-hy, hy))), [co, e1, s1, e2, s2], Checkpoints(traj, None))

    @classmethod
    def random(cls, source, origin: str | None = None, seed: int = 0, filter_norm: bool = True,
               ignore: str = "biasbn", *, model=None, name: str = "origin") -> "Plane":
        """Two Gaussian directions drawn from ``seed``, filter-normalized to the origin's weights (Li
        et al. 2018), orthonormalized. The default grid spans +-|d1| by +-|d2|: Li et al.'s [-1, 1]^2.
        ``Plane.random(traj, "swa/average", seed=0)``, or ``Plane.random(net, seed=0)`` around a live
        module (or a state_dict or flat tensor, with ``model=``)."""
        src, co = _origin_of(source, origin, model, name)
        layout = _trained_layout(src, co)
        g = torch.Generator().manual_seed(int(seed))
        d1 = random_direction(layout, co.params, g, filter_norm, ignore)
        d2 = random_direction(layout, co.params, g, filter_norm, ignore)
        u, v, (n1, _, n2) = _orthonormalize(d1, d2, ("random direction 1", "random direction 2"),
                                            float(co.params.norm()))
        s2 = float(d2.norm())
        spec = {"method": "random", "origin": co.name, "seed": int(seed), "filter_norm": bool(filter_norm),
                "ignore": ignore, **_frozen_spec(layout)}
        derived = {"points": {co.name: [0.0, 0.0]}, "scale": [n1, s2]}
        return _sourced(cls(co.params.float(), u.float(), v.float(), co.buffers.float(), spec=spec, derived=derived,
                            extent=((-n1, n1), (-s2, s2)), pad=False), [co], src)

    @classmethod
    def pca(cls, source, run: str | None = None, origin=None, *, model=None, name: str = "run") -> "Plane":
        """The first two principal components of a run's checkpoints relative to its last one (Li et
        al. 2018), through ``origin`` (default: that last checkpoint). Signs are fixed so that the
        run's first checkpoint has non-positive coordinates. ``Plane.pca(traj, "sgd")``, or
        ``Plane.pca([state0, state1, ...], model=net)`` over live states (``name`` labels the run)."""
        if isinstance(source, Trajectory):
            src, n = Checkpoints(source, None), source.num_checkpoints(run)

            def chunks(size):  # the run's rows, ``size`` at a time, read afresh on every pass
                for start in range(0, n, size):
                    yield torch.from_numpy(source.params(run, slice(start, min(n, start + size)))).double()

            def last():
                return torch.from_numpy(source.params(run, n - 1))
            co = load_checkpoint(source, origin or f"{run}:{n - 1}") if n >= 3 else None
        else:
            states = list(source)
            run, n = name, len(states)
            src, _, _ = checkpoints_of(tuple(states[:1]), 1, model=model)
            loaded = [src.load(s, f"{name}:{i}") for i, s in enumerate(states)]

            def chunks(size):
                for start in range(0, n, size):
                    yield torch.stack([c.params for c in loaded[start:start + size]]).double()

            def last():
                return loaded[-1].params
            co = (src.load(origin, "origin") if origin is not None else loaded[-1]) if n >= 3 else None
        if n < 3:
            raise GeometryError(f"PCA of run {run!r} needs at least 3 checkpoints, it has {n}")
        pca = RunPCA(chunks, n, last(), where=f" of {source.path}" if isinstance(source, Trajectory) else "", run=run)
        evals, comps, total = pca.in_memory() if pca.fits(PCA_MEMORY) else pca.streamed()
        if evals[1] <= DEGENERATE * evals[0]:
            raise GeometryError(f"the checkpoints of run {run!r} lie on a line; PCA has no second direction")
        u, v, _ = _orthonormalize(comps[:, 0], comps[:, 1], ("PC1", "PC2"))
        first = next(iter(chunks(1)))[0] - co.params
        u = -u if first @ u > 0 else u
        v = -v if first @ v > 0 else v
        basis = torch.stack([u, v])
        path = torch.cat([_project_rows(rows, co.params, basis)[0] for rows in chunks(pca.chunk_rows)])
        spec = {"method": "pca", "origin": co.name, "run": run}
        derived = {"points": {co.name: [0.0, 0.0]},
                   "explained_variance_ratio": (evals[:2] / total).tolist()}
        return _sourced(cls(co.params.float(), u.float(), v.float(), co.buffers.float(), spec=spec, derived=derived,
                            extent=((float(path[:, 0].min()), float(path[:, 0].max())),
                                    (float(path[:, 1].min()), float(path[:, 1].max())))), [co], src)

    @classmethod
    def hessian(cls, source, origin: str | None = None, data=None, samples: int = 2000, seed: int = 0,
                iterations: int = 100, tol: float = 1e-4, batch_size: int = 1000, device="cpu", *,
                model=None, name: str = "origin", task=None) -> "Plane":
        """The two eigenvectors of the train-loss Hessian at ``origin`` with the largest |eigenvalue|,
        by subspace iteration on Hessian-vector products over ``samples`` training samples (eval-mode
        BatchNorm with the origin's buffers). The default grid spans +-2 sqrt(2 / |lambda|) per axis,
        where the quadratic model predicts a loss rise of 4. ``Plane.hessian(traj, "sgd")`` rebuilds the
        file's model and data; ``Plane.hessian(net, data=data)`` takes a live module (or a state_dict
        or flat tensor with ``model=``) and a :class:`~landscape.data.Data` or its four tensors, whose
        loss is the ``task``'s (default: the data's; the file's for a trajectory)."""
        if not samples >= 1:
            raise ConfigError(f"Hessian samples must be at least 1, got {samples}")
        if not iterations >= 1:
            raise ConfigError(f"Hessian iterations must be at least 1, got {iterations}")
        if not tol >= 0:
            raise ConfigError(f"Hessian tolerance must be non-negative, got {tol}")
        src, co = _origin_of(source, origin, model, name)
        if src.traj is not None:
            data = as_data(data if data is not None else rebuild_data(src.traj, device), device,
                           task if task is not None else rebuild_task(src.traj))
            net = rebuild_model(src.traj, data, device)
        elif data is None:
            raise ConfigError("a Hessian plane of a live model needs its data: data=(x_train, y_train, x_test, y_test)")
        else:
            data, net = as_data(data, device, task), copy_module(src.model).to(device)
        if not isinstance(data, Data):
            raise ConfigError("a Hessian plane needs its data in memory (tensors); a streamed data source is "
                              "evaluated, not differentiated twice")
        check_task_fits(net, data, device)
        layout = _trained_layout(src, co)
        (l1, l2), (u, v), its = top_hessian_eigen(net, layout, co.params.float(), co.buffers.float(), data,
                                                  samples, seed, iterations, tol, batch_size)
        h = [2 * math.sqrt(2 / max(abs(l), 1e-12)) for l in (l1, l2)]
        spec = {"method": "hessian", "origin": co.name, "samples": min(int(samples), len(data.x_train)), "seed": int(seed),
                "iterations": int(iterations), "tol": float(tol), **_frozen_spec(layout)}
        derived = {"points": {co.name: [0.0, 0.0]}, "eigenvalues": [l1, l2], "iterations_run": its}
        return _sourced(cls(co.params.float(), u.float().cpu(), v.float().cpu(), co.buffers.float(), spec=spec,
                            derived=derived, extent=((-h[0], h[0]), (-h[1], h[1])), pad=False), [co], src)


def check_finite(*ckpts) -> None:
    """Refuse a checkpoint with NaN or infinite weights (a diverged run's): no plane passes through it."""
    for c in ckpts:
        if not bool(torch.isfinite(c.params).all()):
            raise GeometryError(f"checkpoint {c.name} holds NaN or infinite weights (a diverged run?); "
                                "choose finite checkpoints")


def _distinct(*ckpts) -> None:
    """Refuse a checkpoint given twice, or two checkpoints with the same weights (or any not finite)."""
    check_finite(*ckpts)
    what = "a plane needs three" if len(ckpts) == 3 else "a line needs two"
    scale = max(float(c.params.norm()) for c in ckpts)
    for i, a in enumerate(ckpts):
        for b in ckpts[i + 1:]:
            if a.name == b.name:
                raise GeometryError(f"checkpoint {a.name} is given twice; {what} different checkpoints")
            if float((a.params - b.params).norm()) <= DEGENERATE * scale:
                raise GeometryError(f"checkpoints {a.name} and {b.name} are the same point (identical weights); "
                                    f"{what} different points")


def _buffer_map(e1, e2, n1, c, n2):
    """Buffer differences mapped like the weight differences: d1 = n1 u, d2 = c u + n2 v gives the
    buffer change per unit step along u and v (for the ``interpolate`` BatchNorm policy)."""
    if e1.numel() == 0:
        return None, None
    bu = e1 / n1
    bv = (e2 - c * bu) / n2
    return bu.float(), bv.float()


def _sourced(geom, loaded: list, src: "Checkpoints"):
    """``geom`` with the checkpoints it was made of recorded: name -> how to load each again from a
    trajectory, or, for live objects, their weights (to project them) and the model they fit."""
    if src.traj is not None:
        return _replace(geom, sources={c.name: c.source for c in loaded})
    return _replace(geom, live={c.name: c.params.float() for c in loaded}, model=src.model)


def _origin_of(source, origin, model, name: str):
    """(Checkpoints, the origin): a checkpoint name in the trajectory ``source``, or ``source`` itself
    as a live object read against ``model`` (default: ``source``, which must then be a module)."""
    if isinstance(source, Trajectory):
        if origin is None:
            raise ConfigError("give the origin checkpoint's name after the trajectory")
        co = load_checkpoint(source, origin)
        check_finite(co)
        return Checkpoints(source, None), co
    src, objs, labels = checkpoints_of((source,), 1, [name], model)
    co = src.load(objs[0], labels[0])
    check_finite(co)
    return src, co


def _trained_layout(src: "Checkpoints", co: _Ckpt) -> Layout:
    """The layout with the parameters the origin's model does not train marked frozen: the live
    model's ``requires_grad=False`` ones, or those the origin's run in the file never trained."""
    if src.traj is None:
        return src.layout
    m = _OTHER_FILE.match(co.source)  # (a checkpoint of another file: that file's run says)
    traj, name = (open_trajectory(m.group("file")), m.group("name")) if m else (src.traj, co.source)
    return traj.layout_at(name)


def _frozen_spec(layout: Layout) -> dict:
    """A geometry spec's record of the frozen parameters its directions leave alone (none: nothing)."""
    return {"frozen": layout.frozen} if layout.frozen else {}


def _replace(obj, **changes):
    from dataclasses import replace
    return replace(obj, **changes)


def _moved(obj, names, device) -> dict:
    return {n: getattr(obj, n).to(device) for n in names if getattr(obj, n) is not None}


# ----------------------------------------------------------------------------------------------
# lines

@dataclass(frozen=True, eq=False)
class Line:
    """``origin + x u`` for every unit row ``u`` of ``directions`` (R, P). A line through two
    checkpoints has R = 1; a *rays* line (``rays=True``) has R random directions and its values are
    (R, nx), ``x`` being the distance from the origin."""
    origin: torch.Tensor
    directions: torch.Tensor               # (R, P) float32, unit rows
    buffers: torch.Tensor                  # (B,) float32
    buffer_directions: torch.Tensor | None = None  # (R, B) change of the buffers per unit step
    spec: dict = field(default_factory=dict)
    derived: dict = field(default_factory=dict)
    extent: tuple = (0.0, 1.0)
    rays: bool = False
    sources: dict = field(default_factory=dict, repr=False)  # checkpoint name -> how to load it again
    live: dict = field(default_factory=dict, repr=False)     # live checkpoints: name -> (P,) weights
    model: torch.nn.Module | None = field(default=None, repr=False)  # the module live checkpoints fit

    kind = "line"
    default_shape = (41,)

    @property
    def basis(self) -> torch.Tensor:
        return self.directions

    @property
    def buffer_basis(self) -> torch.Tensor | None:
        return self.buffer_directions

    def default_grid(self, shape=None, margin: float = 0.0, xrange=None, yrange=None) -> Grid:
        (nx,) = shape or self.default_shape
        return Grid(tuple(xrange or (_round(self.extent[0]), _round(self.extent[1]))), int(nx))

    def coefficients(self, grid: Grid, flat: np.ndarray) -> np.ndarray:
        """(n, R) coefficients: for rays, point (r, i) is x[i] along direction r."""
        flat = np.asarray(flat)
        if not self.rays:
            return grid.x[flat][:, None]
        r, i = np.divmod(flat, grid.nx)
        c = np.zeros((len(flat), len(self.directions)))
        c[np.arange(len(flat)), r] = grid.x[i]
        return c

    def values_shape(self, grid: Grid) -> tuple:
        return (len(self.directions), grid.nx) if self.rays else (grid.nx,)

    def project(self, traj: Trajectory | None = None, checkpoints=None, paths=None) -> tuple:
        return _project(self, traj, checkpoints, paths)

    def with_basis(self, origin, basis) -> "Line":
        return _replace(self, origin=origin, directions=basis.reshape(len(self.directions), -1))

    def to(self, device) -> "Line":
        return _replace(self, **_moved(self, ("origin", "directions", "buffers", "buffer_directions"), device))

    @classmethod
    def through(cls, *checkpoints, range=(-0.5, 1.5), names=None, model=None) -> "Line":
        """The line a -> b; the default grid runs from ``range[0]`` to ``range[1]`` times the segment
        (-0.5 to 1.5: the SWA paper's line beyond both ends). ``x`` is the distance from a.
        ``Line.through(traj, "sgd", "swa/average")``, or live objects as for :meth:`Plane.through`:
        ``Line.through(sgd_net, swa_model, names=("sgd", "swa"))``."""
        src, objs, labels = checkpoints_of(checkpoints, 2, names, model)
        ca, cb = (src.load(o, n) for o, n in zip(objs, labels))
        _distinct(ca, cb)
        d = cb.params - ca.params
        length = float(d.norm())
        if length <= DEGENERATE * max(1.0, float(ca.params.norm())):
            raise GeometryError(f"checkpoints {ca.name} and {cb.name} are the same point")
        if not range[0] < range[1]:
            raise ConfigError(f"range {list(range)} is empty; give LOW < HIGH (fractions of the segment)")
        bd = ((cb.buffers - ca.buffers) / length).float()[None] if ca.buffers.numel() else None
        spec = {"method": "through", "origin": ca.name, "checkpoints": {"a": ca.name, "b": cb.name},
                "range": [float(range[0]), float(range[1])]}
        derived = {"points": {ca.name: [0.0], cb.name: [length]}, "length": length}
        return _sourced(cls(ca.params.float(), (d / length).float()[None], ca.buffers.float(), bd, spec, derived,
                            (range[0] * length, range[1] * length)), [ca, cb], src)

    @classmethod
    def random_rays(cls, source, origin: str | None = None, n: int = 5, seed: int = 0,
                    max_distance: float | None = None, filter_norm: bool = False, ignore: str = "none", *,
                    model=None, name: str = "origin") -> "Line":
        """``n`` random unit directions from ``origin`` (uniform on the sphere, as in the SWA paper;
        optionally filter-normalized first). The default grid runs from 0 to ``max_distance``
        (default: half the norm of the origin's weights). ``Line.random_rays(traj, "sgd", n=5)``, or
        ``Line.random_rays(net, n=5)`` from a live module (a state_dict or flat tensor with ``model=``)."""
        if n < 1:
            raise ConfigError(f"number of rays must be at least 1, got {n}")
        src, co = _origin_of(source, origin, model, name)
        if n * src.layout.num_params > MAX_RAY_VALUES:
            raise ConfigError(f"{n:,} rays of {src.layout.num_params:,} parameters are more than "
                              f"{MAX_RAY_VALUES * 4 / 2 ** 30:.0f} GiB of directions; give fewer rays")
        layout = _trained_layout(src, co)
        g = torch.Generator().manual_seed(int(seed))
        dirs = []
        for k in range(n):
            d = random_direction(layout, co.params, g, filter_norm, ignore)
            norm = d.norm()
            if norm == 0:
                raise GeometryError("a random direction is zero (every parameter ignored?)")
            dirs.append(d / norm)
        top = float(max_distance) if max_distance is not None else 0.5 * float(co.params.norm())
        if not top > 0:
            raise ConfigError(f"max distance must be positive, got {top}")
        spec = {"method": "ray", "origin": co.name, "rays": int(n), "seed": int(seed),
                "filter_norm": bool(filter_norm), "ignore": ignore, **_frozen_spec(layout)}
        derived = {"points": {co.name: [0.0]}, "max_distance": top}
        return _sourced(cls(co.params.float(), torch.stack(dirs).float(), co.buffers.float(), None, spec, derived,
                            (0.0, top), rays=True), [co], src)


def _project(geom, traj: Trajectory | None, checkpoints=None, paths=None) -> tuple:
    """Points: the checkpoints named in the geometry and the last checkpoint of every run of ``traj``
    (or, for live objects, the given ``checkpoints``); paths: every run's checkpoints."""
    if getattr(geom, "rays", False):  # projecting onto several half-lines says little: the origin only
        return {geom.spec["origin"]: PointData(np.zeros(1), 0.0)}, {}
    origin, basis = geom.origin.double().cpu(), geom.basis.double().cpu()

    def point(params: torch.Tensor) -> PointData:
        coords, dist = _project_rows(params.double().cpu()[None], origin, basis)
        return PointData(coords[0].numpy(), float(dist[0]))

    if traj is not None:
        names = list(geom.derived.get("points", {})) + [n for n in _last_checkpoints(traj)]
        points = {name: point(load_checkpoint(traj, geom.sources.get(name, name)).params)
                  for name in dict.fromkeys(names)}
        return points, project_runs(traj, origin, basis)
    if (checkpoints or paths) and geom.model is None:
        raise ConfigError("checkpoints and paths are projected onto geometry made of live objects; "
                          "this one was made from a trajectory: pass the trajectory")
    load = lambda obj, name: live_checkpoint(obj, name, geom.model).params  # noqa: E731
    points = {name: point(w) for name, w in geom.live.items()}
    points.update({name: point(load(obj, name)) for name, obj in (checkpoints or {}).items()})
    runs = {}
    for run, states in (paths or {}).items():
        rows = torch.stack([load(s, f"{run}:{i}") for i, s in enumerate(states)])
        coords, dist = _project_rows(rows, origin, basis)
        runs[run] = PathData(coords.numpy(), dist.numpy(), np.arange(len(states), dtype=float))
    return points, runs


# ----------------------------------------------------------------------------------------------
# Hessian eigenvectors

class HessianOperator:
    """The mean train loss of the task (cross-entropy by default) at fixed BatchNorm buffers (eval
    mode), as a function of the flat weights: its value and gradient, and Hessian-vector products by
    double backward through ``torch.func.functional_call``; never a (P, P) matrix. Sums run over ``x``
    in batches of ``batch_size`` and are accumulated in float64. Used by :func:`top_hessian_eigen` and
    by :mod:`landscape.sharpness`. Parameters the layout marks frozen are constants: the gradient is
    zero there and the Hessian is that of the trained parameters (products zero at frozen entries).

    ``op(vs)`` takes (k, P) vectors and returns (k, P) float64 products H v: the gradient graph of each
    data batch is built once and serves all k vectors, and from the second call on the next calls too,
    where the graphs fit in memory (:meth:`_gradients`; the products are the same either way). ``stop`` (a
    ``threading.Event``): once set, the next batch raises KeyboardInterrupt (a computation on a worker
    thread ends early)."""

    def __init__(self, model, layout, params: torch.Tensor, buffers: torch.Tensor, x: torch.Tensor,
                 y: torch.Tensor, batch_size: int = 1000, task=None, stop=None, units: float | None = None):
        self.model, self.layout, self.task, self.stop = model.eval(), layout, get_task(task), stop
        self.device = x.device
        self.x, self.y, self.batch_size = x, y, int(batch_size)
        self.params = params.to(self.device).float()
        self.bufs = {k: t for k, t in layout.split_buffers(buffers.to(self.device)).items()}
        self.num_params = layout.num_params
        # products of the Hessian over the parameters the model trains: H restricted to them (M H M)
        self.mask = layout.trainable_mask(self.device)
        self._kept = None  # (w, the gradient of every batch with its graph), see _gradients
        self._graph_bytes = None  # what autograd saves for all batches, measured by the first call
        # the mean's denominator: the samples, or (a language model) the scored tokens, as surfaces have it;
        # ``units``: counted already by an operator on the same data (counting takes a forward pass)
        if units is None:
            units = float(len(x)) if units_are_samples(self.task) else max(self._count_units(), 1.0)
        self.units = units

    def _batches(self):
        for start in range(0, len(self.x), self.batch_size):
            self._check_stop()
            yield self.x[start:start + self.batch_size], self.y[start:start + self.batch_size]

    def _check_stop(self):
        if self.stop is not None and self.stop.is_set():
            raise KeyboardInterrupt

    def _output(self, w: torch.Tensor, xb):
        from torch.func import functional_call
        return output_tree(functional_call(self.model, (self.layout.split_params(w), self.bufs), (xb,)))

    def _loss(self, w: torch.Tensor, xb, yb) -> torch.Tensor:
        # the batch's share of the mean loss: its summed loss over all units (cross-entropy by default)
        return self.task.loss(self._output(w, xb), (xb, yb), reduction="sum") / self.units

    @torch.no_grad()
    def _count_units(self) -> float:
        return sum(count_units(self.task, self._output(self.params, xb), (xb, yb)) for xb, yb in self._batches())

    @torch.no_grad()
    def loss(self, w: torch.Tensor | None = None) -> float:
        """The mean loss at ``w`` (default: the weights the operator was made at)."""
        w = self.params if w is None else w.to(self.device).float()
        return float(sum(self._loss(w, xb, yb).double() for xb, yb in self._batches()))

    def loss_and_grad(self, w: torch.Tensor | None = None) -> tuple:
        """(mean loss, its (P,) float64 gradient) at ``w``."""
        w = (self.params if w is None else w.to(self.device).float()).clone().requires_grad_(True)
        total, grad = 0.0, torch.zeros(self.num_params, dtype=torch.float64, device=self.device)
        for xb, yb in self._batches():
            loss = self._loss(w, xb, yb)
            (g,) = torch.autograd.grad(loss, w)
            total += float(loss.detach().double())
            grad += g.double()
        return total, grad if self.mask is None else grad * self.mask

    def restricted(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` (P,) or (k, P) with its frozen entries zero: a vector of the trained parameters' subspace."""
        v = v.to(self.device)
        return v if self.mask is None else v * self.mask.to(v.dtype)

    def __call__(self, vs: torch.Tensor) -> torch.Tensor:
        vs = self.restricted(vs).float()
        out = torch.zeros(vs.shape, dtype=torch.float64, device=self.device)
        for w, grad, kept in self._gradients():
            for k in range(len(vs)):
                (hv,) = torch.autograd.grad(grad @ vs[k], w, retain_graph=kept or k + 1 < len(vs))
                out[k] += hv.double()
        return out if self.mask is None else out * self.mask

    def _gradients(self):
        """Per data batch: (w, the gradient at the weights with its graph, whether that is kept). From
        the second call on, the graphs are kept for the next calls where they fit (a Lanczos run takes
        one product after another at the same weights, and building the graph is a third of a product's
        time): all operators together keep at most a quarter of the memory free on the device, at the
        size the first call measured."""
        if self._kept is not None:
            w, grads = self._kept
            for grad in grads:
                self._check_stop()
                yield w, grad, True
            return
        measure = self._graph_bytes is None
        keep = not measure and _reserve_graph_memory(self, self._graph_bytes)
        w, grads, measured = self.params.clone().requires_grad_(True), [], 0
        exact = _ExactWeightNorm() if _weight_normed(self.model) else contextlib.nullcontext()
        for xb, yb in self._batches():
            with _SavedBytes() if measure else contextlib.nullcontext() as saved, exact:
                (grad,) = torch.autograd.grad(self._loss(w, xb, yb), w, create_graph=True)
            measured += saved.bytes if measure else 0
            if keep:
                grads.append(grad)
            yield w, grad, keep
        if measure:
            self._graph_bytes = measured
        if keep:
            self._kept = (w, grads)


class _ExactWeightNorm(torch.overrides.TorchFunctionMode):
    """``torch._weight_norm`` (weight normalization, old and new style) written out as ``v * g / |v|``
    while a gradient graph is built to be differentiated again: torch's own second derivative of it is
    wrong (torch 2.13: its Hessian is not even symmetric, and gradgradcheck fails), so Hessian-vector
    products through it were 7 to 10 % off. The values and first derivatives are the same either way.
    (A function mode is the calling thread's only: the evaluator's other threads are untouched.)"""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            v, g = args[0], args[1]
            dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
            return v * (g / torch.norm_except_dim(v, 2, dim))
        return func(*args, **kwargs)


def _weight_normed(model: torch.nn.Module) -> bool:
    """Whether ``model`` computes a weight by ``torch._weight_norm``: a ``parametrizations.weight_norm``
    or an old-style ``nn.utils.weight_norm`` (a forward pre-hook)."""
    from torch.nn.utils.parametrizations import _WeightNorm
    from torch.nn.utils.weight_norm import WeightNorm
    return any(isinstance(m, _WeightNorm) or any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values())
               for m in model.modules())


class _SavedBytes:
    """Counts the bytes of the tensors autograd saves for backward inside the block (each once)."""

    def __enter__(self):
        self.tensors = {}

        def pack(t):
            where = t.data_ptr() if t.layout == torch.strided else id(t)  # (a sparse tensor has no pointer)
            self.tensors[where, t.numel(), t.dtype] = t.numel() * t.element_size()
            # detached: a saved output returned as itself would form a reference cycle through its own
            # graph node that no garbage collection frees (autograd restores the history on unpacking)
            return t.detach()
        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)
        self.bytes = sum(self.tensors.values())
        return False


_GRAPHS_LOCK = threading.Lock()
_GRAPHS_KEPT = {}  # device -> bytes of the gradient graphs that live operators keep


def _reserve_graph_memory(op, nbytes: int) -> bool:
    """Whether ``op`` may keep ``nbytes`` of gradient graphs: all operators' together at most a
    quarter of the device's free memory (counting theirs as free). Given back when ``op`` is freed."""
    key = str(op.device)
    with _GRAPHS_LOCK:
        kept = _GRAPHS_KEPT.get(key, 0)
        if kept + nbytes > (free_memory(op.device) + kept) // 4:
            return False
        _GRAPHS_KEPT[key] = kept + nbytes
    weakref.finalize(op, _release_graph_memory, key, nbytes)
    return True


def _release_graph_memory(key: str, nbytes: int) -> None:
    with _GRAPHS_LOCK:
        _GRAPHS_KEPT[key] -= nbytes


def free_memory(device) -> int:
    """Bytes free now on ``device``: the GPU's own memory for CUDA, else the machine's."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory()


def training_subset(data, samples: int | None, generator: torch.Generator) -> tuple:
    """(x, y): ``samples`` training samples drawn without replacement by ``generator`` (all of them,
    in their order, when ``samples`` is None or not smaller than the training set)."""
    n_train = len(data.x_train)
    if samples is None or samples >= n_train:
        return data.x_train, data.y_train
    idx = torch.randperm(n_train, generator=generator)[:samples].to(data.x_train.device)
    return data.x_train[idx], data.y_train[idx]


def top_hessian_eigen(model, layout, params: torch.Tensor, buffers: torch.Tensor, data, samples: int = 2000,
                      seed: int = 0, iterations: int = 100, tol: float = 1e-4, batch_size: int = 1000):
    """Top-2 (by magnitude) eigenpairs of the Hessian of the mean train cross-entropy at ``params``:
    subspace iteration with Rayleigh-Ritz on Hessian-vector products (:class:`HessianOperator`);
    never a (P, P) matrix. Returns ((l1, l2), (u, v), iterations run)."""
    device = data.x_train.device
    n_train = len(data.x_train)
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n_train, generator=g)[:min(samples, n_train)].to(device)
    hvp = HessianOperator(model, layout, params, buffers, data.x_train[idx], data.y_train[idx], batch_size, data.task)

    start = torch.randn(layout.num_params, 2, generator=g, dtype=torch.float64)
    q = torch.linalg.qr(hvp.restricted(start.T).cpu().T)[0].T.to(device)  # (in the trained parameters' subspace)
    evals, ritz, it = torch.full((2,), float("inf"), dtype=torch.float64), q, 0
    for it in range(1, iterations + 1):
        hq = hvp(q.float())                          # (2, P)
        t = q @ hq.T
        lam, vec = torch.linalg.eigh(0.5 * (t + t.T))  # Rayleigh-Ritz in span(q)
        order = lam.abs().argsort(descending=True)
        lam, vec = lam[order].cpu(), vec[:, order]
        ritz = vec.T @ q                             # current eigenvector estimates, orthonormal
        q = torch.linalg.qr((vec.T @ hq).T)[0].T     # power step: H applied to the Ritz vectors
        converged = (lam - evals).abs().max() <= tol * lam.abs().max()
        evals = lam
        if converged:
            break
    ritz = ritz * torch.where(ritz.sum(1, keepdim=True) < 0, -1.0, 1.0)  # a fixed sign
    ritz = hvp.restricted(ritz)  # (exactly: QR leaves rounding-sized values at the frozen entries)
    u, v, _ = _orthonormalize(ritz[0].cpu(), ritz[1].cpu(), ("Hessian eigenvector 1", "Hessian eigenvector 2"))
    return (float(evals[0]), float(evals[1])), (u, v), it


# ----------------------------------------------------------------------------------------------
# the weights and buffers at given coordinates

def weights_at(geom, coeffs: torch.Tensor) -> torch.Tensor:
    """(K, P) float32 weights ``origin + sum_k c_k basis_k`` for (K, k) coefficients, built row by row
    with the same float32 operations whatever K is (so batched and one-at-a-time points agree)."""
    basis = geom.basis.to(coeffs.device)
    w = geom.origin.to(coeffs.device).expand(len(coeffs), -1)
    c = coeffs.float()
    for k in range(basis.shape[0]):
        w = w + c[:, k:k + 1] * basis[k]
    return w


def buffers_at(geom, coeffs: torch.Tensor, interpolate: bool = False) -> torch.Tensor:
    """(K, B) buffers: the origin's, or combined like the weights when ``interpolate``."""
    b = geom.buffers.to(coeffs.device).expand(len(coeffs), -1)
    if not interpolate or geom.buffer_basis is None:
        return b
    basis = geom.buffer_basis.to(coeffs.device)
    c = coeffs.float()
    for k in range(basis.shape[0]):
        b = b + c[:, k:k + 1] * basis[k]
    return b
