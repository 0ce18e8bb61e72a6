"""An interrupted `landscape train` keeps what it finished: whole methods, and the epochs done of the
method under way. Run again, it trains only the rest, and the file equals an uninterrupted run's."""
import h5py
import numpy as np
import pytest

from landscape.cli.main import main
from landscape.errors import FileFormatError
from landscape.store import open_trajectory
from landscape.train import METHODS, train
from landscape.train.loop import Context

METHODS_RUN = ("sgd", "lookahead", "swa", "grafting", "swap")
EARLIER = ("sgd", "lookahead", "swa", "grafting")


@pytest.fixture(scope="module")
def config(tiny_config):
    return tiny_config.replace(methods=METHODS_RUN, epochs=4, swa_start=2, lookahead_fast_epochs=1,
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
    assert a.keys() == b.keys() and "finished" not in b["attrs"] and "progress" not in b
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key
    assert open_trajectory(whole).runs == open_trajectory(resumed).runs


@pytest.mark.parametrize("run, nth, kept", [
    ("sgd", 3, ()),                       # in the first method's third epoch
    ("lookahead/slow", 4, ("sgd",)),      # mid-epoch, at a synchronization
    ("swa/average", 2, ("sgd", "lookahead")),
    ("grafting/net1", 4, ("sgd", "lookahead", "swa")),        # between the two nets' grafts
    ("grafting/baseline0", 3, ("sgd", "lookahead", "swa")),   # grafted nets done, baseline under way
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

    def must_not_run(ctx):
        raise AssertionError("a finished method was trained again")
    for method in kept:
        monkeypatch.setitem(METHODS, method, (must_not_run, METHODS[method][1]))
    counts = _count_records(monkeypatch)
    summary = train(config, out, quiet=True)
    assert not out.with_name("cut.h5.partial").exists()
    # the interrupted method went on from its last finished epoch, not from the start
    assert 0 < counts[run] < open_trajectory(whole).num_checkpoints(run)

    _assert_same_file(whole, out)
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
    assert err.startswith("landscape: interrupted: sgd, swa up to epoch 1 kept in ") and "run the same command" in err
    assert err.count("\n") == 1
