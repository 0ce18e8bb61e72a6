"""SGD, SWA and an exponential moving average of SGD (SWA: Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima and Better
Generalization"; schedule and averaging as in the authors' train.py).

The three are momentum SGD from the shared initialization and data order that differ only in their
learning rates and in what they record, so trained together they share their steps while their
learning rates agree: ema *is* sgd's iterates, and with the defaults swa takes sgd's first 76 of 150
epochs. Each run's numbers are still those of the method trained alone (tested); only steps that are
the same bit for bit are shared."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..config import MethodOptions, option
from ..device import gpus_of, random_state, set_random_state
from ..errors import ConfigError, FileFormatError
from .loop import Context, part_name, register_method, set_lr, sgd_optimizer, swa_schedule, train_epoch


@dataclass(frozen=True)
class SWAOptions(MethodOptions, prefix="swa", title="swa (Izmailov et al. 2018)"):
    start: int | None = option(None, "first averaged epoch (default: 2/3 of --epochs)")
    lr: float = option(0.1, "learning rate while averaging (reached at 0.9 x --swa-start)", above=0)
    c: int = option(1, "average every c epochs", at_least=1)

    def resolved(self, config):  # the library's default is the command line's: 2/3 of the budget
        return self if self.start is not None else replace(self, start=max(1, round(config.epochs * 2 / 3)))

    def check(self, config):
        super().check(config)
        if "swa" in config.methods and not 1 <= self.start <= config.epochs:
            raise ConfigError(f"swa_start must be between 1 and epochs ({config.epochs}), got {self.start}")


@dataclass(frozen=True)
class EMAOptions(MethodOptions, prefix="ema", title="ema (an exponential moving average of SGD)"):
    decay: float = option(0.999, "w_ema <- d w_ema + (1 - d) w after every SGD step", above=0, below=1)


class SGDRun:
    """What one of these methods adds to momentum SGD: its learning rate at an epoch, what it does
    before the first epoch, after every step and after every epoch, and the state it carries."""
    name: str

    def __init__(self, ctx: Context):
        self.ctx, self.cfg = ctx, ctx.config

    def lr(self, epoch: int) -> float:
        raise NotImplementedError

    def begin(self, model) -> None:
        pass

    def on_step(self, model, epoch: int):
        """A callback ``f(step_in_epoch)`` for the steps of ``epoch``, or None."""
        return None

    def end_epoch(self, model, epoch: int, evaluated: dict) -> None:
        """``evaluated``: metrics of ``model`` at this epoch's end that another run has recorded."""

    def state(self) -> dict:
        return {}


SHARED: dict = {}  # method name -> its SGDRun class


def shared_method(name: str):
    """Register an :class:`SGDRun` class as the method ``name``, trained together with the others of
    :data:`SHARED` it is asked for with (a method of your own too)."""
    def deco(cls):
        cls.name = name
        SHARED[name] = cls
        register_method(name, together=_train_together)(partial(_train_together, names=(name,)))
        return cls
    return deco


def _train_together(ctx: Context, names: tuple) -> None:  # one function for all: it makes them one job
    train_shared(ctx, names)


@shared_method("sgd")
class SGD(SGDRun):
    """Momentum SGD, lr factor 1 -> lr_ratio over the budget; run ``sgd``, one row per epoch (row 0
    is the initialization)."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.step = [0]

    def lr(self, epoch):
        return self.cfg.lr * swa_schedule(epoch, self.cfg.epochs, self.cfg.lr_ratio)

    def begin(self, model):
        self.ctx.record("sgd", model, 0.0, 0)

    def on_step(self, model, epoch):
        return self.ctx.step_recorder("sgd", model, epoch, self.step)

    def end_epoch(self, model, epoch, evaluated):
        evaluated["sgd"] = self.ctx.record("sgd", model, epoch + 1.0, self.step[0])

    def state(self):
        return dict(step=self.step)


@shared_method("swa")
class SWA(SGDRun):
    """SWA: the schedule with t = epoch / swa_start and ratio swa_lr / lr; from epoch swa_start on,
    every swa_c epochs, the iterate is recorded in ``swa/iterates`` and folded into the running
    average (torch.optim.swa_utils.AveragedModel: w <- w n/(n+1) + w_i/(n+1)), whose BatchNorm
    statistics are recomputed sample-weighted before it is recorded in ``swa/average``."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.swa = self.cfg.options_of(SWAOptions)
        self.average = AveragedModel(ctx.fresh_model(), use_buffers=False)  # buffers are recomputed, not averaged

    def lr(self, epoch):
        return self.cfg.lr * swa_schedule(epoch, self.swa.start, self.swa.lr / self.cfg.lr)

    def end_epoch(self, model, epoch, evaluated):
        if epoch + 1 >= self.swa.start and (epoch + 1 - self.swa.start) % self.swa.c == 0:
            step = (epoch + 1) * self.ctx.steps_per_epoch()
            # the averaging window is recorded densely: the average is the mean of the recorded iterates
            self.ctx.record("swa/iterates", model, epoch + 1.0, step, keep=True)
            self.average.update_parameters(model)
            self.ctx.record("swa/average", self.average.module, epoch + 1.0, step, recompute=True, keep=True,
                            n_averaged=int(self.average.n_averaged))

    def state(self):
        return dict(average=self.average)


@shared_method("ema")
class EMA(SGDRun):
    """An exponential moving average of SGD's weights: sgd's schedule and data order; after every step
    w_ema <- d w_ema + (1 - d) w (torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn(d),
    d = ema_decay; the first step copies w). Recorded like SWA after every epoch: the iterate in
    ``ema/iterates`` (with the same seed, sgd's rows) and the average, BatchNorm statistics recomputed
    sample-weighted, in ``ema/average``."""

    def __init__(self, ctx):
        super().__init__(ctx)
        decay = self.cfg.options_of(EMAOptions).decay
        self.average = AveragedModel(ctx.fresh_model(), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
        self.step = [0]

    lr = SGD.lr

    def on_step(self, model, epoch):
        def update(i):
            self.step[0] += 1
            self._update(model)
        return update

    @torch.no_grad()
    def _update(self, model):
        """``self.average.update_parameters(model)`` (the first step copies w, every later one applies the
        EMA's multi_avg_fn), without its copy of ``n_averaged`` to the model's device: on a GPU that
        copy made every training step wait for the GPU."""
        mine, theirs = list(self.average.module.parameters()), [p.detach() for p in model.parameters()]
        if self.step[0] == 1:  # (n_averaged was 0)
            for a, w in zip(mine, theirs):
                a.copy_(w)
        else:
            self.average.multi_avg_fn(mine, theirs, self.step[0] - 1)
        self.average.n_averaged += 1

    def end_epoch(self, model, epoch, evaluated):
        self.ctx.record("ema/iterates", model, epoch + 1.0, self.step[0], evaluated=evaluated.get("sgd") or None)
        self.ctx.record("ema/average", self.average.module, epoch + 1.0, self.step[0], recompute=True,
                        n_averaged=int(self.average.n_averaged))

    def state(self):
        return dict(average=self.average, step=self.step)


class Branch:
    """One model trained by momentum SGD for the runs whose learning rates have agreed so far, with its
    optimizer, its data order and its own stream of torch's global generator (dropout)."""

    def __init__(self, ctx: Context, runs: list, model=None, opt=None, gen=None, rng=None):
        self.ctx, self.runs = ctx, runs
        self.model = ctx.fresh_model() if model is None else model
        self.opt = sgd_optimizer(self.model, ctx.config) if opt is None else opt
        self.gen = ctx.generator() if gen is None else gen
        self.rng = [random_state(gpus_of(ctx.device))] if rng is None else rng

    def split(self, epoch: int) -> list:
        """This branch and, for each other learning rate its runs take at ``epoch``, a copy."""
        groups = {}
        for run in self.runs:
            groups.setdefault(run.lr(epoch), []).append(run)
        first, *others = groups.values()
        self.runs = first
        return [self] + [self.copy(runs) for runs in others]

    def copy(self, runs: list) -> "Branch":
        model = copy.deepcopy(self.model)
        opt = sgd_optimizer(model, self.ctx.config)
        opt.load_state_dict(copy.deepcopy(self.opt.state_dict()))  # momentum buffers of its own
        gen = torch.Generator().set_state(self.gen.get_state())
        return Branch(self.ctx, runs, model, opt, gen, list(self.rng))

    def train_epoch(self, epoch: int) -> None:
        with self.own_random():
            set_lr(self.opt, self.runs[0].lr(epoch))
            hooks = [h for h in (run.on_step(self.model, epoch) for run in self.runs) if h is not None]
            train_epoch(self.model, self.opt, self.ctx.data, self.ctx.config.batch_size, self.gen,
                        lambda i: [hook(i) for hook in hooks])
            evaluated = {}
            for run in self.runs:
                run.end_epoch(self.model, epoch, evaluated)

    @contextmanager
    def own_random(self):
        set_random_state(self.rng[0])
        try:
            yield
        finally:
            self.rng[0] = random_state(self.rng[0][1])

    def state(self) -> dict:
        return dict(model=self.model, opt=self.opt, gen=self.gen, rng=self.rng)


def train_shared(ctx: Context, names: tuple) -> None:
    """Train the methods ``names`` (of :data:`SHARED`) together: one :class:`Branch` at first, split
    when their learning rates part. Resumable after every epoch, under the job's part name."""
    runs = [SHARED[name](ctx) for name in names]
    key = part_name(names)
    start = ctx.saved_epoch(key)
    branches = _branches_after(ctx, runs, start)
    ctx.resume_point(key, ticks_per_epoch=len(runs), **_state(runs, branches))
    if start == 0:
        _check_nothing_held(ctx, names)
        for run in runs:
            run.begin(branches[0].model)
    for epoch in range(start, ctx.config.epochs):
        branches = _in_order(runs, [part for branch in branches for part in branch.split(epoch)])
        for branch in branches:
            branch.train_epoch(epoch)
        ctx.tick(len(runs))
        ctx.epoch_done(key, epoch + 1, **_state(runs, branches))


def _check_nothing_held(ctx: Context, names: tuple) -> None:
    """A partial that holds rows of these methods but no resume state under this job's name (an earlier
    version trained them one by one) would get its rows twice."""
    held = [r for r in (ctx.writer.runs if ctx.writer is not None else ()) if r.split("/")[0] in names]
    if held:
        raise FileFormatError(f"{ctx.writer.tmp} holds rows of {', '.join(held)} but no resume state of "
                              f"{part_name(names)} (an earlier version's partial); delete it to train afresh")


def _branches_after(ctx: Context, runs: list, epochs: int) -> list:
    """The branches after ``epochs`` epochs (fresh models, for a resume state to fill): the runs grouped
    by their learning rates so far."""
    groups = {}
    for run in runs:
        groups.setdefault(tuple(run.lr(e) for e in range(epochs)), []).append(run)
    return [Branch(ctx, group) for group in groups.values()]


def _in_order(runs: list, branches: list) -> list:
    """``branches`` by their first run's place: the order, and so the file, of a resumed run is the same."""
    return sorted(branches, key=lambda b: runs.index(b.runs[0]))


def _state(runs: list, branches: list) -> dict:
    state = {f"{b.runs[0].name}:{k}": v for b in branches for k, v in b.state().items()}
    return dict(state, **{f"{run.name}.{k}": v for run in runs for k, v in run.state().items()})
