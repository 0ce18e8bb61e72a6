"""What the recorder, import and Lightning tests share: one small run trained by `landscape train`,
the same run reproduced by hand, and `landscape plane` on a file."""
from __future__ import annotations

import numpy as np
import torch

from landscape.cli.main import main
from landscape.data import DataSpec, load_data
from landscape.models import ModelSpec, build_model
from landscape.store import open_surface

# cnn1d-bn: BatchNorm buffers must travel too
MODEL = ModelSpec("cnn1d-bn", {"channels": 6})
DATA = DataSpec("synthetic", {"n_train": 256, "n_test": 96, "shape": [1, 24]})
EPOCHS, BATCH, LR, MOMENTUM, WD, SEED = 3, 32, 0.1, 0.9, 5e-4, 0
TRAIN_ARGS = ["--methods", "sgd", "--model", MODEL.name, "--model-arg", "channels=6", "--dataset", DATA.name,
              "--data-option", "n_train=256", "--data-option", "n_test=96", "--data-option", "shape=[1,24]",
              "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--lr", str(LR), "--momentum", str(MOMENTUM),
              "--weight-decay", str(WD), "--seed", str(SEED), "--device", "cpu", "--quiet"]
_cache = {}


def trained_by_landscape(tmp_path_factory):
    """The run `landscape train --methods sgd` records (built once per test session)."""
    if "path" not in _cache:
        path = tmp_path_factory.mktemp("trained") / "train.h5"
        assert main(["train", *TRAIN_ARGS, "-o", str(path)]) == 0
        _cache["path"] = path
    return _cache["path"]


def schedule(epoch: int) -> float:
    """The SWA paper's learning-rate factor for plain SGD (ratio 0.01), as `landscape train` uses it."""
    t = epoch / EPOCHS
    return 1.0 if t <= 0.5 else (1.0 - 0.99 * (t - 0.5) / 0.4 if t <= 0.9 else 0.01)


def same_start():
    """Data, model at the same initialization as `landscape train --seed 0`, and the data-order generator."""
    data = load_data(DATA)
    torch.manual_seed(SEED)
    model = build_model(MODEL, data.input_shape, data.num_classes)
    return data, model, torch.Generator().manual_seed(SEED * 1_000_003)


def sgd_epoch(model, opt, data, order) -> int:
    """One epoch of the plain loop, in the data order drawn from ``order``; returns its step count. On
    one torch thread, as `landscape train` trains: the thread count decides the order of float sums."""
    import torch.nn.functional as F

    from landscape.device import torch_threads
    model.train()
    steps = 0
    with torch_threads(1):
        for idx in torch.randperm(len(data.x_train), generator=order).split(BATCH):
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    return steps


def plane(path, out, *checkpoints, grid=(5, 4)):
    """`landscape plane FILE A B C` on a small grid; returns the surface. (--trust-code: the files these
    tests record name the tests' own model and data factories.)"""
    assert main(["plane", str(path), *checkpoints, "-o", str(out), "--grid", *map(str, grid), "--quiet",
                 "--device", "cpu", "--points-per-call", "4", "--trust-code"]) == 0
    return open_surface(out)


def assert_same_surface(a, b):
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    for name in ("train_loss", "train_err", "test_loss", "test_err"):
        np.testing.assert_array_equal(a.values[name], b.values[name], err_msg=name)
    assert a.spec == b.spec
