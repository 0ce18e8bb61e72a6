"""Tasks: how a model's output and a batch become per-sample losses and named per-sample metrics.

Every evaluation (the batched :class:`~landscape.evaluate.Evaluator`, :func:`evaluate_model`, training's
:func:`~landscape.train.loop.train_epoch`) reads the loss and metrics from the data's task, so a
surface stores exactly the task's values: ``<split>_loss`` and ``<split>_<metric>`` for every metric
the task names (``train_loss``, ``train_err``, ``test_loss``, ``test_err`` for classification).

Built-in tasks:

- ``classification`` (the default): cross-entropy; ``err``, the error in percent (primary).
- ``regression``: mean squared error; ``mae``, the mean absolute error (primary).
- ``language-model``: token-level cross-entropy, tokens labelled ``ignore_index`` (-100) left out;
  ``err``, the token error in percent (primary), and ``ppl``, the perplexity exp(loss).
- ``model-loss``: the loss the model computes itself (an output with ``.loss``, e.g. a Hugging Face
  model given ``labels``); no other metric. Its value per sample is its batch's mean.

A sample's values are *sums* over its units (tokens) with a ``count`` of units: a split's value is
sum(values) / sum(counts) over all its samples (counts are 1 for one-unit tasks), so a language model's
loss is the mean over tokens, as in training.

A batch is an ``(inputs, targets)`` tuple (the model is called on the inputs: a tensor, or tuples and
dicts of tensors for a model of several inputs) or a dict (the model is
called with it as keyword arguments; targets are its ``labels``). A model's output is a tensor of
logits or predictions, a tuple (its first element), or a dict or object with ``logits`` (and ``loss``).

A user task is any object with the attributes and methods of :class:`Task`; on the command line an
import path ``package.module:obj`` (an object, or a class or function called without arguments).

Example::

    task = get_task("regression")
    out = task.evaluate(torch.zeros(4, 1), (torch.zeros(4, 3), torch.ones(4)))
    out.losses            # tensor([1., 1., 1., 1.]): per-sample squared errors
    task.value_names()    # ('train_loss', 'train_mae', 'test_loss', 'test_mae')
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ConfigError, DataError, ModelError

IGNORE_INDEX = -100


@dataclass
class Evaluation:
    """Per-sample values of one batch: ``losses`` (n,), ``metrics`` {name: (n,)} and ``counts`` (n,)
    (units per sample: tokens; None means one each). Values are sums over a sample's units."""
    losses: torch.Tensor
    metrics: dict
    counts: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------------
# batches and outputs

def model_args(batch) -> tuple:
    """``(args, kwargs)`` the model is called with for ``batch``."""
    if isinstance(batch, dict):
        return (), batch
    if isinstance(batch, (tuple, list)):
        return (batch[0],), {}
    return (batch,), {}


def targets_of(batch):
    """The targets of ``batch``: the second element of a tuple, the ``labels`` of a dict."""
    if isinstance(batch, dict):
        if "labels" not in batch:
            raise ConfigError(f"a dict batch needs 'labels' for this task; it has {', '.join(map(str, batch))}")
        return batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    raise ConfigError(f"a batch of type {type(batch).__name__} has no targets; give (inputs, targets) or a dict "
                      "with 'labels'")


def batch_size_of(batch) -> int:
    """Samples in ``batch``: the length of its first tensor (inputs may nest: ``((a, b), y)``)."""
    while isinstance(batch, (dict, tuple, list)):
        batch = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return len(batch)


def output_tree(output):
    """A model's output as tensors, dicts and tuples only (what ``torch.func.vmap`` can return): an
    object with attributes (a dataclass, a Hugging Face ``ModelOutput``) becomes the dict of its
    tensor fields."""
    if torch.is_tensor(output) or isinstance(output, (dict, tuple, list)):
        return output
    fields = vars(output) if hasattr(output, "__dict__") else {}
    tree = {k: v for k, v in fields.items() if torch.is_tensor(v)}
    if not tree:
        raise ModelError(f"the model returns a {type(output).__name__}; expected a tensor, a tuple, a dict or an "
                         "object with tensor fields such as logits or loss")
    return tree


def logits_of(output) -> torch.Tensor:
    """The predictions in a model's output (see :func:`output_tree`)."""
    if isinstance(output, dict):
        if "logits" not in output:
            raise ModelError(f"the model's output has no logits (it has {', '.join(map(str, output))}); use the "
                             "task 'model-loss' for a model that returns only its loss")
        return output["logits"]
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


# ------------------------------------------------------------------------------------------------
# the tasks

class Task:
    """A task; subclasses set ``name``, ``metrics`` (names of per-sample metrics), ``primary`` (the
    metric figures show on the test split; may be ``loss``), ``percent`` (metrics in percent),
    ``maximize`` (metrics where larger is better, such as an accuracy: the offset and figures take
    their maximum), ``per_sample`` (False where the values given to each sample are its batch's: a
    subset's standard errors are then NaN) and implement :meth:`evaluate`. ``derived`` metrics are functions of the split's means. A task is
    ``row_wise`` when sample i's values depend on its own row of the logits (:func:`logits_of`) and its
    target only: the evaluator then scores K points' logits as K * n samples in one call."""
    name = "task"
    row_wise = False
    metrics: tuple = ()
    primary = "loss"
    percent: tuple = ()
    derived: tuple = ()
    maximize: tuple = ()
    per_sample = True  # the values are each sample's own (not a batch's mean given to every sample)

    def evaluate(self, output, batch) -> Evaluation:
        raise NotImplementedError

    def derive(self, means: dict) -> dict:
        """Metrics computed from a split's means (``{"loss": ..., **metrics}``), e.g. perplexity."""
        return {}

    def loss(self, output, batch, reduction: str = "mean") -> torch.Tensor:
        """The training loss of a batch: the sum of per-sample losses (``reduction="sum"``), or that
        over the sum of counts (``"mean"``: the mean over samples, or over tokens); ``"none"``: the
        per-sample losses."""
        e = self.evaluate(output, batch)
        if reduction == "none":
            return e.losses
        if reduction == "sum":
            return e.losses.sum()
        return e.losses.sum() / (len(e.losses) if e.counts is None else e.counts.sum().clamp_min(1))

    def value_names(self, splits=("train", "test")) -> tuple:
        """The names of the values a surface stores, e.g. ``train_loss, train_err, ...``."""
        names = ("loss",) + tuple(self.metrics) + tuple(self.derived)
        return tuple(f"{s}_{n}" for s in splits for n in names)

    def to_dict(self) -> dict:
        d = {"name": self.name, "metrics": list(self.metrics) + list(self.derived), "primary": self.primary,
             "percent": list(self.percent)}
        return dict(d, maximize=list(self.maximize)) if self.maximize else d  # (files of tasks without: as before)


class Classification(Task):
    """Cross-entropy of logits (n, C) against class labels (n,); ``err``: error in percent."""
    name, metrics, primary, percent, row_wise = "classification", ("err",), "err", ("err",), True

    def evaluate(self, output, batch) -> Evaluation:
        logits, y = logits_of(output), targets_of(batch)
        if logits.ndim != 2 or y.ndim != 1 or len(logits) != len(y) or y.is_floating_point():
            hint = "; for float targets (values to fit) give the task 'regression'" if y.is_floating_point() else ""
            raise ModelError(f"task 'classification' needs logits (n, classes) and integer labels (n,); got "
                             f"outputs {list(logits.shape)} and targets {list(y.shape)} ({y.dtype}){hint}")
        try:
            losses = F.cross_entropy(logits, y, reduction="none")
        except IndexError as e:  # a label past the logits, in a streamed batch no check before the work read
            raise DataError(f"a label is out of range for the model's {logits.shape[-1]} classes "
                            f"({str(e).rstrip('.')})") from None
        return Evaluation(losses, {"err": 100.0 * (logits.argmax(-1) != y).double()})

    def loss(self, output, batch, reduction: str = "mean") -> torch.Tensor:
        if type(self).evaluate is not Classification.evaluate:  # a subclass's own loss (temperature, smoothing)
            return super().loss(output, batch, reduction)
        return F.cross_entropy(logits_of(output), targets_of(batch), reduction=reduction)


class Regression(Task):
    """Squared error summed over output dimensions; ``mae``: absolute error, averaged over them."""
    name, metrics, primary, row_wise = "regression", ("mae",), "mae", True

    def evaluate(self, output, batch) -> Evaluation:
        pred, y = logits_of(output), targets_of(batch)
        if pred.ndim == y.ndim + 1 and pred.shape[-1] == 1:
            pred = pred[..., 0]
        if pred.shape != y.shape or not y.is_floating_point():
            raise ModelError(f"task 'regression' needs predictions shaped like the float targets; got outputs "
                             f"{list(logits_of(output).shape)} and targets {list(y.shape)} ({y.dtype})")
        diff = (pred - y).flatten(1) if y.ndim > 1 else (pred - y)[:, None]
        return Evaluation(diff.square().sum(1), {"mae": diff.abs().mean(1)})


class LanguageModel(Task):
    """Token-level cross-entropy of logits (n, T, V) against labels (n, T) (already aligned: label t is
    the token that follows position t), ``ignore_index`` labels left out; ``err``: token error (%),
    ``ppl``: perplexity exp(loss)."""
    name, metrics, primary, percent, derived = "language-model", ("err",), "err", ("err",), ("ppl",)
    row_wise = True

    def __init__(self, ignore_index: int = IGNORE_INDEX):
        self.ignore_index = ignore_index

    def evaluate(self, output, batch) -> Evaluation:
        logits, y = logits_of(output), targets_of(batch)
        if logits.ndim != 3 or y.shape != logits.shape[:2] or y.is_floating_point():
            raise ModelError(f"task 'language-model' needs logits (n, T, vocab) and integer labels (n, T); got "
                             f"outputs {list(logits.shape)} and targets {list(y.shape)} ({y.dtype})")
        keep = y != self.ignore_index
        tokens = F.cross_entropy(logits.transpose(1, 2), y, reduction="none", ignore_index=self.ignore_index)
        wrong = (logits.argmax(-1) != y) & keep
        return Evaluation(tokens.sum(1), {"err": 100.0 * wrong.double().sum(1)}, keep.sum(1).double())

    def derive(self, means: dict) -> dict:
        return {"ppl": math.exp(min(means["loss"], 700.0))}


class ModelLoss(Task):
    """The model's own ``.loss`` (a batch mean), given to each sample of the batch (so its values are
    not per sample: a subset's standard errors are not known, NaN)."""
    name = "model-loss"
    per_sample = False

    def evaluate(self, output, batch) -> Evaluation:
        loss = output.get("loss") if isinstance(output, dict) else None
        if loss is None or loss.numel() != 1:
            raise ModelError("task 'model-loss' needs a model whose output has a scalar loss (give the batch its "
                             "labels)")
        return Evaluation(loss.reshape(1).expand(batch_size_of(batch)), {})

    def loss(self, output, batch, reduction: str = "mean") -> torch.Tensor:
        e = self.evaluate(output, batch)
        return e.losses.sum() if reduction == "sum" else e.losses[0]


TASKS = {"classification": Classification, "regression": Regression, "language-model": LanguageModel,
         "model-loss": ModelLoss}


def get_task(task=None, import_object=None) -> Task:
    """A task from a name (``None``: classification), an import path (``package.module:obj``, resolved
    with ``import_object(path)``: the caller decides whether it may run) or a task object."""
    if task is None:
        return Classification()
    if not isinstance(task, str):
        return check_task_object(task)
    if task in TASKS:
        return TASKS[task]()
    if ":" in task and import_object is not None:
        obj = import_object(task)
        return check_task_object(obj() if isinstance(obj, type) or not hasattr(obj, "evaluate") else obj)
    raise ConfigError(f"unknown task {task!r}; built-in tasks: {', '.join(TASKS)} (or package.module:obj)")


def units_are_samples(task) -> bool:
    """Whether a batch's mean loss is over its samples: every built-in task's but the language
    model's (over scored tokens); a user task's evaluation says it, through its counts."""
    return isinstance(task, (Classification, Regression, ModelLoss))


def count_units(task, output, batch) -> float:
    """The units a batch's loss is a mean over: its samples, or what the task counts (a language
    model's scored tokens). A mean over several batches is their summed losses over their summed units."""
    e = task.evaluate(output, batch)
    return float(len(e.losses) if e.counts is None else e.counts.sum())


def check_task_object(task) -> Task:
    """Refuse an object that lacks what a task needs (named in the message)."""
    missing = [a for a in ("name", "metrics", "primary", "evaluate") if not hasattr(task, a)]
    if missing:
        raise ConfigError(f"{type(task).__name__} is not a task: it lacks {', '.join(missing)} (see landscape.tasks.Task)")
    for attr, default in (("percent", ()), ("derived", ()), ("maximize", ())):
        if not hasattr(task, attr):
            setattr(task, attr, default)
    for method in ("derive", "loss", "value_names", "to_dict"):
        if not hasattr(task, method):
            setattr(task, method, getattr(Task, method).__get__(task))
    if task.primary != "loss" and task.primary not in tuple(task.metrics) + tuple(task.derived):
        raise ConfigError(f"task {task.name!r}: its primary metric {task.primary!r} is not one of its metrics")
    unknown = [m for m in task.maximize if m not in tuple(task.metrics) + tuple(task.derived)]
    if unknown:
        raise ConfigError(f"task {task.name!r}: maximize names {', '.join(map(repr, unknown))}, not one of its metrics")
    return task


def check_evaluation(task, e: Evaluation, n: int) -> Evaluation:
    """Refuse values that are not one number per sample, in one line naming the task and the metric."""
    if not isinstance(e, Evaluation):
        raise ModelError(f"task {task.name!r}: evaluate returned {type(e).__name__}, expected an Evaluation")
    named = {"loss": e.losses, **e.metrics, **({} if e.counts is None else {"counts": e.counts})}
    for name, v in named.items():
        if not torch.is_tensor(v) or v.shape != (n,):
            shape = list(v.shape) if torch.is_tensor(v) else type(v).__name__
            raise ModelError(f"task {task.name!r}: {name} of a batch of {n} samples has shape {shape}, expected "
                             f"[{n}] (one value per sample)")
    if set(e.metrics) != set(task.metrics):
        raise ModelError(f"task {task.name!r}: evaluate returned metrics {sorted(e.metrics)}, its metrics are "
                         f"{sorted(task.metrics)}")
    return e


def take(batch, index):
    """``batch`` (a tensor, or tuples and dicts of them, nested: a two-input model's ``((a, b), y)``)
    indexed along its sample dimension."""
    if isinstance(batch, dict):
        return {k: take(v, index) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(take(v, index) for v in batch)
    return batch[index]


def repeat_targets(batch, times: int):
    """A batch holding only the targets of ``batch``, repeated ``times`` times along the samples (for
    ``row_wise`` tasks scoring several points' outputs at once)."""
    y = targets_of(batch)
    y = y.repeat(times, *([1] * (y.ndim - 1)))
    return {"labels": y} if isinstance(batch, dict) else (None, y)


def to_device(batch, device):
    """``batch`` with every tensor on ``device``."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch.to(device) if torch.is_tensor(batch) else batch
