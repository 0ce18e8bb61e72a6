"""Training: one loop, methods plug in by name (see loop.py for the contract of a method).

Example::

    from landscape.train import train
    from landscape.config import TrainConfig
    path = train(TrainConfig(epochs=20, swa_start=15), "run.h5")

Each method lives in its own module with its options and registers itself (:func:`register_method`);
this package imports them all, so :data:`METHODS` lists every one.

Under ``torchrun`` (the environment variable WORLD_SIZE > 1), :func:`train` joins a torch.distributed
group (gloo on CPU, NCCL on GPU, one GPU per local rank): ``swap`` runs its workers across the
processes; every other method runs on rank 0 alone. Only rank 0 writes the file.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

from tqdm import tqdm

from .. import __version__
from ..config import TrainConfig
from ..data import fingerprinted, import_object, load_data
from ..evaluate import check_task_fits
from ..tasks import get_task
from ..errors import ConfigError, ProcessDied, WriteError
from ..device import resolve_device, seed_everything, torch_threads
from ..dist import Group
from ..models import build_model
from ..params import Layout
from ..store import TrajectoryWriter
from .loop import METHODS, Context, evaluate, jobs, part_name, register_method, run_job, train_epoch
# importing the methods' modules registers them (and their options) in METHODS, in this order
from . import methods, swap, lookahead, grafting  # noqa: F401  isort: skip
from .lookahead import Lookahead
from .processes import check_parts, held_apart, parts_folder, train_apart, trained_with
from .swap import SWAPOptions, SwapThresholdWarning


def train(config: TrainConfig, out, overwrite: bool = False, quiet: bool = False, processes: int = 1,
          progress=None) -> dict:
    """Train every method of ``config`` from one initialization into the trajectory file ``out``.
    Interrupted, the methods finished so far and the finished epochs of the one under way stay in
    ``out.partial``; the same call again goes on from there, and the file equals an uninterrupted
    run's (each method depends only on the seed and restores its state exactly; on a GPU as far as its
    kernels are deterministic, see ``torch.use_deterministic_algorithms``).

    On a CPU every method trains with ``config.threads`` torch threads (1 by default), so the same seed
    gives the same file on any machine; ``processes`` > 1 trains that many methods side by side in
    separate processes (:mod:`.processes`), with the same results. ``progress``: an object with
    tqdm's ``update``/``set_postfix_str``/``set_description`` to report to instead of a bar.
    Returns a summary: the path, the seconds taken and each run's final metrics (under torchrun,
    ranks other than 0 return ``{"rank": r}`` only)."""
    config.validate(tuple(METHODS))
    if int(processes) != processes or processes < 1:
        raise ConfigError(f"processes must be a positive integer, got {processes}")
    config = config.replace(data=fingerprinted(config.data))  # as the file records it
    with Group.join(resolve_device(config.device)) as group:
        workers = config.options_of(SWAPOptions).workers
        if group.distributed and "swap" in config.methods and workers % group.world:
            # checked before any training, so that rank 0 does not train other methods first
            raise ConfigError(f"swap_workers ({workers}) must be a multiple of the number of "
                              f"processes ({group.world})")
        with torch_threads(config.threads if group.device.type == "cpu" else None):
            return _train(config, out, overwrite, quiet, group, processes, progress)


def _train(config, out, overwrite, quiet, group: Group, processes: int, progress) -> dict:
    device, rank, world_size = group.device, group.rank, group.world
    task = get_task(config.task, lambda path: import_object(path, ConfigError, "task"))  # the user's own choice
    data = load_data(config.data, device, task)  # bad data fails before any file is created
    seed_everything(config.seed)
    init_model = build_model(config.model, data.input_shape, data.num_classes).to(device)
    check_task_fits(init_model, data, device)
    layout = Layout.of(init_model)
    every = config.record_every or recorded_every(layout.num_params)
    file_config = dict(config.to_dict(), device=str(device), landscape_version=__version__,
                       num_classes=data.num_classes, input_shape=list(data.input_shape), recorded_every=every)
    if world_size > 1:
        file_config["processes"] = world_size
    start = time.perf_counter()
    writing = rank == 0
    opened = (TrajectoryWriter(out, file_config, layout, overwrite=overwrite, resume=True) if writing
              else contextlib.nullcontext())
    with opened as writer:
        # a file completed by a run killed just before moving it into place: nothing left to train
        done = (list(config.methods) if writer.complete else [m for part in writer.finished for m in part.split("+")]
                ) if writing else None
        finished = group.objects(done)
        methods = [m for m in config.methods if (writing or METHODS[m].distributed) and m not in finished]
        total = sum(METHODS[m].ticks(config) for m in config.methods if writing or METHODS[m].distributed)
        left = jobs(methods)  # methods trained together share their common steps
        if writing and not group.distributed:
            check_parts(writer.path, jobs(config.methods), overwrite)
        # apart when several jobs are left, or when one left has work kept apart (the last one of an
        # interrupted run), which its own process goes on from
        apart = not group.distributed and (processes > 1 and len(left) > 1 or held_apart(writer.path, left))
        with _progress_bar(progress, total, quiet or not writing) as bar:
            bar.update(total - sum(METHODS[m].ticks(config) for m in methods))
            ctx = Context(config, data, layout, init_model, writer, device, bar if writing else None, group=group,
                          record_every=every)
            try:
                if apart:
                    train_apart(config, left, writer, bar, processes, overwrite)
                else:
                    _train_in_turn(ctx, left, writing)
            except (KeyboardInterrupt, WriteError, ProcessDied) as e:
                if not writing:
                    raise
                kept = _kept(writer, ctx, e if apart else None)
                if isinstance(e, (WriteError, ProcessDied)):  # the same error, saying what was kept
                    space = "free space and " if isinstance(e, WriteError) else ""
                    raise type(e)(f"{e}; " + (f"{kept}; {space}run the same command again to go on"
                                              if kept else "nothing kept")) from None
                if kept:
                    raise KeyboardInterrupt(f"{kept}; run the same command again to train the rest") from None
                raise
            except Exception as e:  # the user's model, data or task raised: its own error, and what stays
                kept = _kept(writer, ctx) if writing and not apart else ""
                if kept:
                    e.add_note(f"{kept}; run the same command again to go on")
                raise
        # by name: the same order whether the work was resumed or not
        finals = {run: writer.final(run) for run in sorted(writer.runs)} if writing else {}
        path = writer.path if writing else None
    if not writing:
        return {"rank": rank}
    return {"path": str(Path(path)), "seconds": time.perf_counter() - start, "final": finals}


def recorded_every(num_params: int, per_row: int = 50_000) -> int:
    """``record_every`` by model size: every epoch up to ``per_row`` parameters, then 1 in
    ceil(P / per_row): 6 for resnet20 (0.27 M), whose every method over the default 150 epochs of CIFAR-10
    then keeps 733 rows of 1.09 MB, 0.80 GB (counted by benchmarks/scale.py)."""
    return max(1, math.ceil(num_params / per_row))


def _train_in_turn(ctx: Context, left: list, writing: bool) -> None:
    for job in left:
        if ctx.progress is not None:
            ctx.progress.set_description(f"train {part_name(job)}")
        seed_everything(ctx.config.seed)  # each job alone decides its randomness: resumable
        run_job(ctx, job)
        if writing:
            ctx.writer.finish_part(part_name(job))


def _progress_bar(progress, total: int, disable: bool):
    if progress is not None:
        return contextlib.nullcontext(progress)
    return tqdm(total=total, desc="train", unit="epoch", disable=disable, leave=False)


def _kept(writer, ctx, apart_interruption=None) -> str:
    """What the partial files hold, in words: "sgd+swa, lookahead up to epoch 7 kept in r.h5.partial"."""
    kept = list(writer.finished)
    if apart_interruption is None and ctx.last_epoch_done is not None and ctx.last_epoch_done[0] not in kept:
        kept.append("{} up to epoch {}".format(*ctx.last_epoch_done))
    said = [f"{', '.join(kept)} kept in {writer.tmp}"] if kept else []
    under_way = getattr(apart_interruption, "under_way", None)
    if under_way:
        said.append(f"{', '.join(under_way)} under way kept in {parts_folder(writer.path)}")
    return "; ".join(said)


__all__ = ["train", "trained_with", "register_method", "METHODS", "Context", "evaluate", "train_epoch",
           "Lookahead", "SwapThresholdWarning"]
