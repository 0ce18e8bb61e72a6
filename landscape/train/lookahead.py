"""Lookahead (Zhang, Lucas, Hinton, Ba 2019, "Lookahead Optimizer: k steps forward, 1 step back").

:class:`Lookahead` wraps any ``torch.optim`` optimizer (the *inner* one, which moves the *fast*
weights theta). Every ``k`` inner steps the *slow* weights phi move toward the fast ones and the fast
weights restart from there::

    phi <- phi + alpha (theta - phi),   theta <- phi

Unlike the reference implementations, :meth:`Lookahead.state_dict` carries the slow weights, the
step counter and the cached inner momenta, so a run resumed from it continues exactly.

Example::

    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=5, alpha=0.5)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()                      # every 5th call also synchronizes
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, "ckpt.pt")

The training methods ``lookahead`` (SGD inner) and ``lookahead-adam`` (Adam inner) record the slow
weights after every synchronization in ``<prefix>/slow`` and, over a window of epochs, the fast
weights after every inner step in ``<prefix>/fast`` (``<prefix>`` is the method name).
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from dataclasses import dataclass

import torch
from torch.utils.hooks import RemovableHandle

from ..config import MethodOptions, option
from ..errors import ConfigError
from .loop import Context, register_method, set_lr, sgd_optimizer, swa_schedule, train_epoch

# per-parameter state of the inner optimizer that is a first moment ("momentum"): the tensors that
# inner_state = reset zeroes and inner_state = pullback interpolates
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")
LOOKAHEAD_INNER_STATE = ("none", "reset", "pullback")


def check_lookahead_options(k, alpha, inner_state) -> None:
    if int(k) != k or k < 1:
        raise ConfigError(f"Lookahead k must be an integer of at least 1, got {k}")
    if not 0 < alpha <= 1:
        raise ConfigError(f"Lookahead alpha must be in (0, 1], got {alpha}")
    if inner_state not in LOOKAHEAD_INNER_STATE:
        raise ConfigError(f"Lookahead inner_state must be one of {', '.join(LOOKAHEAD_INNER_STATE)}, "
                          f"got {inner_state!r}")


class Lookahead(torch.optim.Optimizer):
    """Lookahead around ``optimizer``.

    ``k``: inner steps per synchronization (>= 1); ``alpha``: slow step size in (0, 1] (1 gives the
    inner optimizer back); ``inner_state``: what happens to the inner optimizer's momentum
    (``momentum_buffer`` of SGD, ``exp_avg`` of Adam) at a synchronization: ``none`` keeps it,
    ``reset`` zeroes it, ``pullback`` interpolates it like the weights, m <- m_c + alpha (m - m_c),
    where m_c is its value after the previous synchronization (zero at first), then m_c <- m.

    ``param_groups`` are the inner optimizer's, looked up on every access (so learning-rate
    schedulers and ``set_lr`` reach it, also after :meth:`load_state_dict`).
    ``state[p]`` holds ``slow`` (phi) and, with ``pullback``, ``slow_<key>`` (m_c).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5, inner_state: str = "none"):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"Lookahead wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        check_lookahead_options(k, alpha, inner_state)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        super().__init__(params, {})  # hooks and profiling of torch.optim; groups delegated below
        self.optimizer = optimizer
        self.state = defaultdict(dict)
        self.k, self.alpha, self.inner_state = int(k), float(alpha), inner_state
        self._step = 0
        self._sync_hooks: OrderedDict = OrderedDict()
        for p in params:
            self._init_slow(p)

    # -- structure ------------------------------------------------------------------------------
    # param_groups and defaults are the inner optimizer's, looked up on every access: its
    # load_state_dict replaces its param_groups list, and a copy taken once would go stale (a
    # learning-rate change after resuming would then not reach the inner optimizer).
    @property
    def param_groups(self) -> list:
        inner = self.__dict__.get("optimizer")
        return inner.param_groups if inner is not None else self.__dict__["_own_param_groups"]

    @param_groups.setter
    def param_groups(self, groups: list) -> None:
        inner = self.__dict__.get("optimizer")
        if inner is not None:
            inner.param_groups = groups
        else:  # while torch.optim.Optimizer.__init__ runs
            self.__dict__["_own_param_groups"] = groups

    @property
    def defaults(self) -> dict:
        inner = self.__dict__.get("optimizer")
        return inner.defaults if inner is not None else self.__dict__["_own_defaults"]

    @defaults.setter
    def defaults(self, value: dict) -> None:
        inner = self.__dict__.get("optimizer")
        if inner is not None:
            inner.defaults = value
        else:
            self.__dict__["_own_defaults"] = value

    def _params(self) -> list:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def _init_slow(self, p: torch.Tensor) -> None:
        self.state[p]["slow"] = p.detach().clone()

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "optimizer", None) is None:  # while torch.optim.Optimizer.__init__ runs
            return super().add_param_group(param_group)
        self.optimizer.add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._init_slow(p)

    def __repr__(self) -> str:
        return (f"Lookahead(k={self.k}, alpha={self.alpha}, inner_state={self.inner_state!r}, "
                f"inner={type(self.optimizer).__name__})")

    # -- counters -------------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Inner steps taken."""
        return self._step

    @property
    def sync_count(self) -> int:
        """Synchronizations done."""
        return self._step // self.k

    @property
    def synced(self) -> bool:
        """True right after a step that synchronized (the weights are the slow weights)."""
        return self._step > 0 and self._step % self.k == 0

    # -- stepping -------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        """One inner step; every k-th also synchronizes. Returns the closure's loss, if any."""
        loss = self.optimizer.step(closure)
        self._step += 1
        if self._step % self.k == 0:
            self.synchronize()
        return loss

    def register_sync_hook(self, hook) -> RemovableHandle:
        """``hook(optimizer)`` runs at every synchronization just before the slow update, while the
        parameters still hold the fast weights theta_k. Returns a handle with ``remove()``."""
        handle = RemovableHandle(self._sync_hooks)
        self._sync_hooks[handle.id] = hook
        return handle

    @torch.no_grad()
    def synchronize(self) -> None:
        """phi <- phi + alpha (theta - phi); theta <- phi; then the inner-state policy."""
        for hook in list(self._sync_hooks.values()):
            hook(self)
        for p in self._params():
            slow = self.state[p]["slow"]
            slow.add_(p.detach() - slow, alpha=self.alpha)
            p.copy_(slow)
            if self.inner_state == "none":
                continue
            inner = self.optimizer.state.get(p, {})
            for key in MOMENTUM_KEYS:
                m = inner.get(key)
                if not torch.is_tensor(m):
                    continue
                if self.inner_state == "reset":
                    m.zero_()
                else:  # pullback
                    cached = self.state[p].setdefault(f"slow_{key}", torch.zeros_like(m))
                    cached.add_(m - cached, alpha=self.alpha)
                    m.copy_(cached)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"inner": inner optimizer's state_dict, "lookahead": {k, alpha, inner_state, step,
        state: {index: {"slow": phi, ...}}}}``; parameters are indexed in param_groups order. As in
        torch.optim, tensors are references: ``torch.save`` it or deep-copy it."""
        state = {i: dict(self.state[p]) for i, p in enumerate(self._params())}
        return {"inner": self.optimizer.state_dict(),
                "lookahead": {"k": self.k, "alpha": self.alpha, "inner_state": self.inner_state,
                              "step": self._step, "state": state}}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what :meth:`state_dict` returned (slow weights, counter, options, inner state)."""
        if not isinstance(state_dict, dict) or "lookahead" not in state_dict or "inner" not in state_dict:
            raise ConfigError("not a Lookahead state_dict (expected keys 'inner' and 'lookahead'); a plain "
                              "optimizer state_dict has no slow weights to resume from")
        la = state_dict["lookahead"]
        check_lookahead_options(la["k"], la["alpha"], la["inner_state"])
        params = self._params()
        saved = la["state"]
        if len(saved) != len(params):
            raise ConfigError(f"Lookahead state_dict has slow weights for {len(saved)} parameters, "
                              f"this optimizer has {len(params)}")
        new_state = defaultdict(dict)
        for i, p in enumerate(params):
            entry = saved[i] if i in saved else saved[str(i)]
            for key, value in entry.items():
                if value.shape != p.shape:
                    raise ConfigError(f"Lookahead state_dict: {key} of parameter {i} has shape "
                                      f"{list(value.shape)}, the parameter has {list(p.shape)}")
                new_state[p][key] = value.detach().to(device=p.device, dtype=p.dtype).clone()
            if "slow" not in new_state[p]:
                raise ConfigError(f"Lookahead state_dict has no slow weights for parameter {i}")
        self.optimizer.load_state_dict(state_dict["inner"])
        self.k, self.alpha, self.inner_state = int(la["k"]), float(la["alpha"]), la["inner_state"]
        self._step = int(la["step"])
        self.state = new_state


# ----------------------------------------------------------------------------------------------
# training methods

@dataclass(frozen=True)
class LookaheadOptions(MethodOptions, prefix="lookahead",
                       title="lookahead and lookahead-adam (Zhang et al. 2019)"):
    k: int = option(5, "inner steps between synchronizations", at_least=1)
    alpha: float = option(0.5, "slow step size in (0, 1]: phi <- phi + alpha (theta - phi)", above=0, at_most=1)
    inner_state: str = option("none", "inner momentum at a synchronization: keep (none), zero (reset), or "
                                      "interpolate like the weights (pullback)", choices=LOOKAHEAD_INNER_STATE)
    fast_from: int = option(-1, "first epoch whose every inner step is recorded in <method>/fast (-1: "
                                "epochs // 2, the last epoch at the full learning rate)")
    fast_epochs: int = option(1, "number of epochs recorded step by step (0: no fast run)", at_least=0)

    def check(self, config):
        super().check(config)
        if self.fast_from < -1:
            raise ConfigError(f"lookahead_fast_from must be an epoch or -1 (auto), got {self.fast_from}")
        if ({"lookahead", "lookahead-adam"} & set(config.methods) and self.fast_epochs
                and self.fast_from >= config.epochs):
            raise ConfigError(f"lookahead_fast_from must be below epochs ({config.epochs}), got {self.fast_from}")


@dataclass(frozen=True)
class AdamOptions(MethodOptions, prefix="adam", title="lookahead-adam's inner Adam"):
    lr: float = option(0.02, "initial learning rate of the inner Adam (sgd's schedule)", above=0)


def fast_window(config) -> tuple:
    """Epochs [first, end) whose every inner step is recorded in ``<prefix>/fast``."""
    lookahead = config.options_of(LookaheadOptions)
    if lookahead.fast_epochs == 0:
        return 0, 0
    first = config.epochs // 2 if lookahead.fast_from < 0 else lookahead.fast_from
    return first, min(config.epochs, first + lookahead.fast_epochs)


def run_lookahead_method(ctx: Context, prefix: str, inner: str) -> None:
    """Train with Lookahead around ``inner`` (``sgd`` or ``adam``) from the shared initialization and
    data order, with the sgd schedule (lr factor 1 -> lr_ratio over ``epochs``) on the inner
    learning rate.

    Records ``<prefix>/slow``: row 0 the initialization, then the slow weights after *every*
    synchronization (metric ``sync``: how many so far). Train/test metrics are evaluated on row 0,
    on the last synchronization of every epoch (so the run's last row has them) and on every
    synchronization inside :func:`fast_window`; the other rows hold weights only (metrics NaN), which
    keeps Lookahead as cheap as SGD. ``<prefix>/fast``: the fast weights after every inner step within
    :func:`fast_window`, each with its metrics (metric ``inner_step``, 1..k; at a synchronizing step
    the row holds theta_k, recorded just before the slow update)."""
    cfg, lookahead = ctx.config, ctx.config.options_of(LookaheadOptions)
    model = ctx.fresh_model()
    if inner == "sgd":
        base_lr, inner_opt = cfg.lr, sgd_optimizer(model, cfg)
    else:
        base_lr = cfg.options_of(AdamOptions).lr
        inner_opt = torch.optim.Adam(model.parameters(), lr=base_lr, weight_decay=cfg.weight_decay)
    opt = Lookahead(inner_opt, lookahead.k, lookahead.alpha, lookahead.inner_state)
    gen, per_epoch = ctx.generator(), ctx.steps_per_epoch()
    slow_run, fast_run = f"{prefix}/slow", f"{prefix}/fast"
    first, end = fast_window(cfg)
    # thinned recording (large models) keeps the window's first 1/record_every of its steps
    last_step = first * per_epoch + max(2 * opt.k, (end - first) * per_epoch // ctx.record_every)
    now = {"epoch": 0}

    def in_window():
        return first <= now["epoch"] < end and opt.step_count <= last_step

    def on_sync(o):  # fast weights theta_k, just before the slow update
        if in_window():
            s = o.step_count
            ctx.record(fast_run, model, s / per_epoch, s, inner_step=o.k, keep=True)

    def on_step(_):
        s = opt.step_count
        if opt.synced:
            last_of_epoch = s + opt.k > (now["epoch"] + 1) * per_epoch
            kept = in_window() or (last_of_epoch and ctx.kept_epoch(now["epoch"] + 1))
            ctx.record(slow_run, model, s / per_epoch, s, metrics=in_window() or last_of_epoch, keep=kept,
                       sync=opt.sync_count)
        elif in_window():
            ctx.record(fast_run, model, s / per_epoch, s, inner_step=s % opt.k, keep=True)

    opt.register_sync_hook(on_sync)
    state = dict(model=model, opt=opt, gen=gen)
    start = ctx.resume_point(prefix, **state)
    if start == 0:
        ctx.record(slow_run, model, 0.0, 0, sync=0)
    thinned = ctx.record_every > 1
    ctx.writer.set_attrs(slow_run, k=opt.k, alpha=opt.alpha, inner_state=opt.inner_state,
                         inner_optimizer=type(inner_opt).__name__, lr=base_lr, window=[first, end],
                         rows="row 0: initialization; then one row after every synchronization; metrics on "
                              "row 0, the last synchronization of every epoch and every synchronization in "
                              "epochs window[0] to window[1] - 1 (NaN elsewhere)" + (
                                  f"; thinned: outside the window only the last synchronization of every "
                                  f"{ctx.record_every}-th epoch and of the last, inside it up to step "
                                  f"{last_step}" if thinned else ""))
    for epoch in range(start, cfg.epochs):
        now["epoch"] = epoch
        set_lr(opt, base_lr * swa_schedule(epoch, cfg.epochs, cfg.lr_ratio))
        train_epoch(model, opt, ctx.data, cfg.batch_size, gen, on_step)
        ctx.tick()
        ctx.epoch_done(prefix, epoch + 1, **state)
    if end > first:
        ctx.writer.set_attrs(fast_run, window=[first, end], k=opt.k,
                             rows="fast weights after every inner step of epochs window[0] to window[1] - 1"
                                  + (f" up to step {last_step} (thinned)" if thinned else ""))


@register_method("lookahead")
def run_lookahead(ctx: Context) -> None:
    """Lookahead with momentum SGD inside (runs ``lookahead/slow``, ``lookahead/fast``)."""
    run_lookahead_method(ctx, "lookahead", "sgd")


@register_method("lookahead-adam")
def run_lookahead_adam(ctx: Context) -> None:
    """Lookahead with Adam inside (runs ``lookahead-adam/slow``, ``lookahead-adam/fast``)."""
    run_lookahead_method(ctx, "lookahead-adam", "adam")
