"""The Lightning callback: a Trainer run records the file `landscape train` would, `landscape plane`
gives the same surface on it, and a crash leaves only NAME.partial. Skipped without Lightning (CI
installs the `lightning` extra)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _recording import (BATCH, DATA, EPOCHS, LR, MODEL, MOMENTUM, WD, assert_same_surface, plane, same_start,
                        schedule, trained_by_landscape)
from landscape.errors import ConfigError, FileFormatError
from landscape.store import open_trajectory
from landscape.store.files import read_partial


def test_package_imports_without_lightning(monkeypatch):
    import landscape.lightning as ll
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.setattr(ll, "_classes", {})
    import landscape  # noqa: F401
    with pytest.raises(ConfigError, match=r"pip install 'landscape\[lightning\]'"):
        ll.LandscapeCallback


@pytest.fixture
def pl():
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning")
    return pl


class SameOrder(torch.utils.data.Sampler):
    """The data order of `landscape train`: one randperm per epoch from one generator.
    (RandomSampler(generator=g) draws an extra permutation per epoch, so its order differs.)"""

    def __init__(self, n, generator):
        self.n, self.generator = n, generator

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())

    def __len__(self):
        return self.n


def lit_module(pl, net, fail_at_epoch=None):
    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            if fail_at_epoch is not None and self.current_epoch == fail_at_epoch:
                raise RuntimeError("boom")
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("loss/train", loss, on_step=False, on_epoch=True)
            return loss

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule)}

    return Lit()


def fit(pl, tmp_path, out, fail_at_epoch=None, extra_callbacks=(), ckpt_path=None, **callback_kwargs):
    from landscape.lightning import LandscapeCallback
    data, net, order = same_start()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_train, data.y_train),
                                         batch_size=BATCH, sampler=SameOrder(len(data.x_train), order))
    callback = LandscapeCallback(out, model=MODEL.name, model_kwargs=MODEL.kwargs, data=DATA.name,
                                 data_options=DATA.options, **callback_kwargs)
    trainer = pl.Trainer(max_epochs=EPOCHS, callbacks=[callback, *extra_callbacks], accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=bool(extra_callbacks),
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    from landscape.device import torch_threads
    with torch_threads(1):  # landscape train's thread count: the same float sums
        trainer.fit(lit_module(pl, net, fail_at_epoch), loader, ckpt_path=ckpt_path)
    callback.net = net
    return callback


def test_trainer_with_callback_gives_the_surface_of_landscape_train(pl, tmp_path, tmp_path_factory):
    trained = trained_by_landscape(tmp_path_factory)
    out = tmp_path / "lit.h5"
    callback = fit(pl, tmp_path, out, run="sgd")
    assert callback.written == out
    mine, theirs = open_trajectory(out), open_trajectory(trained)
    assert mine.config["source"] == "lightning" and mine.layout == theirs.layout
    np.testing.assert_array_equal(mine.params("sgd"), theirs.params("sgd"))
    np.testing.assert_array_equal(mine.buffers("sgd"), theirs.buffers("sgd"))
    run = mine.run("sgd")
    np.testing.assert_array_equal(run.epoch, theirs.run("sgd").epoch)  # 0 (init), 1, 2, 3
    np.testing.assert_array_equal(run.step, theirs.run("sgd").step)
    assert np.isnan(run.metrics["loss_train"][0]) and np.isfinite(run.metrics["loss_train"][1:]).all()
    a = plane(out, tmp_path / "lit_plane.h5", "sgd:0", "sgd:1", "sgd")
    b = plane(trained, tmp_path / "train_plane.h5", "sgd:0", "sgd:1", "sgd")
    assert_same_surface(a, b)


def test_step_checkpoints_and_evaluated_metrics(pl, tmp_path):
    out = tmp_path / "steps.h5"
    fit(pl, tmp_path, out, run="sgd/steps", every_n_steps=3, evaluate=True, metrics={"logged_loss": "loss/train"})
    run = open_trajectory(out).run("sgd/steps")
    per_epoch = 256 // BATCH
    steps = [0] + [s for s in range(3, EPOCHS * per_epoch, 3) if s % per_epoch] + \
        sorted(set(range(per_epoch, EPOCHS * per_epoch + 1, per_epoch)))
    assert sorted(run.step.tolist()) == sorted(steps) and list(run.step) == sorted(run.step)
    np.testing.assert_allclose(run.epoch, run.step / per_epoch)
    assert np.isfinite(run.metrics["test_err"]).all()
    assert set(run.metrics) == {"train_loss", "train_err", "test_loss", "test_err", "logged_loss"}


def test_crash_in_fit_leaves_only_the_partial_file(pl, tmp_path):
    out = tmp_path / "crash.h5"
    with pytest.raises(RuntimeError, match="boom"):
        fit(pl, tmp_path, out, fail_at_epoch=1)
    assert not out.exists() and (tmp_path / "crash.h5.partial").exists()
    with pytest.raises(FileFormatError, match="incomplete"):
        open_trajectory(tmp_path / "crash.h5.partial")


def test_a_crashed_fit_resumed_from_its_checkpoint_goes_on_in_the_same_file(pl, tmp_path):
    """A second fit on the same path refuses to replace what a crashed one recorded; with resume=True
    and Lightning's checkpoint (one epoch older than the file) it goes on from the checkpoint: the
    crashed fit's rows up to it, then the resumed fit's own, every epoch once (the crashed fit's row
    past the checkpoint was kept, and the file held two branches: this resumed fit sees another data
    order, so its epoch 2 is not the crashed fit's)."""
    out = tmp_path / "resumed.h5"
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=-1, every_n_epochs=1)
    with pytest.raises(RuntimeError, match="boom"):
        fit(pl, tmp_path, out, fail_at_epoch=2, extra_callbacks=[saver])
    with read_partial(tmp_path / "resumed.h5.partial") as f:
        crashed = f["runs/sgd/params"][()]
    assert len(crashed) == 3  # epochs 0, 1, 2
    with pytest.raises(FileFormatError, match="pass resume=True"):
        fit(pl, tmp_path, out)
    first_epoch = sorted((tmp_path / "ckpts").glob("epoch=0-*.ckpt"))[0]
    trained = []

    class Weights(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trained.append(torch.cat([p.detach().reshape(-1) for p in pl_module.net.parameters()]).numpy().copy())

    callback = fit(pl, tmp_path, out, extra_callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "more"),
                                                       Weights()], ckpt_path=first_epoch, resume=True)
    assert callback.written == out
    traj = open_trajectory(out)
    np.testing.assert_array_equal(traj.run("sgd").epoch, [0, 1, 2, 3])
    np.testing.assert_array_equal(traj.params("sgd")[:2], crashed[:2])
    np.testing.assert_array_equal(traj.params("sgd")[2:], np.stack(trained))
    assert not np.array_equal(trained[0], crashed[2])


def test_a_fit_resumed_without_a_checkpoint_starts_the_file_again(pl, tmp_path):
    """resume=True without ckpt_path, from another initialization: the fit starts at step 0, and so does
    the file (it kept the crashed fit's initialization and epochs, and recorded only past them)."""
    out = tmp_path / "again.h5"
    with pytest.raises(RuntimeError, match="boom"):
        fit(pl, tmp_path, out, fail_at_epoch=2)
    inits = []

    class OtherInit(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            with torch.no_grad():
                for p in pl_module.net.parameters():
                    p.mul_(0.5)
            inits.append(torch.cat([p.detach().reshape(-1) for p in pl_module.net.parameters()]).numpy().copy())

    callback = fit(pl, tmp_path, out, extra_callbacks=[OtherInit()], resume=True)
    traj = open_trajectory(out)
    np.testing.assert_array_equal(traj.run("sgd").epoch, np.arange(EPOCHS + 1))
    np.testing.assert_array_equal(traj.params("sgd")[0], inits[0])
    np.testing.assert_array_equal(traj.params("sgd")[-1],
                                  torch.cat([p.detach().reshape(-1) for p in callback.net.parameters()]).numpy())


def test_lightning_checkpoint_files_import_with_weights_only(pl, tmp_path):
    """Lightning's own ModelCheckpoint files (keys `net.*` under "state_dict", epoch, global_step)
    load with weights_only=True and import to the weights the callback recorded."""
    from landscape.cli.main import main
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=-1, every_n_epochs=1)
    fit(pl, tmp_path, tmp_path / "recorded.h5", extra_callbacks=[saver])
    assert len(list((tmp_path / "ckpts").glob("*.ckpt"))) == EPOCHS
    assert main(["import", str(tmp_path / "ckpts"), "--order", "epoch", "--run", "sgd", "--model", MODEL.name,
                 "--model-arg", "channels=6", "--dataset", DATA.name, "--data-option", "n_train=256",
                 "--data-option", "n_test=96", "--data-option", "shape=[1,24]", "--quiet",
                 "-o", str(tmp_path / "imported.h5")]) == 0
    imported, recorded = open_trajectory(tmp_path / "imported.h5"), open_trajectory(tmp_path / "recorded.h5")
    np.testing.assert_array_equal(imported.params("sgd"), recorded.params("sgd")[1:])
    np.testing.assert_array_equal(imported.buffers("sgd"), recorded.buffers("sgd")[1:])
    np.testing.assert_array_equal(imported.run("sgd").step, recorded.run("sgd").step[1:])
    np.testing.assert_array_equal(imported.run("sgd").epoch, np.arange(EPOCHS))  # Lightning's 0-based epoch index


def test_every_lightning_checkpoint_is_a_save_point_of_the_partial(pl, tmp_path, monkeypatch):
    """Killed (no exception handler runs, no save point but those made), the partial holds every epoch
    up to Lightning's last checkpoint: a fit resumed from it misses none (it held only the rows of the
    recorder's last timed save point); a checkpoint newer than the partial is warned about."""
    import landscape.recorder as recorder_module
    from landscape.recorder import Recorder
    monkeypatch.setattr(recorder_module.time, "monotonic", lambda: 0.0)  # no timed save point after the first
    monkeypatch.setattr(Recorder, "close_incomplete", lambda self: self.writer.suspend())  # a kill: nothing more
    out = tmp_path / "killed.h5"
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=-1, every_n_epochs=1)
    with pytest.raises(RuntimeError, match="boom"):
        fit(pl, tmp_path, out, fail_at_epoch=2, extra_callbacks=[saver])
    with read_partial(tmp_path / "killed.h5.partial") as f:
        np.testing.assert_array_equal(f["runs/sgd/epoch"][()], [0, 1, 2])
    monkeypatch.undo()
    (tmp_path / "killed.h5.partial").unlink()  # now a partial behind a newer checkpoint: epochs 0, 1
    with pytest.raises(RuntimeError, match="boom"):
        fit(pl, tmp_path, out, fail_at_epoch=1)
    newer = sorted((tmp_path / "ckpts").glob("epoch=1-*.ckpt"))[0]  # 2 epochs done
    with pytest.warns(UserWarning, match="holds epochs up to 1, and this fit goes on at epoch 3"):
        fit(pl, tmp_path, out, extra_callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "more")],
            ckpt_path=newer, resume=True)


def test_save_every_reaches_the_recorder(pl, tmp_path):
    with pytest.raises(ConfigError, match="save_every must be a number of seconds of at least 0, got -1"):
        fit(pl, tmp_path, tmp_path / "x.h5", save_every=-1)
