"""Foundation: layout, trajectory files, SGD/SWA training, BatchNorm recompute, datasets, bad input."""
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from landscape.bn import batch_slices, recompute_bn
from landscape.cli.main import main
from landscape.data import DataSpec, load_data
from landscape.errors import CheckpointError, DataError, FileFormatError, ModelError
from landscape.models import ModelSpec, build_model
from landscape.params import Layout
from landscape.store import TrajectoryWriter, open_trajectory
from landscape.rebuild import rebuild_data, rebuild_model
from landscape.train import train

from _cli import one_line_error, run_cli


# -- layout and files --------------------------------------------------------------------------

def test_layout_round_trip_params_and_buffers():
    model = build_model(ModelSpec("cnn1d-bn", {"channels": 4}), (1, 24), 3)
    for m in model.modules():  # give the buffers non-default values
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_()
            m.num_batches_tracked.fill_(7)
    layout = Layout.of(model)
    assert layout.num_params == sum(p.numel() for p in model.parameters())
    w, b = layout.params_to_vector(model), layout.buffers_to_vector(model)
    other = build_model(ModelSpec("cnn1d-bn", {"channels": 4}), (1, 24), 3)
    layout.load(other, w, b)
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), other.state_dict().items()):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2), n1
    assert Layout.from_dict(layout.to_dict()) == layout
    named = layout.split_params(torch.stack([w, 2 * w]))
    assert named["0.weight"].shape == (2, 4, 1, 5)


def test_cnn1d_has_the_papers_parameter_count():
    model = build_model(ModelSpec("cnn1d"), (1, 40), 10)
    assert sum(p.numel() for p in model.parameters()) == 5210


def test_trajectory_file_round_trips_exactly(tmp_path):
    model = build_model(ModelSpec("cnn1d-bn", {"channels": 4}), (1, 24), 3)
    layout = Layout.of(model)
    rng = np.random.default_rng(0)
    rows = [(rng.standard_normal(layout.num_params).astype(np.float32),
             rng.standard_normal(layout.num_buffers).astype(np.float32)) for _ in range(4)]
    config = {"model": {"name": "cnn1d-bn", "kwargs": {"channels": 4}}, "data": {"name": "synthetic", "options": {}}}
    with TrajectoryWriter(tmp_path / "r.h5", config, layout) as w:
        for i, (p, b) in enumerate(rows):
            w.append("swa/average", p, b, epoch=i + 0.5, step=10 * i, test_err=float(i), entropy=[i, 2 * i])
        w.append("sgd", rows[0][0], rows[0][1], epoch=0, step=0)
    t = open_trajectory(tmp_path / "r.h5")
    assert set(t.runs) == {"sgd", "swa/average"}
    assert t.layout == layout and t.config == config
    np.testing.assert_array_equal(t.params("swa/average"), np.stack([p for p, _ in rows]))
    np.testing.assert_array_equal(t.buffers("swa/average"), np.stack([b for _, b in rows]))
    c = t.checkpoint("swa/average:-2")
    assert c.name == "swa/average:2" and c.epoch == 2.5 and c.step == 20
    assert torch.equal(c.params, torch.from_numpy(rows[2][0]))
    run = t.run("swa/average")
    np.testing.assert_array_equal(run.metrics["test_err"], [0, 1, 2, 3])
    assert run.metrics["entropy"].shape == (4, 2)
    assert t.checkpoint("sgd").index == 0
    with pytest.raises(CheckpointError, match="swa/average has 4 checkpoints"):
        t.checkpoint("swa/average:7")
    with pytest.raises(CheckpointError, match="runs: sgd, swa/average"):
        t.checkpoint("swap/average")


def test_rows_keep_every_dataset_as_long_as_the_run_across_save_points(tmp_path):
    """Metrics that come and go read NaN where missing; a save point (which reopens the file) between
    appends changes nothing; a row that does not fit is refused before anything is written."""
    layout = Layout.of(torch.nn.Linear(3, 2))
    w = TrajectoryWriter(tmp_path / "r.h5", {}, layout)
    w.append("a", np.full(8, 1, np.float32), epoch=0.0, step=0, train_loss=1.0, norms=[1.0, 2.0])
    w.save_progress("a", b"state")
    w.append("a", np.full(8, 2, np.float32), epoch=1.0, step=5, test_err=3.0)
    w.flush()
    w.append("a", np.full(8, 3, np.float32), epoch=2.0, step=9, norms=5.0)  # a scalar fills the row
    with pytest.raises(FileFormatError, match="norms: a row of shape \\(3,\\) does not fit rows of shape \\(2,\\)"):
        w.append("a", np.full(8, 4, np.float32), epoch=3.0, step=12, train_loss=0.5, norms=[1.0, 2.0, 3.0])
    with pytest.raises(FileFormatError, match="step: nan cannot be stored as int64"):
        w.append("a", np.full(8, 4, np.float32), epoch=3.0, step=float("nan"))
    with pytest.raises(FileFormatError, match="run a: metric note = 'x' is not numbers"):
        w.append("a", np.full(8, 4, np.float32), epoch=3.0, step=12, note="x")
    w.append("b", np.full(8, 5, np.float32))
    w.close()
    run = open_trajectory(tmp_path / "r.h5").run("a")
    np.testing.assert_array_equal(run.epoch, [0, 1, 2])
    np.testing.assert_array_equal(run.step, [0, 5, 9])
    np.testing.assert_array_equal(run.metrics["train_loss"], [1, np.nan, np.nan])
    np.testing.assert_array_equal(run.metrics["test_err"], [np.nan, 3, np.nan])
    np.testing.assert_array_equal(run.metrics["norms"], [[1, 2], [np.nan, np.nan], [5, 5]])
    t = open_trajectory(tmp_path / "r.h5")
    np.testing.assert_array_equal(t.params("a")[:, 0], [1, 2, 3])
    assert t.checkpoint("b").step == -1 and np.isnan(t.checkpoint("b").epoch)


def test_crash_leaves_no_complete_file(tmp_path):
    model = build_model(ModelSpec("mlp"), (4,), 2)
    with pytest.raises(RuntimeError):
        with TrajectoryWriter(tmp_path / "r.h5", {}, Layout.of(model)) as w:
            w.append("sgd", Layout.of(model).params_to_vector(model))
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_incomplete_file_is_refused(tmp_path):
    model = build_model(ModelSpec("mlp"), (4,), 2)
    w = TrajectoryWriter(tmp_path / "r.h5", {}, Layout.of(model))
    w.append("sgd", Layout.of(model).params_to_vector(model))
    w.flush()
    with pytest.raises(FileFormatError, match="incomplete"):
        open_trajectory(tmp_path / "r.h5.partial")
    w.abort()


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.attrs.__delitem__("config"), "missing attribute 'config'"),
    (lambda f: f.__delitem__("layout"), "missing group /layout"),
    (lambda f: f.attrs.__setitem__("config", "{not json"), "not JSON"),
    (lambda f: f["layout"].attrs.__delitem__("params"), "params"),
])
def test_damaged_file_is_refused_in_one_line(tiny_run, tmp_path, damage, message, capsys):
    from landscape.cli.main import main
    path = tmp_path / "damaged.h5"
    path.write_bytes(tiny_run.read_bytes())
    with h5py.File(path, "r+") as f:
        damage(f)
    with pytest.raises(FileFormatError, match=f"not a valid trajectory file.*{message}"):
        open_trajectory(path)
    assert main(["info", str(path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# -- training ----------------------------------------------------------------------------------

def test_tiny_run_has_the_contract_runs(tiny_run, tiny_config):
    t = open_trajectory(tiny_run)
    assert set(t.runs) == {"sgd", "swa/iterates", "swa/average"}
    assert t.num_checkpoints("sgd") == tiny_config.epochs + 1  # row 0 is the initialization
    n_avg = tiny_config.epochs - tiny_config.swa_start + 1
    assert t.num_checkpoints("swa/iterates") == t.num_checkpoints("swa/average") == n_avg
    for run in t.runs:
        m = t.run(run).metrics
        for key in ("train_loss", "train_err", "test_loss", "test_err"):
            assert np.isfinite(m[key]).all(), (run, key)


def test_sgd_and_swa_share_initialization_and_data_order(tmp_path, tiny_config):
    # with swa_start == epochs the SWA schedule equals SGD's with ratio swa_lr/lr; make both equal
    cfg = tiny_config.replace(epochs=4, swa_start=4, lr_ratio=1.0, swa_lr=tiny_config.lr)
    t = open_trajectory(train(cfg, tmp_path / "r.h5", quiet=True)["path"])
    np.testing.assert_array_equal(t.params("sgd")[-1], t.params("swa/iterates")[0])


def test_swa_average_is_the_mean_of_the_recorded_iterates(tiny_run):
    t = open_trajectory(tiny_run)
    iterates, averages = t.params("swa/iterates"), t.params("swa/average")
    for k in range(len(averages)):
        np.testing.assert_allclose(averages[k], iterates[: k + 1].astype(np.float64).mean(0), rtol=0, atol=2e-6)
    np.testing.assert_array_equal(t.run("swa/average").metrics["n_averaged"], np.arange(1, len(averages) + 1))


def test_swa_average_batchnorm_is_recomputed_on_the_training_set(tiny_run):
    t = open_trajectory(tiny_run)
    data = rebuild_data(t)
    model = rebuild_model(t, data)
    ckpt = t.checkpoint("swa/average")
    t.layout.load(model, ckpt.params, torch.zeros_like(ckpt.buffers))
    recompute_bn(model, data.x_train, t.config["eval_batch_size"])
    np.testing.assert_allclose(t.layout.buffers_to_vector(model).numpy(), ckpt.buffers.numpy(), rtol=1e-5, atol=1e-6)


def test_recomputed_batchnorm_equals_whole_training_set_statistics():
    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn1d-bn", {"channels": 6}), (1, 24), 3)
    x = torch.randn(1001, 1, 24) * 3 + 1  # 1001 = 3 batches of 300 + one of 101: unequal batches
    recompute_bn(model, x, batch_size=300)
    conv, bn = model[0], model[1]
    with torch.no_grad():
        h = conv(x)  # the first BatchNorm's input over the whole set at once
    mean = h.double().mean((0, 2))
    var = h.double().var((0, 2), unbiased=True)
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
    # whereas averaging per-batch statistics with equal batch weights (update_bn) does not
    ref = build_model(ModelSpec("cnn1d-bn", {"channels": 6}), (1, 24), 3)
    ref.load_state_dict(model.state_dict())
    torch.optim.swa_utils.update_bn([x[s] for s in batch_slices(len(x), 300)], ref)
    assert not torch.allclose(ref[1].running_var.double(), var, rtol=1e-3)


def test_same_seed_gives_a_bit_identical_file(tmp_path, tiny_config):
    cfg = tiny_config.replace(epochs=3, swa_start=2)
    a = train(cfg, tmp_path / "a.h5", quiet=True)["path"]
    b = train(cfg, tmp_path / "b.h5", quiet=True)["path"]
    assert open(a, "rb").read() == open(b, "rb").read()
    c = train(cfg.replace(seed=1), tmp_path / "c.h5", quiet=True)["path"]
    assert not np.array_equal(open_trajectory(a).params("sgd"), open_trajectory(c).params("sgd"))


def test_checkpoint_every_n_steps(tmp_path, tiny_config):
    cfg = tiny_config.replace(methods=("sgd",), epochs=2, checkpoint_every=4)  # 300/32 -> 10 steps per epoch
    t = open_trajectory(train(cfg, tmp_path / "r.h5", quiet=True)["path"])
    np.testing.assert_array_equal(t.run("sgd").step, [0, 4, 8, 10, 12, 16, 20])
    np.testing.assert_allclose(t.run("sgd").epoch, [0, 0.4, 0.8, 1, 1.2, 1.6, 2])


@pytest.mark.slow
def test_default_recipe_reaches_93_percent(tmp_path):
    """The README's claim: cnn1d on MNIST-1D with SGD reaches >= 93 % test accuracy."""
    r = run_cli("train", "--methods", "sgd", "-o", tmp_path / "r.h5", "--quiet", "--json")
    assert r.returncode == 0, r.stderr
    t = open_trajectory(tmp_path / "r.h5")
    assert t.run("sgd").metrics["test_err"][-1] <= 7.0


# -- datasets ----------------------------------------------------------------------------------

def _write_cifar(folder, n_per_batch=6):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
             b"labels": list(rng.integers(0, 10, n_per_batch).tolist()), b"batch_label": name.encode()}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)
    return folder


def test_cifar10_reads_the_python_pickle_layout(tmp_path):
    folder = _write_cifar(tmp_path / "cifar-10-batches-py")
    data = load_data(DataSpec("cifar10", {"root": str(tmp_path)}))
    assert data.x_train.shape == (30, 3, 32, 32) and data.x_test.shape == (6, 3, 32, 32)
    with open(folder / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    img = raw[b"data"][0].reshape(3, 32, 32).astype(np.float32) / 255.0
    expect = (img - np.array([0.4914, 0.4822, 0.4465])[:, None, None]) / np.array([0.2470, 0.2435, 0.2616])[:, None, None]
    np.testing.assert_allclose(data.x_train[6].numpy(), expect, rtol=1e-5, atol=1e-5)
    assert data.y_train[6].item() == raw[b"labels"][0]


def test_cifar10_pickle_that_runs_code_is_refused(tmp_path):
    folder = _write_cifar(tmp_path / "cifar-10-batches-py")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        load_data(DataSpec("cifar10", {"root": str(folder)}))


def test_augmentation_crops_and_flips_images():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    from landscape.data import augment_batch
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    seen = set()
    for i in range(len(x)):  # every image is a 32 x 32 window of the 4-padded input, maybe mirrored
        matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                   if torch.equal(out[i], (lambda w: w.flip(-1) if flip else w)(padded[i, :, dy:dy + 32, dx:dx + 32]))]
        assert matches, f"image {i} is not a crop of its padded input"
        seen.update(matches[:1])
    assert {f for _, _, f in seen} == {False, True} and len({(dy, dx) for dy, dx, _ in seen}) > 20
    # the draws, in their order: every row's offsets, then every row's flip (a run's crops depend on it)
    g = torch.Generator().manual_seed(0)
    dy, dx, flip = torch.randint(0, 9, (64,), generator=g), torch.randint(0, 9, (64,), generator=g), \
        torch.rand(64, generator=g) < 0.5
    for i in range(len(x)):
        crop = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)


def test_data_with_nan_or_inf_is_one_error_naming_the_split_and_sample(tmp_path, capsys):
    """One NaN sample made every training step diverge and every surface point NaN, with a warning that
    blamed the learning rate; it is refused where the data is read, by name, split and sample."""
    from landscape.cli.main import main
    from landscape.data import as_data
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, 5)).astype(np.float32), rng.standard_normal(20).astype(np.float32)
    x[7, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x_train=x[:15], y_train=y[:15], x_test=x[15:], y_test=y[15:])
    with pytest.raises(DataError, match=r"x_train holds NaN or infinite values in 1 sample \(the first: 7\)"):
        load_data(DataSpec("npz", {"path": str(tmp_path / "nan.npz")}), task="regression")
    assert main(["train", "--dataset", "npz", "--data-option", f"path={tmp_path / 'nan.npz'}", "--task", "regression",
                 "--model", "mlp", "--epochs", "1", "-o", str(tmp_path / "run.h5")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x_train holds NaN" in err and not (tmp_path / "run.h5").exists()
    clean = torch.from_numpy(np.nan_to_num(x))
    targets = torch.from_numpy(y.copy())
    targets[[3, 4]] = float("inf")
    with pytest.raises(DataError, match=r"data: y_test holds NaN or infinite values in 2 samples \(the first: 3\)"):
        as_data((clean[:10], targets[10:], clean[10:], targets[:10]))
    assert as_data((clean[:10], torch.from_numpy(y[:10]), clean[10:], torch.from_numpy(y[10:]))).x_train.shape == (10, 5)


def test_npz_and_synthetic_and_mnist1d(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.standard_normal((20, 5)), y_train=rng.integers(0, 3, 20),
             x_test=rng.standard_normal((8, 5)), y_test=rng.integers(0, 3, 8))
    d = load_data(DataSpec("npz", {"path": str(tmp_path / "d.npz")}))
    assert d.input_shape == (5,) and d.num_classes <= 3
    d = load_data(DataSpec("mnist1d"))
    assert tuple(d.x_train.shape) == (4000, 1, 40) and tuple(d.x_test.shape) == (1000, 1, 40)
    assert d.num_classes == 10


def test_an_npz_file_is_hashed_once_per_training_and_again_once_it_changes(tmp_path, monkeypatch):
    """Training fingerprints its npz file and the loader checks that fingerprint: one read of the file's
    bytes, not two (a dataset of gigabytes). The same name rewritten, even with the same size and
    modification time, is read again: its change time differs."""
    import builtins
    import hashlib
    import os
    from landscape.config import TrainConfig
    from landscape.store import files
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    arrays = dict(x_train=rng.standard_normal((20, 5)), y_train=rng.integers(0, 3, 20),
                  x_test=rng.standard_normal((8, 5)), y_test=rng.integers(0, 3, 8))
    np.savez(path, **arrays)
    monkeypatch.setattr(files, "_SETTLED_NS", 0)  # (kept even just after writing: its times are nanoseconds here)
    reads = []

    def counted(file, *args, **kwargs):  # the store's reads of the npz file (hashing is its only one)
        if Path(file) == path:
            reads.append(1)
        return builtins.open(file, *args, **kwargs)
    monkeypatch.setattr(files, "open", counted, raising=False)
    real = hashlib.sha256
    config = TrainConfig(epochs=1, methods=("sgd",), model=ModelSpec("mlp"), data=DataSpec("npz", {"path": str(path)}))
    train(config, tmp_path / "run.h5", quiet=True)
    assert len(reads) == 1
    first = files.sha256(path)
    assert len(reads) == 1  # unchanged: the digest kept
    stat = path.stat()
    arrays["y_test"] = (arrays["y_test"] + 1) % 3   # the same size, the same modification time
    np.savez(path, **arrays)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    assert files.sha256(path) == real(path.read_bytes()).hexdigest() != first and len(reads) == 2


def test_a_file_rewritten_within_its_filesystems_time_resolution_is_hashed_anew(tmp_path, monkeypatch):
    """On a filesystem that keeps times to the second, a file rewritten with the same size within the
    second it was written (or replaced by one that reuses its inode number) keeps every time: the
    digest of a file changed that recently is not kept, so the new bytes are hashed. Once its last change
    is two seconds old, the digest is kept."""
    import hashlib
    import os
    import time
    from landscape.store import files
    second = 1_000_000_000
    monkeypatch.setattr(files, "_identity", lambda st: (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns // second
                                                        * second, st.st_ctime_ns // second * second))
    path = tmp_path / "data.bin"
    for content in (b"A" * 4096, b"B" * 4096, b"C" * 4096):
        path.write_bytes(content)
        assert files.sha256(path) == hashlib.sha256(content).hexdigest()
    reads, real_open = [], open

    def counted(file, *args, **kwargs):
        reads.append(file)
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(files, "open", counted, raising=False)
    now = time.time_ns
    monkeypatch.setattr(files.time, "time_ns", lambda: now() + 3_000_000_000)  # two seconds on
    files.sha256(path)
    files.sha256(path)
    assert len(reads) == 1


def test_a_trajectory_finds_its_own_npz_file_and_refuses_another_of_the_same_name(tmp_path, monkeypatch):
    """An npz dataset is recorded with its SHA-256: read back from the current folder or beside the
    trajectory (a run shared as a folder with its data), never another file of the same name."""
    import shutil
    from landscape.config import TrainConfig
    from landscape.store.files import sha256
    for folder, seed in (("a", 0), ("b", 1)):
        rng = np.random.default_rng(seed)
        (tmp_path / folder).mkdir()
        np.savez(tmp_path / folder / "data.npz", x_train=rng.standard_normal((20, 5)), y_train=rng.integers(0, 3, 20),
                 x_test=rng.standard_normal((8, 5)), y_test=rng.integers(0, 3, 8))
    monkeypatch.chdir(tmp_path / "a")
    config = TrainConfig(epochs=1, methods=("sgd",), model=ModelSpec("mlp"), data=DataSpec("npz", {"path": "data.npz"}))
    train(config, "run.h5", quiet=True)
    recorded = open_trajectory("run.h5").config["data"]["options"]
    assert recorded == {"path": "data.npz", "sha256": sha256(tmp_path / "a" / "data.npz")}
    expected = rebuild_data(open_trajectory("run.h5")).x_train
    np.testing.assert_array_equal(expected.numpy(), np.load("data.npz")["x_train"].astype(np.float32))
    shutil.copy("run.h5", tmp_path / "b")
    monkeypatch.chdir(tmp_path / "b")  # beside another data.npz
    with pytest.raises(DataError, match="npz file data.npz is not the one recorded"):
        rebuild_data(open_trajectory("run.h5"))
    with pytest.raises(DataError, match="is not the one recorded .* leave the option out"):  # a SHA-256 given
        train(config.replace(data=DataSpec("npz", dict(recorded))), "other.h5", quiet=True)
    with pytest.raises(DataError, match="is not the one recorded"):  # (also to the loader itself)
        load_data(DataSpec("npz", dict(recorded)))
    monkeypatch.chdir(tmp_path)  # the run shared as a folder: found beside the trajectory
    shutil.copytree(tmp_path / "a", tmp_path / "shared")
    assert torch.equal(rebuild_data(open_trajectory("shared/run.h5")).x_train, expected)
    from landscape.train import trained_with
    monkeypatch.chdir(tmp_path / "a")
    assert trained_with("run.h5", config)  # (the config as given: without the SHA-256 the file records)
    # recorded by absolute path, the data gone from there: found beside the trajectory too
    monkeypatch.chdir(tmp_path)
    absolute = config.replace(data=DataSpec("npz", {"path": str(tmp_path / "b" / "data.npz")}))
    train(absolute, "abs.h5", quiet=True)
    (tmp_path / "moved").mkdir()
    for name in ("abs.h5", "b/data.npz"):
        shutil.move(name, tmp_path / "moved")
    assert rebuild_data(open_trajectory("moved/abs.h5")).x_train.shape == (20, 5)
    (tmp_path / "moved" / "data.npz").unlink()
    with pytest.raises(DataError, match=f"npz file {tmp_path / 'b' / 'data.npz'} does not exist, nor beside moved/abs.h5"):
        rebuild_data(open_trajectory("moved/abs.h5"))


# -- bad input: one line, non-zero exit, no file -----------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--model", "nope"], "unknown model 'nope'"),
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--dataset", "cifar10", "--data-option", "root=/does/not/exist"], "does not exist"),
    (["--model", "resnet20"], "resnet20 expects images"),
    (["--model", "mlp", "--model-arg", "hidden=[3]", "--dataset", "npz", "--data-option", "path=/no.npz"], "does not exist"),
    (["--methods", "sgd,adamw"], "unknown method 'adamw'"),
    (["--dataset", "synthetic", "--data-option", "n_trian=20"], "dataset 'synthetic' has no option 'n_trian'"),
    (["--data-option", "augment=true"], "dataset 'mnist1d' has no option 'augment'; its options: none"),
    (["--dataset", "synthetic", "--data-option", "augment=true"], "augment (random crop and flip) needs images"),
    (["--swa-start", "0", "--swa-c", "1"], "--swa-start must be between 1 and --epochs (1), got 0"),
])
def test_bad_input_gives_one_line(tmp_path, capsys, args, message):
    # in this process: the command's own code path, without a fresh interpreter's seconds of start-up
    # (the installed command's one-line refusal is tested as a process in test_trust)
    one_line_error(capsys, ["train", "-o", tmp_path / "r.h5", "--epochs", "1", "--swa-start", "1", "--quiet", *args],
                   message)
    assert list(tmp_path.iterdir()) == []


def test_malformed_cifar_directory(tmp_path, capsys):
    folder = _write_cifar(tmp_path / "cifar-10-batches-py")
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    one_line_error(capsys, ["train", "-o", tmp_path / "r.h5", "--dataset", "cifar10", "--data-option",
                            f"root={tmp_path}"], "data_batch_3 is not a CIFAR-10 batch file")
    assert not (tmp_path / "r.h5").exists()


def test_existing_output_and_unwritable_output(tmp_path, capsys):
    out = tmp_path / "r.h5"
    out.write_bytes(b"precious")
    base = ["train", "--dataset", "synthetic", "--epochs", "1", "--methods", "sgd", "--quiet"]
    one_line_error(capsys, [*base, "-o", out], "already exists; pass --overwrite")
    assert out.read_bytes() == b"precious"
    one_line_error(capsys, [*base, "-o", tmp_path / "missing" / "r.h5"], "does not exist")
    r = run_cli(*base, "-o", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    with h5py.File(out, "r") as f:
        assert f.attrs["complete"]


def test_model_that_does_not_fit_the_data():
    with pytest.raises(ModelError, match="expected 3 values per sample"):
        build_model(ModelSpec("tests.test_foundation:wrong_head"), (1, 24), 3)


def wrong_head(input_shape, num_classes):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(24, num_classes + 1))


def test_info_json(tiny_run, capsys):
    import json
    assert main(["info", str(tiny_run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["runs"]["swa/average"]["checkpoints"] == 4
    # what each run takes in the file: at least its float32 weights, all of them at most the file
    sizes = {r: v["bytes"] for r, v in info["runs"].items()}
    assert all(sizes[r] >= info["runs"][r]["checkpoints"] * info["num_params"] * 4 for r in sizes)
    assert sum(sizes.values()) <= info["bytes"]
    one_line_error(capsys, ["info", tiny_run.parent / "nope.h5"], "does not exist")


def test_swa_start_follows_the_epoch_budget_and_divergence_is_reported(tmp_path):
    base = ["train", "--dataset", "synthetic", "--model", "mlp", "--quiet"]
    r = run_cli(*base, "--epochs", "6", "-o", tmp_path / "a.h5")  # swa and its start from --epochs alone
    assert r.returncode == 0, r.stderr
    assert open_trajectory(tmp_path / "a.h5").config["swa_start"] == 4
    r = run_cli(*base, "--methods", "sgd", "--epochs", "2", "--lr", "1e6", "-o", tmp_path / "b.h5")
    assert r.returncode == 0 and "training diverged" in r.stderr and "in sgd" in r.stderr, r.stderr
    assert np.isnan(open_trajectory(tmp_path / "b.h5").run("sgd").metrics["test_err"][-1])


def test_library_and_command_line_defaults_agree():
    """TrainConfig(epochs=20) is what `landscape train --epochs 20` trains (SWA from 2/3 of the budget)."""
    import argparse

    from landscape.cli.commands import train as train_command
    from landscape.config import TrainConfig
    p = argparse.ArgumentParser()
    train_command.add_arguments(p)
    from_cli = train_command.config_from_args(p.parse_args(["--epochs", "20"]))
    assert TrainConfig(epochs=20).validate() == from_cli
    assert TrainConfig().swa_start == 100 and TrainConfig(epochs=20).swa_start == 13


# -- a method is one file: its options dataclass gives TrainConfig keywords and the command's flags ----

def test_a_new_method_and_its_options_reach_the_library_and_the_command_line(tmp_path, monkeypatch, capsys):
    from dataclasses import dataclass

    from landscape.cli.main import main
    from landscape.config import MethodOptions, TrainConfig, option
    from landscape.train import METHODS, register_method
    from landscape.train.loop import set_lr, sgd_optimizer, train_epoch

    # undone after the test: the registries get back exactly what they held
    monkeypatch.setattr(MethodOptions, "registered", dict(MethodOptions.registered))
    monkeypatch.setitem(METHODS, "slowsgd", None)

    @dataclass(frozen=True)
    class SlowOptions(MethodOptions, prefix="slowsgd", title="slowsgd (a test's method)"):
        factor: float = option(0.5, "learning rate as a fraction of --lr", above=0, at_most=1)

    @register_method("slowsgd")
    def run_slowsgd(ctx):
        model, cfg = ctx.fresh_model(), ctx.config
        opt, gen = sgd_optimizer(model, cfg), ctx.generator()
        for epoch in range(cfg.epochs):
            set_lr(opt, cfg.lr * cfg.options_of(SlowOptions).factor)
            train_epoch(model, opt, ctx.data, cfg.batch_size, gen)
            ctx.record("slowsgd", model, epoch + 1.0, 0)

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--slowsgd-factor SLOWSGD_FACTOR" in capsys.readouterr().out
    out = tmp_path / "r.h5"
    base = ["train", "--dataset", "synthetic", "--model", "mlp", "--epochs", "2", "--methods", "sgd,slowsgd",
            "--quiet", "-o", str(out)]
    one_line_error(capsys, base + ["--slowsgd-factor", "2"], "--slowsgd-factor must be in (0, 1], got 2.0")
    assert main(base + ["--slowsgd-factor", "0.25"]) == 0
    traj = open_trajectory(out)
    assert traj.config["slowsgd_factor"] == 0.25 and traj.run("slowsgd").epoch.tolist() == [1.0, 2.0]
    config = TrainConfig.from_dict(traj.config)
    assert config == TrainConfig(model=config.model, data=config.data, methods=("sgd", "slowsgd"), epochs=2,
                                 device="cpu", slowsgd_factor=0.25)
    assert config.options_of(SlowOptions) == SlowOptions(factor=0.25) and config.slowsgd_factor == 0.25


def test_method_options_by_flat_name_or_object():
    from landscape.config import TrainConfig
    from landscape.train.methods import SWAOptions
    from landscape.train.swap import SWAPOptions
    a = TrainConfig(epochs=20, swa_start=15, swap_workers=2)
    b = TrainConfig(epochs=20, options=[SWAOptions(start=15), SWAPOptions(workers=2)])
    assert a == b and a.to_dict() == b.to_dict() and a.to_dict()["swa_start"] == 15
    assert a.replace(swa_lr=0.05).options_of(SWAOptions) == SWAOptions(start=15, lr=0.05)
    assert TrainConfig.from_dict(a.to_dict()) == a
    with pytest.raises(TypeError, match="unexpected keyword argument 'swa_strat'"):
        TrainConfig(swa_strat=15)
