"""SWAP (Gupta et al. 2020): phases, the average of the recorded worker finals with BatchNorm
recomputed, the threshold warning, bad input, and torchrun against one process -- asserted from the
recorded trajectory files."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from landscape.bn import recompute_bn
from landscape.store import open_trajectory
from landscape.train import SwapThresholdWarning, train
from landscape.rebuild import rebuild_data, rebuild_model

from _cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
W = 3


def swap_config(tiny_config, **changes):
    base = dict(methods=("swap",), swap_workers=W, swap_phase1_lr=0.1, swap_threshold=70.0, swap_phase1_epochs=4,
                swap_phase2_lr=0.05, swap_phase2_epochs=2)
    return tiny_config.replace(**dict(base, **changes))


@pytest.fixture(scope="module")
def swap_run(tmp_path_factory, tiny_config):
    cfg = swap_config(tiny_config)
    path = tmp_path_factory.mktemp("swap") / "swap.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("error", SwapThresholdWarning)  # this recipe reaches its threshold
        train(cfg, path, quiet=True)
    return cfg, open_trajectory(path)


def test_swap_records_its_phases(swap_run):
    cfg, t = swap_run
    assert {"swap/phase1", "swap/average"} | {f"swap/worker{i}" for i in range(W)} == set(t.runs)
    p1 = t.run("swap/phase1")
    assert p1.attrs["threshold_reached"] and p1.attrs["batch_size"] == W * cfg.batch_size
    e1 = p1.attrs["epochs"]
    assert len(p1) == e1 + 1 and 100 - p1.metrics["train_err"][-1] >= cfg.swap_threshold
    assert all(100 - p1.metrics["train_err"][:-1][1:] < cfg.swap_threshold)  # it stopped at the first epoch there
    finals = []
    for i in range(W):
        run = t.run(f"swap/worker{i}")
        assert len(run) == cfg.swap_phase2_epochs + 1
        np.testing.assert_array_equal(t.params(f"swap/worker{i}", 0), t.params("swap/phase1", -1))  # start: phase 1
        np.testing.assert_array_equal(run.epoch, e1 + np.arange(cfg.swap_phase2_epochs + 1))
        finals.append(t.params(f"swap/worker{i}", -1))
    for i in range(W):  # own data order and seed: the workers part ways
        for j in range(i):
            assert np.abs(finals[i] - finals[j]).max() > 1e-3


def test_swap_average_is_the_mean_of_the_recorded_worker_finals_with_batchnorm_recomputed(swap_run):
    cfg, t = swap_run
    finals = np.stack([t.params(f"swap/worker{i}", -1) for i in range(W)]).astype(np.float64)
    avg = t.checkpoint("swap/average")
    assert t.num_checkpoints("swap/average") == 1 and avg.metrics["n_averaged"] == W
    np.testing.assert_allclose(avg.params.numpy(), finals.mean(0), rtol=0, atol=1e-6)
    # the average's BatchNorm buffers are neither the workers' nor their mean: they are the training
    # set's statistics under the averaged weights (whole-set mean and unbiased variance)
    data = rebuild_data(t)
    model = rebuild_model(t, data)
    t.layout.load(model, avg.params, torch.zeros_like(avg.buffers))
    recompute_bn(model, data.x_train, cfg.eval_batch_size)
    expected = t.layout.buffers_to_vector(model).numpy()
    np.testing.assert_allclose(avg.buffers.numpy(), expected, rtol=1e-5, atol=1e-6)
    mean_of_workers = np.stack([t.buffers(f"swap/worker{i}", -1) for i in range(W)]).mean(0)
    assert np.abs(mean_of_workers - expected).max() > 1e-3
    # the BatchNorm layer right after the input sees x itself: its mean is the per-channel data mean
    bn = model[1]
    x = data.x_train.double()
    with torch.no_grad():
        h = torch.nn.functional.conv1d(x, model[0].weight.double(), model[0].bias.double(), stride=2, padding=1)
    torch.testing.assert_close(bn.running_mean.double(), h.mean((0, 2)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), h.transpose(0, 1).reshape(h.shape[1], -1).var(1),
                               rtol=1e-4, atol=1e-5)
    # and the recorded metrics are those of that model
    m = t.run("swap/average").metrics
    assert np.isfinite(m["test_err"][-1]) and m["train_loss"][-1] < t.run("swap/phase1").metrics["train_loss"][0]


def test_threshold_never_reached_warns_and_is_recorded(tmp_path, tiny_config):
    cfg = swap_config(tiny_config, swap_threshold=100.0, swap_phase1_epochs=1, swap_phase2_epochs=1, swap_workers=2)
    with pytest.warns(SwapThresholdWarning, match=r"reached only .*% training accuracy in 1 epochs \(threshold 100%\)"):
        train(cfg, tmp_path / "r.h5", quiet=True)
    attrs = open_trajectory(tmp_path / "r.h5").run("swap/phase1").attrs
    assert attrs["threshold_reached"] is False and "warning" in attrs




TINY_ARGS = ["--model", "cnn1d-bn", "--model-arg", "channels=8", "--dataset", "synthetic",
             "--data-option", "n_train=300", "--data-option", "n_test=120", "--batch-size", "32"]


def in_process_cli(capsys, monkeypatch, *args):
    """``landscape ARGS`` in this process: (exit code, stderr)."""
    from landscape.cli.main import main
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() sets its own
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def test_cli_threshold_warning_is_one_line(tmp_path, capsys, monkeypatch):
    rc, err = in_process_cli(capsys, monkeypatch, "train", "-o", tmp_path / "r.h5", "--methods", "swap",
                             "--swap-workers", "2", "--swap-threshold", "100", "--swap-phase1-epochs", "1",
                             "--swap-phase2-epochs", "1", "--quiet", *TINY_ARGS)
    assert rc == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("landscape: warning: SWAP phase 1 reached only"), err
    assert (tmp_path / "r.h5").exists()


@pytest.mark.parametrize("args, message", [
    (["--methods", "swap", "--swap-workers", "1"], "--swap-workers must be at least 2"),
    (["--methods", "swap", "--swap-threshold", "0"], "--swap-threshold must be in (0, 100], got 0.0"),
    (["--methods", "grafting", "--grafting-nets", "1"], "--grafting-nets must be at least 2"),
])
def test_cli_fewer_than_two_workers_or_networks_is_an_error(tmp_path, args, message, capsys, monkeypatch):
    rc, err = in_process_cli(capsys, monkeypatch, "train", "-o", tmp_path / "r.h5", "--epochs", "1", "--quiet",
                             "--dataset", "synthetic", *args)
    assert rc == 2
    assert err.startswith("landscape: error:") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.distributed
def test_torchrun_two_processes_records_what_one_process_records(tmp_path):
    common = ["--methods", "swap", "--swap-workers", "2", "--swap-phase1-lr", "0.1", "--swap-threshold", "100",
              "--swap-phase1-epochs", "2", "--swap-phase2-epochs", "2", "--device", "cpu", "--quiet", *TINY_ARGS]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = run_cli("train", "-o", tmp_path / "one.h5", *common, env=env)
    assert one.returncode == 0, one.stderr
    two = run_cli("train", "-o", tmp_path / "two.h5", *common, env=env,
              launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    assert two.returncode == 0, two.stderr
    a, b = open_trajectory(tmp_path / "one.h5"), open_trajectory(tmp_path / "two.h5")
    assert b.config["processes"] == 2 and "processes" not in a.config
    assert sorted(a.runs) == sorted(b.runs) == ["swap/average", "swap/phase1", "swap/worker0", "swap/worker1"]
    for run in a.runs:
        ra, rb = a.run(run), b.run(run)
        np.testing.assert_array_equal(ra.step, rb.step)
        np.testing.assert_allclose(a.params(run), b.params(run), rtol=1e-4, atol=1e-5, err_msg=run)
        np.testing.assert_allclose(a.buffers(run), b.buffers(run), rtol=1e-4, atol=1e-5, err_msg=run)
        for key in ("train_loss", "test_loss"):
            np.testing.assert_allclose(ra.metrics[key], rb.metrics[key], rtol=1e-4, err_msg=f"{run} {key}")
    assert b.run("swap/average").attrs["processes"] == 2


@pytest.mark.distributed
def test_torchrun_workers_not_a_multiple_of_processes_is_an_error(tmp_path):
    r = run_cli("train", "-o", tmp_path / "r.h5", "--methods", "sgd,swap", "--swap-workers", "3", "--device", "cpu",
            "--quiet", *TINY_ARGS, env=dict(os.environ, OMP_NUM_THREADS="1"),
            launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    assert r.returncode != 0
    assert "landscape: error: --swap-workers (3) must be a multiple of the number of processes (2)" in r.stderr
    assert list(tmp_path.iterdir()) == []
