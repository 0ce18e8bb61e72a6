"""Training: one loop, methods plug in by name (see loop.py for the contract of a method).

Example::

    from landscape.train import train
    from landscape.config import TrainConfig
    path = train(TrainConfig(epochs=20, swa_start=15), "run.h5")
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import __version__
from ..config import TrainConfig
from ..data import load_data
from ..device import resolve_device, seed_everything
from ..models import build_model
from ..params import Layout
from ..store import TrajectoryWriter
from .loop import Context, evaluate, train_epoch
from .methods import run_sgd, run_swa

# name -> (function, number of progress ticks it makes, as a function of the config)
METHODS = {
    "sgd": (run_sgd, lambda c: c.epochs),
    "swa": (run_swa, lambda c: c.epochs),
}


def register_method(name: str, ticks=lambda c: c.epochs):
    """Decorator adding a training method ``fn(ctx)`` under ``name``."""
    def deco(fn):
        METHODS[name] = (fn, ticks)
        return fn
    return deco


def train(config: TrainConfig, out, overwrite: bool = False, quiet: bool = False) -> dict:
    """Train every method of ``config`` from one initialization into the trajectory file ``out``.
    Returns a summary: the path, the seconds taken and each run's final metrics."""
    config.validate(tuple(METHODS))
    device = resolve_device(config.device)
    data = load_data(config.data, device)  # bad data fails before any file is created
    seed_everything(config.seed)
    init_model = build_model(config.model, data.input_shape, data.num_classes).to(device)
    layout = Layout.of(init_model)
    file_config = dict(config.to_dict(), device=str(device), landscape_version=__version__,
                       num_classes=data.num_classes, input_shape=list(data.input_shape))
    start = time.perf_counter()
    with TrajectoryWriter(out, file_config, layout, overwrite=overwrite) as writer:
        total = sum(METHODS[m][1](config) for m in config.methods)
        with tqdm(total=total, desc="train", unit="epoch", disable=quiet, leave=False) as bar:
            ctx = Context(config, data, layout, init_model, writer, device, bar)
            for method in config.methods:
                bar.set_description(f"train {method}")
                METHODS[method][0](ctx)
        path = writer.path
    finals = {}
    for run, epoch, metrics in ctx.log:
        finals[run] = dict(metrics, epoch=epoch)
    return {"path": str(Path(path)), "seconds": time.perf_counter() - start, "final": finals}


__all__ = ["train", "register_method", "METHODS", "Context", "evaluate", "train_epoch"]
