"""Record the checkpoints of your own training loop into a trajectory file (docs/FORMAT.md), so that
``landscape plane``, ``line``, ``plot`` and ``explore`` work on it as on a file of ``landscape train``.

The file records how to rebuild the model and the data: the model by name or import path
``package.module:factory`` plus keyword arguments, the data by dataset name plus options or by your
``package.module:factory`` (see :mod:`landscape.data`). At start the recorder builds both once and
checks that the model you train has the same parameters and buffers as the one later commands will
build, so a mistake shows before training rather than after it.

Example::

    from landscape.recorder import Recorder

    with Recorder("run.h5", model="mynets:make_net", data="mynets:load_data") as rec:
        rec.record("sgd", net, epoch=0, step=0)              # the initialization
        for epoch in range(epochs):
            ...                                            # your training
            rec.record("sgd", net, epoch=epoch + 1, step=steps, test_err=err)
    # run.h5 now exists; had the loop crashed, only run.h5.partial (marked incomplete) would

The checkpoints go to ``run.h5.partial`` on the disk at save points: the first record, then the first
record ``save_every`` seconds (10 by default) after the last save point, whenever 64 MB wait in memory
(``TrajectoryWriter.MEMORY_BYTES``), at :meth:`Recorder.flush` and at an exception inside the ``with``
block. So a kill (or a lost machine) loses only the records since the last save point: call
:meth:`Recorder.flush` where you save your own checkpoint, and the two agree.
``Recorder(..., resume=True)`` goes on from a partial that a crash left (:attr:`Recorder.kept` says
where its runs end; resume your loop from your checkpoint of that epoch, or from an older one after
:meth:`Recorder.rewind` to its epoch).

Any ``nn.Module`` whose parameters match is accepted: ``torch.optim.swa_utils.AveragedModel``,
``DataParallel``/``DistributedDataParallel`` and ``torch.compile`` wrappers are unwrapped (an
``AveragedModel`` also records ``n_averaged``), and a module holding the model as a submodule (a
LightningModule, say) is searched for it. :meth:`Recorder.record_lookahead` records both the slow and
the fast weights of a Lookahead optimizer.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .data import DataSpec, fingerprinted, import_object, load_data
from .errors import CheckpointError, ConfigError, FileFormatError, HeldWorkError, ModelError, WriteError
from .models import ModelSpec, build_model
from .params import Layout, copy_module, unwrap
from .store import TrajectoryWriter
from .store.files import prepare_output
from .tasks import TASKS, get_task
from .trust import is_import_path

# per-parameter keys under which Lookahead implementations keep the slow weights: ours
# (landscape.train.Lookahead), and the common reference implementations
SLOW_KEYS = ("slow", "slow_buffer", "slow_param", "cached_params")
RESERVED = ("params", "buffers", "epoch", "step")
SAVE_SECONDS = 10.0  # the default save_every: a record this long after the last save point makes one


def model_spec(model, kwargs=None) -> ModelSpec:
    """``"cnn1d"``, ``"pkg.mod:factory"``, a dict or a ModelSpec -> ModelSpec."""
    if isinstance(model, ModelSpec):
        return ModelSpec(model.name, dict(model.kwargs, **(kwargs or {})))
    if isinstance(model, dict):
        spec = ModelSpec.from_dict(model)
        return ModelSpec(spec.name, dict(spec.kwargs, **(kwargs or {})))
    if isinstance(model, str) and model:
        return ModelSpec(model, dict(kwargs or {}))
    if isinstance(model, nn.Module):
        raise ConfigError("model= is the name or import path (package.module:factory) that rebuilds the "
                          "model, not the module itself; pass the module to record()")
    raise ConfigError(f"model must be a model name or package.module:factory, got {model!r}")


def data_spec(data, options=None) -> DataSpec:
    """``"synthetic"``, ``"pkg.mod:factory"``, a dict or a DataSpec -> DataSpec, as a file records it
    (an ``npz`` file's SHA-256 added)."""
    spec = data if isinstance(data, DataSpec) else DataSpec.from_dict(data) if isinstance(data, dict) \
        else DataSpec(data, {}) if isinstance(data, str) and data else None
    if spec is not None:
        return fingerprinted(DataSpec(spec.name, dict(spec.options, **(options or {}))))
    raise ConfigError(f"data must be a dataset name or package.module:factory, got {data!r}")


def _warn_of_the_running_script(*names) -> None:
    """Warn of an import path into ``__main__`` (a notebook's or script's own function): the file records
    it, and no later command, which is another program, can import it."""
    for name in names:
        if isinstance(name, str) and name.startswith("__main__:"):
            own = name.partition(":")[2]
            warnings.warn(f"{name!r} names a function of the running notebook or script: the file records it, but "
                          f"no later command (landscape plane, sharpness, ...) can import it; put {own} in a module "
                          f"(mynets.py) and name it 'mynets:{own}'", stacklevel=3)
            return


def recorded_task(task, config: dict):
    """(the task a file records: ``task`` or the configuration's ``task``, None for classification, and
    that task). A file records a task by name: a built-in one or ``package.module:obj``, imported here
    because the caller gave it."""
    named = config.get("task")
    if task is not None and named is not None and task != named:
        raise ConfigError(f"task={task!r} and the configuration's task {named!r} differ; give one")
    task = named if task is None else task
    if task is not None and not (isinstance(task, str) and (task in TASKS or is_import_path(task))):
        raise ConfigError(f"a file records its task by name: one of {', '.join(TASKS)} or package.module:obj, "
                          f"got {task!r}")
    return task, get_task(task, lambda path: import_object(path, ConfigError, "task"))


def check_run_name(run: str, existing=()) -> str:
    """Run names are HDF5 group paths (``sgd``, ``swa/average``); a ``:`` would clash with
    checkpoint names (``RUN:INDEX``), and a run cannot sit inside another."""
    if not isinstance(run, str) or not run or any(part in ("", ".", "..") for part in run.split("/")):
        raise CheckpointError(f"run name {run!r} is not valid; use names like 'sgd' or 'swa/average'")
    if ":" in run:
        raise CheckpointError(f"run name {run!r} contains ':', which separates a run from a checkpoint index")
    if set(run.split("/")) & set(RESERVED):
        raise CheckpointError(f"run name {run!r} uses a reserved word ({', '.join(RESERVED)})")
    for other in existing:
        if other != run and (other.startswith(run + "/") or run.startswith(other + "/")):
            raise CheckpointError(f"run {run!r} cannot sit beside run {other!r} (one would contain the other)")
    return run


@contextlib.contextmanager
def _rng_untouched():
    """Restore the global random generators (torch CPU, Python, NumPy) afterwards, so that building a
    reference model and loading the data leave the user's initialization and data order as they were."""
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


def _same_structure(a: Layout, b: Layout) -> bool:
    key = lambda entries: [(e.name, e.shape) for e in entries]  # noqa: E731 (dtypes may differ)
    return key(a.params) == key(b.params) and key(a.buffers) == key(b.buffers)


def _digest(values: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.float32).tobytes()).digest()


def find_module(obj: nn.Module, layout: Layout) -> nn.Module:
    """``obj`` itself or the submodule of it whose parameters and buffers match ``layout``; else a
    ModelError naming the first mismatch."""
    if _same_structure(Layout.of(obj), layout):
        return obj
    for _, sub in obj.named_modules():
        if sub is not obj and _same_structure(Layout.of(sub), layout):
            return sub
    layout.check_module(obj)  # raises, naming the first parameter or buffer that differs
    raise ModelError("the module does not match the recorded model")  # pragma: no cover


class Recorder:
    """Writes a trajectory file from any training loop.

    ``model``: the built-in name or ``package.module:factory`` that rebuilds your model (with
    ``model_kwargs``; the factory also receives ``input_shape`` and ``num_classes`` if it accepts
    them). ``data``: a built-in dataset name or ``package.module:factory`` (with ``data_options``).
    ``task``: what scores the model (``"classification"`` by default, ``"regression"``,
    ``"language-model"``, ``"model-loss"`` or ``package.module:obj``); recorded, so that every later
    evaluation of the file uses it. ``config``: anything else worth keeping (hyperparameters); stored
    in the file's ``config`` (``eval_batch_size`` there sets the default batch of later evaluations).
    ``evaluate``: also record the task's values of every checkpoint (``train_loss``, ``train_err``,
    ``test_loss``, ``test_err`` for classification), computed in eval mode on the full sets as
    ``landscape train`` does. ``check=False`` skips building the
    model and data at start (the layout is then taken from the first recorded module, unchecked).

    Use it as a context manager, or call :meth:`close` at the end: only then does ``path`` appear.
    Until then (and after a crash) the checkpoints are in ``path.partial``, marked incomplete, as of
    its last save point (see the module doc). A partial left by a crash
    is refused unless ``resume=True`` (append to it: :attr:`kept` says what it holds) or
    ``overwrite=True`` (discard it).
    """

    def __init__(self, path, model, data, *, model_kwargs=None, data_options=None, task=None, config=None,
                 overwrite: bool = False, resume: bool = False, evaluate: bool = False, check: bool = True,
                 save_every: float = SAVE_SECONDS, source: str = "recorder"):
        self.model_spec = model_spec(model, model_kwargs)
        self.data_spec = data_spec(data, data_options)
        try:
            self.path = prepare_output(path, overwrite)
        except FileFormatError as e:  # (said in the command line's words)
            raise FileFormatError(str(e).replace("pass --overwrite", "pass overwrite=True")) from None
        self.overwrite, self.resume = overwrite, resume
        if not save_every >= 0:
            raise ConfigError(f"save_every must be a number of seconds of at least 0, got {save_every}")
        self.save_every, self._saved_at = float(save_every), -math.inf
        self.evaluate = evaluate
        if evaluate and not check:
            raise ConfigError("evaluate=True needs the data, which check=False skips loading")
        if resume and not check:
            raise ConfigError("resume=True needs the model built at start, which check=False skips")
        if resume and overwrite:
            raise ConfigError("give resume=True (append to an interrupted recording) or overwrite=True "
                              "(discard it), not both")
        extra = dict(config or {})
        for key in ("model", "data"):
            if key in extra:
                raise ConfigError(f"config must not hold {key!r}; give it as {key}=")
        task_name, self.task = recorded_task(task, extra)
        self.config = dict(extra, model=self.model_spec.to_dict(), data=self.data_spec.to_dict(),
                           source=source, landscape_version=__version__)
        if task_name is not None:
            self.config["task"] = task_name
        _warn_of_the_running_script(self.model_spec.name, self.data_spec.name, task_name)
        self.data = None
        self.layout = None
        self.writer = None
        # id of a recorded object -> weak references to it and to the module inside it that matches the
        # layout: by identity (modules may define ==), weak, so that the recorder keeps neither alive, and
        # checked, so that a new object at a dead one's address never finds the dead one's module
        self._found = {}
        self._data_on = {}
        self._runs = []
        self._frozen = {}  # run -> ({parameter never trained so far: digest of its values}, the attribute's names)
        if check:
            with _rng_untouched():  # building them must not change the user's run
                self.data = load_data(self.data_spec, "cpu", self.task)
                reference = build_model(self.model_spec, self.data.input_shape, self.data.num_classes)
            self.config.update(num_classes=self.data.num_classes, input_shape=list(self.data.input_shape))
            self._open(Layout.of(reference))

    def _open(self, layout: Layout) -> None:
        self.layout = layout
        try:
            self.writer = TrajectoryWriter(self.path, self.config, layout, overwrite=self.overwrite,
                                           resume=self.resume)
        except HeldWorkError as e:
            tmp = self.partial_path
            if e.damaged:
                raise HeldWorkError(f"{tmp} is damaged: {e.damaged}; delete it or pass overwrite=True to discard it",
                                    other=True, damaged=e.damaged) from None
            if e.other:
                raise HeldWorkError(f"{tmp} holds an interrupted recording of another model, data or config; "
                                    "delete it, choose another path, or pass overwrite=True to discard it",
                                    other=True) from None
            raise HeldWorkError(f"{tmp} holds the checkpoints of an interrupted recording; pass resume=True to "
                                "append to them (Recorder.kept says where its runs end) or overwrite=True to "
                                "discard them", other=False) from None
        kept = self.writer.runs  # those a resumed partial holds, then any named before the file opened
        self._runs = kept + [r for r in self._runs if r not in kept]

    @property
    def kept(self) -> dict:
        """What the file holds so far, per run: ``{"rows", "epoch", "step"}`` of its last row (epoch NaN
        and step -1 where not given): after ``resume=True``, where a resumed loop goes on from."""
        if self.writer is None:
            return {}
        out = {}
        for run in self._runs:
            if f"runs/{run}" not in self.writer.file:  # named by a record() that failed
                continue
            g = self.writer.file[f"runs/{run}"]
            n = g["params"].shape[0]
            out[run] = {"rows": n, "epoch": float(g["epoch"][n - 1]) if n else math.nan,
                        "step": int(g["step"][n - 1]) if n else -1}
        return out

    def rewind(self, *, epoch: float | None = None, step: int | None = None) -> dict:
        """Drop every row recorded after ``epoch`` (or after optimizer step ``step``) from every run,
        then make a save point; return :attr:`kept`. Call it after ``resume=True`` with the epoch of
        your own checkpoint that the loop resumes from: the rows a crashed loop recorded past that
        checkpoint belong to a branch that is not continued (a training that is not bit-reproducible
        goes elsewhere from the checkpoint), and the file must hold one history. (A run's ``frozen``
        parameters stay those of every record before the rewind, the dropped ones included.)"""
        self._check_open()
        if (epoch is None) == (step is None):
            raise ConfigError("rewind() takes epoch= or step=, one of them")
        name, bound = ("epoch", float(epoch)) if step is None else ("step", int(step))
        if self.writer is None:
            return {}
        cut = {}
        for run in self.kept:  # every run checked before any is cut
            values = self.writer.file[f"runs/{run}/{name}"][()]
            if (np.isnan(values) if name == "epoch" else values < 0).any():
                raise ConfigError(f"run {run!r} has rows recorded without {'an epoch' if name == 'epoch' else 'a step'}, "
                                  f"which rewind({name}=) cannot place")
            past = np.flatnonzero(values > bound)
            if len(past):
                cut[run] = int(past[0])
        for run, rows in cut.items():
            self.writer.truncate(run, rows)
            self._frozen.pop(run, None)
            if run not in self.writer.runs:
                self._runs.remove(run)
        self._save_point()
        return self.kept

    @property
    def partial_path(self) -> Path:
        return self.path.with_name(self.path.name + ".partial")

    # -- recording ----------------------------------------------------------------------------
    def _module(self, obj: nn.Module):
        if not isinstance(obj, nn.Module):
            raise ConfigError(f"record() takes the model (a torch.nn.Module), got {type(obj).__name__}")
        inner, extra = unwrap(obj)
        if self.layout is None:
            self._open(Layout.of(inner))
        key = id(inner)
        holder, found = self._found.get(key, (lambda: None, lambda: None))
        found = found() if holder() is inner else None
        if found is None or not _same_structure(Layout.of(found), self.layout):
            try:
                found = find_module(inner, self.layout)
            except ModelError as e:
                raise ModelError(f"the recorded module does not match model {self.model_spec.name!r}: {e}") from None
            forget = lambda _, cache=self._found: cache.pop(key, None)  # noqa: E731 (inner is gone)
            self._found[key] = (weakref.ref(inner, forget), weakref.ref(found))
        return found, extra

    def _check_run(self, run: str) -> None:
        if run not in self._runs:
            check_run_name(run, self._runs)
            self._runs.append(run)

    def _metrics(self, metrics: dict) -> dict:
        out = {}
        for name, value in metrics.items():
            if value is None:
                continue
            clean = str(name).replace("/", "_")
            if clean in RESERVED:
                raise ConfigError(f"metric name {name!r} is reserved")
            out[clean] = value.detach().cpu() if torch.is_tensor(value) else value
        return out

    def _evaluated(self, module: nn.Module) -> dict:
        """Train/test loss and error of ``module`` as ``landscape train`` records them (or nothing)."""
        if not self.evaluate:
            return {}
        from .evaluate import evaluate_model as evaluate
        device = next(module.parameters()).device
        if device not in self._data_on:
            self._data_on = {device: self.data.to(device)}
        return evaluate(module, self._data_on[device], int(self.config.get("eval_batch_size", 1000)))

    def _append(self, run, params, buffers, epoch, step, metrics, frozen_in=None) -> int:
        if self.writer.complete:  # resumed: a run killed as it moved its finished file into place
            raise ConfigError(f"{self.partial_path} is a finished recording; close() moves it into place")
        epoch = float("nan") if epoch is None else float(epoch)
        step = -1 if step is None else int(step)
        row = self.writer.append(run, params, buffers, epoch=epoch, step=step, **metrics)
        if frozen_in is not None:  # (before any save point: the row and its run's facts reach the disk together)
            self._note_frozen(run, frozen_in, params)
        if self.writer.unsaved >= self.writer.MEMORY_BYTES or time.monotonic() - self._saved_at >= self.save_every:
            self._save_point()
        return row

    def _save_point(self) -> None:
        """Put every row appended so far on the disk, as a point a resumed recorder goes on from."""
        self.writer.save_progress("recorder", b"")
        self._saved_at = time.monotonic()

    def record(self, run: str, model: nn.Module, *, epoch: float | None = None, step: int | None = None,
               **metrics) -> int:
        """Append the current weights and buffers of ``model`` to ``run``; return the row index.
        ``epoch``: epochs completed (fractional mid-epoch), ``step``: optimizer steps taken;
        ``metrics``: numbers (or 1-D arrays) stored per checkpoint, e.g. ``test_err=3.1``."""
        self._check_open()
        self._check_run(run)
        module, extra = self._module(model)
        metrics = dict(self._metrics(dict(extra, **metrics)), **self._evaluated(module))
        return self._append(run, self.layout.params_to_vector(module), self.layout.buffers_to_vector(module),
                            epoch, step, metrics, frozen_in=module)

    def _note_frozen(self, run: str, module: nn.Module, params: torch.Tensor) -> None:
        """Keep in ``run``'s ``frozen`` attribute the parameters it never trained: frozen
        (``requires_grad=False``) at every record, with the values of its first. (An EMA copy's
        parameters are frozen and move: trained. A model that trains nothing has nothing frozen.)"""
        frozen = set(Layout.of(module).frozen)
        slices = {e.name: sl for e, sl in self.layout.param_slices()}
        if run not in self._frozen:  # the run's first record, or its first since the recorder resumed
            g = self.writer.file[f"runs/{run}"]
            if g["params"].shape[0] == 1:
                candidates, first, written = frozen, params.detach().cpu().numpy(), None
            else:  # (no attribute: none frozen so far)
                written = set(json.loads(g.attrs["frozen"])) if "frozen" in g.attrs else None
                candidates, first = written or set(), g["params"][0]
            self._frozen[run] = {name: _digest(first[slices[name]]) for name in candidates}, written
        digests, written = self._frozen[run]
        values = params.detach().cpu().numpy()
        for name in list(digests):
            if name not in frozen or _digest(values[slices[name]]) != digests[name]:
                del digests[name]
        if set(digests) != (written or set()):
            # (none frozen: no attribute, as for a run that trained everything from the start)
            self.writer.set_attrs(run, frozen=[e.name for e in self.layout.params if e.name in digests] or None)
            self._frozen[run] = digests, set(digests)

    def record_lookahead(self, optimizer, model: nn.Module, *, prefix: str = "lookahead", epoch=None, step=None,
                         fast: bool = True, **metrics) -> dict:
        """Record the slow weights phi of a Lookahead ``optimizer`` in ``PREFIX/slow`` and (with
        ``fast``) the model's current weights theta in ``PREFIX/fast``. Returns ``{run: row}``.
        Works with :class:`landscape.train.Lookahead` and implementations that keep the slow weights in
        the optimizer's per-parameter state under ``slow_buffer``, ``slow_param`` or ``cached_params``."""
        self._check_open()
        slow_run, fast_run = f"{prefix}/slow", f"{prefix}/fast"
        self._check_run(slow_run)
        module, extra = self._module(model)
        state = getattr(optimizer, "state", None)
        if state is None:
            raise ConfigError(f"{type(optimizer).__name__} has no per-parameter state; not a Lookahead optimizer")
        slow = []
        found_any = False
        for p in module.parameters():
            entry = state.get(p, {}) if hasattr(state, "get") else {}
            value = next((entry[k] for k in SLOW_KEYS if torch.is_tensor(entry.get(k))), None)
            found_any |= value is not None
            slow.append((p if value is None else value).detach().reshape(-1).float())  # not optimized: phi = theta
        if not found_any:
            raise ConfigError(f"{type(optimizer).__name__} keeps no slow weights for this model's parameters "
                              f"(looked for {', '.join(SLOW_KEYS)}); is it a Lookahead optimizer of this model?")
        metrics = self._metrics(dict(extra, **metrics))
        buffers = self.layout.buffers_to_vector(module)
        slow = torch.cat(slow)
        slow_metrics = dict(metrics)
        if self.evaluate:
            phi = copy_module(module)
            self.layout.vector_to_params(slow.to(next(phi.parameters()).device), phi)
            slow_metrics.update(self._evaluated(phi))
        rows = {slow_run: self._append(slow_run, slow, buffers, epoch, step, slow_metrics, frozen_in=module)}
        if fast:
            self._check_run(fast_run)
            rows[fast_run] = self._append(fast_run, self.layout.params_to_vector(module), buffers, epoch, step,
                                          dict(metrics, **self._evaluated(module)), frozen_in=module)
        return rows

    def set_attrs(self, run: str, **attrs) -> None:
        """Attach JSON-able facts to a run (shown by ``landscape info --json``)."""
        self._check_open()
        self._check_run(run)
        self.writer.set_attrs(run, **attrs)

    def flush(self) -> None:
        """A save point now: every checkpoint recorded so far is on the disk, in ``path.partial``."""
        self._check_open()
        if self.writer is not None:
            self._save_point()

    # -- finishing ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if getattr(self, "_closed", False):
            raise ConfigError(f"the recorder of {self.path} is closed")

    def close(self) -> Path:
        """Mark the file complete and move it into place atomically; return its path."""
        self._check_open()
        if self.writer is None:
            raise ConfigError(f"nothing was recorded; {self.path} not written")
        if not self._runs:
            self.writer.abort()
            self._closed = True
            raise ConfigError(f"nothing was recorded; {self.path} not written")
        self._closed = True
        return self.writer.close()

    def close_incomplete(self) -> Path | None:
        """Stop without completing: what was recorded stays in ``path.partial`` (``complete = False``)."""
        if getattr(self, "_closed", False):
            return None
        self._closed = True
        if self.writer is None:
            return None
        if not self.writer.runs:  # nothing recorded: nothing to keep (a rerun simply starts afresh)
            self.writer.abort()
            return None
        try:
            self._save_point()
        except WriteError:
            pass  # (a full disk) the partial stays as its last save point left it
        return self.writer.suspend()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.close_incomplete()
        return False

