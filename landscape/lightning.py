"""PyTorch Lightning: a callback that records a ``Trainer``'s checkpoints into a trajectory file, as
:class:`landscape.recorder.Recorder` does for a hand-written loop.

Lightning is optional (``pip install 'landscape[lightning]'``); this module imports it only when the
callback is first used, from ``lightning.pytorch`` or ``pytorch_lightning`` (whichever your code
already imported, else whichever is installed).

Example::

    from landscape.lightning import LandscapeCallback

    trainer = pl.Trainer(max_epochs=20, callbacks=[
        LandscapeCallback("run.h5", model="mynets:make_net", data="mynets:load_data", run="sgd")])
    trainer.fit(lit_module, train_loader)   # run.h5 appears when fit ends; a crash leaves run.h5.partial

The recorded module is the one inside your LightningModule whose parameters match ``model`` (say
``self.net``), or the LightningModule itself when it is the model; ``module=`` picks another (an
attribute name, or a function of the LightningModule, e.g. an EMA or AveragedModel copy).
"""
from __future__ import annotations

import importlib
import math
import sys
import warnings

from .errors import ConfigError

PACKAGES = ("lightning.pytorch", "pytorch_lightning")
_classes: dict = {}


def lightning_package(name: str | None = None):
    """The Lightning package to subclass: ``name``, else the one already imported, else the one
    installed. Raises ConfigError when neither is installed."""
    candidates = (name,) if name else PACKAGES
    for pkg in candidates:
        if sys.modules.get(pkg) is not None:
            return sys.modules[pkg]
    for pkg in candidates:
        try:
            return importlib.import_module(pkg)
        except ImportError:
            continue
    raise ConfigError("the Lightning callback needs PyTorch Lightning: pip install 'landscape[lightning]' "
                      "(or pip install lightning)")


def callback_class(package: str | None = None) -> type:
    """:class:`LandscapeCallback` built on ``package``'s ``Callback`` (``lightning.pytorch`` or
    ``pytorch_lightning``; default: see :func:`lightning_package`)."""
    pl = lightning_package(package)
    if pl.__name__ not in _classes:
        _classes[pl.__name__] = _make_class(pl.Callback)
    return _classes[pl.__name__]


def __getattr__(name):  # PEP 562: ``from landscape.lightning import LandscapeCallback`` imports Lightning then
    if name == "LandscapeCallback":
        return callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_class(Callback):
    from .recorder import Recorder

    class LandscapeCallback(Callback):
        """Record ``run`` (default ``sgd``) into trajectory file ``path``: the initialization when
        training starts (``record_init``), then every ``every_n_epochs`` epochs and, optionally,
        every ``every_n_steps`` optimizer steps. ``epoch`` is epochs completed (fractional for step
        checkpoints), ``step`` the trainer's ``global_step``.

        ``model``/``model_kwargs`` and ``data``/``data_options`` say how later commands rebuild the
        model and the data (see :class:`landscape.recorder.Recorder`, which also takes ``task``,
        ``config``, ``evaluate``, ``overwrite``, ``resume``, ``check`` and ``save_every``). ``resume=True`` goes on from
        the partial file a crashed fit left (fit again with ``ckpt_path``): rows it holds past the
        checkpoint's step are dropped (the resumed fit records them again, as it trains them this time),
        those up to it kept. ``metrics``: which logged values
        (``trainer.callback_metrics``) to store with each epoch checkpoint: ``None`` every scalar
        under its logged name (``/`` becomes ``_``), a list of names, or a dict ``{stored name:
        logged name}``; ``[]`` none. Only global rank 0 writes."""

        def __init__(self, path, model, data, *, run: str = "sgd", model_kwargs=None, data_options=None,
                     every_n_epochs: int = 1, every_n_steps: int = 0, record_init: bool = True, metrics=None,
                     module=None, task=None, config=None, evaluate: bool = False, overwrite: bool = False,
                     resume: bool = False, check: bool = True, save_every: float | None = None):
            super().__init__()
            if every_n_epochs < 0 or every_n_steps < 0:
                raise ConfigError("every_n_epochs and every_n_steps must be non-negative")
            self.path, self.run, self.module = path, run, module
            self.every_n_epochs, self.every_n_steps, self.record_init = every_n_epochs, every_n_steps, record_init
            self.metrics = metrics
            self._recorder_args = dict(model=model, data=data, model_kwargs=model_kwargs, data_options=data_options,
                                       task=task, config=config, evaluate=evaluate, overwrite=overwrite,
                                       resume=resume, check=check, source="lightning",
                                       **({} if save_every is None else {"save_every": save_every}))
            self.recorder = None
            self.written = None  # the path of the finished file
            self._kept_epoch = -math.inf  # the last epoch a resumed partial holds

        # -- what to record -------------------------------------------------------------------
        def _target(self, pl_module):
            if self.module is None:
                return pl_module
            if isinstance(self.module, str):
                return getattr(pl_module, self.module)
            return self.module(pl_module)

        def _logged(self, trainer) -> dict:
            logged = dict(getattr(trainer, "callback_metrics", {}) or {})
            if self.metrics is None:
                pairs = [(k, k) for k in logged]
            elif isinstance(self.metrics, dict):
                pairs = list(self.metrics.items())
            else:
                pairs = [(k, k) for k in self.metrics]
            out = {}
            for ours, theirs in pairs:
                value = logged.get(theirs)
                if value is None:
                    continue
                try:
                    value = float(value)
                except (TypeError, ValueError):  # not a scalar
                    continue
                out[ours] = value
            return out

        def _record(self, trainer, pl_module, epoch, metrics=None) -> None:
            if self.recorder is None:
                return
            if math.isfinite(self._kept_epoch) and self.every_n_epochs and \
                    epoch > self._kept_epoch + self.every_n_epochs:
                warnings.warn(f"{self.path}.partial holds epochs up to {self._kept_epoch:g}, and this fit goes on "
                              f"at epoch {epoch:g}: the epochs between are not recorded (resume from the "
                              "checkpoint of the partial's last epoch to keep them)", stacklevel=2)
            self._kept_epoch = -math.inf  # (looked at once)
            self.recorder.record(self.run, self._target(pl_module), epoch=epoch, step=trainer.global_step,
                                 **(metrics or {}))

        # -- Lightning hooks ------------------------------------------------------------------
        def on_fit_start(self, trainer, pl_module) -> None:
            if trainer.is_global_zero and self.recorder is None:
                self.recorder = Recorder(self.path, **self._recorder_args)

        def on_train_start(self, trainer, pl_module) -> None:
            if self.recorder is not None and self.recorder.kept:  # resumed: go on from the checkpoint's step
                # (the loops' state is restored by now; a fit from step 0 starts the history again)
                kept = self.recorder.rewind(step=trainer.global_step if trainer.global_step else -1)
                epoch = kept.get(self.run, {}).get("epoch", -math.inf)
                self._kept_epoch = epoch if math.isfinite(epoch) else -math.inf
            if self.record_init and trainer.global_step == 0:
                self._record(trainer, pl_module, 0.0)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            if not self.every_n_steps or step == 0 or step % self.every_n_steps:
                return
            if getattr(self, "_last_step", None) == step:  # gradient accumulation: one record per step
                return
            self._last_step = step
            n = trainer.num_training_batches
            last = isinstance(n, int) and batch_idx + 1 == n
            if last and self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
                return  # the epoch checkpoint records it
            fraction = (batch_idx + 1) / n if isinstance(n, int) and n > 0 and math.isfinite(n) else 0.0
            self._record(trainer, pl_module, trainer.current_epoch + fraction)

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            epoch = trainer.current_epoch + 1
            if self.every_n_epochs and epoch % self.every_n_epochs == 0:
                self._record(trainer, pl_module, float(epoch), self._logged(trainer))

        def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
            # Lightning's checkpoint never newer than the partial: a fit resumed from it misses no epoch
            # (checkpoint callbacks run after this one's epoch record)
            if self.recorder is not None:
                self.recorder.flush()

        def on_fit_end(self, trainer, pl_module) -> None:
            if self.recorder is not None:
                self.written = self.recorder.close()
                self.recorder = None

        def on_exception(self, trainer, pl_module, exception) -> None:
            if self.recorder is not None:  # keep what was recorded, visibly incomplete
                self.recorder.close_incomplete()
                self.recorder = None

    LandscapeCallback.__module__ = __name__
    return LandscapeCallback
