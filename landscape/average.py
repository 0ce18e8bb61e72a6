"""Averages made after the fact from recorded checkpoints: SWA windows, the average of the last k
checkpoints ("latest weight averaging"), exponential moving averages, without training again.

A window is ``RUN`` (every row) or ``RUN:START:STOP`` (Python slice bounds over the run's rows,
negative allowed, either may be empty: ``sgd:-10:`` is the last ten). Its rows are folded one by one
into ``torch.optim.swa_utils.AveragedModel``, the helper SWA training uses:

- ``uniform``: w_avg <- w_avg n/(n+1) + w/(n+1) (the running mean; its row t is the mean of the first
  t+1 rows of the window);
- ``ema`` with decay d (``get_ema_multi_avg_fn``): the first row as it is, then
  w_avg <- d w_avg + (1 - d) w.

Every intermediate average is a checkpoint of the new run, with the source row's epoch and step,
BatchNorm statistics recomputed on the training set (sample-weighted, :func:`landscape.bn.recompute_bn`)
and train/test metrics from the one single-model evaluation (:func:`landscape.train.loop.evaluate`).
The output is a new trajectory file: every run of the input, unchanged, plus the averaged runs.

Example::

    add_averages("run.h5", [Average(Window.parse("sgd:-20:"), "uniform")], "run+avg.h5")
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from .bn import recompute_bn
from .device import resolve_device
from .errors import CheckpointError, ConfigError
from .evaluate import evaluate_model as evaluate
from .recorder import check_run_name
from .rebuild import rebuild_data, rebuild_model
from .store import Trajectory, TrajectoryWriter, open_trajectory
from .store.files import prepare_output

MODES = ("uniform", "ema")


@dataclass(frozen=True)
class Window:
    run: str
    start: int | None = None
    stop: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Window":
        """``RUN`` or ``RUN:START:STOP`` (either bound may be empty)."""
        parts = text.rsplit(":", 2)
        if len(parts) == 3 and parts[0]:
            bounds = []
            for b in parts[1:]:
                try:
                    bounds.append(int(b) if b.strip() else None)
                except ValueError:
                    raise ConfigError(f"window {text!r}: {b!r} is not a row index; give RUN or "
                                      f"RUN:START:STOP") from None
            return cls(parts[0], *bounds)
        if ":" in text:
            raise ConfigError(f"window {text!r}: give RUN (every row) or RUN:START:STOP (Python slice "
                              f"bounds, e.g. sgd:-10: for the last ten)")
        return cls(text)

    def rows(self, traj) -> range:
        """The rows of the window; an empty one is an error."""
        n = traj.num_checkpoints(self.run)
        rows = range(n)[slice(self.start, self.stop)]
        if len(rows) == 0:
            raise ConfigError(f"averaging window {self} is empty: {self.run} has {n} checkpoints (rows 0 to {n - 1})")
        return rows

    def __str__(self) -> str:
        if self.start is None and self.stop is None:
            return self.run
        return f"{self.run}:{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}"


@dataclass(frozen=True)
class Average:
    window: Window
    mode: str = "uniform"       # uniform | ema
    decay: float | None = None  # ema only
    name: str | None = None     # the new run (default: avg/RUN/uniform_A_B or avg/RUN/ema_D_A_B)

    def check(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown averaging {self.mode!r}; use {', '.join(MODES)}")
        if self.mode == "ema" and not (self.decay is not None and math.isfinite(self.decay) and 0 < self.decay < 1):
            raise ConfigError(f"EMA decay must be between 0 and 1 (exclusive), got {self.decay}")
        if self.name is not None and (not self.name or ":" in self.name or self.name.startswith("/")):
            raise ConfigError(f"run name {self.name!r}: give a non-empty name without ':'")

    def run_name(self, rows: range) -> str:
        if self.name:
            return self.name
        span = f"{rows.start}_{rows.stop}"
        what = "uniform" if self.mode == "uniform" else f"ema_{self.decay:g}"
        return f"avg/{self.window.run}/{what}_{span}"

    def averager(self, model) -> AveragedModel:
        fn = get_ema_multi_avg_fn(self.decay) if self.mode == "ema" else None
        return AveragedModel(model, multi_avg_fn=fn, use_buffers=False)


def _check_finite(traj, window: Window, rows: range) -> None:
    """Refuse a window holding a checkpoint of NaN or infinite weights: every average from it on is
    NaN (the run written would look complete)."""
    for start in range(rows.start, rows.stop, 256):  # (a bounded read at a time)
        block = traj.params(window.run, slice(start, min(start + 256, rows.stop)))
        bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
        if bad.size:
            raise CheckpointError(f"checkpoint {window.run}:{start + int(bad[0])} holds NaN or infinite weights "
                                  f"(training diverged there?); averaging window {window} cannot include it")


def plan(traj, averages) -> list:
    """(average, rows, run name) for each, checked: windows not empty, names new and distinct."""
    if not averages:
        raise ConfigError("nothing to average: give --uniform and/or --ema DECAY")
    out, names = [], set()
    for a in averages:
        a.check()
        rows = a.window.rows(traj)
        name = a.run_name(rows)
        if name in names:  # the same window averaged the same way twice
            raise CheckpointError(f"run {name!r} is asked for twice (the same window and averaging); give each once")
        if name in traj.runs:
            raise CheckpointError(f"run {name!r} exists already; choose another --name")
        check_run_name(name, [*traj.runs, *names])  # a group path of the file: not inside another run
        _check_finite(traj, a.window, rows)
        names.add(name)
        out.append((a, rows, name))
    return out


def add_averages(path, averages, out, device="auto", overwrite: bool = False, quiet: bool = True,
                 batch_size: int | None = None, extra_config: dict | None = None) -> dict:
    """Write ``out``: every run of the trajectory file ``path`` plus one averaged run per
    :class:`Average`. Every input is checked before any work. ``extra_config``: facts added to the
    output's configuration. Returns {"path", "runs": {run name: final metrics}}."""
    traj = path if isinstance(path, Trajectory) else open_trajectory(path)
    jobs = plan(traj, averages)
    out = prepare_output(out, overwrite, inputs=(traj.path,))
    dev = resolve_device(device)
    data = rebuild_data(traj, dev)
    model = rebuild_model(traj, data, dev)
    eval_bs = int(batch_size or traj.eval_batch_size)
    # source_sha256: the input, whose runs (copied as they are) later files may name beside this one's
    config = dict(traj.config, averaged=[{"window": str(a.window), "mode": a.mode, "decay": a.decay, "run": name}
                                         for a, _, name in jobs] + list(traj.config.get("averaged", [])),
                  source_sha256=traj.sha256())
    config.update(extra_config or {})
    finals = {}
    total = sum(len(rows) for _, rows, _ in jobs)
    with TrajectoryWriter(out, config, traj.layout, overwrite=overwrite) as w, \
            tqdm(total=total, desc="average", unit="ckpt", disable=quiet, leave=False) as bar:
        w.adopt(traj.path)  # the input's runs, as they are
        for a, rows, name in jobs:
            src = traj.run(a.window.run)
            params, buffers = traj.params(a.window.run), traj.buffers(a.window.run)
            avg = None
            for t in rows:
                traj.layout.load(model, torch.from_numpy(params[t]).to(dev), torch.from_numpy(buffers[t]).to(dev))
                if avg is None:
                    avg = a.averager(model)
                avg.update_parameters(model)
                recompute_bn(avg.module, data.x_train, eval_bs)
                m = evaluate(avg.module, data, eval_bs)
                w.append(name, traj.layout.params_to_vector(avg.module), traj.layout.buffers_to_vector(avg.module),
                         epoch=float(src.epoch[t]), step=int(src.step[t]), n_averaged=int(avg.n_averaged), **m)
                bar.update(1)
            frozen = traj.layout_of(a.window.run).frozen  # (an average moves none of them either)
            w.set_attrs(name, window=str(a.window), rows=[rows.start, rows.stop], mode=a.mode, decay=a.decay,
                        **({"frozen": frozen} if frozen else {}))
            finals[name] = m
    return {"path": str(out), "runs": finals}
