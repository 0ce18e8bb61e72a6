"""The one training loop and what every method shares: schedule, batches, metrics, recording.

A method is a function ``run(ctx: Context) -> None`` that builds a model from ``ctx.fresh_model()``
(every method starts from the same initialization), draws its data order from ``ctx.generator()``
(the same order for every method given the seed), trains with :func:`train_epoch` and records
checkpoints with :meth:`Context.record`. A method that calls :meth:`Context.epoch_done` after every
epoch, and starts from :meth:`Context.resume_point`, loses at most one epoch to an interruption;
one that does not is trained again from its start.

A method registers itself with :func:`register_method` in its own file, beside its options (a
:class:`~landscape.config.MethodOptions` dataclass, which becomes ``landscape train``'s flags); adding
a method is adding that file and its import in ``landscape/train/__init__.py``.
"""
from __future__ import annotations

import copy
import io
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from ..bn import batch_slices, recompute_bn
from ..config import TrainConfig
from ..evaluate import evaluate_model as evaluate  # noqa: F401 (methods use it under this name)
from ..device import gpus_of, random_state, set_random_state
from ..dist import Group
from ..errors import FileFormatError
from ..data import Data, augment_batch
from ..params import Layout
from ..tasks import output_tree
from ..store import TrajectoryWriter
from ..store.files import interrupts_deferred


@dataclass(frozen=True)
class Method:
    """A registered training method: ``run(ctx)``, the progress ticks it makes for a configuration,
    whether it uses every torchrun process (the others run on rank 0 alone), and ``together(ctx,
    names)``, which trains several methods of the same ``together`` at once, sharing their common steps."""
    run: Callable
    ticks: Callable
    distributed: bool = False
    together: Callable | None = None


METHODS: dict = {}  # name -> Method, in the order of registration


def register_method(name: str, ticks: Callable = lambda config: config.epochs, distributed: bool = False,
                    together: Callable | None = None):
    """Decorator adding a training method ``fn(ctx: Context)`` under ``name``."""
    if "+" in name:
        raise ValueError(f"method name {name!r}: '+' joins the methods trained together")

    def deco(fn):
        METHODS[name] = Method(fn, ticks, distributed, together)
        return fn
    return deco


def jobs(methods) -> list:
    """``methods`` as the units trained at once, in order: the methods of one ``together`` function as
    one job at the place of its first, every other method alone."""
    out, at = [], {}
    for m in methods:
        together = METHODS[m].together
        if together is not None and together in at:
            out[at[together]] += (m,)
            continue
        if together is not None:
            at[together] = len(out)
        out.append((m,))
    return out


def run_job(ctx: "Context", job: tuple) -> None:
    if len(job) == 1:
        METHODS[job[0]].run(ctx)
    else:
        METHODS[job[0]].together(ctx, job)


def part_name(job: tuple) -> str:
    """The name a job's work is kept under in a partial file (its methods joined by '+')."""
    return "+".join(job)


def swa_schedule(epoch: int, budget: int, ratio: float) -> float:
    """The SWA paper's learning-rate factor: 1 until half the budget, then linear down to
    ``ratio`` at 90 % of it, then ``ratio`` (Izmailov et al. 2018, reference train.py)."""
    t = epoch / budget
    if t <= 0.5:
        return 1.0
    if t <= 0.9:
        return 1.0 - (1.0 - ratio) * (t - 0.5) / 0.4
    return ratio


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def sgd_optimizer(model: nn.Module, config: TrainConfig, lr: float | None = None) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=config.lr if lr is None else lr,
                           momentum=config.momentum, weight_decay=config.weight_decay)


def train_epoch(model: nn.Module, optimizer, data: Data, batch_size: int, generator: torch.Generator,
                on_step=None) -> float:
    """One pass over the training set in the order drawn from ``generator``; returns the mean loss.
    ``on_step(step_in_epoch)`` is called after every optimizer step."""
    model.train()
    order = torch.randperm(len(data.x_train), generator=generator).to(data.x_train.device)
    total, count = torch.zeros((), dtype=torch.float64, device=data.x_train.device), 0
    for i, sl in enumerate(batch_slices(len(order), batch_size)):
        idx = order[sl]
        x, y = data.x_train[idx], data.y_train[idx]
        if data.augment:
            x = augment_batch(x, generator)
        loss = data.task.loss(output_tree(model(x)), (x, y))  # the task's mean loss (cross-entropy by default)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach().double() * len(idx)  # no host synchronization per step
        count += len(idx)
        if on_step is not None:
            on_step(i + 1)
    return float(total / count)


def progress_note(run: str, metrics: dict, task) -> str:
    """``sgd test err 3.4%``: a run's test value of the task's primary metric, for progress bars."""
    unit = "%" if task.primary in task.percent else ""
    return f"{run} test {task.primary} {metrics[f'test_{task.primary}']:.{1 if unit else 4}f}{unit}"


@dataclass
class Context:
    """What a method needs: configuration, data, the shared initialization, the file, progress."""
    config: TrainConfig
    data: Data
    layout: Layout
    init_model: nn.Module
    writer: TrajectoryWriter
    device: torch.device
    progress: tqdm = None
    last_epoch_done: tuple = None  # (key, epoch) of the last epoch_done
    group: Group = None  # the torchrun processes (SWAP's workers); one process when None
    record_every: int = 1  # keep every N-th epoch's rows (see :meth:`record`)

    def __post_init__(self):
        if self.group is None:
            self.group = Group.single(self.device)

    def kept_epoch(self, epoch: int, last: int | None = None) -> bool:
        """Whether the rows of the end of ``epoch`` are kept: every ``record_every``-th and the last
        (``last``: of a phase counting its own epochs; default the configuration's budget)."""
        last = self.config.epochs if last is None else last
        return self.record_every == 1 or epoch % self.record_every == 0 or epoch >= last

    def fresh_model(self) -> nn.Module:
        """A copy of the shared initialization."""
        return copy.deepcopy(self.init_model)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A data-order generator; the same seed (and offset) gives the same order in every method."""
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + offset)

    def steps_per_epoch(self, batch_size: int | None = None) -> int:
        return len(batch_slices(len(self.data.x_train), batch_size or self.config.batch_size))

    def record(self, run: str, model: nn.Module, epoch: float, step: int, recompute: bool = False,
               metrics: bool = True, keep: bool | None = None, evaluated: dict | None = None, **extra) -> dict:
        """Evaluate ``model`` and append it to ``run``. ``recompute`` first recomputes BatchNorm
        statistics on the training set (for averaged weights). ``metrics=False`` appends the weights
        without evaluating them (the row's train/test metrics read NaN) and returns ``{}``;
        ``evaluated``: the model's metrics, already computed.

        Thinned recording (``record_every`` > 1) skips the row, evaluating nothing and returning
        ``{}``, unless it is the run's first, or ``keep`` is True (a window recorded densely), or, with
        ``keep`` None, ``epoch`` is the end of a :meth:`kept_epoch`. ``keep=False`` marks a row inside
        an epoch, kept only when nothing is thinned."""
        if keep is None:
            keep = float(epoch).is_integer() and self.kept_epoch(int(epoch))
        if not (keep or self.record_every == 1 or run not in self.writer.runs):
            return {}
        if recompute:
            recompute_bn(model, self.data.x_train, self.config.eval_batch_size)
        if not metrics:
            self.writer.append(run, self.layout.params_to_vector(model), self.layout.buffers_to_vector(model),
                               epoch=epoch, step=step, **extra)
            return {}
        metrics = evaluated if evaluated is not None else evaluate(model, self.data, self.config.eval_batch_size)
        self.writer.append(run, self.layout.params_to_vector(model), self.layout.buffers_to_vector(model),
                           epoch=epoch, step=step, **metrics, **extra)
        if self.progress is not None:
            self.progress.set_postfix_str(progress_note(run, metrics, self.data.task), refresh=False)
        return metrics

    def step_recorder(self, run: str, model: nn.Module, epoch: int, global_step: list):
        """An ``on_step`` callback that counts steps and records every ``checkpoint_every`` steps."""
        every, per_epoch = self.config.checkpoint_every, self.steps_per_epoch()

        def on_step(i):
            global_step[0] += 1
            if every and global_step[0] % every == 0 and i != per_epoch:  # epoch ends record anyway
                self.record(run, model, epoch + i / per_epoch, global_step[0], keep=True)  # asked for
        return on_step

    def tick(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.update(n)

    # epoch-level resume ---------------------------------------------------------------------------
    def resume_point(self, key: str, ticks_per_epoch: int = 1, **state) -> int:
        """Restore ``state`` in place, and torch's global generator, from the last :meth:`epoch_done` of
        ``key`` that an interrupted run of the same configuration kept, and return the epoch to continue
        from (0: start afresh).
        ``state``: what the loop carries from epoch to epoch: modules and optimizers (their
        state_dicts), ``torch.Generator`` s, and dicts or lists of plain values."""
        saved = self._saved(key)
        if saved is None:
            return 0
        if not state.keys() <= saved["state"].keys():
            raise FileFormatError(f"{self.writer.tmp} holds {key}'s work in another form (an earlier version "
                                  f"of landscape); delete it to train afresh")
        for name, obj in state.items():
            value = saved["state"][name]
            if isinstance(obj, torch.Generator):
                obj.set_state(value)
            elif isinstance(obj, dict):
                obj.clear()
                obj.update(value)
            elif isinstance(obj, list):
                obj[:] = value
            else:
                obj.load_state_dict(value)
        if "random" in saved:  # (not kept by earlier versions)
            set_random_state(saved["random"])
        self.tick(saved["epoch"] * ticks_per_epoch)
        self.last_epoch_done = (key, saved["epoch"])
        return saved["epoch"]

    def saved_epoch(self, key: str) -> int:
        """The epoch :meth:`resume_point` goes on from (0: none kept), for a method whose state's shape
        depends on it."""
        saved = self._saved(key)
        return 0 if saved is None else saved["epoch"]

    def _saved(self, key: str):
        blob = self.writer.progress(key) if self.writer is not None else None
        # our own bytes, and still no pickled code
        return None if blob is None else torch.load(io.BytesIO(blob), weights_only=True)

    def epoch_done(self, key: str, epoch: int, **state) -> None:
        """Keep ``state`` (as for :meth:`resume_point`) after ``epoch`` epochs, with the rows written
        so far, so that an interruption loses at most the epoch under way."""
        if self.writer is None:
            return

        def dump(obj):
            if isinstance(obj, torch.Generator):
                return obj.get_state()
            if isinstance(obj, (dict, list)):
                return copy.copy(obj)
            return obj.state_dict()
        buf = io.BytesIO()
        # torch's global generator too: dropout draws from it, and a resumed run must draw what this one draws
        torch.save({"epoch": epoch, "state": {name: dump(obj) for name, obj in state.items()},
                    "random": random_state(gpus_of(self.device))}, buf)
        with interrupts_deferred():  # a Ctrl-C during the save is raised once both say the same epoch
            self.writer.save_progress(key, buf.getvalue())
            self.last_epoch_done = (key, epoch)
