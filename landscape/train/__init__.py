"""Training: one loop, methods plug in by name (see loop.py for the contract of a method).

Example::

    from landscape.train import train
    from landscape.config import TrainConfig
    path = train(TrainConfig(epochs=20, swa_start=15), "run.h5")

Under ``torchrun`` (the environment variable WORLD_SIZE > 1), :func:`train` joins a torch.distributed
group (gloo on CPU, NCCL on GPU, one GPU per local rank): ``swap`` runs its workers across the
processes; every other method runs on rank 0 alone. Only rank 0 writes the file.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

from tqdm import tqdm

from .. import __version__
from ..config import TrainConfig
from ..data import import_object, load_data
from ..evaluate import check_task_fits
from ..tasks import get_task
from ..errors import ConfigError, WriteError
from ..device import resolve_device, seed_everything
from ..dist import Group
from ..models import build_model
from ..params import Layout
from ..store import TrajectoryWriter
from .loop import Context, evaluate, train_epoch
from .grafting import grafting_ticks, run_grafting
from .lookahead import Lookahead, run_lookahead, run_lookahead_adam
from .methods import run_ema, run_sgd, run_swa
from .swap import SwapThresholdWarning, run_swap

# name -> (function, number of progress ticks it makes, as a function of the config)
METHODS = {
    "sgd": (run_sgd, lambda c: c.epochs),
    "swa": (run_swa, lambda c: c.epochs),
    "ema": (run_ema, lambda c: c.epochs),
    "swap": (run_swap, lambda c: c.swap_phase1_epochs + c.swap_workers * c.swap_phase2_epochs),
    "lookahead": (run_lookahead, lambda c: c.epochs),
    "lookahead-adam": (run_lookahead_adam, lambda c: c.epochs),
    "grafting": (run_grafting, grafting_ticks),
}
DISTRIBUTED_METHODS = ("swap",)  # methods that use every process under torchrun; the others run on rank 0


def register_method(name: str, ticks=lambda c: c.epochs):
    """Decorator adding a training method ``fn(ctx)`` under ``name``."""
    def deco(fn):
        METHODS[name] = (fn, ticks)
        return fn
    return deco


def train(config: TrainConfig, out, overwrite: bool = False, quiet: bool = False) -> dict:
    """Train every method of ``config`` from one initialization into the trajectory file ``out``.
    Interrupted, the methods finished so far and the finished epochs of the one under way stay in
    ``out.partial``; the same call again goes on from there, and the file equals an uninterrupted
    run's (each method depends only on the seed and restores its state exactly).
    Returns a summary: the path, the seconds taken and each run's final metrics (under torchrun,
    ranks other than 0 return ``{"rank": r}`` only)."""
    config.validate(tuple(METHODS))
    with Group.join(resolve_device(config.device)) as group:
        if group.distributed and "swap" in config.methods and config.swap_workers % group.world:
            # checked before any training, so that rank 0 does not train other methods first
            raise ConfigError(f"swap_workers ({config.swap_workers}) must be a multiple of the number of "
                              f"processes ({group.world})")
        return _train(config, out, overwrite, quiet, group)


def _train(config, out, overwrite, quiet, group: Group) -> dict:
    device, rank, world_size = group.device, group.rank, group.world
    task = get_task(config.task, lambda path: import_object(path, ConfigError, "task"))  # the user's own choice
    data = load_data(config.data, device, task)  # bad data fails before any file is created
    seed_everything(config.seed)
    init_model = build_model(config.model, data.input_shape, data.num_classes).to(device)
    check_task_fits(init_model, data, device)
    layout = Layout.of(init_model)
    file_config = dict(config.to_dict(), device=str(device), landscape_version=__version__,
                       num_classes=data.num_classes, input_shape=list(data.input_shape))
    if world_size > 1:
        file_config["processes"] = world_size
    start = time.perf_counter()
    writing = rank == 0
    opened = (TrajectoryWriter(out, file_config, layout, overwrite=overwrite, resume=True) if writing
              else contextlib.nullcontext())
    with opened as writer:
        # a file completed by a run killed just before moving it into place: nothing left to train
        done = list(config.methods) if writing and writer.complete else list(writer.finished) if writing else None
        finished = group.objects(done)
        methods = [m for m in config.methods if writing or m in DISTRIBUTED_METHODS]
        total = sum(METHODS[m][1](config) for m in methods)
        with tqdm(total=total, desc="train", unit="epoch", disable=quiet or not writing, leave=False) as bar:
            ctx = Context(config, data, layout, init_model, writer, device, bar if writing else None, group=group)
            try:
                for method in methods:
                    if method in finished:  # kept from an interrupted run of the same command
                        bar.update(METHODS[method][1](config))
                        continue
                    bar.set_description(f"train {method}")
                    seed_everything(config.seed)  # each method alone decides its randomness: resumable
                    METHODS[method][0](ctx)
                    if writing:
                        writer.finish_part(method)
            except (KeyboardInterrupt, WriteError) as e:
                if not writing:
                    raise
                kept = _kept(writer, ctx)
                if isinstance(e, WriteError):
                    raise WriteError(f"{e}; {kept or 'nothing'} kept" + (f" in {writer.tmp}; free space and run "
                                                                          "the same command again to go on"
                                                                          if kept else "")) from None
                if kept:
                    raise KeyboardInterrupt(f"{kept} kept in {writer.tmp}; run the same command "
                                            "again to train the rest") from None
                raise
        finals = {run: writer.final(run) for run in writer.runs} if writing else {}
        path = writer.path if writing else None
    if not writing:
        return {"rank": rank}
    return {"path": str(Path(path)), "seconds": time.perf_counter() - start, "final": finals}


def _kept(writer, ctx) -> str:
    """What the partial file holds, in words: "sgd, swa up to epoch 7"."""
    kept = list(writer.finished)
    if ctx.last_epoch_done is not None and ctx.last_epoch_done[0] not in kept:
        kept.append("{} up to epoch {}".format(*ctx.last_epoch_done))
    return ", ".join(kept)


__all__ = ["train", "register_method", "METHODS", "DISTRIBUTED_METHODS", "Context", "evaluate", "train_epoch",
           "Lookahead", "SwapThresholdWarning"]
