"""Device resolution, seeding and torch threads: the one place that decides where tensors live and
how many threads work on them."""
import contextlib
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cpu`` and ``cuda[:N]`` are taken as given."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"device {name!r} requested but this machine has {count} GPU{'s' * (count != 1)} "
                          f"(cuda:0 to cuda:{count - 1})")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {name!r}; use auto, cpu or cuda[:N]")
    return dev


def device_name(device: torch.device) -> str:
    """The kind of device: "cpu", "cuda (NVIDIA H200)" (any of a machine's GPUs of that model)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return f"cuda ({torch.cuda.get_device_name(device.index if device.index is not None else None)})"


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch threads (None: as they are), then restore the count."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def thread_workers(workers: int, threads_each: int | None = 1):
    """A pool of ``workers`` threads, each running torch on ``threads_each`` threads, and the caller on
    as many (None: its count as it is); None instead of a pool when ``workers`` is 1. The caller's
    thread count is restored after.

    On a CPU, small models are bound by per-operation overhead: a second intra-op thread barely speeds
    one computation up, while independent computations (plane points, checkpoints) on single-threaded
    workers scale with the cores. Example::

        with thread_workers(torch.get_num_threads()) as pool:
            values = list(pool.map(evaluate, points))
    """
    with torch_threads(threads_each):
        if workers <= 1:
            yield None
            return
        pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads,
                                  initargs=(threads_each or torch.get_num_threads(),))
        try:
            yield pool
        finally:
            pool.shutdown(cancel_futures=True)


def random_state(gpus=()) -> tuple:
    """torch's global random state: the CPU's, and ``{index: state}`` of the GPUs ``gpus`` (indices;
    asking for one starts CUDA)."""
    return torch.get_rng_state(), {i: torch.cuda.get_rng_state(i) for i in gpus}


def set_random_state(state: tuple) -> None:
    """Restore a :func:`random_state`."""
    torch.set_rng_state(state[0])
    for i, gpu_state in state[1].items():
        torch.cuda.set_rng_state(gpu_state, i)


def gpus_of(device: torch.device) -> tuple:
    """The GPU ``device`` is, as a tuple of its index (none for a CPU): whose random state training keeps,
    so that a run resumes on a machine with fewer GPUs."""
    if device.type != "cuda":
        return ()
    return (device.index if device.index is not None else torch.cuda.current_device(),)


def seed_everything(seed: int) -> torch.Generator:
    """Seed the global generators once at an entry point; return a CPU generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
