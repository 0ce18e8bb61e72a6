"""The recorder: a plain PyTorch loop writes the file `landscape train` would, and `landscape plane`
gives the same surface on it; AveragedModel and Lookahead; a crash leaves only NAME.partial."""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel

from _recording import (BATCH, DATA, EPOCHS, LR, MODEL, MOMENTUM, WD, assert_same_surface, plane, same_start,
                        schedule, sgd_epoch, trained_by_landscape)
from landscape.errors import ConfigError, FileFormatError, ModelError
from landscape.params import Layout
from landscape.rebuild import rebuild_data, rebuild_model
from landscape.recorder import Recorder
from landscape.store import open_trajectory
from landscape.train import Lookahead


def recorder(path, **kw):
    return Recorder(path, model=MODEL.name, model_kwargs=MODEL.kwargs, data=DATA.name, data_options=DATA.options, **kw)


def test_plain_loop_gives_the_surface_of_landscape_train(tmp_path, tmp_path_factory):
    trained = trained_by_landscape(tmp_path_factory)
    data, model, order = same_start()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    step = 0
    with recorder(tmp_path / "mine.h5") as rec:          # the lines a user adds: this one,
        rec.record("sgd", model, epoch=0, step=step)    # this one,
        for epoch in range(EPOCHS):
            step += sgd_epoch(model, opt, data, order)
            sched.step()
            rec.record("sgd", model, epoch=epoch + 1, step=step)  # and this one
    mine, theirs = open_trajectory(tmp_path / "mine.h5"), open_trajectory(trained)
    assert mine.layout == theirs.layout
    np.testing.assert_array_equal(mine.params("sgd"), theirs.params("sgd"))
    np.testing.assert_array_equal(mine.buffers("sgd"), theirs.buffers("sgd"))
    np.testing.assert_array_equal(mine.run("sgd").step, theirs.run("sgd").step)
    assert mine.config["model"] == theirs.config["model"] and mine.config["data"] == theirs.config["data"]
    a = plane(tmp_path / "mine.h5", tmp_path / "mine_plane.h5", "sgd:0", "sgd:1", "sgd")
    b = plane(trained, tmp_path / "theirs_plane.h5", "sgd:0", "sgd:1", "sgd")
    assert_same_surface(a, b)
    assert np.isfinite(a.values["test_loss"]).all()


def test_recorder_leaves_the_random_state_alone(tmp_path):
    """Building the reference model must not shift the user's initialization or data order."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    rec = recorder(tmp_path / "rng.h5")
    np.testing.assert_array_equal(torch.rand(3), expected)
    rec.close_incomplete()


def test_averaged_model_is_recorded_unwrapped(tmp_path):
    data, model, _ = same_start()
    avg = AveragedModel(model)
    with recorder(tmp_path / "swa.h5") as rec:
        for k in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1 * (k + 1))
            avg.update_parameters(model)
            rec.record("swa/iterates", model, epoch=k + 1)
            rec.record("swa/average", avg, epoch=k + 1)
    traj = open_trajectory(tmp_path / "swa.h5")
    assert not any(e.name.startswith("module.") or e.name == "n_averaged" for e in traj.layout.buffers + traj.layout.params)
    layout = Layout.of(model)
    np.testing.assert_array_equal(traj.params("swa/average")[-1], layout.params_to_vector(avg.module).numpy())
    np.testing.assert_allclose(traj.params("swa/average")[-1], traj.params("swa/iterates").mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(traj.run("swa/average").metrics["n_averaged"], [1, 2, 3])


def test_lookahead_records_slow_and_fast_weights(tmp_path):
    data, model, order = same_start()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), k=3, alpha=0.5)
    with recorder(tmp_path / "la.h5") as rec:
        rec.record_lookahead(opt, model, epoch=0, step=0)
        for i, idx in enumerate(torch.randperm(len(data.x_train), generator=order).split(BATCH)[:6]):
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rows = rec.record_lookahead(opt, model, step=opt.step_count, sync=opt.sync_count)
            if i == 4:  # between synchronizations: slow and fast differ
                slow_now = torch.cat([opt.state[p]["slow"].reshape(-1) for p in model.parameters()]).numpy()
    traj = open_trajectory(tmp_path / "la.h5")
    assert set(traj.runs) == {"lookahead/slow", "lookahead/fast"} and rows == {"lookahead/slow": 6, "lookahead/fast": 6}
    slow, fast = traj.params("lookahead/slow"), traj.params("lookahead/fast")
    np.testing.assert_array_equal(slow[5], slow_now)
    assert not np.array_equal(slow[5], fast[5])
    np.testing.assert_array_equal(slow[6], fast[6])  # step 6 synchronized: theta = phi
    np.testing.assert_array_equal(slow[3], slow[5])  # phi only moves at synchronizations
    np.testing.assert_array_equal(traj.run("lookahead/slow").metrics["sync"][1:], [0, 0, 1, 1, 1, 2])


def test_crash_leaves_only_the_partial_file(tmp_path, capsys):
    from landscape.cli.main import main
    _, model, _ = same_start()
    out = tmp_path / "crash.h5"
    with pytest.raises(RuntimeError, match="boom"):
        with recorder(out) as rec:
            rec.record("sgd", model, epoch=0, step=0)
            raise RuntimeError("boom")
    assert not out.exists()
    partial = tmp_path / "crash.h5.partial"
    assert partial.exists()
    with pytest.raises(FileFormatError, match="incomplete"):
        open_trajectory(partial)
    capsys.readouterr()
    assert main(["info", str(partial)]) == 0  # what a resumed recorder goes on from (not a train command's)
    assert "incomplete: the Recorder did not finish; these rows are what it keeps" in capsys.readouterr().out
    # close() without the context manager also finishes it atomically (the crashed one's checkpoints
    # discarded: without overwrite=True, or resume=True, they are kept and the recorder refused)
    rec = recorder(out, overwrite=True)
    rec.record("sgd", model, epoch=0, step=0)
    assert not out.exists()
    assert rec.close() == out and out.exists() and not partial.exists()
    with pytest.raises(FileFormatError, match="already exists"):
        recorder(out)


_KILLED_LOOP = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from _recording import DATA, MODEL, same_start, sgd_epoch
from landscape.recorder import Recorder
data, model, order = same_start()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
rec = Recorder({out!r}, model=MODEL.name, model_kwargs=MODEL.kwargs, data=DATA.name, data_options=DATA.options,
               save_every=0)
rec.record("sgd", model, epoch=0, step=0)
for epoch in range(2):
    sgd_epoch(model, opt, data, order)
    rec.record("sgd", model, epoch=epoch + 1)
os.kill(os.getpid(), 9)  # killed before the file is closed: no exception, no cleanup
"""


def test_a_killed_loop_keeps_its_checkpoints_and_a_new_recorder_resumes_or_refuses(tmp_path):
    """kill -9 mid-run keeps every checkpoint of the last save point in NAME.partial (it kept none: they
    waited in memory for close()); a new recorder refuses to replace them (it did so silently), and with
    resume=True appends after them, the finished file holding both parts."""
    import subprocess
    out = tmp_path / "killed.h5"
    script = _KILLED_LOOP.format(tests=str(Path(__file__).parent), out=str(out))
    assert subprocess.run([sys.executable, "-c", script], timeout=300).returncode == -9
    with pytest.raises(FileFormatError, match=r"killed\.h5\.partial holds the checkpoints of an interrupted "
                                              r"recording; pass resume=True"):
        recorder(out)
    _, model, _ = same_start()
    with pytest.raises(FileFormatError, match="of another model, data or config"):
        Recorder(out, model=MODEL.name, model_kwargs={"channels": 6}, data=DATA.name,
                 data_options=dict(DATA.options, n_test=95))
    with recorder(out, resume=True) as rec:
        assert rec.kept == {"sgd": {"rows": 3, "epoch": 2.0, "step": -1}}
        rec.record("sgd", model, epoch=3)
    traj = open_trajectory(out)
    np.testing.assert_array_equal(traj.run("sgd").epoch, [0, 1, 2, 3])
    np.testing.assert_array_equal(traj.params("sgd")[3], Layout.of(model).params_to_vector(model).numpy())
    assert not np.array_equal(traj.params("sgd")[2], traj.params("sgd")[0])  # trained rows, not copies


def test_a_recording_whose_partial_is_damaged_says_so(tmp_path):
    """A partial whose record of its rows is damaged: the recorder names what is wrong (it called it a
    recording of another model, data or config)."""
    import h5py
    _, model, _ = same_start()
    out = tmp_path / "damaged.h5"
    rec = recorder(out)
    for epoch in range(2):
        rec.record("sgd", model, epoch=epoch)
    rec.close_incomplete()
    with h5py.File(rec.partial_path, "r+") as f:
        f.attrs["progress_rows"] = '{"sgd": 9999}'
    with pytest.raises(FileFormatError, match=r"damaged\.h5\.partial is damaged: attribute 'progress_rows' does not "
                                              r"count rows its runs hold; delete it or pass overwrite=True"):
        recorder(out, resume=True)


def test_a_loop_resumed_from_an_older_checkpoint_rewinds_the_file_to_it(tmp_path):
    """A loop resumed from its own checkpoint of epoch 2, older than the crashed loop's last rows,
    rewinds the file to that epoch: every run keeps its rows up to it (a (T, k) metric with them), a run
    begun after it goes, the rewound partial is what a kill leaves, and the finished file holds one
    history (it held the crashed loop's epochs 3 and 4, then the resumed loop's)."""
    from landscape.store.files import read_partial
    _, model, _ = same_start()
    out = tmp_path / "rewound.h5"
    rec = recorder(out)
    for epoch in range(5):
        rec.record("sgd", model, epoch=epoch, step=10 * epoch, layers=[epoch, -epoch])
        if epoch >= 3:
            rec.record("swa/average", model, epoch=epoch, step=10 * epoch)
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
    rec.close_incomplete()
    with recorder(out, resume=True) as rec:
        assert rec.rewind(epoch=2) == {"sgd": {"rows": 3, "epoch": 2.0, "step": 20}}
        with read_partial(rec.partial_path) as f:
            assert list(f["runs"]) == ["sgd"] and f["runs/sgd/layers"].shape == (3, 2)  # (no empty group "swa")
        with pytest.raises(ConfigError, match="epoch= or step="):
            rec.rewind()
        resumed = Layout.of(model).params_to_vector(model).numpy()
        rec.record("sgd", model, epoch=3, step=30, layers=[7, 7])
    traj = open_trajectory(out)
    assert traj.runs == ["sgd"]
    np.testing.assert_array_equal(traj.run("sgd").epoch, [0, 1, 2, 3])
    np.testing.assert_array_equal(traj.run("sgd").metrics["layers"][:, 0], [0, 1, 2, 7])
    np.testing.assert_array_equal(traj.params("sgd")[3], resumed)


def test_a_metric_given_as_a_list_of_tensors_is_recorded(tmp_path):
    """Per-layer or per-class values as a list of tensors (with their gradients, or on a GPU) are a
    metric's numbers, as one tensor of them is."""
    _, model, _ = same_start()
    loss = sum(p.sum() for p in model.parameters())  # (requires a gradient)
    with recorder(tmp_path / "list.h5") as rec:
        rec.record("sgd", model, epoch=1, parts=[loss, 2 * loss], whole=torch.stack([loss, 2 * loss]))
    m = open_trajectory(tmp_path / "list.h5").run("sgd").metrics
    np.testing.assert_array_equal(m["parts"], m["whole"])
    assert m["parts"].shape == (1, 2) and m["parts"][0, 1] == pytest.approx(2 * loss.item())


def test_rewind_by_epoch_refuses_rows_without_one(tmp_path):
    _, model, _ = same_start()
    rec = recorder(tmp_path / "steps.h5")
    rec.record("sgd", model, step=0)
    rec.record("sgd", model, step=5)
    with pytest.raises(ConfigError, match="run 'sgd' has rows recorded without an epoch"):
        rec.rewind(epoch=0)
    assert rec.rewind(step=0)["sgd"]["rows"] == 1
    rec.close_incomplete()


def test_frozen_parameters_are_recorded_per_run_and_left_alone_by_directions_and_hessians(tmp_path, capsys):
    """A run that trains only some parameters (requires_grad=False on the rest, as in fine-tuning) keeps
    in its `frozen` attribute those frozen at every record with their first values (unfrozen later, or
    changed, they are trained ones); a run training everything has none, nor has one of a model that
    trains nothing (an EMA copy). Random planes, rays and the sharpness of a file's checkpoint leave
    its frozen parameters alone, as those of the live model do (they moved them)."""
    from landscape.evaluate import BatchNormPolicy
    from landscape.geometry import Line, Plane
    from landscape.sharpness import SharpnessSpec, checkpoint_sharpness, compute_sharpness
    data, model, _ = same_start()
    out = tmp_path / "frozen.h5"
    with recorder(out) as rec:
        rec.record("sgd", model, epoch=0)
        model[0].requires_grad_(False)
        model[3].requires_grad_(False)
        rec.record("head", model, epoch=0)
        with torch.no_grad():
            model[10].weight.mul_(0.5)
        rec.record("head", model, epoch=1)
        model[3].requires_grad_(True)  # unfrozen: trained from now on
        rec.record("head", model, epoch=2)
        ema = copy.deepcopy(model).requires_grad_(False)  # an EMA copy: trains nothing, moves every record
        moved = copy.deepcopy(model)  # a frozen layer whose weight changes anyway (set by hand): trained
        moved[0].requires_grad_(False)
        thawed = copy.deepcopy(model).requires_grad_(True)
        for epoch in range(2):
            with torch.no_grad():
                for net in (ema, moved):
                    net[0].weight.mul_(0.9)
            rec.record("ema", ema, epoch=epoch)
            rec.record("moved", moved, epoch=epoch)
            thawed[0].requires_grad_(epoch > 0)  # a layer frozen at the first record, trained after it
            rec.record("thawed", thawed, epoch=epoch)
    traj = open_trajectory(out)
    assert traj.layout_of("ema").frozen == [] and "frozen" not in traj.run("ema").attrs
    assert traj.layout_of("moved").frozen == ["0.bias"]
    assert "frozen" not in traj.run("thawed").attrs  # (not an empty list)
    assert Plane.random(traj, "ema:1").basis[:, :10].abs().max() > 0 and Plane.random(ema).basis.abs().max() > 0
    assert traj.layout_of("sgd").frozen == [] and "frozen" not in traj.run("sgd").attrs
    assert traj.layout_of("head").frozen == traj.run("head").attrs["frozen"] == ["0.weight", "0.bias"]
    from landscape.cli.main import main
    assert main(["info", str(out)]) == 0
    assert "head: 2 parameter tensors never trained (frozen): 0.weight, 0.bias\n" in capsys.readouterr().out
    model[3].requires_grad_(False)
    live = Layout.of(model)
    assert live.frozen == ["0.weight", "0.bias", "3.weight", "3.bias"]
    frozen_at = ~traj.layout_of("head").trainable_mask().bool()
    import shutil
    shutil.copy(out, tmp_path / "other.h5")
    for plane in (Plane.random(traj, "head:1", seed=3), Line.random_rays(traj, "head:1", n=2),
                  Plane.random(traj, f"{tmp_path / 'other.h5'}:head:1", seed=3)):  # (another file's run says)
        directions = plane.basis
        assert float(directions[:, frozen_at].abs().max()) == 0 and float(directions[:, ~frozen_at].abs().max()) > 0
        assert plane.spec["frozen"] == ["0.weight", "0.bias"]
    from landscape.average import Average, Window, add_averages
    add_averages(traj, [Average(Window.parse("head:1:"))], tmp_path / "averaged.h5")
    averaged = open_trajectory(tmp_path / "averaged.h5")
    assert {r: averaged.layout_of(r).frozen for r in averaged.runs} == {
        "sgd": [], "head": ["0.weight", "0.bias"], "ema": [], "moved": ["0.bias"], "thawed": [],
        "avg/head/uniform_1_3": ["0.weight", "0.bias"]}
    everything = Plane.random(traj, "sgd:0", seed=3)
    assert float(everything.basis[:, frozen_at].abs().max()) > 0 and "frozen" not in everything.spec
    live_plane = Plane.random(model, seed=3)
    assert float(live_plane.basis[:, ~live.trainable_mask().bool()].abs().max()) == 0
    spec = SharpnessSpec(top_k=2, iterations=30, probes=4, ascent_steps=1, samples=64)
    from_file = compute_sharpness(traj, ["head:1"], spec, bn="stored").results[0]
    c = traj.checkpoint("head:1")
    by_hand = checkpoint_sharpness(rebuild_model(traj, data), traj.layout_of("head"), c.params, c.buffers,
                                   rebuild_data(traj), spec, BatchNormPolicy("stored"))
    everything = checkpoint_sharpness(rebuild_model(traj, data), traj.layout, c.params, c.buffers,
                                      rebuild_data(traj), spec, BatchNormPolicy("stored"))
    np.testing.assert_allclose(from_file["eigenvalues"], by_hand["eigenvalues"], rtol=1e-6)
    assert not np.allclose(everything["eigenvalues"], by_hand["eigenvalues"], rtol=1e-3)  # (every parameter's)


def test_checkpoints_go_to_the_disk_at_save_points_not_at_the_end(tmp_path, monkeypatch):
    """Memory holds at most the checkpoints since the last save point: every save_every seconds, and
    whenever MEMORY_BYTES wait (each record here), the partial on disk holds every row so far."""
    from landscape.store import TrajectoryWriter
    from landscape.store.files import read_partial
    _, model, _ = same_start()
    monkeypatch.setattr(TrajectoryWriter, "MEMORY_BYTES", 1)
    with recorder(tmp_path / "saved.h5", save_every=math.inf) as rec:
        for epoch in range(3):
            rec.record("sgd", model, epoch=epoch)
            with read_partial(rec.partial_path) as f:
                assert f["runs/sgd/params"].shape[0] == epoch + 1
    with pytest.raises(ConfigError, match="save_every must be"):
        recorder(tmp_path / "x.h5", save_every=-1)


def test_a_module_that_is_not_the_model_names_the_first_mismatch(tmp_path):
    data, model, _ = same_start()
    other = nn.Sequential(nn.Flatten(), nn.Linear(24, 4))
    with recorder(tmp_path / "bad.h5") as rec:
        rec.record("sgd", model)
        with pytest.raises(ModelError, match=r"0\.weight"):
            rec.record("sgd", other)
        with pytest.raises(ConfigError, match="not the module itself"):
            Recorder(tmp_path / "x.h5", model=model, data="synthetic")
        with pytest.raises(Exception, match="':'"):
            rec.record("sgd:1", model)


def test_model_inside_a_wrapper_module_is_found(tmp_path):
    """A LightningModule-like wrapper: its parameters are `model.*`; the recorder records `model`."""
    data, model, _ = same_start()

    class Wrapper(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.loss = nn.CrossEntropyLoss()
            self.model = net

    with recorder(tmp_path / "wrapped.h5") as rec:
        rec.record("sgd", Wrapper(model), epoch=0)
    np.testing.assert_array_equal(open_trajectory(tmp_path / "wrapped.h5").params("sgd")[0],
                                  Layout.of(model).params_to_vector(model).numpy())


def test_each_wrapper_records_its_own_model_and_none_is_kept_alive(tmp_path):
    """Seeds of an ensemble, each recorded through a wrapper made for the call: every run holds its own
    model's weights (a new wrapper at a dead one's address got the dead one's model), and the recorder
    keeps no recorded module alive (it kept every one)."""
    import gc
    import weakref

    class Holder(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

    class EqualHolder(Holder):  # all equal to each other (a module defining ==): told apart all the same
        def __eq__(self, other):
            return isinstance(other, EqualHolder)

        def __hash__(self):
            return 0

    _, model, _ = same_start()
    nets = []
    for seed in range(6):
        torch.manual_seed(seed)
        nets.append(_reinitialized(model))
    equal = [EqualHolder(net) for net in nets[:2]]  # alive together
    with recorder(tmp_path / "seeds.h5") as rec:
        for k, net in enumerate(nets):
            rec.record(f"seed{k}", Holder(net), epoch=0)
        for k, holder in enumerate(equal):
            rec.record(f"equal{k}", holder, epoch=0)
        gone = []
        for _ in range(3):
            copy = _reinitialized(model)
            rec.record("copies", copy)
            gone.append(weakref.ref(copy))
            del copy
    traj = open_trajectory(tmp_path / "seeds.h5")
    for k, net in enumerate(nets):
        np.testing.assert_array_equal(traj.params(f"seed{k}")[0], Layout.of(net).params_to_vector(net).numpy())
        if k < 2:
            np.testing.assert_array_equal(traj.params(f"equal{k}")[0], traj.params(f"seed{k}")[0])
    gc.collect()
    assert [ref() for ref in gone] == [None, None, None]


def _reinitialized(model):
    import copy
    net = copy.deepcopy(model)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    return net


def test_user_factory_returning_datasets_works_in_plane(tmp_path, monkeypatch):
    """Model and data by the user's own `module:factory`; the data factory returns torch Datasets."""
    (tmp_path / "userpkg_rec.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "from torch.utils.data import TensorDataset\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, width=8):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, width), nn.ReLU(), nn.Linear(width, 3))\n"
        "    def forward(self, x):\n"
        "        return self.body(x)\n"
        "class Pairs(torch.utils.data.Dataset):\n"
        "    def __init__(self, x, y): self.x, self.y = x, y\n"
        "    def __len__(self): return len(self.x)\n"
        "    def __getitem__(self, i): return self.x[i], int(self.y[i])\n"
        "def load(n=90):\n"
        "    g = torch.Generator().manual_seed(1)\n"
        "    x, y = torch.randn(n, 12, generator=g), torch.randint(0, 3, (n,), generator=g)\n"
        "    return Pairs(x[:60], y[:60]), TensorDataset(x[60:], y[60:])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import userpkg_rec
    torch.manual_seed(0)
    net = userpkg_rec.Net(width=5)
    train, _ = userpkg_rec.load()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with Recorder(tmp_path / "user.h5", model="userpkg_rec:Net", model_kwargs={"width": 5},
                  data="userpkg_rec:load", data_options={"n": 90}, evaluate=True, config={"lr": 0.1}) as rec:
        rec.record("sgd", net, epoch=0, step=0)
        for step in range(1, 4):
            loss = F.cross_entropy(net(torch.stack([train[i][0] for i in range(60)])), train.y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.record("sgd", net, epoch=step, step=step)
    traj = open_trajectory(tmp_path / "user.h5")
    assert traj.config["lr"] == 0.1 and traj.config["input_shape"] == [12] and traj.config["num_classes"] == 3
    assert np.isfinite(traj.run("sgd").metrics["test_err"]).all()
    surf = plane(tmp_path / "user.h5", tmp_path / "user_plane.h5", "sgd:0", "sgd:1", "sgd", grid=(3, 3))
    assert surf.done.all()


def test_user_data_factory_forms(tmp_path, monkeypatch):
    """A data factory may return four arrays, a dict, (x, y) pairs or datasets; anything else is a
    DataError; the module is also found in the current folder (as `python -m` would)."""
    from landscape.data import DataSpec, load_data
    from landscape.errors import DataError
    (tmp_path / "userdata_forms.py").write_text(
        "import numpy as np, torch\n"
        "x, y = np.arange(40, dtype=np.float32).reshape(10, 4), np.arange(10) % 2\n"
        "def four(): return x[:6], y[:6], x[6:], y[6:]\n"
        "def as_dict(): return dict(x_train=x[:6], y_train=y[:6], x_test=x[6:], y_test=y[6:])\n"
        "def pairs(): return (torch.tensor(x[:6]), torch.tensor(y[:6])), (x[6:], y[6:])\n"
        "class D(torch.utils.data.Dataset):\n"
        "    def __init__(self, a, b): self.a, self.b = a, b\n"
        "    def __len__(self): return len(self.a)\n"
        "    def __getitem__(self, i): return torch.tensor(self.a[i]), int(self.b[i])\n"
        "def datasets(): return D(x[:6], y[:6]), torch.utils.data.TensorDataset(torch.tensor(x[6:]), torch.tensor(y[6:]))\n"
        "def wrong(): return 42\n"
        "class AsGiven(D):\n"
        "    def __getitem__(self, i): return self.a[i], self.b[i]\n"
        "def values(): return AsGiven(x[:6], x[:6, 0] / 7), AsGiven(x[6:], x[6:, 0] / 7)\n"
        "def ragged(): return AsGiven(x[:6], [0, 1, 2, [3, 4], 0, 1]), D(x[6:], y[6:])\n"
        "def boxed(): return AsGiven(x[:6], [np.array([c]) for c in y[:6]]), AsGiven(x[6:], [float(c) for c in y[6:]])\n"
        "def dicts(): return AsGiven([{'ids': r} for r in x[:6]], y[:6]), D(x[6:], y[6:])\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    for name in ("four", "as_dict", "pairs", "datasets"):
        d = load_data(DataSpec(f"userdata_forms:{name}"))
        assert d.x_train.shape == (6, 4) and d.x_test.shape == (4, 4) and d.num_classes == 2, name
        assert d.x_train.dtype == torch.float32 and d.y_test.dtype == torch.int64, name
        np.testing.assert_array_equal(d.x_test.numpy()[:, 0], [24, 28, 32, 36])
    values = load_data(DataSpec("userdata_forms:values"), task="regression")  # float targets stay values
    assert values.y_train.dtype == torch.float32 and values.num_classes == 1
    np.testing.assert_allclose(values.y_test.numpy(), np.array([24, 28, 32, 36]) / 7, rtol=1e-6)
    boxed = load_data(DataSpec("userdata_forms:boxed"))  # labels as [c] arrays and as 1.0: classes still
    assert boxed.y_train.dtype == torch.int64 and boxed.y_train.shape == (6,) and boxed.num_classes == 2
    np.testing.assert_array_equal(boxed.y_test.numpy(), [0, 1, 0, 1])
    with pytest.raises(DataError, match="the train set's targets differ in shape or type"):
        load_data(DataSpec("userdata_forms:ragged"))
    with pytest.raises(DataError, match="returned int"):
        load_data(DataSpec("userdata_forms:wrong"))
    with pytest.raises(DataError, match="item 0 of the train set has inputs of type dict; a dataset by name holds"):
        load_data(DataSpec("userdata_forms:dicts"))  # (was numpy's TypeError)
    with pytest.raises(DataError, match="cannot import dataset module 'no_such_module_here'"):
        load_data(DataSpec("no_such_module_here:f"))
    with pytest.raises(DataError, match="'.userdata_forms': a relative module name"):  # was importlib's TypeError
        load_data(DataSpec(".userdata_forms:boxed"))


def test_a_regression_model_is_recorded_imported_and_evaluated_with_its_task(tmp_path, capsys):
    """task= (Recorder, import_checkpoints, `landscape import --task`) is recorded: the checkpoints'
    values and every later plane are the task's (mae, not a classification error)."""
    from landscape.cli.main import main
    from landscape.data import DataSpec, load_data
    from landscape.geometry import Plane
    from landscape.importer import import_checkpoints
    from landscape.models import ModelSpec, build_model
    from landscape.store import open_surface
    from landscape.surface import compute_surface
    data_args = dict(data="regression", data_options={"n_train": 32, "n_test": 16, "features": 3})
    model_args = dict(model="mlp", model_kwargs={"hidden": [4]})
    data = load_data(DataSpec("regression", data_args["data_options"]), task="regression")
    torch.manual_seed(0)
    nets = [build_model(ModelSpec("mlp", {"hidden": [4]}), data.input_shape, data.num_classes) for _ in range(3)]
    with Recorder(tmp_path / "rec.h5", **model_args, **data_args, task="regression", evaluate=True) as rec:
        for i, net in enumerate(nets):
            rec.record("sgd", net, epoch=i)
    traj = open_trajectory(tmp_path / "rec.h5")
    assert traj.config["task"] == "regression" and "test_mae" in traj.run("sgd").metrics
    surf = compute_surface(traj, Plane.through(traj, "sgd:0", "sgd:1", "sgd:2"), (3, 3), out=tmp_path / "p.h5",
                           quiet=True)
    assert "test_mae" in surf.values and "test_err" not in surf.values
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for i, net in enumerate(nets):
        torch.save(net.state_dict(), folder / f"epoch{i}.pt")
    import_checkpoints({"sgd": [folder]}, tmp_path / "imp.h5", **model_args, **data_args, task="regression",
                       evaluate=True)
    imported = open_trajectory(tmp_path / "imp.h5")
    np.testing.assert_allclose(imported.run("sgd").metrics["test_mae"], traj.run("sgd").metrics["test_mae"], rtol=1e-6)
    assert main(["import", str(folder), "--run", "sgd", "--model", "mlp", "--model-arg", "hidden=[4]",
                 "--dataset", "regression", "--data-option", "n_train=32", "--data-option", "n_test=16",
                 "--data-option", "features=3", "--task", "regression", "-o", str(tmp_path / "cli.h5"), "--quiet"]) == 0
    assert main(["plane", str(tmp_path / "cli.h5"), "sgd:0", "sgd:1", "sgd:2", "--grid", "3", "3",
                 "-o", str(tmp_path / "cli-plane.h5"), "--quiet"]) == 0
    np.testing.assert_allclose(open_surface(tmp_path / "cli-plane.h5").values["test_mae"], surf.values["test_mae"],
                               rtol=1e-6)
    with pytest.raises(ConfigError, match="differ"):
        Recorder(tmp_path / "x.h5", **model_args, **data_args, task="regression", config={"task": "classification"})
    with pytest.raises(ConfigError, match="records its task by name"):
        Recorder(tmp_path / "x.h5", **model_args, **data_args, task=object())


def test_a_file_rebuilds_its_model_with_the_class_count_it_records(tmp_path):
    """The file says how many outputs its model was built with; the data's count, worked out again by a
    later version, does not change the model."""
    from landscape.data import DataSpec, load_data
    from landscape.models import ModelSpec, build_model
    from landscape.rebuild import rebuild_model
    data = load_data(DataSpec("synthetic", {"n_train": 20, "n_test": 8}))
    net = build_model(ModelSpec("mlp", {"hidden": [4]}), data.input_shape, data.num_classes + 2)
    with Recorder(tmp_path / "r.h5", model="mlp", model_kwargs={"hidden": [4]}, data="synthetic",
                  data_options={"n_train": 20, "n_test": 8}, check=False,
                  config={"num_classes": data.num_classes + 2, "input_shape": list(data.input_shape)}) as rec:
        rec.record("sgd", net, epoch=0)
    model = rebuild_model(open_trajectory(tmp_path / "r.h5"))
    assert model[-1].out_features == data.num_classes + 2


def test_a_file_open_in_h5py_in_the_same_process_is_read(tmp_path):
    """Looking at the file with h5py (in a notebook cell, say) and opening it with landscape at once:
    read (it was refused as "not an HDF5 file": HDF5's file locking flags differed)."""
    import h5py
    _, model, _ = same_start()
    with recorder(tmp_path / "looked.h5") as rec:
        rec.record("sgd", model, epoch=0)
    with h5py.File(tmp_path / "looked.h5", "r") as f:
        assert f["runs/sgd/params"].shape[0] == 1
        assert open_trajectory(tmp_path / "looked.h5").runs == ["sgd"]


def test_a_loop_that_crashed_before_its_first_record_leaves_nothing_to_resume(tmp_path):
    """A crash before any record leaves no partial, so the script simply runs again (it was refused as
    an interrupted recording holding nothing); resume=True with overwrite=True or check=False is refused;
    a record() that failed names no run in kept."""
    _, model, _ = same_start()
    with pytest.raises(RuntimeError, match="boom"):
        with recorder(tmp_path / "early.h5"):
            raise RuntimeError("boom")
    assert not (tmp_path / "early.h5.partial").exists()
    with recorder(tmp_path / "early.h5") as rec:
        with pytest.raises(ModelError):
            rec.record("bad", nn.Linear(2, 2))
        rec.record("sgd", model, epoch=0)
        assert list(rec.kept) == ["sgd"]
    with pytest.raises(ConfigError, match="not both"):
        recorder(tmp_path / "x.h5", resume=True, overwrite=True)
    with pytest.raises(ConfigError, match="resume=True needs the model built at start"):
        recorder(tmp_path / "x.h5", resume=True, check=False)


def test_a_function_of_the_running_script_is_recorded_with_a_warning(tmp_path):
    """``model="__main__:make_net"`` is what a notebook writes; the file records it, and no later command
    can import it (``landscape plane`` said the module has no such factory): said at once."""
    with pytest.warns(UserWarning, match=r"'__main__:make_net' names a function of the running notebook or script"
                                         r".*name it 'mynets:make_net'"):
        Recorder(tmp_path / "nb.h5", model="__main__:make_net", data="synthetic", check=False)
    assert not (tmp_path / "nb.h5").exists()
