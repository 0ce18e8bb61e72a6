"""Filter Grafting (Meng, Zhao, Ding, Chen, Ni, Wang, Shen, Dai, Dong 2020, "Filter Grafting for
Deep Neural Networks", CVPR; reference code fxmeng/filter-grafting, grafting_cifar/grafting.py).

N networks train side by side with different hyperparameters. After every epoch, network i receives
from network i-1 (net 0 from net N-1, a ring), all from their weights before this round: for every
layer l, with H the entropy of a 10-bin histogram of the layer's weights,

    w = A / pi * arctan(c (H_own - H_other)) + 0.5        (A = 0.4, c = 500)
    new = w * own + (1 - w) * other

so the layer with more information (higher entropy) keeps more of itself. A *layer* is a weight
tensor with at least two dimensions (a convolution's filters, a linear layer's matrix); the
one-dimensional parameters after it (its bias, the BatchNorm that follows) are mixed with the same w,
as the reference does with its stale w. BatchNorm statistics are recomputed on the training set after
a graft (the reference mixes the running buffers instead).

Hyperparameters that differ (``grafting_vary``): ``lr``, the reference's rule
lr_i = lr (1 + cos(pi (N - 1 - i) / N)) / 2 (N = 2: 0.5 lr and lr), one initialization and data
order; ``seed``: the same lr, net i initialized and shuffled from its own seed (net 0 from the shared
ones); ``both``: the two together, as the reference's separate processes do.

Runs: ``grafting/net<i>``: row 0 the initialization, then two rows per epoch at the same epoch value,
the trained network (``grafted`` 0) and the grafted one (``grafted`` 1). Every row has ``entropy``
(T, L), the entropy of each layer of that row's weights; grafted rows also have ``donor_entropy`` (the
donor's entropies that entered the rule) and ``graft_weight`` (w per layer), NaN elsewhere. The run
attrs name the layers (``layers``) and the parameters mixed with each (``groups``).
``grafting/baseline<i>`` (with ``grafting_baseline``): the same networks trained without grafting,
one row per epoch, with ``entropy``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..bn import has_batchnorm, recompute_bn
from ..config import MethodOptions, option
from ..device import gpus_of
from ..models import build_model
from .loop import Context, register_method, set_lr, sgd_optimizer, swa_schedule, train_epoch

BINS = 10
NET_OFFSET = 20_000  # data order of net i >= 1 in seed mode: ctx.generator(NET_OFFSET + i)


def lr_factors(n: int) -> list:
    """The reference's learning-rate factors, (1 + cos(pi (n - 1 - i) / n)) / 2 for i = 0..n-1."""
    return [(1.0 + math.cos(math.pi * (n - 1 - i) / n)) / 2.0 for i in range(n)]


def entropy(x: torch.Tensor, bins: int = BINS) -> float:
    """Entropy (natural log) of the histogram of ``x`` over ``bins`` equal bins from its min to its max
    (the max in the last bin); 0 when all values are equal."""
    x = x.detach().reshape(-1).double()
    lo, hi = x.min(), x.max()
    if not hi > lo:
        return 0.0
    idx = ((x - lo) / (hi - lo) * bins).floor().clamp_(0, bins - 1).long()
    p = torch.bincount(idx, minlength=bins).double() / x.numel()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def graft_weight(h_own: float, h_other: float, a: float = 0.4, c: float = 500.0) -> float:
    """w = a / pi * arctan(c (h_own - h_other)) + 0.5, the share a layer keeps of itself."""
    return a / math.pi * math.atan(c * (h_own - h_other)) + 0.5


def layer_groups(model) -> list:
    """[(layer name, index of its weight, [indices of the parameters mixed with its w])] in
    ``named_parameters`` order. Parameters before the first layer join the first layer; a model
    without any weight of two or more dimensions has one layer per parameter."""
    named = list(model.named_parameters())
    groups, leading = [], []
    for i, (name, p) in enumerate(named):
        if p.dim() >= 2:
            groups.append((name, i, leading + [i]))
            leading = []
        elif groups:
            groups[-1][2].append(i)
        else:
            leading.append(i)
    if not groups:
        return [(name, i, [i]) for i, (name, _) in enumerate(named)]
    return groups


def layer_entropies(model, groups, bins: int = BINS) -> list:
    params = list(model.parameters())
    return [entropy(params[w], bins) for _, w, _ in groups]


@torch.no_grad()
def graft(models: list, groups: list, a: float, c: float, bins: int = BINS) -> tuple:
    """One round: net i receives from net i-1, everything computed from the weights before the round.
    Returns (own entropies, donor entropies, weights), each a list of N lists of L floats."""
    n = len(models)
    before = [[p.detach().clone() for p in m.parameters()] for m in models]
    h = [[entropy(ps[w], bins) for _, w, _ in groups] for ps in before]
    donor_h, weights = [], []
    for i, model in enumerate(models):
        d = (i - 1) % n
        params = list(model.parameters())
        ws = []
        for layer, (_, _, members) in enumerate(groups):
            w = graft_weight(h[i][layer], h[d][layer], a, c)
            for j in members:
                params[j].copy_(before[i][j] * w + before[d][j] * (1.0 - w))
            ws.append(w)
        donor_h.append(h[d])
        weights.append(ws)
    return h, donor_h, weights


@dataclass(frozen=True)
class GraftingOptions(MethodOptions, prefix="grafting", title="grafting (Meng et al. 2020)"):
    nets: int = option(2, "N networks in a ring; net i receives from net i-1 after every epoch", at_least=2)
    vary: str = option("lr", "what differs between the nets: learning rate (the reference's rule), seed, "
                             "or both", choices=("lr", "seed", "both"))
    a: float = option(0.4, "A in w = A/pi arctan(c (H_own - H_other)) + 0.5; in (0, 1] so that w stays "
                           "in [0, 1]", above=0, at_most=1)
    c: float = option(500.0, "c in the same rule", above=0)
    baseline: bool = option(True, "also train the same nets without grafting (runs grafting/baseline<i>)")


def _nets(ctx: Context) -> list:
    """(model, data-order generator, lr factor, description) of every net, from the configuration."""
    cfg, grafting = ctx.config, ctx.config.options_of(GraftingOptions)
    n = grafting.nets
    factors = lr_factors(n) if grafting.vary in ("lr", "both") else [1.0] * n
    nets = []
    for i in range(n):
        if grafting.vary == "lr" or i == 0:
            model, gen, init = ctx.fresh_model(), ctx.generator(0), "shared initialization and data order"
        else:
            seed = cfg.seed * 1_000_003 + NET_OFFSET + i
            with torch.random.fork_rng(devices=gpus_of(ctx.device)):  # (restored after: CPU and training GPU)
                torch.manual_seed(seed)
                model = build_model(cfg.model, ctx.data.input_shape, ctx.data.num_classes).to(ctx.device)
            gen, init = ctx.generator(NET_OFFSET + i), f"initialization and data order from seed {seed}"
        nets.append((model, gen, factors[i], init))
    return nets


def _train_nets(ctx: Context, prefix: str, grafting: bool) -> None:
    cfg, options = ctx.config, ctx.config.options_of(GraftingOptions)
    nets = _nets(ctx)
    models = [m for m, _, _, _ in nets]
    opts = [sgd_optimizer(m, cfg, cfg.lr * f) for m, _, f, _ in nets]
    groups = layer_groups(models[0])
    L = len(groups)
    nan = [float("nan")] * L
    per_epoch = ctx.steps_per_epoch()
    bn = has_batchnorm(models[0])
    runs = [f"{prefix}{i}" for i in range(len(nets))]
    state = {f"{what}{i}": obj for i, (model, gen, _, _) in enumerate(nets)
             for what, obj in (("model", model), ("opt", opts[i]), ("gen", gen))}
    start = ctx.resume_point(prefix, ticks_per_epoch=len(nets), **state)
    for i, (model, _, factor, init) in enumerate(nets):
        if start == 0:
            extra = dict(grafted=0, donor_entropy=nan, graft_weight=nan) if grafting else {}
            ctx.record(runs[i], model, 0.0, 0, lr=cfg.lr * factor, entropy=layer_entropies(model, groups), **extra)
        attrs = dict(layers=[name for name, _, _ in groups],
                     groups=[[ctx.layout.params[j].name for j in members] for _, _, members in groups],
                     lr=cfg.lr * factor, lr_factor=factor, init=init, vary=options.vary, bins=BINS)
        if grafting:
            attrs.update(donor=runs[(i - 1) % len(nets)], A=options.a, c=options.c,
                         rows="row 0: initialization; per epoch two rows: trained (grafted 0), grafted (grafted 1)")
        ctx.writer.set_attrs(runs[i], **attrs)
    for epoch in range(start, cfg.epochs):
        factor_t = swa_schedule(epoch, cfg.epochs, cfg.lr_ratio)
        for (model, gen, factor, _), opt in zip(nets, opts):
            set_lr(opt, cfg.lr * factor * factor_t)
            train_epoch(model, opt, ctx.data, cfg.batch_size, gen)
            ctx.tick()
        step = (epoch + 1) * per_epoch
        for i, (model, _, factor, _) in enumerate(nets):
            extra = dict(grafted=0, donor_entropy=nan, graft_weight=nan) if grafting else {}
            ctx.record(runs[i], model, epoch + 1.0, step, lr=cfg.lr * factor * factor_t,
                       entropy=layer_entropies(model, groups), **extra)
        if grafting:
            _, donor_h, weights = graft(models, groups, options.a, options.c)
            for i, (model, _, factor, _) in enumerate(nets):
                if bn:
                    recompute_bn(model, ctx.data.x_train, cfg.eval_batch_size)
                ctx.record(runs[i], model, epoch + 1.0, step, lr=cfg.lr * factor * factor_t, grafted=1,
                           entropy=layer_entropies(model, groups), donor_entropy=donor_h[i],
                           graft_weight=weights[i])
        ctx.epoch_done(prefix, epoch + 1, **state)


def grafting_ticks(config) -> int:
    grafting = config.options_of(GraftingOptions)
    return config.epochs * grafting.nets * (2 if grafting.baseline else 1)


@register_method("grafting", ticks=grafting_ticks)
def run_grafting(ctx: Context) -> None:
    """``grafting/net<i>`` and, with ``grafting_baseline``, ``grafting/baseline<i>``."""
    _train_nets(ctx, "grafting/net", grafting=True)
    if ctx.config.options_of(GraftingOptions).baseline:
        _train_nets(ctx, "grafting/baseline", grafting=False)
