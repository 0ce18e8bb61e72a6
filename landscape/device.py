"""Device resolution, seeding, torch threads and CPU workers: the one place that decides where
tensors live and how many threads (or forked processes) work on them."""
import collections
import contextlib
import gc
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .errors import ConfigError, ProcessDied


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


def can_fork() -> bool:
    """Whether CPU workers may be processes forked from this one: on Linux (elsewhere fork is
    unavailable or unsafe with the system's frameworks) and before CUDA is initialized."""
    return sys.platform.startswith("linux") and not torch.cuda.is_initialized()


class ForkedWorkers:
    """``workers`` processes forked from this one, worker j running ``call(j, item)`` on one torch
    thread for the items :meth:`map` hands it. Forked, they hold this process's memory as it is (the
    model, the data, nothing pickled or copied until written), and each runs its own interpreter:
    independent computations of a small model, bound by per-operation Python overhead, scale with the
    cores, where threads wait on each other's interpreter lock (1.14x to 1.30x over two threads on a
    BatchNorm plane of ``cnn1d``). The values are those of a single-threaded worker thread, to the bit.

    A worker ignores Ctrl-C (this process stops them and keeps what they finished), raises its error
    here (the same exception), and one that dies is :class:`ProcessDied`. It never returns into this
    process's code: it leaves with ``os._exit``, so no file this process has open is flushed or closed
    from it. Example::

        with ForkedWorkers(lambda j, x: evaluate(x), workers=2) as pool:
            for x, value in pool.map(points):
                keep(x, value)
    """

    def __init__(self, call, workers: int):
        self.call, self.workers = call, workers
        self.procs, self.conns = [], []

    def __enter__(self) -> "ForkedWorkers":
        context = multiprocessing.get_context("fork")
        _flush_output()  # (else a worker would print this process's unwritten output again)
        gc.freeze()  # what exists now is never collected in a worker (nor its pages copied for it)
        try:
            for j in range(self.workers):
                mine, theirs = context.Pipe()
                # (the child closes this process's ends it inherits: else its own keeps it from ever
                # reading the end of its pipe once this process is gone)
                proc = context.Process(target=_serve, args=(self.call, j, theirs, [mine, *self.conns], os.getpid()),
                                       daemon=False)
                proc.start()
                theirs.close()
                self.procs.append(proc)
                self.conns.append(mine)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        finally:
            gc.unfreeze()
        return self

    def map(self, items):
        """``(item, call(j, item))`` for every item, as the workers finish them; each worker has the
        next item waiting (at most two at a time)."""
        items, queued = iter(items), {j: collections.deque() for j in range(self.workers)}
        undelivered = collections.deque()  # to a worker that stopped meanwhile (its error or end comes next)

        def feed(j):
            while len(queued[j]) < 2:
                item = undelivered.popleft() if undelivered else next(items, _END)
                if item is _END:
                    return
                try:
                    self.conns[j].send(item)
                except OSError:
                    undelivered.append(item)
                    return
                queued[j].append(item)

        finished = False
        try:
            for j in queued:
                feed(j)
            while any(queued.values()):
                busy = [j for j in queued if queued[j]]
                ready = multiprocessing.connection.wait([self.conns[j] for j in busy]
                                                        + [self.procs[j].sentinel for j in busy])
                for j in busy:
                    if self.conns[j] in ready or self.conns[j].poll():
                        yield queued[j].popleft(), self._receive(j)
                        feed(j)
                    elif self.procs[j].sentinel in ready:
                        raise self._died(j)
            finished = True
        finally:
            if not finished:  # items still under way: these workers cannot be handed more
                self._stop(now=True)

    def _receive(self, j: int):
        try:
            kind, value = self.conns[j].recv()
        except (EOFError, OSError):
            raise self._died(j) from None
        if kind == "error":
            raise value
        return value

    def _died(self, j: int) -> ProcessDied:
        proc = self.procs[j]
        proc.join(1.0)
        how = how_it_ended(proc.exitcode) if proc.exitcode is not None else "its connection broke"
        return ProcessDied(f"worker process {j} (pid {proc.pid}) stopped: {how}")

    def _stop(self, now: bool) -> None:
        for proc, conn in zip(self.procs, self.conns):
            if now and proc.is_alive():
                proc.terminate()
            elif not now:
                try:
                    conn.send(None)
                except OSError:
                    pass
        for proc, conn in zip(self.procs, self.conns):
            proc.join(None if not now else 5.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()
        self.procs, self.conns = [], []

    def __exit__(self, exc_type, exc, tb):
        self._stop(now=exc_type is not None)
        return False


_END = object()


def _serve(call, j: int, conn, parents_ends, parent: int) -> None:
    """A forked worker: items in, ``("done", value)`` or ``("error", exception)`` out, until None. It
    ends with its parent, however that dies (``kill -9`` too): killed by the kernel where Linux can be
    asked to, else at the end of its pipe, so that nothing the parent held (an output's lock) stays held."""
    _die_with_parent(parent)
    for end in parents_ends:
        end.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the whole group: the parent handles it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (the parent's handler turns it into an exception)
    torch.set_num_threads(1)
    code = 0
    try:
        while (item := conn.recv()) is not None:
            try:
                conn.send(("done", call(j, item)))
            except BaseException as e:
                code = 1
                _send_error(conn, e)
                break
    except (EOFError, OSError):  # the parent is gone
        code = 1
    finally:
        _flush_output()
        os._exit(code)


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG); a parent gone
    already ends it now."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):  # (None without a console; a closed one cannot flush)
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass


def _send_error(conn, e: BaseException) -> None:
    """The worker's exception, as it is when it pickles, else its type and text as a RuntimeError."""
    try:
        conn.send(("error", e))
    except Exception:
        conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}")))


def how_it_ended(exitcode: int) -> str:
    """How a child process ended, in words: "killed by SIGKILL (out of memory?)", "exit code 3"."""
    if exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else f"signal {-exitcode}"
        return f"killed by {name}" + (" (out of memory?)" if -exitcode == signal.SIGKILL else "")
    return f"exit code {exitcode}"


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
