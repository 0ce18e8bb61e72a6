"""Methods side by side: each in its own process, on one torch thread, into its own file.

Training a small model is bound by per-operation overhead, not arithmetic, so a second thread barely
helps one method, while a second process trains a second method at full speed. And on a CPU the
thread count changes the floating-point order of reductions, so the same seed gave different numbers
on machines with different core counts; with a fixed thread count per method (``threads``, 1 by
default) it gives the same file everywhere, whether the methods run one after another or apart.

:func:`train_apart` starts at most ``processes`` children (``forkserver``: no forked torch state), each
running :func:`landscape.train.train` on one job (a method, or the methods trained together that share
their common steps, :func:`~.loop.jobs`) into ``NAME.parts/<part>.h5`` (``sgd+swa+ema.h5``), with the
usual resume there. As the jobs finish, in the configuration's order, their runs are copied into the
main file (:meth:`~landscape.store.TrajectoryWriter.adopt`) as finished parts and their files removed.
Interrupted, every child keeps its own partial file; the same call again continues each of them.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import queue as queues
import shutil
import signal
import sys
import threading
import warnings
from pathlib import Path

from .. import errors
from ..store import open_trajectory
from ..data import fingerprinted
from ..device import how_it_ended
from ..store.files import interrupts_deferred
from .loop import METHODS, part_name


def parts_folder(path) -> Path:
    """Where the methods trained apart keep their files until they join ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".parts")


def held_apart(path, jobs) -> bool:
    """Whether an interrupted run kept work of one of ``jobs`` (tuples of methods trained together)
    apart (in :func:`parts_folder`)."""
    folder = parts_folder(path)
    return any((folder / f"{part_name(j)}.h5").exists() or (folder / f"{part_name(j)}.h5.partial").exists()
               for j in jobs)


def check_parts(path, jobs, overwrite: bool) -> None:
    """Work kept apart that no job of this run goes on from (an earlier version kept a part per method,
    where the methods now train together): refused in one line, or discarded with ``overwrite``."""
    folder = parts_folder(path)
    if not folder.is_dir():
        return
    ours = {part_name(job) for job in jobs}
    foreign = [f for f in sorted(folder.iterdir()) if f.name.split(".h5")[0] not in ours]
    if foreign and not overwrite:
        raise errors.FileFormatError(
            f"{folder} holds work of {', '.join(sorted({f.name.split('.h5')[0] for f in foreign}))}, which this "
            f"run trains in other parts (an earlier version's); delete it or pass --overwrite to discard it")
    for f in foreign:
        f.unlink()


def train_apart(config, jobs: list, writer, bar, processes: int, overwrite: bool) -> None:
    """Train ``jobs`` (tuples of methods of ``config`` trained together) in at most ``processes`` child
    processes and adopt their runs into ``writer`` in the jobs' order. Raises what a child raised (as
    the same landscape error), and KeyboardInterrupt with ``under_way``, the parts whose children kept
    work, when interrupted."""
    folder = parts_folder(writer.path)
    folder.mkdir(exist_ok=True)
    context = _context()
    messages = context.Queue()
    parts = [part_name(job) for job in jobs]
    # the longest first (their progress ticks measure their epochs; methods trained together tick for each
    # of theirs, more than the epochs they share cost), so that no long job starts last and runs alone;
    # they still join the file in the jobs' order
    waiting = sorted(jobs, key=lambda job: -sum(METHODS[m].ticks(config) for m in job))
    running, trained, adopted = {}, set(), 0
    try:
        while adopted < len(jobs):
            while waiting and len(running) < processes:
                job = waiting.pop(0)
                part = part_name(job)
                if trained_with(folder / f"{part}.h5", config.replace(methods=job)):
                    trained.add(part)  # finished before an interruption, not yet adopted
                    continue
                bar.set_description(f"train {', '.join(list(running) + [part])}")
                # a child resumes its own partial file of this configuration; with ``overwrite`` it
                # replaces one of another configuration
                child = context.Process(target=_child, args=(config.replace(methods=job), str(folder / f"{part}.h5"),
                                                             overwrite, messages, os.getpid()))
                with interrupts_deferred():  # a started child is waited for: it still needs the queue we own
                    child.start()
                    running[part] = child
            failure = _relay(messages, bar)
            if failure is not None:
                raise failure
            for part, child in list(running.items()):
                if child.exitcode is not None:
                    del running[part]
                    if child.exitcode == 130:  # interrupted with the parent (Ctrl-C reaches them all)
                        raise KeyboardInterrupt
                    if child.exitcode != 0:
                        raise _relay(messages, bar, wait=True) or errors.ProcessDied(
                            f"training {part} in its own process stopped: {how_it_ended(child.exitcode)}")
                    trained.add(part)
            while adopted < len(jobs) and parts[adopted] in trained:
                path = folder / f"{parts[adopted]}.h5"
                writer.adopt(path, parts[adopted])
                path.unlink()
                adopted += 1
        _relay(messages, bar)  # what the last children said just before they ended (their warnings)
        shutil.rmtree(folder)
    except BaseException as e:
        _stop(running)
        if isinstance(e, (KeyboardInterrupt, errors.WriteError, errors.ProcessDied)):
            e.under_way = [p for p in parts[adopted:] if (folder / f"{p}.h5").exists()
                           or (folder / f"{p}.h5.partial").exists()]
        raise


def trained_with(path, config) -> bool:
    """Whether ``path`` is a complete trajectory file trained with ``config`` (on any device)."""
    if not Path(path).exists():
        return False
    try:
        recorded = open_trajectory(path).config
    except errors.LandscapeError:
        return False
    mine = json.loads(json.dumps(config.replace(data=fingerprinted(config.data)).to_dict()))  # as train() records
    return all(recorded.get(k) == v for k, v in mine.items() if k != "device")


def _context():
    """Children forked from a server that has imported torch and landscape once (``forkserver``: no
    state of this process is forked; each child starts in a fraction of a second). The server also
    imports ``torch._dynamo``, which torch imports on a process's first optimizer (2.3 s of every
    child's start here otherwise)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "torch._dynamo", f"{__package__}._server_ready"])
    # The server ignores Ctrl-C only once its imports are done; a Ctrl-C before (it is in the
    # terminal's process group) printed its traceback. Started with SIGINT blocked, it inherits the
    # mask, and a Ctrl-C waits; its last import (_server_ready) drops it and unblocks SIGINT, so the
    # processes it forks receive Ctrl-C. This thread's Ctrl-C is only held back: it arrives when the
    # mask is restored. (The resource tracker starts first: starting it unblocks SIGINT.)
    multiprocessing.resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return context


def _relay(messages, bar, wait: bool = False):
    """Pass the children's progress to ``bar`` and their warnings to this process's; return the error
    a child reported, if any."""
    while True:
        try:
            kind, *what = messages.get(timeout=1.0 if wait else 0.2)
        except queues.Empty:
            return None
        if kind == "tick":
            bar.update(what[0])
        elif kind == "warning":
            warnings.warn(what[1], what[0], stacklevel=2)
        elif kind == "error":
            part, name, message = what
            cls = getattr(errors, name, None)
            if isinstance(cls, type) and issubclass(cls, errors.LandscapeError):
                return cls(message)
            return RuntimeError(f"training {part} in its own process failed: {name}: {message}")


def _stop(running: dict) -> None:
    """Interrupt the children still running (each keeps its epochs done) and wait for them."""
    for child in running.values():
        if child.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGINT)
    for child in running.values():
        child.join()


class _ChildProgress:
    """A child's progress bar: ticks go to the parent; a child whose parent died stops (keeping its
    work) at its next tick."""

    def __init__(self, messages, parent: int):
        self.messages, self.parent = messages, parent

    def update(self, n=1):
        if _LOST_INTERRUPT.is_set():
            raise KeyboardInterrupt
        try:
            os.kill(self.parent, 0)  # (a forkserver child's own parent is the server, not the trainer)
        except ProcessLookupError:
            raise KeyboardInterrupt("the parent process is gone") from None
        if n:
            put(self.messages, ("tick", n))

    def set_postfix_str(self, *args, **kwargs):
        pass

    def set_description(self, *args, **kwargs):
        pass


def put(messages, message) -> None:
    """``messages.put(message)`` with Ctrl-C held back until it returns. The first put starts the
    queue's feeder thread and registers two exit handlers, one that stops the thread and one that
    joins it; a KeyboardInterrupt between the two left only the join, and the child hung at exit.
    The handler is swapped, not the signal masked: a process-directed SIGINT reaches any thread that
    does not block it (numpy's OpenBLAS threads), and Python raises it in the main thread all the same."""
    with interrupts_deferred():
        messages.put(message)


# A Ctrl-C whose KeyboardInterrupt was raised inside a finalizer or weakref callback, where Python can
# only report it ("Exception ignored") and goes on: the child raises it again at its next progress tick.
_LOST_INTERRUPT = threading.Event()


def _keep_lost_interrupts(hook):
    def unraisable(unraisable_exception):
        if isinstance(unraisable_exception.exc_value, KeyboardInterrupt):
            _LOST_INTERRUPT.set()
        else:
            hook(unraisable_exception)
    return unraisable


def _child(config, path: str, overwrite: bool, messages, parent: int) -> None:
    from . import train

    def once(*_):  # Ctrl-C reaches the whole process group and the parent passes it on: act on the first
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt
    sys.unraisablehook = _keep_lost_interrupts(sys.unraisablehook)
    signal.signal(signal.SIGINT, once)
    try:
        with warnings.catch_warnings(record=True) as caught:  # shown by the parent, as its own
            warnings.simplefilter("always")
            train(config, path, overwrite=overwrite, processes=1, progress=_ChildProgress(messages, parent))
        for w in caught:
            put(messages, ("warning", w.category, str(w.message)))
    except KeyboardInterrupt:
        raise SystemExit(130)
    except BaseException as e:  # reported to the parent, which raises it as its own
        put(messages, ("error", part_name(config.methods), type(e).__name__, str(e)))
        raise SystemExit(1)
