"""An interrupted `landscape train` keeps the methods it finished and, run again, trains only the
rest; the file equals an uninterrupted run's."""
import h5py
import numpy as np
import pytest

from cli.main import main
from landscape.errors import FileFormatError
from landscape.store import open_trajectory
from landscape.train import METHODS, train
from landscape.train.loop import Context

METHODS_RUN = ("sgd", "lookahead", "swa")  # swa last, cut short in the middle


@pytest.fixture
def config(tiny_config):
    return tiny_config.replace(methods=METHODS_RUN, epochs=4, swa_start=2, lookahead_fast_epochs=1)


def _interrupt_at(monkeypatch, run_name):
    """Ctrl-C the first time ``run_name`` is recorded (so that run already has rows)."""
    record = Context.record

    def record_then_stop(self, run, *args, **kwargs):
        out = record(self, run, *args, **kwargs)
        if run == run_name:
            raise KeyboardInterrupt
        return out
    monkeypatch.setattr(Context, "record", record_then_stop)


def _contents(path):
    """Every run's every dataset and attribute, and the file's attributes."""
    out = {}
    with h5py.File(path, "r") as f:
        out["attrs"] = dict(f.attrs)
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()] if isinstance(obj, h5py.Dataset)
                                                       else dict(obj.attrs)))
    return out


def test_interrupted_training_resumes_to_the_uninterrupted_file(config, tmp_path, monkeypatch, capsys):
    whole = train(config, tmp_path / "whole.h5", quiet=True)["path"]

    out = tmp_path / "cut.h5"
    with monkeypatch.context() as m:
        _interrupt_at(m, "swa/average")
        with pytest.raises(KeyboardInterrupt, match="sgd, lookahead kept in .*cut.h5.partial"):
            train(config, out, quiet=True)
    assert not out.exists() and out.with_name("cut.h5.partial").exists()

    def must_not_run(ctx):
        raise AssertionError("a finished method was trained again")
    monkeypatch.setitem(METHODS, "sgd", (must_not_run, METHODS["sgd"][1]))
    monkeypatch.setitem(METHODS, "lookahead", (must_not_run, METHODS["lookahead"][1]))
    summary = train(config, out, quiet=True)
    assert not out.with_name("cut.h5.partial").exists()

    a, b = _contents(whole), _contents(out)
    assert a.keys() == b.keys() and "finished" not in b["attrs"]
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key
    assert open_trajectory(whole).runs == open_trajectory(out).runs  # same order too
    assert set(summary["final"]) == set(open_trajectory(out).runs)  # kept runs are reported as well


def test_interrupted_partial_of_another_configuration(config, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cut.h5"
    with monkeypatch.context() as m:
        _interrupt_at(m, "lookahead/slow")
        with pytest.raises(KeyboardInterrupt):
            train(config, out, quiet=True)
    other = config.replace(lr=0.05)
    with pytest.raises(FileFormatError, match="another configuration.*--overwrite"):
        train(other, out, quiet=True)
    assert out.with_name("cut.h5.partial").exists()  # refused, not discarded
    assert train(other, out, overwrite=True, quiet=True)["path"]
    assert open_trajectory(out).config["lr"] == 0.05


def test_nothing_finished_leaves_nothing(config, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cut.h5"
    _interrupt_at(monkeypatch, "sgd")
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
    assert err.startswith("landscape: interrupted: sgd kept in ") and "run the same command again" in err
    assert err.count("\n") == 1
