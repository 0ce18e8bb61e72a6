"""SWAP (Gupta, Akle Serrano, DeCoste 2020, "Stochastic Weight Averaging in Parallel: Large-Batch
Training That Generalizes Well").

Phase 1: W workers train one model synchronously with a large batch (W x batch_size, each worker
computing the gradient of its W-th of it, summed by an all-reduce) until the *training* accuracy
reaches ``swap_threshold`` (or ``swap_phase1_epochs`` pass: then a :class:`SwapThresholdWarning`).
Phase 2: every worker continues from there on its own, with batch_size, a fresh momentum buffer, its
own data order and seed, for ``swap_phase2_epochs`` = E epochs with the learning rate decaying linearly
from ``swap_phase2_lr`` toward 0 (epoch e at lr (1 - e/E), the last at lr/E). Phase 3: the average of the W final weights, BatchNorm statistics
recomputed on the training set (every sample weighted equally).

Two ways to run, which record the same weights up to floating-point rounding:

- one process (default): the workers are simulated one after another. In phase 1 the large batch is
  cut into W shards, each forwarded separately (so BatchNorm sees per-worker batches, as on W
  devices) and the gradients summed; the running BatchNorm statistics are those of worker 0's shard.
- under ``torchrun --nproc_per_node R`` (R divides W): torch.distributed (gloo on CPU, NCCL on GPU).
  Rank r holds shards r, r+R, ... of every large batch; gradients are summed by all_reduce. In phase 2
  rank r trains workers r, r+R, ...; their checkpoints are gathered to rank 0, the only writer. Phase 3
  averages with an all_reduce.

Runs: ``swap/phase1`` (row 0 initialization, one row per phase-1 epoch), ``swap/worker<i>`` (row 0 the
phase-1 result, one row per phase-2 epoch), ``swap/average`` (one row, ``n_averaged`` = W).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch

from ..bn import batch_slices
from ..config import MethodOptions, option
from ..data import augment_batch
from ..device import gpus_of
from ..dist import Group
from ..errors import ConfigError
from ..tasks import count_units, output_tree, units_are_samples
from .loop import Context, evaluate, progress_note, register_method, set_lr, train_epoch

WORKER_OFFSET = 10_000  # data order of worker i: ctx.generator(WORKER_OFFSET + i)


@dataclass(frozen=True)
class SWAPOptions(MethodOptions, prefix="swap",
                  title="swap (Gupta et al. 2020): budget at most phase-1 cap + workers x phase-2 epochs"):
    # defaults: at most 50 + 4 x 25 = 150 epochs of gradients (sgd's budget), in at most 50 + 25
    # epochs of time when the workers run in parallel
    workers: int = option(4, "W workers; phase 1 uses batches of W x --batch-size", at_least=2)
    phase1_lr: float = option(0.3, "phase-1 (large-batch) learning rate, constant", above=0)
    threshold: float = option(99.0, "training accuracy (%) that ends phase 1", above=0, at_most=100)
    phase1_epochs: int = option(50, "phase-1 epoch cap (a warning if the threshold is not reached)", at_least=1)
    phase2_lr: float = option(0.12, "phase-2 learning rate of every worker, decayed linearly toward 0 "
                                    "(epoch e of E at lr (1 - e/E), the last at lr/E)", above=0)
    phase2_epochs: int = option(25, "phase-2 epochs of every worker", at_least=1)


class SwapThresholdWarning(UserWarning):
    """Phase 1 of SWAP hit its epoch cap before the training accuracy reached the threshold."""


def worker_seed(config, i: int) -> int:
    return config.seed * 1_000_003 + WORKER_OFFSET + i


def large_batches(n: int, size: int, workers: int) -> list:
    """Slices of the large batches; a last batch too small to give every worker two samples (train-mode
    BatchNorm needs two) is merged into the one before."""
    slices = batch_slices(n, size)
    if len(slices) > 1 and slices[-1].stop - slices[-1].start < 2 * workers:
        slices[-2:] = [slice(slices[-2].start, n)]
    return slices


def phase1_epoch(model, optimizer, data, workers: int, batch_size: int, generator: torch.Generator,
                 group: Group | None = None) -> None:
    """One synchronous large-batch epoch: batches of ``workers * batch_size`` in the order drawn from
    ``generator``; shard j of a batch (``torch.tensor_split``) is worker j's. This process computes
    the shards rank, rank + world_size, ...; the summed gradient is sum_j sum_{x in shard j} grad
    loss(x) / |batch|, the gradient of the whole batch's mean loss (for a language model, over
    the batch's scored tokens: scaled by |batch| / tokens once every shard is done). BatchNorm
    buffers keep the update of this process's first shard only (worker ``rank``), as on separate
    devices."""
    group = group or Group.single(data.x_train.device)
    rank, world_size = group.rank, group.world
    model.train()
    order = torch.randperm(len(data.x_train), generator=generator).to(data.x_train.device)
    params = list(model.parameters())
    for sl in large_batches(len(order), workers * batch_size, workers):
        idx = order[sl]
        x_all, y_all = data.x_train[idx], data.y_train[idx]
        if data.augment:  # the whole batch, so that every process draws the same random numbers
            x_all = augment_batch(x_all, generator)
        shards = torch.tensor_split(torch.arange(len(idx), device=idx.device), workers)
        optimizer.zero_grad(set_to_none=True)
        units = torch.zeros((), dtype=torch.float64, device=idx.device)  # scored tokens, where the task counts
        for n, j in enumerate(range(rank, workers, world_size)):
            saved = [b.clone() for b in model.buffers()] if n else None
            shard = (x_all[shards[j]], y_all[shards[j]])
            output = output_tree(model(shard[0]))
            loss = data.task.loss(output, shard, reduction="sum") / len(idx)
            loss.backward()
            if not units_are_samples(data.task):
                with torch.no_grad():
                    units += count_units(data.task, output, shard)
            if saved is not None:  # only this process's first worker updates the running statistics
                with torch.no_grad():
                    for b, s in zip(model.buffers(), saved):
                        b.copy_(s)
        if group.distributed:
            flat = group.sum(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                        for p in params]))
            for p, g in zip(params, torch.split(flat, [p.numel() for p in params])):
                p.grad = g.view_as(p).clone()
        if not units_are_samples(data.task):  # the mean over the batch's units, not its samples
            scale = len(idx) / max(float(group.sum(units)), 1.0)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        optimizer.step()


def _append(ctx: Context, run: str, vec: torch.Tensor, meta: torch.Tensor, **extra) -> None:
    """Write one gathered row: ``vec`` = params ++ buffers (float32), ``meta`` = epoch, step, metrics."""
    P = ctx.layout.num_params
    metrics = {k: float(v) for k, v in zip(ctx.data.task.value_names(), meta[2:].tolist())}
    epoch, step = float(meta[0]), int(meta[1])
    ctx.writer.append(run, vec[:P], vec[P:], epoch=epoch, step=step, **metrics, **extra)
    if ctx.progress is not None:
        ctx.progress.set_postfix_str(progress_note(run, metrics, ctx.data.task), refresh=False)


def _row(ctx: Context, model, epoch: float, step: int) -> tuple:
    m = evaluate(model, ctx.data, ctx.config.eval_batch_size)
    vec = torch.cat([ctx.layout.params_to_vector(model), ctx.layout.buffers_to_vector(model)]).cpu()
    meta = torch.tensor([epoch, step] + [m[k] for k in ctx.data.task.value_names()], dtype=torch.float64)
    return vec, meta


def train_worker(ctx: Context, start, i: int, step0: int, epoch0: float) -> tuple:
    """Phase 2 of worker ``i`` from the model ``start``; returns (rows of params++buffers (T, P+B),
    rows of epoch/step/metrics (T, 2 + the task's values), final model). Row 0 is ``start`` itself,
    then every ``record_every``-th epoch's end and the last."""
    cfg, swap = ctx.config, ctx.config.options_of(SWAPOptions)
    per_epoch = ctx.steps_per_epoch()
    # a worker's own seed for any randomness in the model; the generators are restored after, the GPU's too
    with torch.random.fork_rng(devices=gpus_of(ctx.device)):
        torch.manual_seed(worker_seed(cfg, i))
        model = copy.deepcopy(start)
        opt = torch.optim.SGD(model.parameters(), lr=swap.phase2_lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        gen = ctx.generator(WORKER_OFFSET + i)
        vecs, metas = [], []
        v, m = _row(ctx, model, epoch0, step0)
        vecs.append(v)
        metas.append(m)
        E = swap.phase2_epochs
        for e in range(E):
            set_lr(opt, swap.phase2_lr * (1.0 - e / E))  # linear to 0 (the last epoch at lr / E)
            train_epoch(model, opt, ctx.data, cfg.batch_size, gen)
            if ctx.kept_epoch(e + 1, last=E):
                v, m = _row(ctx, model, epoch0 + e + 1, step0 + (e + 1) * per_epoch)
                vecs.append(v)
                metas.append(m)
            ctx.tick()
    return torch.stack(vecs), torch.stack(metas), model


def _ticks(config) -> int:
    swap = config.options_of(SWAPOptions)
    return swap.phase1_epochs + swap.workers * swap.phase2_epochs


@register_method("swap", ticks=_ticks, distributed=True)
def run_swap(ctx: Context) -> None:
    cfg, swap = ctx.config, ctx.config.options_of(SWAPOptions)
    group = ctx.group
    rank, world_size = group.rank, group.world
    W = swap.workers
    if W % world_size:
        raise ConfigError(f"swap_workers ({W}) must be a multiple of the number of processes ({world_size})")
    writer = rank == 0
    device = ctx.device

    # -- phase 1: synchronous large-batch training until the training accuracy reaches the threshold
    model = ctx.fresh_model()
    opt = torch.optim.SGD(model.parameters(), lr=swap.phase1_lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    gen = ctx.generator(0)
    big = W * cfg.batch_size
    per_big = len(large_batches(len(ctx.data.x_train), big, W))
    # one process resumes from its last finished phase-1 epoch and phase-2 worker (under torchrun only
    # rank 0 has the file, so there the method starts over)
    resumable = world_size == 1
    phase1 = {"epochs": 0, "acc": float("nan"), "reached": False}
    state = dict(model=model, opt=opt, gen=gen, phase1=phase1)
    if resumable:
        ctx.resume_point("swap/phase1", **state)
    if writer and phase1["epochs"] == 0:
        ctx.record("swap/phase1", model, 0.0, 0)
    while not phase1["reached"] and phase1["epochs"] < swap.phase1_epochs:
        phase1_epoch(model, opt, ctx.data, W, cfg.batch_size, gen, group)
        phase1["epochs"] += 1
        flag = torch.zeros(2, dtype=torch.float64)
        if writer:
            e = phase1["epochs"]
            m = evaluate(model, ctx.data, cfg.eval_batch_size)  # every epoch: the threshold needs it
            flag[0] = 100.0 - m.get("train_err", 100.0)  # a task without an error never reaches the threshold
            flag[1] = float(flag[0] >= swap.threshold)
            keep = bool(flag[1]) or ctx.kept_epoch(e, last=swap.phase1_epochs)  # phase 2 starts from the last
            ctx.record("swap/phase1", model, float(e), e * per_big, keep=keep, evaluated=m)
        ctx.tick()
        flag = group.tensor(flag).cpu()  # every rank stops with rank 0
        phase1.update(acc=float(flag[0]), reached=bool(flag[1]))
        if resumable:
            ctx.epoch_done("swap/phase1", phase1["epochs"], **state)
    epochs1, acc, reached = phase1["epochs"], phase1["acc"], phase1["reached"]
    if writer:
        if ctx.progress is not None:  # the epochs phase 1 did not need
            ctx.progress.update(swap.phase1_epochs - epochs1)
        ctx.writer.set_attrs("swap/phase1", threshold=swap.threshold, threshold_reached=reached,
                             train_accuracy=acc, epochs=epochs1, epoch_cap=swap.phase1_epochs,
                             batch_size=big, lr=swap.phase1_lr, workers=W, processes=world_size)
    if not reached and writer:
        message = (f"SWAP phase 1 reached only {acc:.1f}% training accuracy in {epochs1} epochs "
                   f"(threshold {swap.threshold:g}%); phase 2 starts from there. Give phase 1 more epochs "
                   f"(swap_phase1_epochs) or another rate (swap_phase1_lr: higher if it learned slowly, lower "
                   f"if its loss jumped up; swap/phase1 holds its train_err per epoch), or lower swap_threshold")
        warnings.warn(message, SwapThresholdWarning, stacklevel=2)  # the CLI prints it as one line
        ctx.writer.set_attrs("swap/phase1", warning=message)

    # every worker starts from rank 0's weights and BatchNorm buffers
    if group.distributed:
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                t.data.copy_(group.tensor(t.data))

    # -- phase 2: every worker on its own; rank r trains workers r, r + R, ...
    step0 = epochs1 * per_big
    total = torch.zeros(ctx.layout.num_params, dtype=torch.float64, device=device)
    done = ctx.resume_point("swap/phase2", ticks_per_epoch=swap.phase2_epochs) if resumable else 0
    for i in range(done):  # workers an interrupted run finished: their final weights are in the file
        total += torch.as_tensor(ctx.writer.last_params(f"swap/worker{i}"), device=device).double()
    for first in range(done, W, world_size):
        i = first + rank
        vecs, metas, final = train_worker(ctx, model, i, step0, float(epochs1))
        total += ctx.layout.params_to_vector(final).double()
        gathered_v, gathered_m = group.gather_list(vecs), group.gather_list(metas)
        if writer:
            for r in range(world_size):
                run = f"swap/worker{first + r}"
                for v, m in zip(gathered_v[r], gathered_m[r]):
                    _append(ctx, run, v, m)
                ctx.writer.set_attrs(run, worker=first + r, seed=worker_seed(cfg, first + r),
                                     lr=swap.phase2_lr, schedule="linear toward 0, last epoch at lr/E", epochs=swap.phase2_epochs,
                                     batch_size=cfg.batch_size)
                if r != 0 and ctx.progress is not None:
                    ctx.progress.update(swap.phase2_epochs)
        if resumable:
            ctx.epoch_done("swap/phase2", first + 1)  # "epochs" of phase 2: finished workers

    # -- phase 3: the average of the workers, BatchNorm recomputed
    group.sum(total)
    average = copy.deepcopy(model)
    ctx.layout.vector_to_params((total / W).float(), average)
    if writer:
        ctx.record("swap/average", average, float(epochs1 + swap.phase2_epochs),
                   step0 + swap.phase2_epochs * ctx.steps_per_epoch(), recompute=True, n_averaged=W, keep=True)
        ctx.writer.set_attrs("swap/average", workers=W, processes=world_size,
                             bn="recomputed on the training set, every sample weighted equally")

