"""The batched evaluator: train and test loss and error at many points of weight space per call.

Points arrive as the rows of a (K, P) weight matrix (and (K, B) buffers). For K > 1 one call runs
``torch.func.functional_call`` under ``torch.func.vmap`` over the K rows, so every data batch passes
through K models at once; K = 1 runs the plain model. Data stays on the device as tensors, losses are
summed per sample in float64, errors are in percent, and a point whose logits turn NaN gets NaN error.

BatchNorm policies (:class:`BatchNormPolicy`):

- ``recompute``: fresh statistics from the training set (or a fixed subset), every *sample* weighted
  equally, exactly as :func:`landscape.bn.recompute_bn` does for one model: BatchNorm layers run in
  train mode with momentum 1.0, so after each data batch their running buffers hold that batch's mean
  and unbiased variance; :class:`~landscape.bn.MomentMerger` merges them (Chan's formula, float64, a
  leading K dimension) into whole-set statistics; then the metrics are computed in eval mode. Results
  depend on the batch size of this pass (deeper layers see batch-normalized inputs), so it is part of
  the policy.
- ``interpolate``: buffers combined like the weights (running variances clipped at 0).
- ``stored``: the origin's buffers at every point.
- ``none``: the model has no BatchNorm.

On a CPU, the number of points per call that runs fastest is found by a short measurement
(:meth:`Evaluator.measure`); on a GPU, the same measurement settles on large K.

Example::

    ev = Evaluator(model, layout, data, BatchNormPolicy("recompute", batch_size=1000))
    k = ev.measure(w0, b0)                  # points per call
    out = ev(weights[:k], buffers[:k])      # {"train_loss": (k,) float64, ...}
"""
from __future__ import annotations

import copy
import time
import types
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from .bn import MomentMerger, batch_slices, has_batchnorm
from .errors import ConfigError

POLICIES = ("recompute", "interpolate", "stored")
METRICS = ("train_loss", "train_err", "test_loss", "test_err")


@dataclass(frozen=True)
class BatchNormPolicy:
    policy: str = "recompute"   # recompute | interpolate | stored | none
    batch_size: int = 1000      # batches of the recompute pass (the results depend on it)
    samples: int | None = None  # recompute from a fixed random subset of this many training samples
    seed: int = 0               # which subset

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.policy != "recompute":  # the other fields mean nothing then
            d = {"policy": self.policy}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BatchNormPolicy":
        return cls(**d)


def resolve_policy(bn, model, can_interpolate: bool, batch_size: int = 1000) -> BatchNormPolicy:
    """``bn``: a policy name (``auto`` = recompute when the model has BatchNorm) or a BatchNormPolicy."""
    pol = bn if isinstance(bn, BatchNormPolicy) else BatchNormPolicy(bn or "auto", batch_size)
    if not has_batchnorm(model):
        return BatchNormPolicy("none")
    name = "recompute" if pol.policy == "auto" else pol.policy
    if name not in POLICIES:
        raise ConfigError(f"unknown BatchNorm policy {pol.policy!r}; use auto, {', '.join(POLICIES)}")
    if name == "interpolate" and not can_interpolate:
        raise ConfigError("BatchNorm policy 'interpolate' needs a plane or line made of checkpoints "
                          "(through, directions); use recompute or stored")
    if pol.batch_size < 2:
        raise ConfigError(f"BatchNorm batch size must be at least 2, got {pol.batch_size}")
    if pol.samples is not None and pol.samples < 2:
        raise ConfigError(f"BatchNorm samples must be at least 2, got {pol.samples}")
    return BatchNormPolicy(name, pol.batch_size, pol.samples, pol.seed)


def stacked_batch_norm(bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Train-mode BatchNorm of ``x`` holding several BatchNorm batches of ``bn.stacked_batch`` samples
    one after the other: each batch is normalized with its own mean and variance, as if it had passed
    alone. The batches become extra channels of one native batch-norm call (momentum 1, so its
    buffers receive each batch's mean and unbiased variance, exactly as a pass batch by batch would);
    their merge (Chan's formula, float64) goes to the layer's running buffers."""
    g, c, rest = bn.stacked_batch, x.shape[1], tuple(x.shape[2:])
    m = x.shape[0] // g
    xs = x.reshape(m, g, c, *rest).transpose(0, 1).reshape(g, m * c, *rest)  # (batch, m*C, ...)
    # batched like x under vmap, contiguous: vmap's rule updates the buffers in place through a reshape
    mean = torch.zeros_like(xs[0].reshape(m * c, -1)[:, 0], memory_format=torch.contiguous_format)
    var = torch.ones_like(mean, memory_format=torch.contiguous_format)
    w = None if bn.weight is None else bn.weight.repeat(m)
    bias = None if bn.bias is None else bn.bias.repeat(m)
    y = F.batch_norm(xs, mean, var, w, bias, True, 1.0, bn.eps)
    count = g * xs[0, 0].numel()  # values per channel in one batch
    mean, var = mean.reshape(m, c).double(), var.reshape(m, c).double()
    total = mean.mean(0)
    m2 = (var * (count - 1)).sum(0) + count * (mean - total).square().sum(0)
    bn.running_mean.copy_(total)
    bn.running_var.copy_(m2 / (m * count - 1))
    return y.reshape(g, m, c, *rest).transpose(0, 1).reshape(x.shape)


class Evaluator:
    """Evaluates the points given as rows of (K, P) weights and (K, B) buffers; see the module doc."""

    def __init__(self, model, layout, data, bn: BatchNormPolicy = BatchNormPolicy("stored"),
                 batch_size: int = 1000, weight_decay: float | None = None):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.layout, self.data, self.bn = layout, data, bn
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        self.weight_decay = weight_decay
        self.metrics = METRICS + (("train_loss_l2",) if weight_decay is not None else ())
        self.bn_layers = {n: m for n, m in self.model.named_modules()
                          if isinstance(m, _BatchNorm) and m.track_running_stats}
        self.var_names = [f"{n}.running_var" for n in self.bn_layers]
        self.x_bn = data.x_train
        if bn.policy == "recompute" and bn.samples is not None and bn.samples < len(data.x_train):
            g = torch.Generator().manual_seed(bn.seed)
            idx = torch.randperm(len(data.x_train), generator=g)[:bn.samples].sort().values
            self.x_bn = data.x_train[idx.to(data.x_train.device)]
        self._per_sample = self._elements_per_sample()

    # ------------------------------------------------------------------------------------------
    def _elements_per_sample(self) -> dict:
        """Values per channel per sample that each BatchNorm layer sees (the L of (N, C, L))."""
        counts, hooks = {}, []
        for name, m in self.bn_layers.items():
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: counts.__setitem__(name, args[0][0].numel() // args[0].shape[1])))
        try:
            with torch.no_grad():
                self.model(self.data.x_train[:2])
        finally:
            for h in hooks:
                h.remove()
        return counts

    def _split(self, params: torch.Tensor, buffers: torch.Tensor, batched: bool):
        if not batched:
            params, buffers = params[0], buffers[0]
        p = self.layout.split_params(params)
        # every buffer its own contiguous tensor: vmap's batch-norm rule reshapes batched running
        # statistics, which copies a strided view, and the in-place update would be lost
        b = {k: t.clone(memory_format=torch.contiguous_format) for k, t in self.layout.split_buffers(buffers).items()}
        return p, b

    def _forward(self, p: dict, b: dict, x: torch.Tensor, batched: bool) -> torch.Tensor:
        """Logits (K, n, classes)."""
        call = lambda p_, b_, x_: functional_call(self.model, (p_, b_), (x_,))  # noqa: E731
        if batched:
            return vmap(call, in_dims=(0, 0, None))(p, b, x)
        return call(p, b, x)[None]

    def _bn_calls(self) -> list:
        """The recompute pass as (slice of x_bn, BatchNorm batch size) calls: consecutive batches of
        equal size (those of :func:`batch_slices`) stacked up to about ``batch_size`` samples a call."""
        batches, calls, i = batch_slices(len(self.x_bn), self.bn.batch_size), [], 0
        per_call = max(1, self.batch_size // self.bn.batch_size)
        while i < len(batches):
            size, j = batches[i].stop - batches[i].start, i
            while j < len(batches) and j - i < per_call and batches[j].stop - batches[j].start == size:
                j += 1
            calls.append((slice(batches[i].start, batches[j - 1].stop), size))
            i = j
        return calls

    def _recompute(self, p: dict, b: dict, batched: bool) -> None:
        """Replace the BatchNorm statistics in ``b`` by whole-training-set ones (see the module doc).
        Several BatchNorm batches go through the model in one call; each BatchNorm layer normalizes
        every batch with that batch's own statistics (:func:`stacked_batch_norm`), so the result is
        that of a pass batch by batch, with larger, faster matrix products."""
        for name in self.bn_layers:
            b[f"{name}.running_mean"].zero_()
            b[f"{name}.running_var"].fill_(1.0)
            b[f"{name}.num_batches_tracked"].zero_()
        mergers = {name: MomentMerger() for name in self.bn_layers}
        for m in self.bn_layers.values():
            m.train()
            m.forward = types.MethodType(stacked_batch_norm, m)
        try:
            for sl, group in self._bn_calls():
                for m in self.bn_layers.values():
                    m.stacked_batch = group
                self._forward(p, b, self.x_bn[sl], batched)
                n = sl.stop - sl.start
                for name, merger in mergers.items():
                    merger.add(n * self._per_sample[name], b[f"{name}.running_mean"], b[f"{name}.running_var"])
        finally:
            for m in self.bn_layers.values():
                m.eval()
                del m.forward
        for name, merger in mergers.items():
            mean, var = merger.result()
            b[f"{name}.running_mean"] = mean.float()
            b[f"{name}.running_var"] = var.float()

    @torch.no_grad()
    def __call__(self, params: torch.Tensor, buffers: torch.Tensor) -> dict:
        """Metrics of the K points: name -> (K,) float64 numpy array."""
        K = params.shape[0]
        batched = K > 1
        p, b = self._split(params, buffers, batched)
        if self.bn.policy == "recompute":
            self._recompute(p, b, batched)
        elif self.bn.policy == "interpolate":
            for name in self.var_names:
                b[name] = b[name].clamp_min(0.0)
        out = {}
        for split in ("train", "test"):
            x, y = getattr(self.data, f"x_{split}"), getattr(self.data, f"y_{split}")
            loss_sum = torch.zeros(K, dtype=torch.float64, device=x.device)
            wrong = torch.zeros(K, dtype=torch.float64, device=x.device)
            nan = torch.zeros(K, dtype=torch.bool, device=x.device)
            for sl in batch_slices(len(x), self.batch_size):
                logits = self._forward(p, b, x[sl], batched)                     # (K, n, C)
                target = y[sl].expand(K, -1)
                loss = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (K, n)
                loss_sum += loss.double().sum(1)
                wrong += (logits.argmax(-1) != target).sum(1)
                nan |= logits.isnan().flatten(1).any(1)
            err = 100.0 * wrong / len(x)
            out[f"{split}_loss"] = (loss_sum / len(x)).cpu().numpy()
            out[f"{split}_err"] = torch.where(nan, float("nan"), err).cpu().numpy()
        if self.weight_decay is not None:
            sq = params.double().pow(2).sum(1).cpu().numpy()
            out["train_loss_l2"] = out["train_loss"] + 0.5 * self.weight_decay * sq
        return out

    # ------------------------------------------------------------------------------------------
    def measure(self, params: torch.Tensor, buffers: torch.Tensor, candidates=None, budget_s: float = 3.0,
                quiet: bool = True) -> int:
        """The number of points per call with the highest throughput, from timing one batch of each
        pass at K = 1, 2, 4, ... (stopping once it is much slower, out of memory or out of ``budget_s``)."""
        device = self.data.x_train.device
        if candidates is None:
            candidates = (1, 2, 4, 8, 16, 32) if device.type == "cpu" else (1, 2, 4, 8, 16, 32, 64, 128, 256)
        x = self.data.x_train[:self.batch_size]
        xb = self.x_bn[:self.bn.batch_size]
        # how many batches of each kind one point costs
        n_eval = len(batch_slices(len(self.data.x_train), self.batch_size)) + \
            len(batch_slices(len(self.data.x_test), self.batch_size))
        n_bn = len(batch_slices(len(self.x_bn), self.bn.batch_size)) if self.bn.policy == "recompute" else 0
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        best_k, best_rate, start = 1, 0.0, time.perf_counter()
        for k in candidates:
            w = params.reshape(1, -1).expand(k, -1)
            bf = buffers.reshape(1, -1).expand(k, -1)
            try:
                with torch.no_grad():
                    times = []
                    for _ in range(3):  # the first is a warm-up
                        p, b = self._split(w, bf, k > 1)
                        sync()
                        t0 = time.perf_counter()
                        if n_bn:
                            for m in self.bn_layers.values():
                                m.train()
                            self._forward(p, b, xb, k > 1)
                            for m in self.bn_layers.values():
                                m.eval()
                        sync()
                        t1 = time.perf_counter()
                        self._forward(p, b, x, k > 1)
                        sync()
                        times.append((t1 - t0, time.perf_counter() - t1))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                break
            finally:
                for m in self.bn_layers.values():
                    m.eval()
            t_bn = min(t[0] for t in times[1:])
            t_ev = min(t[1] for t in times[1:])
            rate = k / (n_bn * t_bn + n_eval * t_ev)
            if not quiet:
                print(f"  {k:4d} points per call: {rate:8.1f} points/s")
            if rate > best_rate:
                best_k, best_rate = k, rate
            elif rate < 0.5 * best_rate and k >= 8:  # small K can dip before vmap pays off
                break
            if time.perf_counter() - start > budget_s:
                break
        return best_k
