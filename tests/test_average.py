"""Averages made after the fact: --uniform is the running mean of the window's rows, --ema the
recursion; BatchNorm recomputed and metrics recorded; the input's runs copied unchanged; bad windows
are one line before any work. And ema as a training method."""
import copy

import numpy as np
import pytest
import torch

from landscape.cli.main import main
from landscape.rebuild import rebuild_data, rebuild_model
from landscape.average import Window
from landscape.store import open_trajectory


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def averaged(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("avg") / "avg.h5"
    assert main(["average", str(tiny_run), "--from", "sgd:2:6", "--uniform", "--ema", "0.7", "-o", str(out),
                 "--quiet"]) == 0
    return open_trajectory(tiny_run), open_trajectory(out)


def test_uniform_is_the_mean_of_the_rows(averaged):
    src, out = averaged
    rows = src.params("sgd")[2:6].astype(np.float64)
    avg = out.params("avg/sgd/uniform_2_6")
    assert avg.shape == (4, src.layout.num_params)
    for t in range(4):
        np.testing.assert_allclose(avg[t], rows[:t + 1].mean(0), rtol=1e-5, atol=1e-6)
    d = out.run("avg/sgd/uniform_2_6")
    np.testing.assert_array_equal(d.epoch, src.run("sgd").epoch[2:6])
    np.testing.assert_array_equal(d.metrics["n_averaged"], [1, 2, 3, 4])
    assert np.isfinite(d.metrics["test_err"]).all() and np.isfinite(d.metrics["train_loss"]).all()


def test_ema_is_the_recursion(averaged):
    src, out = averaged
    rows = src.params("sgd")[2:6].astype(np.float64)
    ema = out.params("avg/sgd/ema_0.7_2_6")
    e = rows[0]
    for t in range(4):
        if t:
            e = 0.7 * e + 0.3 * rows[t]
        np.testing.assert_allclose(ema[t], e, rtol=1e-5, atol=1e-6)


def test_batchnorm_recomputed_and_input_copied(averaged, tiny_config):
    src, out = averaged
    from landscape.bn import recompute_bn
    data = rebuild_data(src)
    model = rebuild_model(src, data)
    src.layout.load(model, torch.from_numpy(out.params("avg/sgd/uniform_2_6")[-1]))
    recompute_bn(model, data.x_train, tiny_config.eval_batch_size)
    np.testing.assert_allclose(out.buffers("avg/sgd/uniform_2_6")[-1], src.layout.buffers_to_vector(model).numpy(),
                               rtol=1e-5, atol=1e-6)
    assert [r for r in out.runs if not r.startswith("avg/")] == src.runs
    for run in src.runs:  # every input run as it was: weights, buffers, rows, metrics, attributes
        np.testing.assert_array_equal(out.params(run), src.params(run))
        np.testing.assert_array_equal(out.buffers(run), src.buffers(run))
        mine, theirs = out.run(run), src.run(run)
        np.testing.assert_array_equal(mine.epoch, theirs.epoch)
        np.testing.assert_array_equal(mine.step, theirs.step)
        assert mine.metrics.keys() == theirs.metrics.keys() and mine.attrs == theirs.attrs
        for name in theirs.metrics:
            np.testing.assert_array_equal(mine.metrics[name], theirs.metrics[name])


def test_windows():
    assert Window.parse("sgd") == Window("sgd")
    assert Window.parse("swa/average:-3:") == Window("swa/average", -3, None)
    assert Window.parse("sgd::4") == Window("sgd", None, 4)


@pytest.mark.parametrize("argv, words", [
    (["--from", "sgd:5:5", "--uniform"], ["empty", "sgd has 7 checkpoints"]),
    (["--from", "sgd:100:", "--uniform"], ["empty"]),
    (["--from", "nope", "--uniform"], ["'nope' not found"]),
    (["--from", "sgd:1", "--uniform"], ["RUN:START:STOP"]),
    (["--from", "sgd"], ["--uniform"]),
    (["--from", "sgd", "--ema", "1.5"], ["decay"]),
    (["--from", "sgd", "--ema", "0"], ["decay"]),
    (["--from", "sgd", "--ema", "0.5", "0.5"], ["'avg/sgd/ema_0.5_0_7' is asked for twice", "give each once"]),
])
def test_bad_input_is_one_line_before_any_work(tiny_run, tmp_path, capsys, argv, words):
    assert main(["average", str(tiny_run), *argv, "-o", str(tmp_path / "o.h5"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("landscape: error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    assert not list(tmp_path.iterdir())


def test_a_window_holding_a_diverged_checkpoint_is_refused_before_any_work(tiny_run, tmp_path, capsys):
    """A row of infinite weights made every average from it on NaN, written as a complete run (exit 0);
    a window that ends before it still averages."""
    import shutil
    import h5py
    path = tmp_path / "diverged.h5"
    shutil.copy(tiny_run, path)
    with h5py.File(path, "r+") as f:
        row = f["runs/sgd/params"][4]
        row[3] = np.inf
        f["runs/sgd/params"][4] = row
    assert main(["average", str(path), "--from", "sgd:2:", "--uniform", "-o", str(tmp_path / "o.h5"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == ("landscape: error: checkpoint sgd:4 holds NaN or infinite weights (training diverged there?); "
                   "averaging window sgd:2: cannot include it\n")
    assert not (tmp_path / "o.h5").exists()
    assert main(["average", str(path), "--from", "sgd:0:4", "--uniform", "-o", str(tmp_path / "o.h5"), "--quiet"]) == 0


def test_ema_training_method(tiny_config, tmp_path):
    from landscape.train import train
    cfg = tiny_config.replace(methods=("sgd", "ema"), epochs=3, ema_decay=0.9)
    train(cfg, tmp_path / "ema.h5", quiet=True)
    traj = open_trajectory(tmp_path / "ema.h5")
    assert {"ema/average", "ema/iterates"} <= set(traj.runs)
    # same seed, schedule and data order: the iterates are sgd's after every epoch
    np.testing.assert_allclose(traj.params("ema/iterates"), traj.params("sgd")[1:], rtol=1e-6, atol=1e-7)
    d = traj.run("ema/average")
    assert len(d) == 3 and np.isfinite(d.metrics["test_err"]).all()
    steps = d.metrics["n_averaged"]
    assert list(steps) == list(traj.run("sgd").step[1:])
    # the average differs from the iterate, and lies between earlier and later iterates' scale
    assert np.linalg.norm(traj.params("ema/average")[-1] - traj.params("sgd")[-1]) > 0


def test_ema_averages_every_step_as_torchs_averaged_model_does(tiny_config, tmp_path):
    """The EMA's average, bit for bit, of torch.optim.swa_utils.AveragedModel (get_ema_multi_avg_fn)
    fed sgd's weights after every step (recorded here at every step)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from landscape.train import train
    cfg = tiny_config.replace(methods=("sgd", "ema"), epochs=2, ema_decay=0.9, checkpoint_every=1)
    train(cfg, tmp_path / "ema.h5", quiet=True)
    traj = open_trajectory(tmp_path / "ema.h5")
    model = rebuild_model(traj, rebuild_data(traj, "cpu"))
    reference = AveragedModel(copy.deepcopy(model), multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=False)
    steps = traj.run("sgd").step
    ends = dict(zip(traj.run("ema/average").step, traj.params("ema/average")))
    assert list(steps) == list(range(len(steps))) and len(ends) == 2
    for row in range(1, len(steps)):  # (row 0: the initialization, before any step)
        traj.layout.load(model, torch.from_numpy(traj.params("sgd")[row]), torch.from_numpy(traj.buffers("sgd")[row]))
        reference.update_parameters(model)
        if steps[row] in ends:
            assert np.array_equal(traj.layout.params_to_vector(reference.module).numpy(), ends[steps[row]])
    assert int(reference.n_averaged) == steps[-1] == traj.run("ema/average").metrics["n_averaged"][-1]
