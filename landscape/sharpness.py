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

Example::

    traj = open_trajectory("run.h5")
    res = compute_sharpness(traj, ["sgd", "swa/average"], SharpnessSpec(top_k=3), out="sharp.h5")
    res.results[0]["eigenvalues"], res.results[0]["trace"], res.results[0]["epsilon_sharpness"]
"""
from __future__ import annotations

import math
import threading
import time
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from .bn import recompute_bn
from .device import resolve_device, thread_workers
from .errors import ConfigError
from .evaluate import BatchNormPolicy, Evaluator, bn_inputs, resolve_policy
from .geometry import HessianOperator, load_checkpoint, training_subset
from .rebuild import rebuild_data, rebuild_model
from .store.sharpness import SharpnessFile, write_sharpness


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
    batch_size: int = 1000         # data batch of every pass (speed only)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SharpnessSpec":
        return cls(**d)

    def check(self, num_params: int | None = None) -> "SharpnessSpec":
        """Refuse values no computation can use (``num_params``: of the model, when known)."""
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
                raise ConfigError(f"top k = {self.top_k} eigenvalues asked of a model with {num_params:,} "
                                  f"parameters; k must be at most the parameter count")
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
    return torch.linalg.eigh(T)


def top_eigen(op, num_params: int, k: int, iterations: int, tol: float, generator: torch.Generator,
              device) -> dict:
    """The k largest eigenvalues (descending) of ``op`` by Lanczos, their residual bounds and the top
    eigenvector (P,) float64."""
    start = torch.randn(num_params, generator=generator, dtype=torch.float64).to(device)

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
    return {"eigenvalues": theta[order].tolist(), "residuals": res.tolist(), "lanczos_steps": len(alpha),
            "top_vector": vecs[0]}


def hutchinson(op, num_params: int, probes: int, generator: torch.Generator, device, chunk: int = 16) -> dict:
    """Hutchinson's trace estimate: the mean of z^T H z over Rademacher z, with its standard error."""
    values = []
    for start in range(0, probes, chunk):
        n = min(chunk, probes - start)
        z = torch.randint(0, 2, (n, num_params), generator=generator).double().mul_(2).sub_(1).to(device)
        values.append((z * op(z)).sum(1).cpu())
    v = torch.cat(values).numpy()
    return {"trace": float(v.mean()), "trace_stderr": float(v.std(ddof=1) / math.sqrt(len(v))),
            "trace_probes": v}


def spectral_density(op, num_params: int, runs: int, steps: int, generator: torch.Generator, device) -> dict:
    """Stochastic Lanczos quadrature: per run the Ritz values (nodes) and squared first components of
    their eigenvectors (weights, summing to 1), (runs, steps) arrays padded with NaN."""
    m = min(steps, num_params)
    nodes, weights = np.full((runs, m), np.nan), np.full((runs, m), np.nan)
    for r in range(runs):
        z = torch.randint(0, 2, (num_params,), generator=generator).double().mul_(2).sub_(1).to(device)
        alpha, beta, _ = lanczos(op, num_params, m, z)
        theta, s = ritz(alpha, beta)
        nodes[r, :len(theta)] = theta.numpy()
        weights[r, :len(theta)] = (s[0] ** 2).numpy()
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
    parameter with two or more dimensions; other parameters are held fixed (d = 0 there)."""

    def __init__(self, layout, w: torch.Tensor, epsilon: float):
        self.epsilon = float(epsilon)
        self.parts = []  # (slice, number of filters)
        for e, sl in layout.param_slices():
            if len(e.shape) >= 2:
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


def epsilon_sharpness(op: HessianOperator, layout, epsilon: float, steps: int, top_vector=None) -> dict:
    """Projected gradient ascent of the loss over the filter-normalized epsilon-ball (see the module
    doc); starts: the checkpoint (first step along the gradient) and +-``top_vector`` on the
    boundary. Returns the largest rise found, the rise along the top eigenvector at the same radius,
    and the largest ||d_f|| / ||w_f|| of the maximizer (never above epsilon)."""
    w = op.params.double()
    ball = FilterBall(layout, w, epsilon)
    base = op.loss()
    lr = 2.5 / max(steps, 1)  # the usual PGD step: 2.5 epsilon / steps, in the ball's own units
    best = (base, torch.zeros_like(w))
    along = None
    starts = [torch.zeros_like(w)]
    if top_vector is not None:
        v = ball.onto_boundary(top_vector.double().to(w.device))
        starts += [v, -v]
    for i, d in enumerate(starts):
        if i > 0:
            value = op.loss((w + d).float())
            along = value if along is None else max(along, value)
            if value > best[0]:
                best = (value, d)
        for _ in range(steps):
            _, g = op.loss_and_grad((w + d).float())
            d = ball.project(d + lr * ball.step(g))
            value = op.loss((w + d).float())
            if value > best[0]:
                best = (value, d)
    return {"loss": base, "epsilon_sharpness": best[0] - base,
            "eigenvector_sharpness": (along - base) if along is not None else float("nan"),
            "epsilon_ratio": ball.ratio(best[1])}


# ----------------------------------------------------------------------------------------------
# one checkpoint, many checkpoints

def checkpoint_sharpness(model, layout, params: torch.Tensor, buffers: torch.Tensor, data,
                         spec: SharpnessSpec, policy: BatchNormPolicy, bar=None, stop=None) -> dict:
    """Every number of the module doc for one checkpoint (``params``, ``buffers``), and the
    evaluator's train/test loss and error (%) there. ``stop`` (a ``threading.Event``): once set, the
    next Hessian pass raises KeyboardInterrupt."""
    device = data.x_train.device
    params, buffers = params.to(device).float(), buffers.to(device).float()
    ev = Evaluator(model, layout, data, policy, batch_size=spec.batch_size)
    metrics = {k: float(v[0]) for k, v in ev(params[None], buffers[None]).items()}
    if policy.policy == "recompute":  # the statistics held fixed around the checkpoint
        m = layout.load(ev.model, params, buffers)
        recompute_bn(m, bn_inputs(data, policy), policy.batch_size)
        buffers = layout.buffers_to_vector(m)
    g = torch.Generator().manual_seed(int(spec.seed))
    x, y = training_subset(data, spec.samples, g)
    # 1-D convolutions as 2-D ones on channels-last memory, as the evaluator runs them: a cnn1d
    # checkpoint's sharpness 1.1 to 1.3x faster on a CPU (measured), the same numbers to rounding
    with ev.conv1d_as_2d() as memory:
        op = HessianOperator(ev.model, layout, params, buffers, memory(x), y, spec.batch_size, data.task, stop)
        return {"metrics": metrics, **_hessian_numbers(op, layout, spec, g, device, bar)}


def _hessian_numbers(op: HessianOperator, layout, spec: SharpnessSpec, g: torch.Generator, device, bar=None) -> dict:
    """Eigenvalues, trace, density (if asked) and epsilon-sharpness of ``op``'s Hessian."""
    P = layout.num_params
    tick = (lambda what: bar.set_postfix_str(what, refresh=True)) if bar is not None else (lambda what: None)
    out = {}
    tick("eigenvalues")
    eig = top_eigen(op, P, spec.top_k, spec.iterations, spec.tol, g, device)
    tick("trace")
    out.update(hutchinson(op, P, spec.probes, g, device))
    if spec.density:
        tick("density")
        out.update(spectral_density(op, P, spec.density_runs, spec.density_steps, g, device))
    tick("epsilon-sharpness")
    out.update(epsilon_sharpness(op, layout, spec.epsilon, spec.ascent_steps, eig["top_vector"]))
    out.update({k: v for k, v in eig.items() if k != "top_vector"})
    return out


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
    sharpness file, docs/FORMAT.md) when given. Every input is checked before any work."""
    names = check_checkpoints(traj, checkpoints)
    spec.check(traj.layout.num_params)
    dev = resolve_device(device)
    if out is not None:
        from .store.files import prepare_output
        prepare_output(out, overwrite, inputs=(traj.path,))
    data = rebuild_data(traj, dev)
    model = rebuild_model(traj, data, dev)
    policy = resolve_policy(bn if bn is not None else "auto", model, can_interpolate=False,
                            batch_size=spec.batch_size)
    start = time.perf_counter()
    # on a CPU, checkpoints side by side on the cores (a second thread barely speeds up one small model)
    workers = min(len(names), torch.get_num_threads()) if dev.type == "cpu" else 1
    stop = threading.Event()

    def one(name, bar=None):
        c = load_checkpoint(traj, name)
        t0 = time.perf_counter()
        r = checkpoint_sharpness(model, traj.layout, c.params.float(), c.buffers.float(), data, spec, policy, bar,
                                 stop)
        r.update(checkpoint=c.name, epoch=traj.checkpoint(name).epoch, seconds=time.perf_counter() - t0)
        return r

    with tqdm(total=len(names), desc="sharpness", unit="ckpt", disable=quiet, leave=False) as bar, \
            thread_workers(workers, torch.get_num_threads() // workers if workers > 1 else None) as pool:
        if pool is None:
            results = []
            for name in names:
                results.append(one(name, bar))
                bar.update(1)
        else:
            futures = [pool.submit(one, name) for name in names]
            try:
                for f in as_completed(futures):
                    f.result()
                    bar.update(1)
            except BaseException:
                stop.set()  # the checkpoints under way end at their next Hessian pass
                raise
            results = [f.result() for f in futures]
    full_spec = {"sharpness": spec.to_dict(), "bn": policy.to_dict(), "dataset": traj.config.get("data"),
                 "model": traj.config.get("model"), "num_params": traj.layout.num_params,
                 "ball": "filter-normalized: ||d_f|| <= epsilon ||w_f|| per filter of every parameter with "
                         ">= 2 dimensions; biases and BatchNorm parameters fixed"}
    result = SharpnessFile(None, full_spec, results, str(traj.path), None)
    if out is not None:
        result = write_sharpness(out, full_spec, results, trajectory=traj.path, overwrite=overwrite)
    result.seconds = time.perf_counter() - start
    return result
