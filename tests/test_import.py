"""`landscape import`: checkpoints a plain loop saved (every common layout) come back bit for bit, and
`landscape plane` on them equals the surface of `landscape train`; bad input is one line, no file."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from _recording import (DATA, EPOCHS, LR, MODEL, MOMENTUM, WD, assert_same_surface, plane, same_start,
                        schedule, sgd_epoch, trained_by_landscape)
from landscape.cli.main import main
from landscape.importer import natural_key
from landscape.models import ModelSpec, build_model
from landscape.params import Layout
from landscape.store import open_trajectory

SPEC_ARGS = ["--model", MODEL.name, "--model-arg", "channels=6", "--dataset", DATA.name,
             "--data-option", "n_train=256", "--data-option", "n_test=96", "--data-option", "shape=[1,24]"]


def landscape_import(*args):
    return main(["import", *map(str, args), *SPEC_ARGS, "--quiet"])


def save(state: dict, path: Path, how: str, epoch: int, step: int) -> None:
    """One of the layouts people save checkpoints in."""
    state = {k: v.clone() for k, v in state.items()}
    if how == "plain":
        torch.save(state, path)
    elif how == "model":
        torch.save({"model": state, "epoch": epoch, "step": step}, path)
    elif how == "dataparallel":  # DataParallel / DDP keys, inside a training script's dict
        torch.save({"model_state_dict": {f"module.{k}": v for k, v in state.items()},
                    "optimizer_state_dict": {"state": {}, "param_groups": []}, "epoch": epoch}, path)
    elif how == "lightning":  # a Lightning checkpoint of a LightningModule holding the net as self.model
        torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": epoch, "global_step": step,
                    "pytorch-lightning_version": "2.6.6", "loops": {}, "callbacks": {}}, path)
    elif how == "safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path), metadata={"epoch": str(epoch), "step": str(step)})


def plain_loop_with_checkpoints(folder: Path, average_to: Path | None = None) -> list:
    """The run of `landscape train --methods sgd`, by hand, saving a checkpoint file per epoch in a
    different layout each time; returns the saved state_dicts."""
    data, model, order = same_start()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    avg = AveragedModel(model)
    folder.mkdir()
    hows = ["plain", "model", "dataparallel", "lightning", "safetensors"]
    saved, step = [], 0
    for epoch in range(EPOCHS + 1):
        if epoch:
            step += sgd_epoch(model, opt, data, order)
            sched.step()
            avg.update_parameters(model)
        how = hows[epoch % len(hows)]
        suffix = ".safetensors" if how == "safetensors" else ".pt"
        save(model.state_dict(), folder / f"ep{epoch}{suffix}", how, epoch, step)
        saved.append({k: v.clone() for k, v in model.state_dict().items()})
    if average_to is not None:
        torch.save(avg.state_dict(), average_to)  # keys module.*, plus n_averaged
    return saved


def test_imported_weights_equal_the_saved_ones_and_plane_matches_train(tmp_path, tmp_path_factory):
    saved = plain_loop_with_checkpoints(tmp_path / "ckpts", average_to=tmp_path / "swa.pt")
    # ep10 must come after ep2 (natural order): add far-out names that only natural sort puts last
    out = tmp_path / "imported.h5"
    assert landscape_import(tmp_path / "ckpts", "--run", "sgd", "--add", "swa/average", tmp_path / "swa.pt",
                            "-o", out) == 0
    traj = open_trajectory(out)
    assert traj.runs == ["sgd", "swa/average"]
    _, model, _ = same_start()
    layout = Layout.of(model)
    for i, state in enumerate(saved):
        model.load_state_dict(state)
        np.testing.assert_array_equal(traj.params("sgd")[i], layout.params_to_vector(model).numpy())
        np.testing.assert_array_equal(traj.buffers("sgd")[i], layout.buffers_to_vector(model).numpy())
    run = traj.run("sgd")
    np.testing.assert_array_equal(run.epoch, [0, 1, 2, 3])  # position, then recorded epochs
    np.testing.assert_array_equal(traj.run("swa/average").metrics["n_averaged"], [EPOCHS])
    assert traj.config["source"] == "import" and traj.config["model"] == MODEL.to_dict()
    # the same run as `landscape train` records: identical rows, identical surface
    trained = open_trajectory(trained_by_landscape(tmp_path_factory))
    np.testing.assert_array_equal(traj.params("sgd"), trained.params("sgd"))
    a = plane(out, tmp_path / "imported_plane.h5", "sgd:0", "sgd:1", "sgd")
    b = plane(trained.path, tmp_path / "trained_plane.h5", "sgd:0", "sgd:1", "sgd")
    assert_same_surface(a, b)


def test_order_by_name_is_natural_and_by_epoch_reads_the_files(tmp_path):
    _, model, _ = same_start()
    folder = tmp_path / "c"
    folder.mkdir()
    for name, epoch in (("b_ep10.pt", 1), ("b_ep2.pt", 3), ("b_ep9.pt", 2)):
        with torch.no_grad():
            next(model.parameters()).fill_(epoch)
        torch.save({"state_dict": model.state_dict(), "epoch": epoch}, folder / name)
    assert sorted(folder.iterdir(), key=natural_key)[0].name == "b_ep2.pt"
    assert landscape_import(folder, "-o", tmp_path / "name.h5") == 0
    np.testing.assert_array_equal(open_trajectory(tmp_path / "name.h5").run("imported").epoch, [3, 2, 1])
    assert landscape_import(folder, "--order", "epoch", "-o", tmp_path / "epoch.h5") == 0
    traj = open_trajectory(tmp_path / "epoch.h5")
    np.testing.assert_array_equal(traj.run("imported").epoch, [1, 2, 3])
    np.testing.assert_array_equal(traj.params("imported")[:, 0], [1, 2, 3])
    assert landscape_import(folder / "b_ep9.pt", folder / "b_ep10.pt", "--order", "given", "-o",
                            tmp_path / "given.h5") == 0
    np.testing.assert_array_equal(open_trajectory(tmp_path / "given.h5").run("imported").epoch, [2, 1])


def test_an_epoch_that_is_not_a_number_is_not_recorded(tmp_path, capsys):
    """A NaN epoch counts as none: --order epoch refuses it (it was sorted anyhow: epochs 11, nan, 0,
    5 in the file); in safetensors metadata a step that does not parse leaves the epoch (it dropped both)."""
    from safetensors.torch import save_file

    from landscape.importer import read_checkpoint
    _, model, _ = same_start()
    folder = tmp_path / "c"
    folder.mkdir()
    for name, epoch in (("a.pt", 0), ("b.pt", float("nan")), ("c.pt", 5)):
        torch.save({"state_dict": model.state_dict(), "epoch": epoch}, folder / name)
    assert landscape_import(folder, "--order", "epoch", "-o", tmp_path / "r.h5") == 2
    assert "b.pt records no epoch" in capsys.readouterr().err and not (tmp_path / "r.h5").exists()
    save_file(model.state_dict(), str(tmp_path / "s.safetensors"), metadata={"epoch": "1e3", "step": "abc"})
    assert read_checkpoint(tmp_path / "s.safetensors")[1] == {"epoch": 1000.0}


class Opaque:  # a checkpoint holding an object of a class needs code to unpickle
    pass


def _bad_inputs(tmp: Path) -> dict:
    data, model, _ = same_start()
    good = model.state_dict()
    cases = {}

    def folder(name, files):
        d = tmp / name
        d.mkdir()
        for fname, obj in files.items():
            if isinstance(obj, bytes):
                (d / fname).write_bytes(obj)
            else:
                torch.save(obj, d / fname)
        return d

    other = build_model(ModelSpec("mlp", {"hidden": [5]}), data.input_shape, data.num_classes)
    cases["other model"] = (folder("keys", {"a.pt": good, "b.pt": other.state_dict()}),
                            r"b\.pt does not match model 'cnn1d-bn': key '0\.weight' \[6, 1, 5\] is missing")
    narrow = build_model(ModelSpec("cnn1d-bn", {"channels": 4}), data.input_shape, data.num_classes)
    cases["other shapes"] = (folder("shapes", {"a.pt": narrow.state_dict()}),
                             r"key '0\.weight' has shape \[4, 1, 5\] in the checkpoint, \[6, 1, 5\] in the model")
    cases["extra key"] = (folder("extra", {"a.pt": dict(good, **{"head.weight": torch.zeros(2)})}),
                          r"key 'head\.weight' is not in the model")
    cases["whole model pickled"] = (folder("pickled", {"a.pt": good, "b.pt": model}),
                                    r"b\.pt needs code to load \(torch\.nn.*\); refused.*weights_only=True")
    cases["custom class"] = (folder("custom", {"a.pt": {"model": good, "config": Opaque()}}),
                             r"needs code to load \(.*Opaque\); refused")
    cases["empty folder"] = (folder("empty", {"notes.txt": b"hello"}), r"holds no checkpoint files")
    cases["missing folder"] = (tmp / "nowhere", r"checkpoint .*nowhere does not exist")
    cases["garbage"] = (folder("garbage", {"a.pt": b"\x00not a checkpoint at all"}), r"cannot read checkpoint .*a\.pt")
    cases["bad safetensors"] = (folder("badst", {"a.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json}xxxxx"}),
                                r"cannot read checkpoint .*a\.safetensors: not a safetensors file")
    cases["no state_dict"] = (folder("nostate", {"a.pt": {"epoch": 3, "note": "hi"}}),
                              r"a\.pt holds a dict without a state_dict \(keys: epoch, note\)")
    return cases


def test_bad_input_is_one_line_with_no_file_left(tmp_path, capsys):
    cases = _bad_inputs(tmp_path)
    for what, (source, pattern) in cases.items():
        out = tmp_path / f"{what.replace(' ', '_')}.h5"
        assert landscape_import(source, "-o", out) == 2, what
        err = capsys.readouterr().err
        assert err.startswith("landscape: error: ") and err.count("\n") == 1, (what, err)
        assert pytest.importorskip("re").search(pattern, err), (what, err)
        assert not out.exists() and not Path(str(out) + ".partial").exists(), what
        assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir()), what


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their permissions")
def test_unreadable_folder(tmp_path, capsys):
    d = tmp_path / "locked"
    d.mkdir()
    torch.save({}, d / "a.pt")
    d.chmod(0)
    try:
        assert landscape_import(d, "-o", tmp_path / "x.h5") == 2
    finally:
        d.chmod(0o755)
    assert "cannot read folder" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "x.h5.partial").exists()


def test_no_sources_and_bad_run_names(tmp_path, capsys):
    assert main(["import", *SPEC_ARGS, "-o", str(tmp_path / "x.h5")]) == 2
    assert "no checkpoints given" in capsys.readouterr().err
    _, model, _ = same_start()
    torch.save(model.state_dict(), tmp_path / "a.pt")
    assert landscape_import(tmp_path / "a.pt", "--run", "sgd:3", "-o", tmp_path / "x.h5") == 2
    assert "contains ':'" in capsys.readouterr().err
    assert landscape_import(tmp_path / "a.pt", "--run", "swa", "--add", "swa/average", tmp_path / "a.pt",
                            "-o", tmp_path / "x.h5") == 2
    assert "cannot sit beside" in capsys.readouterr().err
    assert not list(tmp_path.glob("x.h5*"))


def test_an_import_puts_its_rows_on_the_disk_as_it_goes(tmp_path, monkeypatch):
    """Checkpoints read wait in memory only up to TrajectoryWriter.MEMORY_BYTES (each one here): the
    partial holds every row read so far (all waited for the end), and the file equals its checkpoints."""
    from landscape.importer import import_checkpoints
    from landscape.store import TrajectoryWriter
    from landscape.store.files import read_partial
    monkeypatch.setattr(TrajectoryWriter, "MEMORY_BYTES", 1)
    _, model, _ = same_start()
    folder, states = tmp_path / "ckpts", []
    folder.mkdir()
    for epoch in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        save(model.state_dict(), folder / f"ep{epoch}.pt", "plain", epoch, epoch)
        states.append(Layout.of(model).params_to_vector(model).numpy())
    out, on_disk = tmp_path / "imported.h5", []

    def progress(done, total):
        with read_partial(tmp_path / "imported.h5.partial") as f:
            on_disk.append(f["runs/sgd/params"].shape[0])
    import_checkpoints({"sgd": sorted(folder.iterdir())}, out, model=MODEL.name, model_kwargs=MODEL.kwargs,
                       data=DATA.name, data_options=DATA.options, progress=progress)
    assert on_disk == [1, 2, 3]
    np.testing.assert_array_equal(open_trajectory(out).params("sgd"), np.stack(states))
