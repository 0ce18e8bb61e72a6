"""Flatness as numbers: Hessian spectrum, trace and epsilon-sharpness of checkpoints.

Everything here is a property of one function of the weights: the mean train cross-entropy over the
training set (or a fixed random subset of ``samples``), in eval mode, with the checkpoint's BatchNorm
statistics under the evaluator's policy (``recompute``: fresh statistics from the training set,
sample-weighted, computed once at the checkpoint and held fixed around it; ``stored``: the recorded
buffers), in batches of the evaluator's batch size, sums in float64. All Hessian work goes through
:class:`landscape.geometry.HessianOperator` (Hessian-vector products by double backward; never a
(P, P) matrix).

- **Top-k eigenvalues**: Lanczos with full reorthogonalization from a random start; the k largest
  Ritz values, descending (largest algebraic, as PyHessian's power iteration reports), with their
  residual bounds |beta_m s_mi|; it stops when the k residuals fall below ``tol`` times |lambda_1|.
- **Trace**: Hutchinson's estimator with Rademacher probes, mean of z^T H z and its standard error.
- **Spectral density** (optional): stochastic Lanczos quadrature (Ghorbani et al. 2019; PyHessian):
  per run, the Ritz values of an m-step Lanczos from a Rademacher start are the nodes and the squared
  first components of their eigenvectors the weights; a density is their Gaussian-smoothed sum.
- **Epsilon-sharpness**: the largest train-loss increase max L(w + d) - L(w) over the filter-normalized
  epsilon-ball ||d_f|| <= epsilon ||w_f|| for every filter f (a slice along the first dimension of a
  parameter with two or more dimensions; biases and BatchNorm parameters are not moved, as in Li et
  al.'s filter normalization), found by projected gradient ascent with per-filter normalized steps.
  The ascent starts from the checkpoint and from both ends of the top eigenvector scaled onto the
  ball's boundary, so the result is at least the rise along the top eigenvector at the same radius
  (also reported, as ``eigenvector_sharpness``).

:func:`evaluate_sharpness` takes a live model and its data and returns the numbers in memory;
:func:`compute_sharpness` does the same for checkpoints of a trajectory file, resumable, into a
sharpness file.

Example::

    res = evaluate_sharpness(net, (x_train, y_train, x_test, y_test), spec=SharpnessSpec(top_k=3))
    traj = open_trajectory("run.h5")
    res = compute_sharpness(traj, ["sgd", "swa/average"], SharpnessSpec(top_k=3), out="sharp.h5")
    res.results[0]["eigenvalues"], res.results[0]["trace"], res.results[0]["epsilon_sharpness"]
"""
from __future__ import annotations

import contextlib
import hashlib
import heapq
import math
import queue
import threading
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .bn import recompute_bn
from .data import Data, as_data
from .device import resolve_device, thread_workers
from .errors import ConfigError, ModelError
from .evaluate import BatchNormPolicy, Evaluator, bn_inputs, resolve_policy
from .geometry import HessianOperator, check_finite, live_checkpoint, load_checkpoint, training_subset
from .params import Layout, copy_module, unwrap
from .rebuild import rebuild_data, rebuild_model
from .store.files import claim_output
from .store.sharpness import SharpnessFile, SharpnessProgress, write_sharpness


@dataclass(frozen=True)
class SharpnessSpec:
    top_k: int = 5                 # eigenvalues reported
    iterations: int = 100          # Lanczos steps at most for them
    tol: float = 1e-3              # ... stopping once every residual bound is below tol * |lambda_1|
    probes: int = 100              # Hutchinson probes for the trace
    density: bool = False          # also the spectral density (stochastic Lanczos quadrature)
    density_runs: int = 3          # SLQ: independent Lanczos runs
    density_steps: int = 80        # SLQ: steps per run
    epsilon: float = 0.01          # radius of the filter-normalized ball (fraction of each filter's norm)
    ascent_steps: int = 20         # projected gradient ascent steps per start
    samples: int | None = None     # training samples (None: all)
    seed: int = 0                  # starting vectors, probes and the subset
    batch_size: int = 1000         # data batch of every pass (and of the BatchNorm recompute, whose statistics it sways)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SharpnessSpec":
        return cls(**d)

    def check(self, num_params: int | None = None) -> "SharpnessSpec":
        """Refuse values no computation can use (``num_params``: the model's trained parameters, when
        known)."""
        for name, least in (("top_k", 1), ("iterations", 1), ("probes", 2), ("density_runs", 1),
                            ("density_steps", 2), ("ascent_steps", 0), ("batch_size", 1)):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= least):
                raise ConfigError(f"{name.replace('_', ' ')} must be a whole number of at least {least}, got {v}")
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ConfigError(f"epsilon must be a positive number (the ball's radius as a fraction of "
                              f"each filter's norm), got {self.epsilon}")
        if not (math.isfinite(self.tol) and self.tol > 0):
            raise ConfigError(f"tolerance must be positive, got {self.tol}")
        if self.samples is not None and self.samples < 1:
            raise ConfigError(f"samples must be at least 1, got {self.samples}")
        if num_params is not None:
            if self.top_k > num_params:
                raise ConfigError(f"top k = {self.top_k} eigenvalues asked of a model with {num_params:,} trained "
                                  f"parameters; k must be at most their count")
            if self.top_k > self.iterations:
                raise ConfigError(f"top k = {self.top_k} needs at least as many Lanczos iterations, "
                                  f"got {self.iterations}")
        return self


# ----------------------------------------------------------------------------------------------
# Lanczos

def lanczos(op, num_params: int, steps: int, start: torch.Tensor, keep_vectors: bool = True,
            check=None):
    """``steps`` Lanczos steps of the symmetric operator ``op`` ((1, P) -> (1, P)) from ``start``,
    with full reorthogonalization (twice, classical Gram-Schmidt) in float64. Stops early on an
    invariant subspace, or when ``check(alpha, beta)`` returns True (looked at every 5 steps).
    Returns (alpha (m,), beta (m,), Q (m, P) or None): T = tridiag(beta[:-1], alpha, beta[:-1]),
    beta[-1] the residual norm of the last step."""
    steps = min(int(steps), num_params)
    q = start.double() / start.double().norm()
    Q = torch.empty(steps, num_params, dtype=torch.float64, device=q.device)
    alpha, beta = [], []
    for j in range(steps):
        Q[j] = q
        w = op(q[None])[0]
        a = float(q @ w)
        w = w - a * q - (beta[-1] * Q[j - 1] if j else 0.0)
        for _ in range(2):
            w = w - Q[:j + 1].T @ (Q[:j + 1] @ w)
        b = float(w.norm())
        alpha.append(a)
        beta.append(b)
        scale = max(abs(x) for x in alpha) or 1.0
        if b <= 1e-10 * scale or j + 1 == steps:
            break
        if check is not None and (j + 1) % 5 == 0 and check(alpha, beta):
            break
        q = w / b
    m = len(alpha)
    return (torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64),
            Q[:m] if keep_vectors else None)


def ritz(alpha: torch.Tensor, beta: torch.Tensor):
    """Eigenvalues (ascending) and eigenvectors of the tridiagonal matrix of a Lanczos run."""
    m = len(alpha)
    T = torch.diag(alpha)
    if m > 1:
        T = T + torch.diag(beta[:m - 1], 1) + torch.diag(beta[:m - 1], -1)
    if not bool(torch.isfinite(T).all()):
        raise ModelError("the Hessian-vector products are NaN or infinite (a loss that overflows near this "
                         "checkpoint?)")
    return torch.linalg.eigh(T)


def top_eigen(op, num_params: int, k: int, iterations: int, tol: float, start: torch.Tensor) -> dict:
    """The k largest eigenvalues (descending) of ``op`` by Lanczos from ``start``, their residual
    bounds and the top eigenvector (P,) float64."""

    def converged(alpha, beta) -> bool:
        if len(alpha) < k:
            return False
        theta, s = ritz(torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64))
        res = (beta[-1] * s[-1, -k:]).abs()
        return bool((res <= tol * max(abs(float(theta[-1])), 1e-12)).all())

    alpha, beta, Q = lanczos(op, num_params, iterations, start, check=converged)
    theta, s = ritz(alpha, beta)
    order = theta.argsort(descending=True)[:k]
    vecs = s[:, order].T.to(Q.device) @ Q                 # (k, P) Ritz vectors
    res = (beta[-1] * s[-1, order]).abs()
    # an invariant subspace of fewer than k dimensions (repeated eigenvalues: a dead unit's zeros) has
    # fewer Ritz values: the rest are NaN, not known
    missing = [float("nan")] * (k - len(order))
    return {"eigenvalues": theta[order].tolist() + missing, "residuals": res.tolist() + missing,
            "lanczos_steps": len(alpha), "top_vector": vecs[0]}


def probe_values(op, z: torch.Tensor) -> np.ndarray:
    """z^T H z for every Rademacher probe z, a row of ``z`` (n, P): one Hessian pass for all n."""
    return (z * op(z)).sum(1).cpu().numpy()


def trace_estimate(values: np.ndarray) -> dict:
    """Hutchinson's trace estimate from the probes' z^T H z: their mean and its standard error."""
    return {"trace": float(values.mean()), "trace_stderr": float(values.std(ddof=1) / math.sqrt(len(values))),
            "trace_probes": values}


def density_run(op, num_params: int, steps: int, z: torch.Tensor) -> tuple:
    """One run of stochastic Lanczos quadrature from the Rademacher start ``z``: the Ritz values
    (nodes) and the squared first components of their eigenvectors (weights, summing to 1)."""
    alpha, beta, _ = lanczos(op, num_params, steps, z)
    theta, s = ritz(alpha, beta)
    return theta.numpy(), (s[0] ** 2).numpy()


def density_arrays(runs: list, steps: int) -> dict:
    """The runs' (nodes, weights) as (runs, steps) arrays padded with NaN (a run may stop early)."""
    nodes, weights = np.full((len(runs), steps), np.nan), np.full((len(runs), steps), np.nan)
    for r, (n, w) in enumerate(runs):
        nodes[r, :len(n)], weights[r, :len(w)] = n, w
    return {"density_nodes": nodes, "density_weights": weights}


def density_curve(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    """The SLQ density on ``grid``: each node a Gaussian of width ``sigma`` with its weight, averaged
    over runs (integrates to 1 over the real line)."""
    ok = np.isfinite(nodes) & np.isfinite(weights)
    runs = max(1, nodes.shape[0]) if nodes.ndim == 2 else 1
    d = np.zeros_like(grid, dtype=float)
    for n, w in zip(nodes[ok], weights[ok]):
        d += w * np.exp(-0.5 * ((grid - n) / sigma) ** 2)
    return d / (runs * sigma * math.sqrt(2 * math.pi))


# ----------------------------------------------------------------------------------------------
# epsilon-sharpness

class FilterBall:
    """The filter-normalized ball ||d_f|| <= epsilon ||w_f|| around ``w``: every filter of every
    parameter with two or more dimensions that the model trains; other parameters (and frozen ones)
    are held fixed (d = 0 there)."""

    def __init__(self, layout, w: torch.Tensor, epsilon: float):
        self.epsilon = float(epsilon)
        self.parts = []  # (slice, number of filters)
        for e, sl in layout.param_slices():
            if len(e.shape) >= 2 and not e.frozen:
                self.parts.append((sl, e.shape[0]))
        w = w.double()
        self.radius = [epsilon * w[sl].view(n, -1).norm(dim=1) for sl, n in self.parts]
        self.w_norm = [w[sl].view(n, -1).norm(dim=1) for sl, n in self.parts]
        self.num_params = len(w)

    def project(self, d: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(d)
        for (sl, n), r in zip(self.parts, self.radius):
            f = d[sl].view(n, -1)
            norm = f.norm(dim=1, keepdim=True)
            scale = torch.where(norm > r[:, None], r[:, None] / norm.clamp_min(1e-300), torch.ones_like(norm))
            out[sl] = (f * scale).reshape(-1)
        return out

    def step(self, g: torch.Tensor) -> torch.Tensor:
        """The steepest-ascent step of the ball's geometry: every filter along its gradient, scaled to
        its radius (the maximizer of g . d over the ball)."""
        out = torch.zeros_like(g)
        for (sl, n), r in zip(self.parts, self.radius):
            f = g[sl].view(n, -1)
            out[sl] = (f * (r[:, None] / f.norm(dim=1, keepdim=True).clamp_min(1e-300))).reshape(-1)
        return out

    def onto_boundary(self, v: torch.Tensor) -> torch.Tensor:
        """The largest multiple of ``v`` (its moved part) that lies in the ball."""
        v = self.project_mask(v)
        t = math.inf
        for (sl, n), r in zip(self.parts, self.radius):
            norm = v[sl].view(n, -1).norm(dim=1)
            ok = norm > 0
            if ok.any():
                t = min(t, float((r[ok] / norm[ok]).min()))
        return v * (0.0 if math.isinf(t) else t)

    def project_mask(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(v)
        for sl, _ in self.parts:
            out[sl] = v[sl]
        return out

    def ratio(self, d: torch.Tensor) -> float:
        """max over filters of ||d_f|| / ||w_f||: at most epsilon inside the ball."""
        worst = 0.0
        for (sl, n), wn in zip(self.parts, self.w_norm):
            norm = d[sl].view(n, -1).norm(dim=1)
            moved = norm > 0
            if moved.any():
                worst = max(worst, float((norm[moved] / wn[moved].clamp_min(1e-300)).max()))
        return worst


def ascend(op: HessianOperator, ball: FilterBall, d: torch.Tensor, steps: int, from_checkpoint: bool) -> dict:
    """Projected gradient ascent of the loss from w + ``d`` inside ``ball`` (see the module doc):
    ``steps`` steps of 2.5 / steps of the radius (the usual PGD step, in the ball's own units). Returns
    the loss at the start (None from the checkpoint itself, whose loss is the base), the largest loss
    seen (the start's included) and the first ``d`` where it was seen."""
    w = op.params.double()
    lr = 2.5 / max(steps, 1)
    start = None if from_checkpoint else op.loss((w + d).float())
    best, at = -math.inf, None
    if start is not None and start > best:
        best, at = start, d
    for _ in range(steps):
        _, g = op.loss_and_grad((w + d).float())
        d = ball.project(d + lr * ball.step(g))
        value = op.loss((w + d).float())
        if value > best:
            best, at = value, d
    return {"start": start, "best": best, "at": at}


def epsilon_sharpness(base: float, ascents: list, ball: FilterBall) -> dict:
    """The largest rise over ``base`` that the ascents (in order: from the checkpoint, from +-the top
    eigenvector on the boundary) found, the rise along the top eigenvector at the same radius, and the
    largest ||d_f|| / ||w_f|| of the maximizer (never above epsilon)."""
    best, at = base, None
    for a in ascents:
        if a["best"] > best:
            best, at = a["best"], a["at"]
    along = max((a["start"] for a in ascents if a["start"] is not None), default=math.nan)
    return {"loss": base, "epsilon_sharpness": best - base, "eigenvector_sharpness": along - base,
            "epsilon_ratio": ball.ratio(at) if at is not None else 0.0}


# ----------------------------------------------------------------------------------------------
# one checkpoint as pieces of work

PROBES_PER_PASS = 16  # Hutchinson probes per Hessian pass: one gradient graph per data batch serves them all
# which ready piece a free worker takes first (after the earlier checkpoints'): those the rest waits
# for or that take longest (a density run is the longest chain of products), the short ones last
_URGENCY = {"prepare": -1, "eigen": 0, "density": 1, "ascent+-": 2, "trace": 3, "ascent0": 4}


def _rademacher(shape, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=generator).double().mul_(2).sub_(1)


class CheckpointWork:
    """One checkpoint's numbers as pieces that run on any thread, in any order, with the same results:
    the Lanczos run for the top eigenvalues, Hutchinson's probes 16 per Hessian pass, each density run,
    and the three ascents (the two from the top eigenvector once it is known). Each piece draws its
    random vectors from the generator state at which one piece after the other would draw them, and the
    pieces' results are combined in a fixed order.

    ``load()`` gives the checkpoint's (params, buffers). :meth:`prepare` (once) returns the first
    pieces; :meth:`run` computes one; :meth:`take` keeps its result and returns the pieces it made
    ready; :meth:`result` once :attr:`done`."""

    def __init__(self, spec: SharpnessSpec, layout, load):
        self.spec, self.layout, self.load = spec, layout, load
        self.trace_passes = math.ceil(spec.probes / PROBES_PER_PASS)
        self.density_runs = spec.density_runs if spec.density else 0
        self.results, self.seconds, self.numbers = {}, 0.0, None

    def prepare(self, ev: Evaluator, data, policy: BatchNormPolicy) -> list:
        """The evaluator's metrics at the checkpoint, the BatchNorm statistics held fixed around it, the
        training subset and every piece's generator state; returns the first pieces."""
        device = data.x_train.device
        params, buffers = (t.to(device).float() for t in self.load())
        self.metrics = {k: float(v[0]) for k, v in ev(params[None], buffers[None]).items()}
        if not math.isfinite(self.metrics["train_loss"]):
            raise ModelError(f"the training loss is {self.metrics['train_loss']} at this checkpoint: its Hessian "
                             "cannot be taken (inputs or weights that overflow?)")
        if policy.policy == "recompute":  # the statistics held fixed around the checkpoint
            m = self.layout.load(ev.model, params, buffers)
            recompute_bn(m, bn_inputs(data, policy), policy.batch_size)
            buffers = self.layout.buffers_to_vector(m)
        self.params, self.buffers = params, buffers
        g = torch.Generator().manual_seed(int(self.spec.seed))
        x, self.y = training_subset(data, self.spec.samples, g)
        with ev.conv1d_as_2d() as memory:  # the memory layout the pieces' model runs on (see _run_piece)
            self.x = memory(x)
            # what every piece's mean loss divides by (a language model's scored tokens: a forward pass)
            self.units = HessianOperator(ev.model, self.layout, params, buffers, self.x, self.y,
                                         self.spec.batch_size, ev.task).units
        draws = [("eigen", 0)] + [("trace", i) for i in range(self.trace_passes)] + \
                [("density", r) for r in range(self.density_runs)]
        self.states = {}
        for piece in draws:  # the order one piece after the other draws them in
            self.states[piece] = g.get_state()
            self._draw(piece, g)
        return draws + [("ascent", 0)]

    def _draw(self, piece, g: torch.Generator) -> torch.Tensor:
        kind, i = piece
        P = self.layout.num_params
        if kind == "eigen":
            return torch.randn(P, generator=g, dtype=torch.float64)  # the Lanczos start
        if kind == "trace":
            return _rademacher((min(PROBES_PER_PASS, self.spec.probes - i * PROBES_PER_PASS), P), g)
        return _rademacher((P,), g)  # a density run's start

    def run(self, piece, op: HessianOperator):
        """The result of one piece, by ``op`` (the Hessian at this checkpoint)."""
        kind, i = piece
        spec, P = self.spec, self.layout.num_params
        if piece in self.states:
            g = torch.Generator()
            g.set_state(self.states[piece])
            v = self._draw(piece, g).to(op.device)
            if kind != "trace":  # Lanczos in the trained parameters' subspace (H is restricted to it)
                v = op.restricted(v)
        if kind == "eigen":
            return top_eigen(op, P, spec.top_k, spec.iterations, spec.tol, v)
        if kind == "trace":
            return probe_values(op, v)
        if kind == "density":
            return density_run(op, P, min(spec.density_steps, P), v)
        ball = FilterBall(self.layout, op.params.double(), spec.epsilon)
        if i == 0:
            d = torch.zeros(P, dtype=torch.float64, device=op.device)
            return {"base": op.loss(), **ascend(op, ball, d, spec.ascent_steps, from_checkpoint=True)}
        v = ball.onto_boundary(self.top_vector.double().to(op.device))
        return ascend(op, ball, v if i > 0 else -v, spec.ascent_steps, from_checkpoint=False)

    def take(self, piece, result) -> list:
        self.results[piece] = result
        if piece[0] == "eigen":
            self.top_vector = result.pop("top_vector")
            return [("ascent", 1), ("ascent", -1)]
        if self.done:  # only the numbers stay: the weights, the data copy, the ascents' vectors (on the
            # device, P values each) would add up over many checkpoints of a large model
            self.numbers = self._numbers()
            self.results = self.states = self.x = self.y = self.top_vector = self.params = self.buffers = None
        return []

    @property
    def done(self) -> bool:
        return self.numbers is not None or len(self.results) == 4 + self.trace_passes + self.density_runs

    def result(self) -> dict:
        """Every number of the module doc and the evaluator's metrics (once :attr:`done`)."""
        return self.numbers

    def _numbers(self) -> dict:
        r = self.results
        out = {"metrics": self.metrics}
        out.update(trace_estimate(np.concatenate([r[("trace", i)] for i in range(self.trace_passes)])))
        if self.density_runs:
            runs = [r[("density", k)] for k in range(self.density_runs)]
            out.update(density_arrays(runs, min(self.spec.density_steps, self.layout.num_params)))
        ball = FilterBall(self.layout, self.params.double(), self.spec.epsilon)
        ascents = [r[("ascent", s)] for s in (0, 1, -1)]
        out.update(epsilon_sharpness(ascents[0]["base"], ascents, ball))
        out.update(r[("eigen", 0)])
        return out


def _run_piece(ev: Evaluator, work: CheckpointWork, piece, stop):
    # 1-D convolutions as 2-D ones on channels-last memory, as the evaluator runs them: a cnn1d
    # checkpoint's sharpness 1.1 to 1.3x faster on a CPU (measured), the same numbers to rounding
    with ev.conv1d_as_2d():
        op = HessianOperator(ev.model, work.layout, work.params, work.buffers, work.x, work.y,
                             work.spec.batch_size, ev.task, stop, units=work.units)
        return work.run(piece, op)


def _urgency(index: int, piece) -> tuple:
    kind, i = piece
    kind = "ascent+-" if kind == "ascent" and i else "ascent0" if kind == "ascent" else kind
    return index, _URGENCY[kind], i


def run_works(works: list, model, layout, data, policy: BatchNormPolicy, workers: int = 1, stop=None,
              on_done=None) -> None:
    """Every piece of every :class:`CheckpointWork` on ``workers`` threads (in this one for 1), each
    thread with its own evaluator (a copy of the model), the most urgent ready piece first: the
    earliest checkpoint's, and of it the one the rest waits for or the longest. ``on_done(index)``
    when a work is done. ``stop`` (a ``threading.Event``) is set when a piece fails or the run is
    interrupted: the pieces under way end at their next Hessian pass."""
    stop = stop if stop is not None else threading.Event()
    # every worker's evaluator made here, before any piece runs: making one traces the model with torch.fx,
    # which patches torch.nn.Module for every thread meanwhile (a piece running then went through the trace)
    free = queue.SimpleQueue()
    for _ in range(max(workers, 1) if works else 0):
        free.put(Evaluator(model, layout, data, policy, batch_size=works[0].spec.batch_size))

    def timed(work, piece):
        t = time.perf_counter()
        ev = free.get()  # (a piece keeps nothing in its evaluator: its work holds the checkpoint's state)
        try:
            result = work.prepare(ev, data, policy) if piece is None else _run_piece(ev, work, piece, stop)
        finally:
            free.put(ev)
        return result, time.perf_counter() - t

    ready = [(i, _URGENCY["prepare"], 0, None) for i in range(len(works))]  # a heap
    running = {}
    with thread_workers(workers, 1 if workers > 1 else None) as pool:
        try:
            while ready or running:
                while ready and len(running) < max(workers, 1):
                    i, _, _, piece = heapq.heappop(ready)
                    running[(pool or _INLINE).submit(timed, works[i], piece)] = i, piece
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in finished:
                    i, piece = running.pop(f)
                    result, seconds = f.result()
                    works[i].seconds += seconds
                    for p in result if piece is None else works[i].take(piece, result):
                        heapq.heappush(ready, (*_urgency(i, p), p))
                    if piece is not None and works[i].done and on_done is not None:
                        on_done(i)
        except BaseException:
            stop.set()
            raise


class _Inline:
    """An executor that runs what is submitted at once, in the caller's thread."""

    def submit(self, fn, *args) -> Future:
        f = Future()
        f.set_result(fn(*args))
        return f


_INLINE = _Inline()


def checkpoint_sharpness(model, layout, params: torch.Tensor, buffers: torch.Tensor, data,
                         spec: SharpnessSpec, policy: BatchNormPolicy, workers: int = 1, stop=None) -> dict:
    """Every number of the module doc for one checkpoint (``params``, ``buffers``), and the
    evaluator's train/test loss and error (%) there, its pieces on ``workers`` threads."""
    work = CheckpointWork(spec, layout, lambda: (params, buffers))
    run_works([work], model, layout, data, policy, workers, stop)
    return work.result()


BALL = ("filter-normalized: ||d_f|| <= epsilon ||w_f|| per filter of every parameter with >= 2 dimensions; "
        "biases and BatchNorm parameters fixed")


def sharpness_spec(spec: SharpnessSpec, policy: BatchNormPolicy, num_params: int, task, frozen: dict,
                   **recorded) -> dict:
    """What a sharpness file records of how its numbers were made (compared when a computation
    resumes): the options, the BatchNorm policy, the task, the ball; ``frozen``: {run or checkpoint:
    the parameters held fixed} where any are; ``recorded``: the trajectory's dataset and model."""
    full = {"sharpness": spec.to_dict(), "bn": policy.to_dict(), **recorded, "num_params": num_params,
            "task": task.to_dict(), "ball": BALL}
    if frozen:  # the Hessian and the ball of the parameters each trained
        full["frozen"] = frozen
    return full


# ----------------------------------------------------------------------------------------------
# the core on live objects

def evaluate_sharpness(model, data, checkpoints=None, spec: SharpnessSpec = SharpnessSpec(), *, bn="auto",
                       device=None, task=None) -> SharpnessFile:
    """The numbers of the module doc for live objects, in memory: no file is read or written
    (``result.save(path)`` writes the file ``landscape sharpness`` would).

    ``model``: an ``nn.Module`` (wrappers such as ``AveragedModel`` unwrapped), the checkpoint itself
    when ``checkpoints`` is None; ``checkpoints``: {name: module, state_dict or flat parameter tensor}
    of its architecture; ``data``: a :class:`~landscape.data.Data` or ``(x_train, y_train, x_test,
    y_test)`` in memory (the Hessian is of the training loss); ``task``: a task name or object (default:
    the data's, classification); ``bn``: auto | recompute | stored. Parameters with
    ``requires_grad=False`` are frozen: the numbers are of the trained ones, as PyHessian's are.
    Checkpoints with the same weights and buffers are computed once.

    Example::

        res = evaluate_sharpness(net, (x_train, y_train, x_test, y_test), spec=SharpnessSpec(top_k=3))
        res.results[0]["eigenvalues"], res.results[0]["trace"], res.results[0]["epsilon_sharpness"]
    """
    module = unwrap(model)[0]
    layout = Layout.of(module)
    spec.check(layout.num_trained)
    if device is None:
        device = next(module.parameters()).device if any(True for _ in module.parameters()) else "cpu"
    dev = resolve_device(str(device))
    data = as_data(data, dev, task)
    if not isinstance(data, Data):
        raise ConfigError("sharpness needs the data in memory (tensors or a landscape Data), not a data source: "
                          "the Hessian passes run over the training tensors again and again")
    policy = resolve_policy(bn if bn is not None else "auto", module, can_interpolate=False, batch_size=spec.batch_size)
    if checkpoints is not None and not isinstance(checkpoints, Mapping):
        raise ConfigError(f"checkpoints is a {type(checkpoints).__name__}; give {{name: module, state_dict or flat "
                          "tensor}")
    named = {"model": module} if checkpoints is None else dict(checkpoints)
    if not named:
        raise ConfigError("give at least one checkpoint")
    ckpts = [live_checkpoint(obj, name, module) for name, obj in named.items()]
    check_finite(*ckpts)
    works = {}  # checkpoints with the same weights and buffers are computed once
    for c in ckpts:
        works.setdefault(_identity(c.params, c.buffers), CheckpointWork(spec, layout, lambda c=c: (c.params, c.buffers)))
    start = time.perf_counter()
    run_works(list(works.values()), copy_module(module).to(dev), layout, data, policy,  # (the caller's module stays)
              torch.get_num_threads() if dev.type == "cpu" else 1)
    frozen = {name: layout.frozen for name in named} if layout.frozen else {}
    results, seen = [], set()
    for c in ckpts:
        key = _identity(c.params, c.buffers)
        results.append(dict(works[key].result(), checkpoint=c.name, epoch=float("nan"),
                            seconds=0.0 if key in seen else works[key].seconds))
        seen.add(key)
    result = SharpnessFile(None, sharpness_spec(spec, policy, layout.num_params, data.task, frozen), results)
    result.seconds = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------------------------
# many checkpoints

def check_checkpoints(traj, checkpoints) -> list:
    """Canonical names of ``checkpoints`` (RUN or RUN:INDEX); a missing one is one error."""
    if not checkpoints:
        raise ConfigError("give at least one checkpoint (RUN or RUN:INDEX)")
    names = []
    for name in checkpoints:
        run, index = traj.resolve(name)
        names.append(f"{run}:{index}")
    return names


def compute_sharpness(traj, checkpoints, spec: SharpnessSpec = SharpnessSpec(), bn="auto", device="auto",
                      out=None, overwrite: bool = False, quiet: bool = True) -> SharpnessFile:
    """The numbers of the module doc for every checkpoint of ``traj`` named; written to ``out`` (a
    sharpness file, docs/FORMAT.md) when given. Every input is checked before any work. On a CPU the
    checkpoints' pieces run side by side, one per torch thread; checkpoints with the same weights and
    buffers are computed once."""
    names = check_checkpoints(traj, checkpoints)
    spec.check(min(traj.layout_at(n).num_trained for n in names))
    dev = resolve_device(device)
    if out is not None:
        from .store.files import prepare_output
        prepare_output(out, overwrite, inputs=(traj.path,))
    data = rebuild_data(traj, dev)
    model = rebuild_model(traj, data, dev)
    policy = resolve_policy(bn if bn is not None else "auto", model, can_interpolate=False,
                            batch_size=spec.batch_size)
    frozen = {traj.resolve(n)[0]: traj.layout_at(n).frozen for n in names}  # (its run's trained parameters)
    full_spec = sharpness_spec(spec, policy, traj.layout.num_params, data.task, {r: f for r, f in frozen.items() if f},
                               dataset=traj.config.get("data"), model=traj.config.get("model"))
    start = time.perf_counter()
    with contextlib.ExitStack() as held:
        progress = None
        if out is not None:  # one writer; the checkpoints an interrupted run finished are read back
            held.enter_context(claim_output(Path(out), overwrite))
            progress = SharpnessProgress(out, full_spec, overwrite)
        results = _results(traj, names, spec, (model, data, policy, dev), progress, quiet)
        result = SharpnessFile(None, full_spec, results, str(traj.path), None, traj.config.get("source_sha256"))
        if out is None:
            result.trajectory_sha256 = traj.sha256()  # (a file written hashes it: once)
        else:
            result = write_sharpness(out, full_spec, results, trajectory=traj.path, overwrite=overwrite,
                                     source_sha256=traj.config.get("source_sha256"), prepared=True)
            progress.remove()
    result.seconds = time.perf_counter() - start
    return result


def _results(traj, names, spec, setting, progress, quiet: bool) -> list:
    """Every checkpoint's numbers, in order; ``progress`` holds those an interrupted run kept and
    keeps each new one as it is done (a checkpoint equal to an earlier one is computed once)."""
    model, data, policy, dev = setting
    done = dict(progress.done) if progress is not None else {}
    keys, works, key_of = [], [], []
    for name in names:
        c = load_checkpoint(traj, name)
        layout = traj.layout_at(name)  # (the Hessian of the parameters its run trained)
        keys.append((c.name, _identity(c.params, c.buffers).hex() + "".join(f"|{f}" for f in layout.frozen)))
        if keys[-1][1] not in done and keys[-1][1] not in key_of:
            key_of.append(keys[-1][1])
            works.append(CheckpointWork(spec, layout, lambda name=name: _weights(traj, name)))

    def finished(i):
        done[key_of[i]] = dict(works[i].result(), seconds=works[i].seconds)
        if progress is not None:
            progress.add(key_of[i], done[key_of[i]])
        bar.update(sum(k == key_of[i] for _, k in keys))
    with tqdm(total=len(names), initial=sum(k in done for _, k in keys), desc="sharpness", unit="ckpt",
              disable=quiet, leave=False) as bar:
        try:  # on a CPU, pieces side by side on the cores (a second thread barely speeds up one small model)
            run_works(works, model, traj.layout, data, policy, torch.get_num_threads() if dev.type == "cpu" else 1,
                      on_done=finished)
        except KeyboardInterrupt:
            kept = sum(k in progress.done for _, k in keys) if progress is not None else 0
            asked = len(keys)
            if kept:
                raise KeyboardInterrupt(f"{kept} of {asked} checkpoints kept in {progress.path}; run the same "
                                        "command again to finish") from None
            raise
    results, seen = [], set()
    for (name, key), canonical in zip(keys, names):  # one equal to an earlier one took no time of its own
        results.append(dict(done[key], checkpoint=name, epoch=traj.checkpoint(canonical).epoch,
                            seconds=0.0 if key in seen else done[key]["seconds"]))
        seen.add(key)
    return results


def _weights(traj, name) -> tuple:
    c = load_checkpoint(traj, name)
    return c.params, c.buffers


def _identity(params: torch.Tensor, buffers: torch.Tensor) -> bytes:
    """A checkpoint's weights and buffers as float32, hashed: equal for equal checkpoints."""
    h = hashlib.sha256()
    for t in (params, buffers):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.digest()
