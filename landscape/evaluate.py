"""The batched evaluator: train and test loss and the task's metrics at many points of weight space per call.

Points arrive as the rows of a (K, P) weight matrix (and (K, B) buffers). For K > 1 one call runs
``torch.func.functional_call`` under ``torch.func.vmap`` over the K rows, so every data batch passes
through K models at once; K = 1 runs the plain model. The data's task (:mod:`landscape.tasks`;
classification: cross-entropy and error in percent) turns each point's output into per-sample values,
summed in float64 (:class:`MetricSums`), and a point whose loss is not finite gets NaN metrics.
In-memory data stays on the device as tensors (the fast path); a data source
(:class:`~landscape.data.StreamData`) is read batch by batch in its fixed order, once per call for all
K points, so memory does not depend on the dataset's size. On a subset, each value's standard error
over samples comes beside it (``test_loss_se``).

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
- ``none``: the model has no BatchNorm: the origin's buffers at every point. (Without BatchNorm,
  buffers that differ between the checkpoints, such as pruning masks, are interpolated.)

One point per call, a convolution whose output only an eval-mode BatchNorm layer reads runs as one
convolution with that layer folded into its weights (:func:`conv_batchnorm_pairs`, found on the
model's ``torch.fx`` graph and checked on a probe batch): the same values to rounding, one pass over
the activations fewer.

The number of points per call that runs fastest is found by a short measurement on the first points
of the grid (:func:`choose_points_per_call`): on a GPU it settles on large K; on a CPU a model with
convolutions runs K = 1 without measuring (vmap turns convolutions into grouped ones, which are slow
there), and an MLP may gain from a few points per call.

Example::

    ev = Evaluator(model, layout, data, BatchNormPolicy("recompute", batch_size=1000))
    out = ev(weights[:k], buffers[:k])      # {"train_loss": (k,) float64, ...}
"""
from __future__ import annotations

import contextlib
import ctypes
import platform
import threading
import time
import types
import warnings
import weakref
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.utils._pytree import tree_leaves, tree_map

from .bn import MomentMerger, batch_slices, has_batchnorm
from .data import Data
from .errors import ConfigError, DataError, ModelError
from .params import copy_module
from .tasks import (Classification, Evaluation, LanguageModel, batch_size_of, check_evaluation, logits_of, model_args,
                    output_tree, repeat_targets, take, targets_of, to_device)

POLICIES = ("recompute", "interpolate", "stored")
METRICS = ("train_loss", "train_err", "test_loss", "test_err")   # classification's


def metric_names(task, weight_decay=None, stderr: bool = False) -> tuple:
    """The values an evaluation of ``task`` gives: the task's (``train_loss``, ``train_err``, ...),
    ``train_loss_l2`` with a weight decay, and ``<value>_se`` for the loss and the per-sample
    metrics with standard errors (subset evaluation)."""
    names = task.value_names() + (("train_loss_l2",) if weight_decay is not None else ())
    if stderr:
        names += tuple(f"{s}_{m}_se" for s in ("train", "test") for m in ("loss",) + tuple(task.metrics))
    return names


@dataclass(frozen=True)
class BatchNormPolicy:
    policy: str = "recompute"   # recompute | interpolate | stored | none
    batch_size: int = 1000      # batches of the recompute pass (the results depend on it; 0: a data source's own)
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


def resolve_policy(bn, model, can_interpolate: bool, batch_size: int = 1000,
                   buffers_differ: bool = False) -> BatchNormPolicy:
    """``bn``: a policy name (``auto`` = recompute when the model has BatchNorm) or a BatchNormPolicy.
    A model without BatchNorm whose checkpoints' buffers differ (``buffers_differ``: pruning masks,
    spectral norm's vectors) has them interpolated under ``auto`` or ``interpolate``, so that the point
    of every checkpoint is that checkpoint; otherwise its policy is ``none`` (the origin's buffers)."""
    pol = bn if isinstance(bn, BatchNormPolicy) else BatchNormPolicy(bn or "auto", batch_size)
    if pol.policy not in POLICIES + ("auto", "none"):
        raise ConfigError(f"unknown BatchNorm policy {pol.policy!r}; use auto, {', '.join(POLICIES)}")
    if not has_batchnorm(model):
        interpolate = pol.policy in ("auto", "interpolate") and can_interpolate and buffers_differ
        return BatchNormPolicy("interpolate" if interpolate else "none")
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


def bn_inputs(data, bn: BatchNormPolicy):
    """The training data a ``recompute`` pass reads: the whole training set, or the fixed random
    subset of ``bn.samples`` of them (in their order) drawn from ``bn.seed``: the training inputs of
    in-memory data, a data source's training batches (inputs and targets) otherwise."""
    if bn.policy == "recompute" and bn.samples is not None:
        data = data.subset(bn.samples, bn.seed, splits=("train",))
    return data.x_train if isinstance(data, Data) else data


def stacked_batch_norm(bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Train-mode BatchNorm of ``x`` holding several BatchNorm batches of ``bn.stacked_batch`` samples
    one after the other: each batch is normalized with its own mean and (biased) variance, as if it
    had passed alone. The statistics are column sums over the batch dimension of the (m, g, C * L)
    view, then over L, with the variance taken about the mean in a second pass; every elementwise
    operation runs along the contiguous C * L (no transposed copy, which a native batch-norm call over
    stacked batches would need). The batches' means and unbiased variances, merged in float64 (Chan's
    formula), go to the layer's running buffers: what a pass batch by batch with momentum 1 leaves,
    merged."""
    g, c = bn.stacked_batch, x.shape[1]
    m = x.shape[0] // g
    per = x[0, 0].numel()                      # values per channel per sample (the L of (N, C, L))
    count = g * per                            # values per channel in one batch
    if _is_channels_last(x):
        return _stacked_channels_last(bn, x, m, g, c, per)
    cols = x.reshape(m, g, c * per)            # a view

    def along(t):                              # (m or 1, C) -> (m or 1, 1, C * L), contiguous
        return t.float()[:, :, None].expand(t.shape[0], c, per).reshape(t.shape[0], 1, c * per)

    mean = cols.sum(1).reshape(m, c, per).double().sum(2) / count                      # (m, C)
    d = cols - along(mean)
    m2 = d.square().sum(1).reshape(m, c, per).double().sum(2)                          # (m, C)
    _keep_statistics(bn, mean, m2, m, count)
    scale = _scale(bn, m2, count)
    if bn.bias is not None:
        y = torch.addcmul(along(bn.bias[None]), d, along(scale))
    else:
        y = d.mul_(along(scale))
    return y.reshape(x.shape)


def _stacked_channels_last(bn: _BatchNorm, x: torch.Tensor, m: int, g: int, c: int, per: int) -> torch.Tensor:
    """:func:`stacked_batch_norm` of a channels-last (N, C, H, W) or (N, C, L) ``x``: its memory is
    (N, H, W, C) or (N, L, C), so each batch's values are the rows of a (g * H * W, C) view and the
    statistics column sums."""
    count = g * per
    rows = x.movedim(1, -1).reshape(m, count, c)                                      # a view
    mean = rows.reshape(m, g, per, c).sum(1).double().sum(1) / count                  # (m, C)
    d = rows - mean.float()[:, None, :]
    m2 = d.square().reshape(m, g, per, c).sum(1).double().sum(1)                      # (m, C)
    _keep_statistics(bn, mean, m2, m, count)
    scale = _scale(bn, m2, count).float()[:, None, :]
    y = torch.addcmul(bn.bias.float()[None, None, :], d, scale) if bn.bias is not None else d.mul_(scale)
    return y.reshape(x.shape[0], *x.shape[2:], c).movedim(-1, 1)                     # channels-last again


def _scale(bn: _BatchNorm, m2: torch.Tensor, count: int) -> torch.Tensor:
    scale = torch.rsqrt(m2 / count + bn.eps)
    return scale * bn.weight.double() if bn.weight is not None else scale


def _joined(a, b):
    """Two batches of the same structure as one (tensors concatenated along the samples)."""
    try:
        return tree_map(lambda u, v: torch.cat([u, v]) if torch.is_tensor(u) else u, a, b)
    except (RuntimeError, ValueError, TypeError) as e:
        raise DataError("a training batch of one sample cannot pass through BatchNorm alone, and joining it to "
                        f"the batch beside it failed ({str(e).splitlines()[0]}); give the data source batches "
                        "of at least two samples") from None


def _keep_statistics(bn: _BatchNorm, mean: torch.Tensor, m2: torch.Tensor, m: int, count: int) -> None:
    """The batches' statistics merged into the layer's running buffers; the pass ends at the last
    BatchNorm layer, before its output is normalized."""
    total = mean.mean(0)
    merged = m2.sum(0) + count * (mean - total).square().sum(0)
    bn.running_mean.copy_(total)
    bn.running_var.copy_(merged / (m * count - 1))
    if getattr(bn, "last_of_pass", False):  # nothing after the last BatchNorm layer matters to the pass
        raise _PassDone


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """The same (N, C, H, W) or (N, C, L) tensor with its channels last in memory."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x.movedim(1, -1).contiguous().movedim(-1, 1)


def _is_channels_last(x: torch.Tensor) -> bool:
    if x.dim() not in (3, 4):
        return False
    try:
        return not x.is_contiguous() and x.movedim(1, -1).is_contiguous()
    except RuntimeError:  # under vmap, which cannot tell (the batched path gets the plain layout)
        return False


def _conv1d_channels_last(conv: torch.nn.Conv1d, x: torch.Tensor, weight=None, bias=None) -> torch.Tensor:
    """``conv`` (with ``weight`` and ``bias`` where given) as a 2-D convolution of height 1 on
    channels-last memory, which oneDNN runs 1.3 to 1.7 times faster than its 1-D one for few channels
    (cnn1d's layers, measured); the output (N, C, L) keeps its channels last in memory."""
    weight, bias = (conv.weight, conv.bias) if weight is None else (weight, bias)
    padding = conv.padding if isinstance(conv.padding, str) else (0, conv.padding[0])
    if conv.padding_mode != "zeros":
        x, padding = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), (0, 0)
    # a weight with channels-last strides, so that the output has them even when the input's one
    # channel makes its layout ambiguous (oneDNN would then return the plain layout)
    w = weight.unsqueeze(2)
    w = torch.empty(w.shape, dtype=w.dtype, device=w.device, memory_format=torch.channels_last).copy_(w)
    y = F.conv2d(x.unsqueeze(2).contiguous(memory_format=torch.channels_last), w, bias,
                 (1, conv.stride[0]), padding, (1, conv.dilation[0]), conv.groups)
    return y.squeeze(2)


def _batch_norm_channels_last(bn: torch.nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """An eval-mode BatchNorm1d of a channels-last (N, C, L) ``x``, as the 2-D kernel for channels-last
    memory computes it (the same values; the 1-D kernel takes twice as long on such memory)."""
    if x.dim() != 3:
        return type(bn).forward(bn, x)
    return F.batch_norm(x.unsqueeze(2), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                        bn.eps).squeeze(2)


def conv_batchnorm_pairs(model) -> list:
    """The (convolution, BatchNorm) layers of ``model`` that an eval-mode forward may run as one
    convolution (:func:`_folded_forward`): a ``Conv1d/2d/3d`` whose output only a
    ``BatchNorm1d/2d/3d`` with running statistics reads, each layer called once per forward. Found on
    the model's ``torch.fx`` graph, so a reader of the convolution's output outside the BatchNorm
    (a residual branch, say) is seen; none for a model fx cannot trace or a compiled one. Forward
    hooks are code fx does not see: a convolution with a forward hook, or a BatchNorm with any (its
    pre-hook would read the folded output), is not folded, and no layer is while a global module hook
    is set."""
    modules = dict(model.named_modules())
    if (hasattr(model, "_orig_mod") or not any(type(m) in _FOLDABLE_CONV for m in modules.values())
            or not any(type(m) in _FOLDABLE_BN for m in modules.values()) or _global_forward_hooks()):
        return []
    try:
        # fx patches torch.nn.Module for every thread while it traces: one trace at a time, and no evaluator
        # is made while another thread runs a model (the sharpness workers' are made before they start)
        with _TRACING, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # data-dependent control flow, an operation fx cannot trace: no folding
        return []
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        src = node.args[0] if node.op == "call_module" and len(node.args) == 1 and not node.kwargs else None
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        conv, bn = modules.get(src.target), modules.get(node.target)
        if (type(conv) in _FOLDABLE_CONV and type(bn) in _FOLDABLE_BN and bn.track_running_stats
                and bn.num_features == conv.out_channels and calls[src.target] == calls[node.target] == 1
                and not conv._forward_hooks and not bn._forward_pre_hooks and not bn._forward_hooks):
            pairs.append((conv, bn))  # (the convolution's pre-hooks, an old-style weight norm's, run as ever)
    return pairs


def _global_forward_hooks() -> bool:
    """Whether a hook of every module's forward is set (``torch.nn.modules.module.register_module_forward_hook``)."""
    module = torch.nn.modules.module
    return bool(getattr(module, "_global_forward_hooks", None) or getattr(module, "_global_forward_pre_hooks", None))


_TRACING = threading.Lock()
_FOLDABLE_CONV = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_FOLDABLE_BN = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def _folded_forward(conv: _ConvNd, bn: _BatchNorm, channels_last: bool):
    """The forward of ``conv`` followed by eval-mode ``bn``, as one convolution: BatchNorm's
    y = (x - mean) * s + beta with s = gamma / sqrt(var + eps) folded into the convolution's weights
    (each output channel's times s) and bias, which saves a pass over the activations. It reads the
    layers' tensors when called, so under ``functional_call`` they are the point's."""
    def forward(x):
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if conv.bias is not None:
            shift = torch.addcmul(shift, conv.bias, scale)
        if bn.bias is not None:
            shift = shift + bn.bias
        weight = conv.weight * scale.reshape(-1, *(1,) * (conv.weight.dim() - 1))
        if channels_last:
            return _conv1d_channels_last(conv, x, weight, shift)
        return conv._conv_forward(x, weight, shift)
    return forward


def _unchanged(x):
    return x


@contextlib.contextmanager
def _one_dimensional_channels_last(layers, folds=()):
    """For one forward: the Conv1d layers among ``layers`` run on channels-last memory, and so do the
    BatchNorm1d layers in eval mode (a recompute pass's have their own forward already); each
    (convolution, BatchNorm) of ``folds`` whose BatchNorm is in eval mode runs as one convolution
    (:func:`_folded_forward`, on channels-last memory if the convolution is among ``layers``)."""
    patched = []
    for conv, bn in folds:
        if not bn.training and "forward" not in conv.__dict__ and "forward" not in bn.__dict__:
            conv.forward = _folded_forward(conv, bn, any(conv is m for m in layers))
            bn.forward = _unchanged
            patched += [conv, bn]
    for m in layers:
        if "forward" not in m.__dict__ and (isinstance(m, torch.nn.Conv1d) or not m.training):
            m.forward = types.MethodType(
                _conv1d_channels_last if isinstance(m, torch.nn.Conv1d) else _batch_norm_channels_last, m)
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def channels_last_layers(model, probe, device) -> list | None:
    """Whether to give ``model`` its inputs channels-last (one point per call on a CPU): None for no;
    else the 1-D layers to switch while it runs (:func:`_one_dimensional_channels_last`; none for
    images). Images (N, C, H, W) to a model with 2-D convolutions, whose oneDNN convolutions of few
    channels run 1.5 to 2.4 times faster so (resnet20's layers, measured); sequences (N, C, L) to a
    model with 1-D convolutions, which then run as 2-D ones of height 1 on channels-last memory (1.3
    to 1.7 times faster on cnn1d's layers). Only if the model takes the channels-last ``probe`` batch
    and gives the same outputs: one that calls ``.view`` on its activations cannot; nor does a
    compiled model, whose layers are not switched."""
    args, _ = model_args(probe)
    conv = {4: torch.nn.Conv2d, 3: torch.nn.Conv1d}.get(args[0].dim() if args and torch.is_tensor(args[0]) else 0)
    if (torch.device(device).type != "cpu" or conv is None or not args[0].is_floating_point()
            or hasattr(model, "_orig_mod") or not any(isinstance(m, conv) for m in model.modules())):
        return None
    layers = []
    if conv is torch.nn.Conv1d:
        layers = [m for m in model.modules() if isinstance(m, torch.nn.Conv1d)
                  or isinstance(m, torch.nn.BatchNorm1d) and m.track_running_stats]
    return layers if _switched_outputs_agree(model, probe, layers, channels_last=True) else None


def _folds_that_agree(model, probe) -> list:
    """:func:`conv_batchnorm_pairs` of ``model`` if, folded, its eval-mode outputs for the ``probe``
    batch equal the plain forward's to rounding (else none)."""
    folds = conv_batchnorm_pairs(model)
    return folds if folds and _switched_outputs_agree(model, probe, folds=folds) else []


def _switched_outputs_agree(model, probe, layers=(), folds=(), channels_last: bool = False) -> bool:
    """Whether ``model``'s outputs for the ``probe`` batch with ``layers`` and ``folds`` switched
    (:func:`_one_dimensional_channels_last`; its first input channels-last with ``channels_last``)
    equal the plain forward's to rounding; False where the switched forward fails."""
    args, kwargs = model_args(probe)
    switched = (_channels_last(args[0]),) + tuple(args[1:]) if channels_last else args
    try:
        with torch.no_grad():
            plain = tree_leaves(output_tree(model(*args, **kwargs)))
            with _one_dimensional_channels_last(layers, folds):
                other = tree_leaves(output_tree(model(*switched, **kwargs)))
    except Exception:
        return False
    return len(plain) == len(other) and all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)
                                            for a, b in zip(plain, other))


class _OnePoint(torch.nn.Module):
    """Runs a function while ``functional_call`` holds one point's tensors in ``model``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, work):
        return work()


class _PassDone(Exception):
    """Raised by the last BatchNorm layer of a recompute pass to skip the rest of the forward."""


_ALLOCATOR_TUNED = False


def keep_freed_memory() -> None:
    """Let glibc's malloc keep freed memory for reuse (once per process, Linux with glibc only).

    The evaluator allocates the same megabyte-sized temporaries for every data batch. By default glibc
    serves such blocks with fresh ``mmap``s (or trims them off the heap when freed), so every batch
    page-faults its memory in again, which costs as much as the arithmetic here (measured: a 15 ms
    point took 34 ms). Fixing M_MMAP_THRESHOLD at 32 MiB and M_TRIM_THRESHOLD at 1 GiB keeps the
    blocks in the heap; the process keeps its peak heap size. (PyTorch's CPU tuning guide gets the
    same effect by preloading jemalloc or tcmalloc.)"""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    _ALLOCATOR_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class Evaluator:
    """Evaluates the points given as rows of (K, P) weights and (K, B) buffers; see the module doc."""

    def __init__(self, model, layout, data, bn: BatchNormPolicy = BatchNormPolicy("stored"),
                 batch_size: int = 1000, weight_decay: float | None = None, stderr: bool = False, bn_data=None):
        self.model = copy_module(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = next(self.model.parameters()).device
        if self.device.type == "cpu":
            keep_freed_memory()
        self.layout, self.data, self.bn, self.task = layout, data, bn, data.task
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        self.weight_decay, self.stderr = weight_decay, stderr
        self.metrics = metric_names(self.task, weight_decay, stderr)
        self.bn_layers = {n: m for n, m in self.model.named_modules()
                          if isinstance(m, _BatchNorm) and m.track_running_stats}
        # every running variance an interpolated point clips at 0 (InstanceNorm's too, which is no _BatchNorm)
        self.var_names = [n for n, _ in self.model.named_buffers() if n.rpartition(".")[2] == "running_var"]
        self.x_bn = bn_inputs(data if bn_data is None else bn_data, bn)  # (``bn_data``: a subset's whole set)
        self._vmap_task = True  # until the task fails under vmap
        self._vmap_model = True  # until the model fails under vmap (an operation without a batching rule)
        probe = check_task_fits(self.model, data, self.device)
        self._label_width = None if isinstance(data, Data) else _label_width(self.task, self.model, probe)
        self._per_sample = self._elements_per_sample(probe)
        layers = channels_last_layers(self.model, probe, self.device)
        self._channels_last = layers is not None
        self._layers_1d = layers or []  # the layers _layers_channels_last switches, when inputs are (N, C, L)
        self._folds = _folds_that_agree(self.model, probe)
        self._one_point, self._loaded = _OnePoint(self.model), False

    def points_per_call_candidates(self) -> tuple | None:
        """The points per call worth timing (None: the default sizes). On a CPU a model with
        convolutions runs one point per call: under vmap its convolutions become grouped ones, several
        times slower per point there (cnn1d, resnet20, measured), and timing K > 1 would cost more
        than a few points (a minute for resnet20)."""
        if self.device.type == "cpu" and any(isinstance(m, _ConvNd) for m in self.model.modules()):
            return (1,)
        return None

    # ------------------------------------------------------------------------------------------
    def _elements_per_sample(self, probe) -> dict:
        """Values per channel per sample that each BatchNorm layer sees (the L of (N, C, L)); also
        finds the BatchNorm layer that runs last, after which a recompute pass can stop (none when a
        layer runs more than once per forward)."""
        counts, rows, hooks, order = {}, {}, [], []

        def seen(mod, args, name):
            counts[name] = args[0][0].numel() // args[0].shape[1]
            rows[name] = args[0].shape[0]
            order.append(name)

        for name, m in self.bn_layers.items():
            hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: seen(mod, args, name)))
        try:
            with torch.no_grad():
                args, kwargs = model_args(probe)
                self.model(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        self._last_bn = order[-1] if order and len(order) == len(set(order)) else None
        size = batch_size_of(probe)
        folded = [name for name, n in rows.items() if n != size]
        if folded and self.bn.policy == "recompute":
            # the batched recompute splits a BatchNorm input into batches along dimension 0
            raise ConfigError(f"BatchNorm layer {folded[0]!r} does not see one row per sample ({size} samples "
                              f"gave {rows[folded[0]]} rows), so its statistics cannot be recomputed; "
                              "use --bn stored or --bn interpolate")
        return counts

    def _split(self, params: torch.Tensor, buffers: torch.Tensor, batched: bool):
        if not batched:
            params, buffers = params[0], buffers[0]
        p = self.layout.split_params(params)
        # every buffer its own contiguous tensor: vmap's batch-norm rule reshapes batched running
        # statistics, which copies a strided view, and the in-place update would be lost
        b = {k: t.clone(memory_format=torch.contiguous_format) for k, t in self.layout.split_buffers(buffers).items()}
        return p, b

    @contextlib.contextmanager
    def conv1d_as_2d(self):
        """For work on ``self.model`` outside the evaluator (Hessian-vector products, one point at a
        time): while the block runs, the model's 1-D convolutions run as 2-D ones of height 1 on
        channels-last memory, as in the evaluator's one-point forward; yields the function that gives
        an input batch that memory. The identity, and nothing switched, where the evaluator does not
        (GPUs, models without Conv1d, a model whose outputs differ so). Images keep their plain layout
        here: a resnet20 Hessian-vector product gains nothing measurable from channels-last memory.

        Example::

            with ev.conv1d_as_2d() as memory:
                loss = F.cross_entropy(ev.model(memory(x)), y)
        """
        if not (self._channels_last and self._layers_1d):
            yield lambda x: x
            return
        with self._layers_channels_last(True):
            yield _channels_last

    def _layers_channels_last(self, on: bool, folds=()):
        """For one forward: the model's 1-D layers on channels-last memory (if ``on``; nothing to do
        for 2-D layers, which take channels-last inputs as they are), and ``folds`` folded."""
        return _one_dimensional_channels_last(self._layers_1d if on else [], folds)

    def _forward(self, p: dict, b: dict, batch, batched: bool):
        """The model's output for ``batch`` at the K points, every tensor with a leading K."""
        args, kwargs = model_args(batch)
        channels_last = self._channels_last and not batched
        if channels_last:
            args = (_channels_last(args[0]),) + tuple(args[1:])
        if self._loaded and not batched:  # the point's tensors are in the model already
            call = lambda p_, b_: output_tree(self.model(*args, **kwargs))  # noqa: E731
        else:
            call = lambda p_, b_: output_tree(functional_call(self.model, (p_, b_), args, kwargs))  # noqa: E731
        if batched and self._vmap_model:
            try:
                return vmap(call, in_dims=(0, 0))(p, b)
            except RuntimeError as e:  # e.g. a GRU: vmap has no batching rule for it
                if not _cannot_vmap(e):
                    raise
                self._vmap_model = False
                warnings.warn(f"vmap cannot batch this model ({str(e).splitlines()[0][:120]}); its points run one "
                              "call each, with the same values")
        if batched:
            return self._forward_each(p, b, batch)
        with self._layers_channels_last(channels_last, self._folds):
            return tree_map(lambda t: t[None], call(p, b))

    def _forward_each(self, p: dict, b: dict, batch):
        """:meth:`_forward` of the K points one call each, the calls of K = 1 (a model vmap cannot
        batch). The recompute pass's statistics go to ``b`` through views; it ends after every point."""
        outputs, done = [], None
        for k in range(len(next(iter(b.values()), next(iter(p.values()))))):
            try:
                outputs.append(self._forward({n: t[k] for n, t in p.items()}, {n: t[k] for n, t in b.items()},
                                             batch, batched=False))
            except _PassDone as e:
                done = e
        if done is not None:
            raise done
        return tree_map(lambda *ts: torch.cat(ts), *outputs)

    def _bn_calls(self):
        """The recompute pass as (batch, BatchNorm batch size) calls. In memory: consecutive batches
        of equal size (those of :func:`batch_slices`) stacked up to about ``batch_size`` samples a
        call; from a data source: each of its training batches, one BatchNorm batch, a batch of one
        sample joined to its neighbour where a BatchNorm layer sees one value per channel of a sample
        (as :func:`batch_slices` does: that batch's variance would be 0 / 0)."""
        if not torch.is_tensor(self.x_bn):
            held, alone = None, min(self._per_sample.values(), default=2) > 1  # (a sequence's L values: fine)
            for batch in self.x_bn.batches("train", None, self.device):
                if held is not None and not alone and 1 in (batch_size_of(held), batch_size_of(batch)):
                    held = _joined(held, batch)
                    continue
                if held is not None:
                    yield held, batch_size_of(held)
                held = batch
            if held is not None:
                yield held, batch_size_of(held)
            return
        batches, calls, i = batch_slices(len(self.x_bn), self.bn.batch_size), [], 0
        per_call = max(1, self.batch_size // self.bn.batch_size)
        while i < len(batches):
            size, j = batches[i].stop - batches[i].start, i
            while j < len(batches) and j - i < per_call and batches[j].stop - batches[j].start == size:
                j += 1
            calls.append((slice(batches[i].start, batches[j - 1].stop), size))
            i = j
        for sl, size in calls:
            yield (self.x_bn[sl],), size

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
        for name, m in self.bn_layers.items():
            m.train()
            m.forward = types.MethodType(stacked_batch_norm, m)
            m.last_of_pass = name == self._last_bn
        try:
            for batch, group in self._bn_calls():
                for m in self.bn_layers.values():
                    m.stacked_batch = group
                try:
                    self._forward(p, b, batch, batched)
                except _PassDone:
                    pass
                n = batch_size_of(batch)
                for name, merger in mergers.items():
                    merger.add(n * self._per_sample[name], b[f"{name}.running_mean"], b[f"{name}.running_var"])
        finally:
            for m in self.bn_layers.values():
                m.eval()
                del m.forward
                m.last_of_pass = False
        for name, merger in mergers.items():  # in place: the model may hold these very tensors
            mean, var = merger.result()
            b[f"{name}.running_mean"].copy_(mean)
            b[f"{name}.running_var"].copy_(var)

    @torch.no_grad()
    def __call__(self, params: torch.Tensor, buffers: torch.Tensor) -> dict:
        """Metrics of the K points: name -> (K,) float64 numpy array."""
        K = params.shape[0]
        batched = K > 1
        p, b = self._split(params, buffers, batched)
        if batched:
            return self._evaluate(p, b, params, batched)
        # one point: the model holds its tensors for all its passes, swapped in once, not at every forward
        # (a third of a small model's time, which also held the GIL, so the CPU's workers did not scale)
        tensors = {f"model.{name}": t for name, t in (*p.items(), *b.items())}
        self._loaded = True
        try:
            return functional_call(self._one_point, tensors, (lambda: self._evaluate(p, b, params, batched),))
        finally:
            self._loaded = False

    def _evaluate(self, p: dict, b: dict, params: torch.Tensor, batched: bool) -> dict:
        K = params.shape[0]
        if self.bn.policy == "recompute":
            self._recompute(p, b, batched)
        elif self.bn.policy == "interpolate":
            for name in self.var_names:
                b[name].clamp_min_(0.0)
        out = {}
        for split in ("train", "test"):
            sums = MetricSums(self.task, K, self.device)
            for batch in self._batches(split):
                output = self._forward(p, b, batch, batched)
                sums.add(self._evaluate_points(output, batch, K))
            out.update(sums.result(split, self.data.population(split) if self.stderr else None))
        if self.weight_decay is not None:
            sq = params.double().pow(2).sum(1).cpu().numpy()
            out["train_loss_l2"] = out["train_loss"] + 0.5 * self.weight_decay * sq
        return out

    def _batches(self, split: str):
        """The split's batches on the device. A streamed batch's class labels still on the host are
        checked against the model's logits first (in memory, a whole split was checked at the start):
        past them, they would fail deep inside the pass, and on a GPU stop the process. The check
        makes no one wait for the device."""
        if self._label_width is None:
            yield from self.data.batches(split, self.batch_size, self.device)
            return
        width = self._label_width
        for i, batch in enumerate(self.data.batches(split, self.batch_size)):
            y = targets_of(batch)
            if torch.is_tensor(y) and y.device.type == "cpu":
                _check_label_range(self.task, y, width, f"the {split} labels of batch {i}")
            yield to_device(batch, self.device)

    def _evaluate_points(self, output, batch, K: int) -> Evaluation:
        """The K points' per-sample values, each a (K, n) tensor: for a ``row_wise`` task (the built-in
        ones: sample i's values depend on its own logits and target only) one call on the K * n rows;
        else one vmapped call where the task allows, else one call per point (a task vmap cannot
        batch, e.g. one that reads values with ``.item()``)."""
        def fields(e: Evaluation) -> tuple:
            counts = e.counts if e.counts is not None else torch.ones_like(e.losses, dtype=torch.float64)
            return e.losses, e.metrics, counts
        if K > 1 and getattr(self.task, "row_wise", False):  # the K points' outputs scored as K * n samples
            n = batch_size_of(batch)
            logits = logits_of(output)
            e = self.task.evaluate(logits.reshape(K * n, *logits.shape[2:]), repeat_targets(batch, K))
            split = lambda t: None if t is None else t.reshape(K, n)  # noqa: E731
            return Evaluation(split(e.losses), {m: split(v) for m, v in e.metrics.items()}, split(e.counts))
        if K > 1 and self._vmap_task:
            try:
                return Evaluation(*vmap(lambda o: fields(self.task.evaluate(o, batch)))(output))
            except Exception:
                self._vmap_task = False
        parts = [fields(self.task.evaluate(tree_map(lambda t: t[k], output), batch)) for k in range(K)]
        return Evaluation(torch.stack([p[0] for p in parts]), {m: torch.stack([p[1][m] for p in parts])
                                                               for m in parts[0][1]}, torch.stack([p[2] for p in parts]))


def _cannot_vmap(e: RuntimeError) -> bool:
    """Whether ``e`` is vmap's own refusal (no batching rule, data-dependent Python), not a failure
    that would recur one point at a time (such as running out of memory)."""
    text = str(e).lower()
    return ("batching rule" in text or "vmap" in text) and "out of memory" not in text


def check_task_fits(model, data, device):
    """Two samples of each split through the model (in eval mode) and the data's task, before any long
    work: a task that does not fit the model's outputs, data of the wrong shapes, a metric of the
    wrong length, a split without batches or (in memory) a class label past the model's logits is
    refused in one line. Returns the training probe batch."""
    _check_float32(model)
    probes = {}
    for split in ("train", "test"):
        if isinstance(data, Data):
            first = (getattr(data, f"x_{split}")[:2], getattr(data, f"y_{split}")[:2])
        else:
            first = next(iter(data.batches(split)), None)
            if first is None:
                raise DataError(f"the {split} data yields no batches")
        batch = to_device(take(first, slice(0, 2)), device)
        args, kwargs = model_args(batch)
        was_training = model.training
        try:
            with torch.no_grad():
                output = output_tree(model.eval()(*args, **kwargs))
        except Exception as e:
            raise DataError(f"the model cannot take a batch of the {split} data ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
        finally:
            model.train(was_training)
        _check_labels(data.task, lambda: getattr(data, f"y_{split}") if isinstance(data, Data) else targets_of(batch),
                      output, split)
        check_evaluation(data.task, data.task.evaluate(output, batch), batch_size_of(batch))
        probes[split] = batch
    return probes["train"]


def _check_float32(model) -> None:
    """Weights move as float32 vectors (planes, files, Hessian products): a model of another float
    type would meet them, and its data, in another type deep inside a pass."""
    other = next(((n, p.dtype) for n, p in model.named_parameters() if p.dtype != torch.float32), None)
    if other is not None:
        raise ModelError(f"the model's parameter {other[0]} is {str(other[1]).replace('torch.', '')}; landscape "
                         "evaluates float32 models (give it model.float(), and float32 inputs)")


def _check_labels(task, labels, output, split: str) -> None:
    """Class labels (classification, language model; ``labels()``: a whole split in memory, else the
    probe's) within the model's logits: a label past them would fail deep inside a pass (on a GPU,
    stop the process)."""
    width = _logits_width(task, lambda: output)
    if width is not None:
        _check_label_range(task, labels(), width, f"the {split} labels")


def _check_label_range(task, y, width: int, what: str) -> None:
    """Refuse class labels ``y`` (``what``: "the test labels") outside 0 to ``width`` - 1; targets that
    are no class labels pass (the task's own check names what does not fit)."""
    if not torch.is_tensor(y) or y.is_floating_point() or not y.numel():
        return
    if isinstance(task, LanguageModel):  # left-out labels read as 0, without a copy of the kept ones
        y = torch.where(y == task.ignore_index, 0, y)
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= width:
        raise DataError(f"{what} run from {low} to {high}, but the model gives {width} logits (labels 0 to "
                        f"{width - 1})")


def _logits_width(task, output) -> int | None:
    """How many logits the class labels of ``task`` index (classification, language model; ``output()``:
    the model's output, asked for only then: another task's output may have no logits), else None."""
    if not isinstance(task, (Classification, LanguageModel)):
        return None
    logits = logits_of(output())
    return logits.shape[-1] if torch.is_tensor(logits) and logits.ndim >= 2 else None


def _label_width(task, model, probe) -> int | None:
    """:func:`_logits_width` of ``model``'s output for the ``probe`` batch."""
    args, kwargs = model_args(probe)

    def output():
        with torch.no_grad():
            return output_tree(model(*args, **kwargs))
    return _logits_width(task, output)


class MetricSums:
    """Running sums of a task's per-sample values for K points, in float64, and the split's values
    from them: each metric is sum(values) / sum(counts), and, given the population size N the samples
    were drawn from (without replacement), its standard error over samples (the ratio estimator's,
    with the finite-population factor sqrt(1 - n/N); the plain standard error of the mean when counts
    are 1). A point whose loss is not finite gets NaN metrics (an argmax of NaN logits means nothing)."""

    def __init__(self, task, K: int, device):
        self.task, self.n = task, 0
        zeros = lambda: torch.zeros(K, dtype=torch.float64, device=device)  # noqa: E731
        self.names = ("loss",) + tuple(task.metrics)
        self.sum = {m: zeros() for m in self.names}
        self.sq = {m: zeros() for m in self.names}       # sum of value^2
        self.cross = {m: zeros() for m in self.names}    # sum of value * count
        self.count, self.count_sq = zeros(), zeros()

    def add(self, e: Evaluation) -> None:
        """One batch: the K points' values as (K, n) tensors (counts (K, n) or None: one each)."""
        c = torch.ones_like(e.losses, dtype=torch.float64) if e.counts is None else e.counts.double()   # (K, n)
        self.n += c.shape[1]
        self.count += c.sum(1)
        self.count_sq += c.square().sum(1)
        for m in self.names:
            v = (e.losses if m == "loss" else e.metrics[m]).double()
            self.sum[m] += v.sum(1)
            self.sq[m] += v.square().sum(1)
            self.cross[m] += (v * c).sum(1)

    def result(self, split: str, population: int | None = None) -> dict:
        """``{split}_{metric}`` -> (K,) numpy arrays; with ``population`` also ``{split}_{metric}_se``."""
        if self.n == 0:
            raise DataError(f"the {split} data yielded no samples")
        mean = {m: self.sum[m] / self.count for m in self.names}
        bad = ~torch.isfinite(mean["loss"])
        out = {f"{split}_{m}": torch.where(bad & (m != "loss"), float("nan"), v) for m, v in mean.items()}
        if population is not None:
            for m in self.names:
                out[f"{split}_{m}_se"] = self._stderr(m, mean[m], population)
        out = {k: v.cpu().numpy() for k, v in out.items()}
        for name in getattr(self.task, "derived", ()):
            values = [self.task.derive({m: float(v[i]) for m, v in mean.items()})[name] for i in range(len(bad))]
            out[f"{split}_{name}"] = np.asarray(values, dtype=np.float64)
        return out

    def _stderr(self, m: str, mean: torch.Tensor, population: int) -> torch.Tensor:
        if not getattr(self.task, "per_sample", True):  # batch means given to every sample: no spread over samples
            return torch.full_like(mean, float("nan"))
        n = self.n
        resid = self.sq[m] - 2 * mean * self.cross[m] + mean.square() * self.count_sq    # sum (v - mean c)^2
        fpc = max(0.0, 1.0 - n / population)
        return (resid.clamp_min(0) * n / max(n - 1, 1) * fpc).sqrt() / self.count


@torch.inference_mode()
def evaluate_model(model, data, batch_size: int = 1000) -> dict:
    """Train and test loss and the task's metrics (``data.task``; classification: mean cross-entropy
    and error in %) of one model in eval mode, sums in float64: the one evaluation of single models
    (training, the recorder, the importer). Agrees with :class:`Evaluator` at the same weights, and
    like it gives a CPU model with convolutions its inputs channels-last where the outputs stay the
    same (:func:`channels_last_layers`, decided once per model).

    Example::

        evaluate_model(net, as_data((x, y, x_test, y_test)))   # {"train_loss": ..., "test_err": ...}
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else data.device
    if torch.device(device).type == "cpu":
        keep_freed_memory()  # as the evaluator: without it every batch page-faults its memory in again
    task, out = data.task, {}
    for split in ("train", "test"):
        sums = MetricSums(task, 1, device)
        for batch in data.batches(split, batch_size, device):
            args, kwargs = model_args(batch)
            layers = _channels_last_of(model, batch, device)
            if layers is not None:
                args = (_channels_last(args[0]),) + tuple(args[1:])
            with _one_dimensional_channels_last(layers or []):
                e = task.evaluate(output_tree(model(*args, **kwargs)), batch)
            sums.add(Evaluation(e.losses[None], {m: v[None] for m, v in e.metrics.items()},
                                None if e.counts is None else e.counts[None]))
        out.update({k: float(v[0]) for k, v in sums.result(split).items()})
    model.train(was_training)
    return out


# model -> (device type, input dimensions, its channels_last_layers): decided once per model
_CHANNELS_LAST = weakref.WeakKeyDictionary()


def _channels_last_of(model, batch, device) -> list | None:
    args, _ = model_args(batch)
    key = (torch.device(device).type, args[0].dim() if args and torch.is_tensor(args[0]) else None)
    known = _CHANNELS_LAST.get(model)
    if known is None or known[:2] != key:
        known = key + (channels_last_layers(model, take(batch, slice(0, 2)), device),)
        _CHANNELS_LAST[model] = known
    return known[2]


def choose_points_per_call(call, available: int, device, candidates=None, budget_s: float = 1.0,
                           report=None, workers: int = 1) -> tuple:
    """The number of points per call with the highest throughput, from timing real work: ``call(k)``
    must evaluate the next ``k`` points still to do on each of ``workers`` workers at once (and keep
    their values), so the measurement costs nothing but running a few calls at a slower size. Each
    candidate K = 1, 2, 4, ... runs twice (the first call at a new size builds kernels) and the second
    call is timed. It stops after two sizes in a row that are no faster than the best, when points or
    ``budget_s`` run out, or on out-of-memory. (A model with convolutions on a CPU has only K = 1 to
    try: :meth:`Evaluator.points_per_call_candidates`.)
    Returns (the best K, how many points ``call`` evaluated)."""
    device = torch.device(device)
    if candidates is None:
        candidates = (1, 2, 4, 8, 16, 32) if device.type == "cpu" else (1, 2, 4, 8, 16, 32, 64, 128, 256)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best_k, best_rate, used, slower, start = 1, 0.0, 0, 0, time.perf_counter()
    for k in candidates:
        if used + 2 * k * workers > available:
            break
        try:
            call(k)
            sync()
            t0 = time.perf_counter()
            call(k)
            sync()
            dt = max(time.perf_counter() - t0, 1e-9)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        used += 2 * k * workers
        rate = k * workers / dt
        if report is not None:
            report(k, rate)
        if rate > best_rate:
            best_k, best_rate, slower = k, rate, 0
        else:
            slower += 1
            if slower == 2:
                break
        if time.perf_counter() - start > budget_s:
            break
    return best_k, used
