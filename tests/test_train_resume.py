"""An interrupted `landscape train` keeps what it finished: whole methods, and the epochs done of the
method under way. Run again, it trains only the rest, and the file equals an uninterrupted run's."""
import dataclasses
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from _cli import one_line_error
from landscape.cli.main import main
from landscape.errors import FileFormatError
from landscape.models import ModelSpec
from landscape.store import open_trajectory
from landscape.store.files import sha256
from landscape.train import METHODS, train
from landscape.train.loop import Context

METHODS_RUN = ("sgd", "lookahead", "swa", "grafting", "swap")
EARLIER = ("sgd+swa", "lookahead", "grafting")  # the parts before swap's: sgd and swa share their steps


@pytest.fixture(scope="module")
def config(tiny_config):
    # swa's lr 0.05 parts from sgd's 0.1 at the third epoch: the two share two epochs, then train apart
    return tiny_config.replace(methods=METHODS_RUN, epochs=4, swa_start=2, swa_lr=0.05, lookahead_fast_epochs=1,
                               grafting_baseline=True, swap_workers=3, swap_threshold=90.0, swap_phase1_epochs=6,
                               swap_phase2_epochs=2)


@pytest.fixture(scope="module")
def whole(config, tmp_path_factory):
    return train(config, tmp_path_factory.mktemp("whole") / "whole.h5", quiet=True)["path"]


def _interrupt_at(monkeypatch, run_name, nth=1):
    """Ctrl-C right after the ``nth`` checkpoint of ``run_name`` is recorded."""
    record, seen = Context.record, [0]

    def record_then_stop(self, run, *args, **kwargs):
        out = record(self, run, *args, **kwargs)
        if run == run_name:
            seen[0] += 1
            if seen[0] == nth:
                raise KeyboardInterrupt
        return out
    monkeypatch.setattr(Context, "record", record_then_stop)


def _count_records(monkeypatch) -> dict:
    record, counts = Context.record, {}

    def counting(self, run, *args, **kwargs):
        counts[run] = counts.get(run, 0) + 1
        return record(self, run, *args, **kwargs)
    monkeypatch.setattr(Context, "record", counting)
    return counts


def _contents(path):
    """Every run's every dataset and attribute, and the file's attributes."""
    out = {}
    with h5py.File(path, "r") as f:
        out["attrs"] = dict(f.attrs)
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()] if isinstance(obj, h5py.Dataset)
                                                       else dict(obj.attrs)))
    return out


def _assert_same_file(whole, resumed):
    """The same datasets, values and attributes, the runs in the same order, no resume bookkeeping."""
    a, b = _contents(whole), _contents(resumed)
    assert a.keys() == b.keys() and "finished" not in b["attrs"] and "progress_state" not in b["attrs"]
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key
    assert open_trajectory(whole).runs == open_trajectory(resumed).runs


@pytest.mark.parametrize("run, nth, kept", [
    ("sgd", 3, ()),                       # in the first job's third epoch, sgd and swa still one model
    ("sgd", 5, ()),                       # in its fourth, sgd and swa apart since the third
    ("swa/average", 2, ()),
    ("lookahead/slow", 4, ("sgd+swa",)),      # mid-epoch, at a synchronization
    ("grafting/net1", 4, ("sgd+swa", "lookahead")),        # between the two nets' grafts
    ("grafting/baseline0", 3, ("sgd+swa", "lookahead")),   # grafted nets done, baseline under way
    ("swap/phase1", 3, EARLIER),
])
def test_interrupted_training_resumes_to_the_uninterrupted_file(config, whole, tmp_path, monkeypatch, run, nth,
                                                                kept):
    out = tmp_path / "cut.h5"
    with monkeypatch.context() as m:
        _interrupt_at(m, run, nth)
        with pytest.raises(KeyboardInterrupt) as e:
            train(config, out, quiet=True)
    assert not out.exists() and out.with_name("cut.h5.partial").exists()
    said = str(e.value)
    assert said.startswith(", ".join(kept)) and " up to epoch " in said and "kept in" in said, said

    def must_not_run(*args):
        raise AssertionError("a finished method was trained again")
    for method in (m for part in kept for m in part.split("+")):
        monkeypatch.setitem(METHODS, method, dataclasses.replace(METHODS[method], run=must_not_run,
                                                                together=must_not_run))
    counts = _count_records(monkeypatch)
    summary = train(config, out, quiet=True)
    assert not out.with_name("cut.h5.partial").exists()
    # the interrupted method went on from its last finished epoch, not from the start
    assert 0 < counts[run] < open_trajectory(whole).num_checkpoints(run)

    _assert_same_file(whole, out)
    assert sha256(out) == sha256(whole)  # byte for byte: surfaces of either record the same trajectory
    assert set(summary["final"]) == set(open_trajectory(out).runs)  # kept runs are reported as well


def test_swap_interrupted_in_phase_2_keeps_its_finished_workers(config, whole, tmp_path, monkeypatch):
    from landscape.train import swap
    out, calls, train_worker = tmp_path / "cut.h5", [], swap.train_worker

    def worker(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 3:  # workers 0 and 1 are done
            raise KeyboardInterrupt
        return train_worker(*args, **kwargs)
    monkeypatch.setattr(swap, "train_worker", worker)
    with pytest.raises(KeyboardInterrupt, match="swap/phase2 up to epoch 2"):
        train(config, out, quiet=True)
    calls.clear()
    train(config, out, quiet=True)
    assert calls == [2]  # only the worker that did not finish
    _assert_same_file(whole, out)


def test_info_shows_an_interrupted_partial_as_the_whole_runs_first_rows(config, whole, tmp_path, monkeypatch,
                                                                       capsys):
    """``landscape info NAME.partial`` reads the last save of an interrupted training: each run's rows
    so far, the very first rows of the uninterrupted file; reading it changes nothing, so the resumed
    file still equals the uninterrupted one. A partial that a running command writes, or one the
    user may not write (its last save may need finishing), is refused in one line."""
    import json
    from landscape.store import files
    from landscape.store.files import OutputLock
    out = tmp_path / "cut.h5"
    partial = out.with_name("cut.h5.partial")
    with monkeypatch.context() as m:
        _interrupt_at(m, "lookahead/slow", 4)
        with pytest.raises(KeyboardInterrupt):
            train(config, out, quiet=True)
    assert main(["info", str(partial), "--json"]) == 0
    shown, full = json.loads(capsys.readouterr().out), open_trajectory(whole)
    assert not shown["complete"] and 0 < shown["runs"]["lookahead/slow"]["checkpoints"]
    for run, r in shown["runs"].items():
        n = r["checkpoints"]
        assert 0 < n <= full.num_checkpoints(run), run
        rows = full.run(run)
        assert r["epochs"] == [float(rows.epoch[0]), float(rows.epoch[n - 1])], run
        assert r["final"]["test_loss"] == float(rows.metrics["test_loss"][n - 1]), run
    assert main(["info", str(partial)]) == 0
    assert "incomplete: training did not finish" in capsys.readouterr().out
    with OutputLock(out):  # a command writing it: not read
        one_line_error(capsys, ["info", partial], f"{out} is being written by process {os.getpid()}")
    with monkeypatch.context() as m:  # one the user may not write (tests run as root here: simulated)
        def denied(path, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))
        m.setattr(files, "JournaledFile", denied)
        one_line_error(capsys, ["info", partial], f"cannot read {partial}: Permission denied", "needs write access")
    train(config, out, quiet=True)
    _assert_same_file(whole, out)


def test_interrupted_partial_of_another_configuration(config, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cut.h5"
    with monkeypatch.context() as m:
        _interrupt_at(m, "lookahead/slow", 4)
        with pytest.raises(KeyboardInterrupt):
            train(config, out, quiet=True)
    other = config.replace(lr=0.05)
    with pytest.raises(FileFormatError, match="another configuration.*--overwrite"):
        train(other, out, quiet=True)
    assert out.with_name("cut.h5.partial").exists()  # refused, not discarded
    assert train(other, out, overwrite=True, quiet=True)["path"]
    assert open_trajectory(out).config["lr"] == 0.05


def test_nothing_done_leaves_nothing(config, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cut.h5"
    _interrupt_at(monkeypatch, "sgd")  # at the initialization, before any epoch
    argv = ["train", "--dataset", "synthetic", "--model", "mlp", "--methods", "sgd", "--epochs", "2",
            "-o", str(out), "--quiet"]
    assert main(argv) == 130
    assert capsys.readouterr().err == "landscape: interrupted\n"
    assert not out.exists() and not out.with_name("cut.h5.partial").exists()


def test_cli_says_what_was_kept(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cut.h5"
    _interrupt_at(monkeypatch, "swa/average")
    argv = ["train", "--dataset", "synthetic", "--model", "mlp", "--methods", "sgd,swa", "--epochs", "3",
            "--swa-start", "2", "-o", str(out), "--quiet"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    # sgd and swa share their steps, as one part
    assert err.startswith("landscape: interrupted: sgd+swa up to epoch 1 kept in ") and "run the same command" in err
    assert err.count("\n") == 1


# -- methods trained apart, in their own processes --------------------------------------------------

def test_methods_trained_apart_equal_methods_trained_in_turn(config, whole, tmp_path):
    """Every method on one thread in its own process (two at a time) writes the file trained in turn."""
    apart = train(config, tmp_path / "apart.h5", quiet=True, processes=2)["path"]
    _assert_same_file(whole, apart)
    assert not (tmp_path / "apart.h5.parts").exists()


def test_the_machines_thread_count_does_not_change_the_results(config, tmp_path):
    import torch
    one = config.replace(methods=("sgd", "swa"))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = train(one, tmp_path / "a.h5", quiet=True)["path"]
        torch.set_num_threads(2)
        b = train(one, tmp_path / "b.h5", quiet=True)["path"]
        assert torch.get_num_threads() == 2  # restored after training
    finally:
        torch.set_num_threads(before)
    _assert_same_file(a, b)
    assert open_trajectory(a).config["threads"] == 1


def test_a_method_finished_apart_before_an_interruption_is_adopted_not_trained_again(config, tmp_path):
    two = config.replace(methods=("sgd", "lookahead"))
    whole = train(two, tmp_path / "whole.h5", quiet=True)["path"]
    parts = tmp_path / "r.h5.parts"
    parts.mkdir()
    done = train(config.replace(methods=("lookahead",)), parts / "lookahead.h5", quiet=True)["path"]
    with h5py.File(done, "r+") as f:  # a mark that only this very file carries
        f["runs/lookahead/slow"].attrs["mark"] = "kept"
    out = train(two, tmp_path / "r.h5", quiet=True, processes=2)["path"]
    with h5py.File(out, "r") as f, h5py.File(whole, "r") as w:
        assert f["runs/lookahead/slow"].attrs["mark"] == "kept"
        for name in ("sgd/params", "lookahead/slow/params", "lookahead/fast/params", "lookahead/slow/test_err"):
            np.testing.assert_array_equal(f["runs/" + name][()], w["runs/" + name][()])
    assert not parts.exists()


def test_the_last_method_left_goes_on_from_its_part(config, tmp_path):
    """Interrupted when one method was left, trained apart: the same command again takes its part (it
    trained the method again from scratch in this process, one method being nothing to train apart,
    and left the parts folder behind for ever); so does a rerun on one process."""
    two = config.replace(methods=("sgd", "lookahead"))
    whole = train(two, tmp_path / "whole.h5", quiet=True)["path"]

    class StopAtLookahead:  # a progress bar interrupted as lookahead starts: sgd is finished in the partial
        def update(self, n=1):
            pass

        def set_postfix_str(self, *args, **kwargs):
            pass

        def set_description(self, text):
            if "lookahead" in text:
                raise KeyboardInterrupt
    for processes in (2, 1):
        out = tmp_path / f"r{processes}.h5"
        with pytest.raises(KeyboardInterrupt, match="sgd kept in"):
            train(two, out, quiet=True, progress=StopAtLookahead())
        parts = tmp_path / f"r{processes}.h5.parts"
        parts.mkdir()
        done = train(config.replace(methods=("lookahead",)), parts / "lookahead.h5", quiet=True)["path"]
        with h5py.File(done, "r+") as f:  # a mark that only this very file carries
            f["runs/lookahead/slow"].attrs["mark"] = "kept"
        train(two, out, quiet=True, processes=processes)
        with h5py.File(out, "r") as f, h5py.File(whole, "r") as w:
            assert f["runs/lookahead/slow"].attrs["mark"] == "kept"
            for name in ("sgd/params", "lookahead/slow/params", "lookahead/fast/params", "lookahead/slow/test_err"):
                np.testing.assert_array_equal(f["runs/" + name][()], w["runs/" + name][()])
        assert not parts.exists()


@pytest.mark.slow  # a real Ctrl-C to a real process group: ~40 s
def test_ctrl_c_while_methods_train_apart_keeps_every_one_and_resumes(config, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    argv = [sys.executable, "-m", "landscape", "train", "--dataset", "synthetic", "--data-option", "n_train=2000",
            "--model", "mlp", "--methods", "sgd,ema,lookahead", "--epochs", "30", "--processes", "2", "--quiet",
            "--device", "cpu", "-o", str(tmp_path / "r.h5")]
    reference = train(_config_of(argv), tmp_path / "ref.h5", quiet=True)["path"]
    child = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, start_new_session=True)
    parts = tmp_path / "r.h5.parts"
    deadline = time.time() + 120
    while time.time() < deadline and not _saved_epochs(parts):
        time.sleep(0.2)
    assert _saved_epochs(parts), "no child kept an epoch"
    os.killpg(child.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: every process of the group
    err = child.communicate(timeout=120)[1]
    assert child.returncode == 130 and "kept in" in err and err.count("\n") == 1, err
    assert not (tmp_path / "r.h5").exists()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    _assert_same_file(reference, tmp_path / "r.h5")
    assert not parts.exists()


@pytest.mark.slow  # real processes, one killed: ~30 s
def test_a_child_killed_mid_training_is_one_line_saying_what_was_kept(config, tmp_path):
    """kill -9 of a method's process (the out-of-memory killer) was the parent's 18-line traceback
    ("RuntimeError: ... exit code -9"); now one line naming the method, how it ended and what was kept
    where, and the same command again finishes the file."""
    import os
    import signal
    import subprocess
    import sys
    import time
    argv = [sys.executable, "-m", "landscape", "train", "--dataset", "synthetic", "--data-option", "n_train=2000",
            "--model", "mlp", "--methods", "sgd,ema,lookahead", "--epochs", "30", "--processes", "2", "--quiet",
            "--device", "cpu", "-o", str(tmp_path / "r.h5")]
    child = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, start_new_session=True)
    parts = tmp_path / "r.h5.parts"
    deadline = time.time() + 120
    while time.time() < deadline and not _saved_epochs(parts):
        time.sleep(0.2)
    trainers = [pid for server in _children(child.pid) for pid in _children(server)]  # forkserver's children
    assert trainers, "no training process found"
    os.kill(trainers[0], signal.SIGKILL)
    err = child.communicate(timeout=120)[1]
    assert child.returncode == 2 and err.count("\n") == 1, err
    assert "in its own process stopped: killed by SIGKILL" in err and "kept in" in err and \
        "run the same command again" in err, err
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert not parts.exists()


def _children(pid: int) -> list:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


# Ctrl-C at the worst moment of a child's first message: after its queue registered the exit handler
# that joins the feeder thread, before the one that stops it. The pause lets the kernel deliver it to
# whichever thread does not block it (numpy's OpenBLAS threads, on a machine with several cores).
CTRL_C_IN_FIRST_PUT = """
import multiprocessing, os, signal, sys, time
from multiprocessing import util
from landscape.train.processes import put
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a child does (a background job inherits SIG_IGN)
register = util.Finalize.__init__
def registered(self, obj, callback, *args, **kwargs):
    register(self, obj, callback, *args, **kwargs)
    if callback.__name__ == "_finalize_join":
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
util.Finalize.__init__ = registered
messages = multiprocessing.get_context("forkserver").Queue()
try:
    put(messages, ("tick", 1))
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_ctrl_c_during_a_childs_first_message_does_not_hang_its_exit():
    """Without Ctrl-C held back around the put, the process never exits (its feeder thread is joined
    but never told to stop)."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", CTRL_C_IN_FIRST_PUT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130, r.stderr


# Ctrl-C to the whole process group while the children's server imports torch (it ignores Ctrl-C
# only once its imports are done): this process goes on, and the server must live on, silent.
CTRL_C_WHILE_THE_SERVER_IMPORTS = """
import multiprocessing.forkserver, os, signal, sys, time
from landscape.train.processes import _context
signal.signal(signal.SIGINT, lambda *_: None)
_context()
multiprocessing.forkserver.ensure_running()  # what the first child's start does (started already: nothing)
server = multiprocessing.forkserver._forkserver._forkserver_pid
os.killpg(0, signal.SIGINT)

def ignores_ctrl_c():
    with open(f"/proc/{server}/status") as f:
        return int(next(line for line in f if line.startswith("SigIgn")).split()[1], 16) & (1 << signal.SIGINT - 1)

deadline = time.time() + 120
while not ignores_ctrl_c():
    if os.waitpid(server, os.WNOHANG)[0] or time.time() > deadline:
        sys.exit("the server died")
    time.sleep(0.05)
# what the server forks later (a user's process too) receives Ctrl-C: SIGINT is not blocked there
child = multiprocessing.get_context("forkserver").Process(target=exec, args=(
    "import signal, sys; sys.exit(3 if signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []) else 0)",))
child.start()
child.join()
sys.exit(child.exitcode and "a child of the server starts with SIGINT blocked")
"""


def test_ctrl_c_while_the_childrens_server_starts_prints_nothing_of_it():
    """The server started with SIGINT blocked: without it, it died printing a KeyboardInterrupt
    traceback of the imports beside the command's one-line message."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_THE_SERVER_IMPORTS], capture_output=True, text=True,
                       timeout=180, start_new_session=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_a_childs_ctrl_c_lost_in_a_finalizer_stops_it_at_its_next_tick():
    """A child's KeyboardInterrupt raised inside a weakref callback was only reported ("Exception
    ignored", beside the one-line message) and lost: the child went on training. Its unraisablehook
    now keeps it, and the next progress tick raises it (the work is kept as for any Ctrl-C)."""
    import os
    import types

    from landscape.train import processes
    others = []
    hook = processes._keep_lost_interrupts(others.append)
    hook(types.SimpleNamespace(exc_value=ValueError("not ours")))
    assert len(others) == 1 and not processes._LOST_INTERRUPT.is_set()
    try:
        hook(types.SimpleNamespace(exc_value=KeyboardInterrupt()))
        assert len(others) == 1
        with pytest.raises(KeyboardInterrupt):
            processes._ChildProgress(None, os.getpid()).update(0)
    finally:
        processes._LOST_INTERRUPT.clear()


def _saved_epochs(parts) -> bool:
    """Whether a child has kept at least one epoch (a partial file naming a resume state) in ``parts``."""
    for partial in parts.glob("*.h5.partial") if parts.exists() else []:
        try:
            with h5py.File(partial, "r", locking=False) as f:
                if "progress_state" in f.attrs:
                    return True
        except OSError:  # being written
            continue
    return False


def _config_of(argv):
    import argparse

    from landscape.cli.commands import train as train_command
    p = argparse.ArgumentParser()
    train_command.add_arguments(p)
    return train_command.config_from_args(p.parse_args(argv[argv.index("train") + 1:]))


# -- thinned recording ------------------------------------------------------------------------------

def test_thinned_recording_keeps_the_contract(config, tmp_path):
    """Every 2nd epoch kept: first and last rows, SWA's window whole (its averages stay the mean of the
    iterates), Lookahead's fast window; names, projections and resume work as with every epoch."""
    from landscape.geometry import Plane
    thin = config.replace(methods=("sgd", "swa", "lookahead", "swap"), epochs=5, swa_start=3, record_every=2,
                          swap_threshold=100.0, swap_phase1_epochs=3, swap_phase2_epochs=3)
    path = train(thin, tmp_path / "thin.h5", quiet=True)["path"]
    t = open_trajectory(path)
    assert t.config["recorded_every"] == 2
    assert t.run("sgd").epoch.tolist() == [0.0, 2.0, 4.0, 5.0]
    assert t.run("swa/iterates").epoch.tolist() == [3.0, 4.0, 5.0]
    for i in range(3):  # the average after the i-th iterate is the mean of the first i + 1
        np.testing.assert_allclose(t.params("swa/average", i), t.params("swa/iterates", slice(0, i + 1)).mean(0),
                                   rtol=1e-5, atol=1e-6)
    # k = 5, 10 steps an epoch: row 0, the last sync of epochs 2, 4 and 5, and every sync of the fast
    # window (epoch index 2 = epochs // 2: steps 21-30), whose every inner step is in lookahead/fast
    assert t.run("lookahead/slow").epoch.tolist() == [0.0, 2.0, 2.5, 3.0, 4.0, 5.0]
    np.testing.assert_allclose(t.run("lookahead/fast").epoch, np.arange(21, 31) / 10)
    # SWAP: phase 1 to its cap of 3 epochs (the last kept: phase 2 starts there), every worker from
    # that start over 3 epochs; its average is the mean of the workers' last rows
    assert t.run("swap/phase1").epoch.tolist() == [0.0, 2.0, 3.0]
    for w in range(3):
        assert t.run(f"swap/worker{w}").epoch.tolist() == [3.0, 5.0, 6.0]
    np.testing.assert_allclose(t.params("swap/average", 0), np.mean([t.params(f"swap/worker{w}", -1) for w in range(3)],
                                                                      axis=0), rtol=1e-5, atol=1e-6)
    plane = Plane.through(t, "sgd", "swa/average", "sgd:1")
    points, paths = plane.project(t)
    assert len(paths["sgd"].coords) == 4 and "sgd:1" in points
    # thinned and resumed equals thinned and uninterrupted
    out = tmp_path / "cut.h5"
    with pytest.MonkeyPatch.context() as m:
        _interrupt_at(m, "swa/iterates", 2)
        with pytest.raises(KeyboardInterrupt):
            train(thin, out, quiet=True)
    _assert_same_file(path, train(thin, out, quiet=True)["path"])


def test_a_childs_warning_reaches_the_command_line_as_one_line(tmp_path):
    """SWAP's threshold warning, raised in a child process, is printed once, as one line, by the parent."""
    from _cli import run_cli
    r = run_cli("train", "--dataset", "synthetic", "--model", "mlp", "--methods", "swap,sgd", "--epochs", "2",
                "--swap-phase1-epochs", "1", "--swap-threshold", "100", "--swap-phase2-epochs", "1",
                "--processes", "2", "--quiet", "-o", tmp_path / "r.h5")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "warning" in line]
    assert lines == [line for line in lines if line.startswith("landscape: warning: SWAP phase 1 reached only")]
    assert len(lines) == 1, r.stderr


def test_dropped_resume_states_leave_no_dead_bytes_in_the_file(config, tmp_path, monkeypatch):
    """Every method keeps its model and optimizer state after each epoch and drops it when done. The
    states live beside the partial file, not in it: the file is its runs and HDF5's own bookkeeping,
    with no dropped state left in it (inside, every method's last state stayed as dead bytes: 5.5
    states' worth here, gigabytes for a 15 M-parameter model)."""
    from landscape.store import TrajectoryWriter
    states, save = [], TrajectoryWriter.save_progress

    def kept(self, key, state):
        states.append(len(state))
        save(self, key, state)
    monkeypatch.setattr(TrajectoryWriter, "save_progress", kept)
    many = config.replace(methods=("sgd", "ema", "lookahead", "lookahead-adam", "grafting"), epochs=3,
                          model=ModelSpec("mlp", {"hidden": [256, 256]}))
    t = open_trajectory(train(many, tmp_path / "r.h5", quiet=True)["path"])
    runs = sum(t.stored_bytes(r) for r in t.runs)
    assert t.path.stat().st_size - runs < max(states) / 2, (t.path.stat().st_size, runs, max(states))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5"]  # no state file left


def test_a_missing_resume_state_is_one_line_not_a_wrong_resume(config, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.h5"
    _interrupt_at(monkeypatch, "swa/iterates", 2)
    with pytest.raises(KeyboardInterrupt):
        train(config.replace(methods=("sgd", "swa")), out, quiet=True)
    monkeypatch.undo()
    states = list(tmp_path.glob("r.h5.partial.*.state"))
    assert len(states) == 1  # the last save point's, the older ones gone
    states[0].unlink()
    with pytest.raises(FileFormatError, match=r"resume state r\.h5\.partial\.\d+\.state is missing; delete"):
        train(config.replace(methods=("sgd", "swa")), out, quiet=True)


# -- methods that share their steps ------------------------------------------------------------------

def dropout_mlp(input_shape, num_classes):
    """A model that draws from torch's global generator at every training step."""
    from math import prod
    from torch import nn
    return nn.Sequential(nn.Flatten(), nn.Linear(prod(input_shape), 16), nn.ReLU(), nn.Dropout(0.3),
                         nn.Linear(16, num_classes))


def _same_runs(together, alone):
    """Every dataset of ``alone``'s runs equals the same dataset in ``together``."""
    with h5py.File(together, "r") as t, h5py.File(alone, "r") as a:
        names = []
        a["runs"].visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        assert names
        for name in names:
            np.testing.assert_array_equal(t["runs"][name][()], a["runs"][name][()], err_msg=name)


@pytest.mark.parametrize("model, options", [
    (None, dict(swa_lr=0.05)),                                  # swa parts from sgd at the third epoch
    ("tests.test_train_resume:dropout_mlp", dict(swa_lr=0.1)),  # shares sgd's first three; dropout
    (None, dict(swa_lr=0.1, record_every=2, checkpoint_every=7)),  # thinned rows, rows inside epochs
])
def test_methods_trained_together_equal_each_trained_alone(tiny_config, tmp_path, monkeypatch, model, options):
    """sgd, swa and ema share the steps their learning rates agree on, and each run is still, bit for
    bit, the method trained alone; ema's iterates are sgd's rows."""
    from landscape.train import methods
    config = tiny_config.replace(methods=("sgd", "swa", "ema"), epochs=4, swa_start=2, **options)
    if model is not None:
        config = config.replace(model=ModelSpec(model))
    epochs, train_epoch = [], methods.train_epoch
    monkeypatch.setattr(methods, "train_epoch", lambda *args, **kwargs: epochs.append(1) or train_epoch(*args, **kwargs))
    together = train(config, tmp_path / "together.h5", quiet=True)["path"]
    shared = 2 if options["swa_lr"] == 0.05 else 3   # sgd's lr falls in the fourth epoch (t = 0.75)
    assert len(epochs) == 4 + (4 - shared)           # one model for the three until swa parts
    for method in config.methods:
        _same_runs(together, train(config.replace(methods=(method,)), tmp_path / f"{method}.h5", quiet=True)["path"])
    if "record_every" not in options:
        traj = open_trajectory(together)
        np.testing.assert_array_equal(traj.params("ema/iterates"), traj.params("sgd")[1:])


@pytest.mark.parametrize("nth", [2, 4])  # interrupted while sgd and swa share a model, and once apart
def test_methods_trained_together_resume_to_the_uninterrupted_file(tiny_config, tmp_path, monkeypatch, nth):
    """The branches' models, optimizers, data orders and streams of the global generator (dropout)
    are kept at every epoch: resumed, the file is byte for byte the uninterrupted one."""
    config = tiny_config.replace(methods=("sgd", "swa", "ema"), epochs=4, swa_start=2, swa_lr=0.05,
                                 model=ModelSpec("tests.test_train_resume:dropout_mlp"))
    uninterrupted = train(config, tmp_path / "whole.h5", quiet=True)
    whole = uninterrupted["path"]
    out = tmp_path / "cut.h5"
    with monkeypatch.context() as m:
        _interrupt_at(m, "ema/average", nth)
        with pytest.raises(KeyboardInterrupt, match=f"sgd\\+swa\\+ema up to epoch {nth - 1} kept in"):
            train(config, out, quiet=True)
    counts = _count_records(monkeypatch)
    resumed = train(config, out, quiet=True)
    assert counts["ema/average"] == 4 - (nth - 1)
    assert list(resumed["final"]) == list(uninterrupted["final"]) == sorted(open_trajectory(whole).runs)
    _assert_same_file(whole, out)
    assert sha256(out) == sha256(whole)


def test_a_resume_state_of_another_form_is_refused_in_one_line(tiny_config, tmp_path, monkeypatch):
    from landscape.train import methods
    config = tiny_config.replace(methods=("sgd",), epochs=3)
    out = tmp_path / "cut.h5"
    with monkeypatch.context() as m:
        _interrupt_at(m, "sgd", 3)
        with pytest.raises(KeyboardInterrupt):
            train(config, out, quiet=True)
    monkeypatch.setattr(methods.SGD, "state", lambda self: dict(step=self.step, moment=[0]))  # a state it never kept
    with pytest.raises(FileFormatError, match="holds sgd's work in another form.*delete it to train afresh"):
        train(config, out, quiet=True)


def test_a_partial_of_methods_trained_one_by_one_is_refused_not_doubled(tiny_config, tmp_path, monkeypatch):
    """An earlier version trained sgd and swa one after the other: its partial holds sgd's rows under
    sgd's own state, which the two trained together never read; going on would write sgd's rows twice."""
    import landscape.train as training
    config = tiny_config.replace(methods=("sgd", "swa"), epochs=3)
    out = tmp_path / "cut.h5"
    with monkeypatch.context() as m:
        m.setattr(training, "jobs", lambda methods: [(method,) for method in methods])
        _interrupt_at(m, "sgd", 3)
        with pytest.raises(KeyboardInterrupt, match="sgd up to epoch 1"):
            train(config, out, quiet=True)
    with pytest.raises(FileFormatError, match="holds rows of sgd but no resume state of sgd\\+swa.*delete it"):
        train(config, out, quiet=True)
    out.with_name("cut.h5.partial").unlink()
    assert train(config, out, quiet=True)["path"]


@pytest.mark.filterwarnings("ignore::landscape.train.SwapThresholdWarning")
@pytest.mark.parametrize("method, run, nth", [
    ("lookahead", "lookahead/slow", 5),   # in the second epoch
    ("grafting", "grafting/net1", 4),
    ("swap", "swap/phase1", 3),
])
def test_a_model_with_dropout_resumes_to_the_uninterrupted_file(tiny_config, tmp_path, monkeypatch, method, run, nth):
    """torch's global generator, which dropout draws from, is part of every method's resume state: a
    resumed run draws the masks the uninterrupted one drew."""
    config = tiny_config.replace(methods=(method,), epochs=4, lookahead_fast_epochs=1, swap_workers=2,
                                 swap_threshold=100.0, swap_phase1_epochs=3, swap_phase2_epochs=1,
                                 model=ModelSpec("tests.test_train_resume:dropout_mlp"))
    noisy = dict(config.data.options, noise=4.0)  # SWAP's phase 1 does not reach its threshold at once
    config = config.replace(data=dataclasses.replace(config.data, options=noisy))
    whole = train(config, tmp_path / "whole.h5", quiet=True)["path"]
    out = tmp_path / "cut.h5"
    with monkeypatch.context() as m:
        _interrupt_at(m, run, nth)
        with pytest.raises(KeyboardInterrupt, match="up to epoch"):
            train(config, out, quiet=True)
    train(config, out, quiet=True)
    _assert_same_file(whole, out)


def test_work_kept_apart_in_parts_this_run_does_not_have_is_refused_or_discarded(tiny_config, tmp_path):
    """An earlier version kept sgd's and swa's work apart each in its own part; trained together now,
    they would silently start over and the old parts be deleted at the end."""
    config = tiny_config.replace(methods=("sgd", "swa", "lookahead"), epochs=2, swa_start=1)
    parts = tmp_path / "r.h5.parts"
    parts.mkdir()
    (parts / "sgd.h5.partial").write_bytes(b"kept")
    (parts / "swa.h5.partial.3.state").write_bytes(b"kept")
    with pytest.raises(FileFormatError, match="r.h5.parts holds work of sgd, swa, which this run trains in other "
                                              "parts.*--overwrite"):
        train(config, tmp_path / "r.h5", quiet=True, processes=2)
    assert (parts / "sgd.h5.partial").exists()
    assert train(config, tmp_path / "r.h5", quiet=True, processes=2, overwrite=True)["path"]
    assert not parts.exists()


def test_a_momentum_sgd_method_of_your_own_shares_its_steps_with_sgd(tiny_config, tmp_path, monkeypatch):
    """``@shared_method`` makes an SGDRun subclass a method trained together with sgd, swa and ema."""
    from landscape.train import methods
    from landscape.train.loop import METHODS

    class LateHalf(methods.SGDRun):  # sgd's rate for two epochs, then half of it
        def lr(self, epoch):
            return self.cfg.lr * (1.0 if epoch < 2 else 0.5)

        def end_epoch(self, model, epoch, evaluated):
            self.ctx.record("latehalf", model, epoch + 1.0, (epoch + 1) * self.ctx.steps_per_epoch())
    monkeypatch.setitem(METHODS, "latehalf", None)  # both registries as they were after the test
    monkeypatch.setitem(methods.SHARED, "latehalf", None)
    methods.shared_method("latehalf")(LateHalf)
    config = tiny_config.replace(methods=("sgd", "latehalf"), epochs=4)
    epochs, train_epoch = [], methods.train_epoch
    monkeypatch.setattr(methods, "train_epoch", lambda *args, **kwargs: epochs.append(1) or train_epoch(*args, **kwargs))
    together = train(config, tmp_path / "together.h5", quiet=True)["path"]
    assert len(epochs) == 2 + 2 * 2  # shared for two epochs, then each its own
    for method in config.methods:
        _same_runs(together, train(config.replace(methods=(method,)), tmp_path / f"{method}.h5", quiet=True)["path"])


def test_cuda_and_cuda_0_are_one_device_to_a_resumed_run(monkeypatch):
    """``--device cuda`` and ``--device cuda:0`` name one GPU: a process records (and resume compares)
    ``cuda:0`` for both, where a run interrupted with one was refused as another configuration with the
    other. Under torchrun CUDA without an index still means each process's own GPU."""
    import torch
    from landscape.dist import Group
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for name in ("cuda", "cuda:0"):
        with Group.join(torch.device(name)) as group:
            assert str(group.device) == "cuda:0", name
    with Group.join(torch.device("cpu")) as group:
        assert str(group.device) == "cpu"
