"""SGD, SWA and an exponential moving average of SGD (SWA: Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima and Better
Generalization"; schedule and averaging as in the authors' train.py)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..config import MethodOptions, option
from ..errors import ConfigError
from .loop import Context, register_method, set_lr, sgd_optimizer, swa_schedule, train_epoch


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


@register_method("sgd")
def run_sgd(ctx: Context) -> None:
    """Momentum SGD, lr factor 1 -> lr_ratio over the budget; run ``sgd``, one row per epoch (row 0
    is the initialization)."""
    cfg = ctx.config
    model = ctx.fresh_model()
    opt = sgd_optimizer(model, cfg)
    gen, step = ctx.generator(), [0]
    state = dict(model=model, opt=opt, gen=gen, step=step)
    start = ctx.resume_point("sgd", **state)
    if start == 0:
        ctx.record("sgd", model, 0.0, 0)
    for epoch in range(start, cfg.epochs):
        set_lr(opt, cfg.lr * swa_schedule(epoch, cfg.epochs, cfg.lr_ratio))
        train_epoch(model, opt, ctx.data, cfg.batch_size, gen, ctx.step_recorder("sgd", model, epoch, step))
        ctx.record("sgd", model, epoch + 1.0, step[0])
        ctx.tick()
        ctx.epoch_done("sgd", epoch + 1, **state)


@register_method("swa")
def run_swa(ctx: Context) -> None:
    """SWA: the schedule with t = epoch / swa_start and ratio swa_lr / lr; from epoch swa_start on,
    every swa_c epochs, the iterate is recorded in ``swa/iterates`` and folded into the running
    average (torch.optim.swa_utils.AveragedModel: w <- w n/(n+1) + w_i/(n+1)), whose BatchNorm
    statistics are recomputed sample-weighted before it is recorded in ``swa/average``."""
    cfg, swa = ctx.config, ctx.config.options_of(SWAOptions)
    model = ctx.fresh_model()
    opt = sgd_optimizer(model, cfg)
    average = AveragedModel(model, use_buffers=False)  # buffers are recomputed, not averaged
    gen, per_epoch = ctx.generator(), ctx.steps_per_epoch()
    state = dict(model=model, opt=opt, average=average, gen=gen)
    for epoch in range(ctx.resume_point("swa", **state), cfg.epochs):
        set_lr(opt, cfg.lr * swa_schedule(epoch, swa.start, swa.lr / cfg.lr))
        train_epoch(model, opt, ctx.data, cfg.batch_size, gen)
        if epoch + 1 >= swa.start and (epoch + 1 - swa.start) % swa.c == 0:
            step = (epoch + 1) * per_epoch
            # the averaging window is recorded densely: the average is the mean of the recorded iterates
            ctx.record("swa/iterates", model, epoch + 1.0, step, keep=True)
            average.update_parameters(model)
            ctx.record("swa/average", average.module, epoch + 1.0, step, recompute=True, keep=True,
                       n_averaged=int(average.n_averaged))
        ctx.tick()
        ctx.epoch_done("swa", epoch + 1, **state)


@register_method("ema")
def run_ema(ctx: Context) -> None:
    """An exponential moving average of SGD's weights: sgd's schedule and data order; after every step
    w_ema <- d w_ema + (1 - d) w (torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn(d),
    d = ema_decay; the first step copies w). Recorded like SWA after every epoch: the iterate in
    ``ema/iterates`` (with the same seed, sgd's rows) and the average, BatchNorm statistics recomputed
    sample-weighted, in ``ema/average``."""
    cfg = ctx.config
    model = ctx.fresh_model()
    opt = sgd_optimizer(model, cfg)
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.options_of(EMAOptions).decay), use_buffers=False)
    gen, step = ctx.generator(), [0]
    state = dict(model=model, opt=opt, average=average, gen=gen, step=step)

    def on_step(i):
        step[0] += 1
        average.update_parameters(model)
    for epoch in range(ctx.resume_point("ema", **state), cfg.epochs):
        set_lr(opt, cfg.lr * swa_schedule(epoch, cfg.epochs, cfg.lr_ratio))
        train_epoch(model, opt, ctx.data, cfg.batch_size, gen, on_step)
        ctx.record("ema/iterates", model, epoch + 1.0, step[0])
        ctx.record("ema/average", average.module, epoch + 1.0, step[0], recompute=True,
                   n_averaged=int(average.n_averaged))
        ctx.tick()
        ctx.epoch_done("ema", epoch + 1, **state)
