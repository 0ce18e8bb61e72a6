"""BatchNorm statistics recomputed on the training set, every *sample* weighted equally.

``torch.optim.swa_utils.update_bn`` weights every batch equally (momentum=None averages the per-batch
statistics), so a short last batch counts as much as a full one, and averaging per-batch variances
misses the spread of the batch means. Here each forward pass runs with momentum 1.0, so the running
buffers hold exactly that batch's mean and unbiased variance; we read them after every batch and merge
them in float64 with Chan's parallel-variance formula. The result is the mean and unbiased variance
over the whole training set at once (for a BatchNorm layer whose input does not depend on an earlier
BatchNorm layer this is exact; deeper layers see activations normalized with batch statistics, as in
every train-mode pass).

The same merge is used by the batched evaluator, which reads the buffers of many points at once.

Example::

    recompute_bn(model, data.x_train, batch_size=500)
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())


def batch_slices(n: int, batch_size: int) -> list:
    """Contiguous slices covering range(n); a last batch of one sample is merged into the one before
    (train-mode BatchNorm cannot take a batch of one)."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    ends = starts[1:] + [n]
    return [slice(a, b) for a, b in zip(starts, ends)]


class MomentMerger:
    """Merge per-batch (count, mean, unbiased var) into whole-set statistics, in float64.

    Works on tensors of any shape (a leading batch-of-points dimension included)."""

    def __init__(self):
        self.n = 0.0
        self.mean = None
        self.m2 = None  # sum of squared deviations

    def add(self, count: float, mean: torch.Tensor, var_unbiased: torch.Tensor) -> None:
        mean = mean.double()
        m2 = var_unbiased.double() * (count - 1)
        if self.mean is None:
            self.n, self.mean, self.m2 = float(count), mean, m2
            return
        n = self.n + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / n)
        self.m2 = self.m2 + m2 + delta * delta * (self.n * count / n)
        self.n = n

    def result(self):
        """(mean, unbiased variance)."""
        return self.mean, self.m2 / (self.n - 1)


@torch.no_grad()
def recompute_bn(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> nn.Module:
    """Reset and recompute the running statistics of every BatchNorm layer of ``model`` from ``x``."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return model
    was_training = model.training
    momenta = {bn: bn.momentum for bn in bns}
    counts = {}

    def count_hook(module, args):
        inp = args[0]
        counts[module] = inp.numel() // inp.shape[1]  # elements per channel in this batch

    hooks = [bn.register_forward_pre_hook(count_hook) for bn in bns]
    mergers = {bn: MomentMerger() for bn in bns}
    try:
        model.eval()  # only BatchNorm in train mode: Dropout off, as in the evaluator's recompute
        for bn in bns:
            bn.train()
            bn.reset_running_stats()
            bn.momentum = 1.0
        batches = batch_slices(len(x), batch_size)
        for sl in batches:
            model(x[sl])
            for bn in bns:
                mergers[bn].add(counts[bn], bn.running_mean, bn.running_var)
        for bn in bns:
            mean, var = mergers[bn].result()
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.num_batches_tracked.fill_(len(batches))
    finally:
        for h in hooks:
            h.remove()
        for bn, mom in momenta.items():
            bn.momentum = mom
        model.train(was_training)
    return model
