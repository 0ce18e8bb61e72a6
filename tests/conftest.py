"""Shared fixtures: one small trajectory file per test session, for tests that only read it."""
from __future__ import annotations

import os

import pytest
import torch

from landscape.config import TrainConfig
from landscape.data import DataSpec
from landscape.device import torch_threads
from landscape.models import ModelSpec

# one thread per pytest worker when the suite runs on every core (pytest -n auto), else at most two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))

# small and fast, but with BatchNorm so that every code path is exercised
TINY = TrainConfig(model=ModelSpec("cnn1d-bn", {"channels": 8}),
                   data=DataSpec("synthetic", {"n_train": 300, "n_test": 120, "shape": [1, 24]}),
                   methods=("sgd", "swa"), epochs=6, batch_size=32, swa_start=3, seed=0, device="cpu",
                   eval_batch_size=128)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # mnist1d is generated once per session into a shared cache folder
    monkeypatch.setenv("LANDSCAPE_CACHE", os.environ.get("LANDSCAPE_TEST_CACHE",
                                                         str(tmp_path_factory.getbasetemp() / "cache")))


@pytest.fixture(autouse=True)
def _float32_on_gpus(request):
    """The gpu-marked tests compare a GPU's numbers with the CPU's float32 ones: TF32, torch's default
    for convolutions on Ampere and newer GPUs (inputs rounded to 10 mantissa bits, losses ~1e-3 apart),
    is off while they run, and restored after."""
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="session")
def tiny_config() -> TrainConfig:
    return TINY


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Path of a trajectory file with runs sgd, swa/iterates, swa/average (cnn1d-bn, synthetic)."""
    from landscape.train import train
    path = tmp_path_factory.mktemp("traj") / "tiny.h5"
    train(TINY, path, quiet=True)
    return path


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads only cost here (modules use it with pytest.mark.usefixtures)."""
    with torch_threads(1):
        yield


@pytest.fixture
def two_workers():
    """torch.get_num_threads() == 2: a CPU surface evaluates on two workers (forked processes on Linux)."""
    with torch_threads(2):
        yield
