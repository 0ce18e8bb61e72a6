"""torchrun in one place: joining the process group, rank and world size, one device per local rank,
and the few collectives the library uses (broadcast, gather, sum, barrier).

Without torchrun (WORLD_SIZE unset or 1) every call is the identity of one process, so callers write
one code path. Training (SWAP's workers as processes) and surfaces (the grid shared among processes)
both go through :class:`Group`.

Example::

    with Group.join(resolve_device("auto")) as group:
        todo = group.objects(todo if group.rank == 0 else None)   # rank 0's value everywhere
        rows = group.gather(my_rows)                               # stacked on rank 0, None elsewhere
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re

import torch
import torch.distributed as dist

from .errors import ConfigError, ProcessDied

# Ranks wait for rank 0 while it alone works (trains the methods that are not distributed, measures
# a surface's points per call, writes files): the default 30 minutes would end a long run.
TIMEOUT = datetime.timedelta(hours=12)


# how gloo and NCCL say that a peer is gone (gloo: plain RuntimeErrors)
_PEER_GONE = re.compile(r"closed by peer|reset by peer|Read error|Broken pipe|Connection refused|remote process "
                        r"exited|communicator was aborted|NCCL error|timed out|Timeout", re.IGNORECASE)


@contextlib.contextmanager
def _peers():
    """A collective whose peer is gone (killed, out of memory) raises ProcessDied in one line, not the
    backend's traceback; this process's own errors (its out-of-memory included) stay as they are."""
    try:
        yield
    except RuntimeError as e:
        gone = isinstance(e, (dist.DistNetworkError, dist.DistBackendError)) or _PEER_GONE.search(str(e))
        if isinstance(e, torch.OutOfMemoryError) or not gone:
            raise
        text = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip())  # gloo's "[source.cc:553] " prefix
        reason = re.split(r"(?<=[.!])\s", text, maxsplit=1)[0].rstrip(".") or type(e).__name__
        raise ProcessDied(f"another process of the torchrun group stopped ({reason})") from e


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun); valid before and after the group."""
    return int(os.environ.get("RANK", "0"))


def process_device(device: torch.device) -> torch.device:
    """The device this process works on: under torchrun, CUDA without an index is the GPU of its local
    rank (process i on GPU i); in one process, the current GPU (so that ``cuda`` and ``cuda:0`` name one
    device, in what files record too); anything else as given."""
    if not launched():
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return device
    _check_gpus_per_process(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _check_gpus_per_process(device: torch.device) -> None:
    """NCCL takes one GPU per process: more processes on this machine than GPUs, or all of them on one
    named GPU, would fail at the first collective (as "Duplicate GPU detected"); refused first."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type != "cuda" or local <= 1:
        return
    gpus = torch.cuda.device_count()
    if device.index is not None:
        raise ConfigError(f"torchrun started {local} processes on this machine, all on {device}; NCCL needs a GPU "
                          f"per process: pass --device cuda (process i takes GPU i) or --device cpu")
    if local > gpus:
        raise ConfigError(f"torchrun started {local} processes on this machine, which has {gpus} GPU"
                          f"{'s' * (gpus != 1)}; NCCL needs a GPU per process: start at most {gpus} "
                          f"(--nproc_per_node {gpus}) or pass --device cpu")


class Group:
    """The torchrun process group (joined by :meth:`join`), or one process (:meth:`single`)."""

    def __init__(self, rank: int, world: int, device: torch.device, started: bool):
        self.rank, self.world, self.device, self.started = rank, world, device, started

    @classmethod
    def join(cls, device: torch.device) -> "Group":
        """Join the group torchrun describes (creating it unless the caller already has), with one
        CUDA device per local rank when ``device`` is CUDA without an index; one process otherwise
        (on the current GPU for CUDA without an index)."""
        if not launched():
            return cls.single(process_device(device))
        device = process_device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        started = not dist.is_initialized()
        if started:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), device, started)

    @classmethod
    def single(cls, device) -> "Group":
        """One process, whatever torchrun set (e.g. an in-memory evaluation, never sharded)."""
        return cls(0, 1, torch.device(device), False)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def objects(self, obj):
        """Rank 0's ``obj`` on every rank (small picklable things: status, grid, masks)."""
        if not self.distributed:
            return obj
        box = [obj]
        with _peers():
            dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor on every rank (in place; the same shape everywhere)."""
        if not self.distributed:
            return t
        t = t.to(self.device).contiguous()
        with _peers():
            dist.broadcast(t, src=0)
        return t

    def gather(self, rows: torch.Tensor) -> torch.Tensor | None:
        """Every rank's equally shaped ``rows`` stacked in rank order on rank 0 (None elsewhere)."""
        if not self.distributed:
            return rows
        parts = [torch.empty_like(rows) for _ in range(self.world)]
        with _peers():
            dist.all_gather(parts, rows.contiguous())
        return torch.cat(parts) if self.rank == 0 else None

    def gather_list(self, t: torch.Tensor) -> list | None:
        """Every rank's ``t`` as a list of CPU tensors on rank 0, in rank order (None elsewhere)."""
        if not self.distributed:
            return [t.cpu()]
        t = t.to(self.device)
        out = [torch.empty_like(t) for _ in range(self.world)] if self.rank == 0 else None
        with _peers():
            dist.gather(t, out, dst=0)
        return [o.cpu() for o in out] if self.rank == 0 else None

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks, in place, on every rank."""
        if self.distributed:
            with _peers():
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.distributed:
            with _peers():
                dist.barrier()

    def close(self, wait: bool = True) -> None:
        """Leave the group if :meth:`join` created it; ``wait``: after a barrier, so that no rank
        leaves while another still communicates (not after a failure, when others may never come)."""
        if self.started and dist.is_initialized():
            if wait:
                dist.barrier()
            dist.destroy_process_group()
            self.started = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(wait=exc_type is None)
        return False
