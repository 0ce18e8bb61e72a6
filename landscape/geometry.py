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
- ``Line.rays(traj, origin, n, seed)``: random directions from a checkpoint (Izmailov et al. 2018).

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

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CheckpointError, ConfigError, GeometryError, ModelError
from .store import PathData, PointData, Trajectory, open_trajectory

# a direction shorter than this fraction of the weights' norm counts as zero (duplicate checkpoints)
DEGENERATE = 1e-6
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
        for r in (self.xrange, self.yrange):
            if r is not None and not all(math.isfinite(v) for v in r):
                raise ConfigError(f"grid range {list(r)} is not finite")

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
    """A Gaussian direction (float64), filter-normalized to ``weights`` unless ``filter_norm`` is false."""
    if ignore not in ("biasbn", "none"):
        raise ConfigError(f"ignore must be 'biasbn' or 'none', got {ignore!r}")
    d = torch.randn(layout.num_params, generator=generator, dtype=torch.float32).double()
    if filter_norm:
        return filter_normalize(d, weights, layout, ignore)
    return _zero_biasbn(d, layout) if ignore == "biasbn" else d


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

    def project(self, traj: Trajectory) -> tuple:
        """(points, paths): the checkpoints that made the plane and every run's last checkpoint, and
        every checkpoint of every run, with coordinates and distance from the plane."""
        return _project(self, traj)

    def values_shape(self, grid: Grid) -> tuple:
        return grid.shape

    def with_basis(self, origin, basis) -> "Plane":
        """The same plane with its vectors replaced (by those stored in a file being resumed)."""
        return _replace(self, origin=origin, u=basis[0], v=basis[1])

    def to(self, device) -> "Plane":
        return _replace(self, **_moved(self, ("origin", "u", "v", "buffers", "buffer_u", "buffer_v"), device))

    # ways to make one ---------------------------------------------------------------------------
    @classmethod
    def through(cls, traj: Trajectory, a: str, b: str, c: str) -> "Plane":
        """The plane through three checkpoints: origin a, u along b - a, v by Gram-Schmidt of c - a."""
        ca, cb, cc = (load_checkpoint(traj, n) for n in (a, b, c))
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
                            ((min(xs), max(xs)), (min(ys), max(ys)))), [ca, cb, cc])

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
                            ((-hx, hx), (-hy, hy))), [co, e1, s1, e2, s2])

    @classmethod
    def random(cls, traj: Trajectory, origin: str, seed: int = 0, filter_norm: bool = True,
               ignore: str = "biasbn") -> "Plane":
        """Two Gaussian directions drawn from ``seed``, filter-normalized to the origin's weights (Li
        et al. 2018), orthonormalized. The default grid spans +-|d1| by +-|d2|: Li et al.'s [-1, 1]^2."""
        co = load_checkpoint(traj, origin)
        g = torch.Generator().manual_seed(int(seed))
        d1 = random_direction(traj.layout, co.params, g, filter_norm, ignore)
        d2 = random_direction(traj.layout, co.params, g, filter_norm, ignore)
        u, v, (n1, _, n2) = _orthonormalize(d1, d2, ("random direction 1", "random direction 2"),
                                            float(co.params.norm()))
        s2 = float(d2.norm())
        spec = {"method": "random", "origin": co.name, "seed": int(seed), "filter_norm": bool(filter_norm),
                "ignore": ignore}
        derived = {"points": {co.name: [0.0, 0.0]}, "scale": [n1, s2]}
        return _sourced(cls(co.params.float(), u.float(), v.float(), co.buffers.float(), spec=spec, derived=derived,
                            extent=((-n1, n1), (-s2, s2)), pad=False), [co])

    @classmethod
    def pca(cls, traj: Trajectory, run: str, origin: str | None = None) -> "Plane":
        """The first two principal components of ``run``'s checkpoints relative to its last one (Li et
        al. 2018), through ``origin`` (default: that last checkpoint). Signs are fixed so that the
        run's first checkpoint has non-positive coordinates."""
        n = traj.num_checkpoints(run)
        if n < 3:
            raise GeometryError(f"PCA of run {run!r} needs at least 3 checkpoints, it has {n}")
        co = load_checkpoint(traj, origin or f"{run}:{n - 1}")
        w = torch.from_numpy(traj.params(run)).double()
        bad = (~torch.isfinite(w)).any(1).nonzero().flatten().tolist()
        if bad:  # one NaN row would make every component NaN
            raise CheckpointError(f"checkpoints {', '.join(f'{run}:{i}' for i in bad[:3])}"
                                  f"{' ...' if len(bad) > 3 else ''} of {traj.path} have non-finite weights "
                                  f"(training diverged there); PCA of run {run!r} needs finite checkpoints")
        m = w - w[-1]
        m = m - m.mean(0)
        gram = m @ m.T  # (T, T): no (P, P) matrix
        evals, evecs = torch.linalg.eigh(gram)
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        if evals[1] <= DEGENERATE * evals[0]:
            raise GeometryError(f"the checkpoints of run {run!r} lie on a line; PCA has no second direction")
        comps = (m.T @ evecs[:, :2]) / evals[:2].sqrt()
        u, v, _ = _orthonormalize(comps[:, 0], comps[:, 1], ("PC1", "PC2"))
        first = w[0] - co.params
        u = -u if first @ u > 0 else u
        v = -v if first @ v > 0 else v
        basis = torch.stack([u, v])
        path, _ = _project_rows(w, co.params, basis)
        spec = {"method": "pca", "origin": co.name, "run": run}
        derived = {"points": {co.name: [0.0, 0.0]},
                   "explained_variance_ratio": (evals[:2] / evals.sum()).tolist()}
        return _sourced(cls(co.params.float(), u.float(), v.float(), co.buffers.float(), spec=spec, derived=derived,
                            extent=((float(path[:, 0].min()), float(path[:, 0].max())),
                                    (float(path[:, 1].min()), float(path[:, 1].max())))), [co])

    @classmethod
    def hessian(cls, traj: Trajectory, origin: str, data=None, samples: int = 2000, seed: int = 0,
                iterations: int = 100, tol: float = 1e-4, batch_size: int = 1000, device="cpu") -> "Plane":
        """The two eigenvectors of the train-loss Hessian at ``origin`` with the largest |eigenvalue|,
        by subspace iteration on Hessian-vector products over ``samples`` training samples (eval-mode
        BatchNorm with the origin's buffers). The default grid spans +-2 sqrt(2 / |lambda|) per axis,
        where the quadratic model predicts a loss rise of 4."""
        if not samples >= 1:
            raise ConfigError(f"Hessian samples must be at least 1, got {samples}")
        if not iterations >= 1:
            raise ConfigError(f"Hessian iterations must be at least 1, got {iterations}")
        if not tol >= 0:
            raise ConfigError(f"Hessian tolerance must be non-negative, got {tol}")
        co = load_checkpoint(traj, origin)
        data = data if data is not None else traj.build_data(device)
        model = traj.build_model(data, device)
        (l1, l2), (u, v), its = top_hessian_eigen(model, traj.layout, co.params.float(), co.buffers.float(), data,
                                                  samples, seed, iterations, tol, batch_size)
        h = [2 * math.sqrt(2 / max(abs(l), 1e-12)) for l in (l1, l2)]
        spec = {"method": "hessian", "origin": co.name, "samples": int(samples), "seed": int(seed),
                "iterations": int(iterations), "tol": float(tol)}
        derived = {"points": {co.name: [0.0, 0.0]}, "eigenvalues": [l1, l2], "iterations_run": its}
        return _sourced(cls(co.params.float(), u.float().cpu(), v.float().cpu(), co.buffers.float(), spec=spec,
                            derived=derived, extent=((-h[0], h[0]), (-h[1], h[1])), pad=False), [co])


def _distinct(*ckpts) -> None:
    """Refuse a checkpoint given twice, or two checkpoints with the same weights."""
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


def _sourced(geom, loaded: list):
    """``geom`` with the checkpoints it was made of recorded (name -> how to load each again)."""
    return _replace(geom, sources={c.name: c.source for c in loaded})


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

    def project(self, traj: Trajectory) -> tuple:
        return _project(self, traj)

    def with_basis(self, origin, basis) -> "Line":
        return _replace(self, origin=origin, directions=basis.reshape(len(self.directions), -1))

    def to(self, device) -> "Line":
        return _replace(self, **_moved(self, ("origin", "directions", "buffers", "buffer_directions"), device))

    @classmethod
    def through(cls, traj: Trajectory, a: str, b: str, range=(-0.5, 1.5)) -> "Line":
        """The line a -> b; the default grid runs from ``range[0]`` to ``range[1]`` times the segment
        (-0.5 to 1.5: the SWA paper's line beyond both ends). ``x`` is the distance from a."""
        ca, cb = load_checkpoint(traj, a), load_checkpoint(traj, b)
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
                            (range[0] * length, range[1] * length)), [ca, cb])

    @classmethod
    def random_rays(cls, traj: Trajectory, origin: str, n: int = 5, seed: int = 0, max_distance: float | None = None,
                    filter_norm: bool = False, ignore: str = "none") -> "Line":
        """``n`` random unit directions from ``origin`` (uniform on the sphere, as in the SWA paper;
        optionally filter-normalized first). The default grid runs from 0 to ``max_distance``
        (default: half the norm of the origin's weights)."""
        if n < 1:
            raise ConfigError(f"number of rays must be at least 1, got {n}")
        if n * traj.layout.num_params > MAX_RAY_VALUES:
            raise ConfigError(f"{n:,} rays of {traj.layout.num_params:,} parameters are more than "
                              f"{MAX_RAY_VALUES * 4 / 2 ** 30:.0f} GiB of directions; give fewer rays")
        co = load_checkpoint(traj, origin)
        g = torch.Generator().manual_seed(int(seed))
        dirs = []
        for k in range(n):
            d = random_direction(traj.layout, co.params, g, filter_norm, ignore)
            norm = d.norm()
            if norm == 0:
                raise GeometryError("a random direction is zero (every parameter ignored?)")
            dirs.append(d / norm)
        top = float(max_distance) if max_distance is not None else 0.5 * float(co.params.norm())
        if not top > 0:
            raise ConfigError(f"max distance must be positive, got {top}")
        spec = {"method": "ray", "origin": co.name, "rays": int(n), "seed": int(seed),
                "filter_norm": bool(filter_norm), "ignore": ignore}
        derived = {"points": {co.name: [0.0]}, "max_distance": top}
        return _sourced(cls(co.params.float(), torch.stack(dirs).float(), co.buffers.float(), None, spec, derived,
                            (0.0, top), rays=True), [co])


def _project(geom, traj: Trajectory) -> tuple:
    """Points: the checkpoints named in the geometry and the last checkpoint of every run."""
    if getattr(geom, "rays", False):  # projecting onto several half-lines says little: the origin only
        return {geom.spec["origin"]: PointData(np.zeros(1), 0.0)}, {}
    origin, basis = geom.origin.double(), geom.basis.double()
    names = list(geom.derived.get("points", {})) + [n for n in _last_checkpoints(traj)]
    points = {}
    for name in dict.fromkeys(names):
        c = load_checkpoint(traj, geom.sources.get(name, name))
        coords, dist = _project_rows(c.params[None], origin, basis)
        points[name] = PointData(coords[0].numpy(), float(dist[0]))
    return points, project_runs(traj, origin, basis)


# ----------------------------------------------------------------------------------------------
# Hessian eigenvectors

def top_hessian_eigen(model, layout, params: torch.Tensor, buffers: torch.Tensor, data, samples: int = 2000,
                      seed: int = 0, iterations: int = 100, tol: float = 1e-4, batch_size: int = 1000):
    """Top-2 (by magnitude) eigenpairs of the Hessian of the mean train cross-entropy at ``params``:
    subspace iteration with Rayleigh-Ritz on Hessian-vector products (double backward); never a
    (P, P) matrix. Returns ((l1, l2), (u, v), iterations run)."""
    from torch.func import functional_call

    device = data.x_train.device
    n_train = len(data.x_train)
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n_train, generator=g)[:min(samples, n_train)].to(device)
    x, y = data.x_train[idx], data.y_train[idx]
    model = model.eval()
    w = params.to(device).clone().requires_grad_(True)
    bufs = {k: t for k, t in layout.split_buffers(buffers.to(device)).items()}

    def hvp(vs: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(vs, dtype=torch.float64)
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            loss = F.cross_entropy(functional_call(model, (layout.split_params(w), bufs), (xb,)), yb,
                                   reduction="sum") / len(x)
            (grad,) = torch.autograd.grad(loss, w, create_graph=True)
            for k in range(len(vs)):
                (hv,) = torch.autograd.grad(grad @ vs[k], w, retain_graph=k + 1 < len(vs))
                out[k] += hv.double()
        return out

    q = torch.linalg.qr(torch.randn(layout.num_params, 2, generator=g, dtype=torch.float64))[0].T.to(device)
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
