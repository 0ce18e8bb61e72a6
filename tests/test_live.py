"""The in-memory core: geometry from live modules, state_dicts and tensors; evaluate_surface without a
file; Surface.save writing the file compute_surface writes; a resumed surface equal to an uninterrupted
one bit for bit whatever points per call the measurement picked."""
from __future__ import annotations

import copy

import h5py
import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from landscape import evaluate_surface
from landscape.errors import ConfigError, FileFormatError, GeometryError, ModelError
from landscape.geometry import Grid, Line, Plane
from landscape.plot import interactive_figure
from landscape.store import open_surface, open_trajectory
from landscape.surface import compute_surface
from landscape.params import Layout
from landscape.rebuild import rebuild_data, rebuild_model

THREE = ("sgd", "swa/average", "swa/iterates:0")


@pytest.fixture(scope="module")
def traj(tiny_run):
    return open_trajectory(tiny_run)


@pytest.fixture(scope="module")
def live(traj):
    """The tiny run's model and data, and its three checkpoints as modules (what a notebook holds)."""
    data = rebuild_data(traj)
    nets = []
    for name in THREE:
        c = traj.checkpoint(name)
        nets.append(traj.layout.load(rebuild_model(traj, data), c.params, c.buffers))
    return data, nets


@pytest.fixture(scope="module")
def reference(traj):
    return compute_surface(traj, Plane.through(traj, *THREE), (5, 4), quiet=True, points_per_call=2)


def _same_vectors(a, b):
    for name in ("origin", "u", "v", "buffers"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_a_plane_of_modules_state_dicts_or_tensors_is_the_plane_of_the_checkpoints(traj, live):
    data, (a, b, c) = live
    named = Plane.through(traj, *THREE)
    _same_vectors(Plane.through(a, b, c), named)
    swa = AveragedModel(b)  # a wrapper is unwrapped; its state_dict's "module." prefix is removed
    _same_vectors(Plane.through(a.state_dict(), swa, c, model=a), named)
    flat = traj.layout.params_to_vector(c)
    _same_vectors(Plane.through(a, swa.state_dict(), flat), named)  # a tensor's buffers are the model's (a)
    line = Line.through(a, b, names=("sgd", "swa"))
    assert torch.equal(line.directions, Line.through(traj, "sgd", "swa/average").directions)
    assert line.spec["checkpoints"] == {"a": "sgd", "b": "swa"}


def test_evaluated_in_memory_equals_the_trajectory_surface(live, reference):
    data, (a, b, c) = live
    plane = Plane.through(a, b, c, names=("sgd", "swa", "early"))
    surf = evaluate_surface(a, plane, (data.x_train, data.y_train, data.x_test, data.y_test), (5, 4),
                            points_per_call=2, batch_size=128)  # the tiny run's eval batch size
    assert surf.path is None and surf.done.all() and surf.kind == "plane"
    np.testing.assert_array_equal(surf.x, reference.x)
    np.testing.assert_array_equal(surf.y, reference.y)
    for m in reference.values:
        np.testing.assert_array_equal(surf.values[m], reference.values[m])
    assert set(surf.points) == {"sgd", "swa", "early"} and surf.points["swa"].distance < 1e-4
    assert surf.spec["bn"]["policy"] == "recompute" and "dataset" not in surf.spec


def test_checkpoints_and_paths_are_projected(live):
    data, (a, b, c) = live
    plane = Plane.through(a, b, c)
    mid = {k: (v1 + v2) / 2 if v1.is_floating_point() else v1
           for (k, v1), v2 in zip(a.state_dict().items(), b.state_dict().values())}
    points, paths = plane.project(checkpoints={"mid": mid}, paths={"walk": [a, mid, b]})
    np.testing.assert_allclose(points["mid"].coords, (points["a"].coords + points["b"].coords) / 2, atol=1e-5)
    np.testing.assert_allclose(paths["walk"].coords[1], points["mid"].coords)
    assert paths["walk"].coords.shape == (3, 2) and list(paths["walk"].epoch) == [0, 1, 2]


def test_saved_surface_is_the_file_compute_surface_writes(traj, tmp_path):
    plane = Plane.through(traj, *THREE)
    in_memory = compute_surface(traj, plane, (3, 4), quiet=True, points_per_call=3)
    saved = in_memory.save(tmp_path / "saved.h5")
    written = tmp_path / "written.h5"
    compute_surface(traj, plane, (3, 4), out=written, quiet=True, points_per_call=3)
    with h5py.File(saved, "r") as f, h5py.File(written, "r") as g:
        assert dict(f.attrs) == dict(g.attrs)
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        assert names and names == [n for n in names if n in g]
        for n in names:
            np.testing.assert_array_equal(f[n][()], g[n][()], err_msg=n)
        assert len(names) == sum(1 for _ in _datasets(g))
    back = open_surface(saved)
    for m in in_memory.values:
        np.testing.assert_array_equal(back.values[m], in_memory.values[m])
    assert back.points_per_call == 3 and set(back.points) == set(in_memory.points)


def _datasets(f):
    out = []
    f.visititems(lambda n, o: out.append(n) if isinstance(o, h5py.Dataset) else None)
    return out


def test_a_live_surface_saves_and_opens(live, tmp_path):
    data, (a, b, c) = live
    surf = evaluate_surface(a, Line.through(a, b, names=("sgd", "swa")), data, (6,), points_per_call=2)
    back = open_surface(surf.save(tmp_path / "line.h5"))
    assert back.trajectory is None and back.kind == "line"
    np.testing.assert_array_equal(back.values["test_err"], surf.values["test_err"])
    np.testing.assert_array_equal(back.basis()["u"], surf.basis()["u"])
    fig = interactive_figure(back)
    assert len(fig.data) >= 1 and type(fig).__name__ == "Figure"
    from landscape.plot import plane_figure
    with pytest.raises(FileFormatError, match="^this surface holds a line, not a plane$"):  # was "None holds"
        plane_figure(surf)


def test_random_pca_and_hessian_planes_of_live_objects(traj, live):
    data, (a, b, c) = live
    p = Plane.random(b, seed=3)
    q = Plane.random(traj, "swa/average", seed=3)
    _same_vectors(p, q)
    assert torch.equal(Line.random_rays(b, n=2, seed=1, max_distance=1.0).directions,
                       Line.random_rays(traj, "swa/average", n=2, seed=1, max_distance=1.0).directions)
    states = [traj.layout.load(rebuild_model(traj, data), torch.from_numpy(w), torch.from_numpy(bf))
              for w, bf in zip(traj.params("sgd"), traj.buffers("sgd"))]
    pca = Plane.pca([s.state_dict() for s in states], model=a)
    _same_vectors(pca, Plane.pca(traj, "sgd"))
    h = Plane.hessian(b, data=data, samples=100, iterations=5)
    assert h.derived["eigenvalues"][0] == pytest.approx(
        Plane.hessian(traj, "swa/average", data=data, samples=100, iterations=5).derived["eigenvalues"][0])
    everything = Plane.hessian(b, data=data, samples=10 ** 6, iterations=2)
    assert everything.spec["samples"] == len(data.x_train)  # what was used (it recorded 1000000)


def test_live_objects_that_do_not_fit_are_one_line_errors(live):
    data, (a, b, c) = live
    with pytest.raises(ConfigError, match="need model="):
        Plane.through(a.state_dict(), b.state_dict(), c.state_dict())
    with pytest.raises(ModelError, match="holds 3 values"):
        Plane.through(a, b, torch.zeros(3))
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(24, 4))
    with pytest.raises(ModelError, match="mismatch"):
        Plane.through(a, b, other)
    with pytest.raises(ModelError, match="parameters; the plane was made for"):
        evaluate_surface(other, Plane.through(a, b, c), data, (2, 2))
    with pytest.raises(ConfigError, match="needs its data"):
        Plane.hessian(a)
    with pytest.raises(ModelError, match=r"parameter .* is float64; landscape evaluates float32 models"):
        evaluate_surface(copy.deepcopy(a).double(), Plane.through(a, b, c), data, (2, 2))  # was a dtype clash mid-pass
    for xrange, yrange in (((1.0, -1.0), (-1.0, 1.0)), ((0.0, 1.0), (0.5, 0.5))):
        with pytest.raises(ConfigError, match="is empty; give LOW < HIGH"):  # a file's axes increase
            evaluate_surface(a, Plane.through(a, b, c), data, Grid(xrange, 3, yrange, 3))


def test_resume_after_a_measured_start_is_bit_identical(traj, tmp_path):
    """The measurement picks the points per call; the file keeps it, a resumed run uses it, and every
    call holds exactly that many points, so the file equals an uninterrupted run at that K."""
    out = tmp_path / "plane.h5"
    plane = Plane.through(traj, *THREE)
    flushes = []

    def stop_after_first(done, total):
        flushes.append(done)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compute_surface(traj, plane, (7, 5), out=out, quiet=True, write_every=0, on_write=stop_after_first)
    with h5py.File(tmp_path / "plane.h5.partial", "r") as f:
        k = int(f.attrs["points_per_call"])
        assert 0 < int(f["done"][()].sum()) < 35
    resumed = compute_surface(traj, plane, (7, 5), out=out, quiet=True)
    assert resumed.points_per_call == k
    uninterrupted = compute_surface(traj, plane, (7, 5), quiet=True, points_per_call=k)
    for m in uninterrupted.values:
        np.testing.assert_array_equal(resumed.values[m], uninterrupted.values[m])


def test_a_model_of_another_architecture_with_as_many_parameters_is_refused():
    def made():
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    other = torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 8, bias=False), torch.nn.ReLU(),
                                torch.nn.Linear(8, 2))  # 58 parameters too
    a, b = made(), made()
    line = Line.through(a, b)
    x, y = torch.randn(40, 4), torch.randint(0, 2, (40,))
    with pytest.raises(ModelError, match="parameter 0.weight is \\[4\\], but the line was made for a model"):
        evaluate_surface(other, line, (x[:30], y[:30], x[30:], y[30:]), grid=3)
    surf = evaluate_surface(made(), line, (x[:30], y[:30], x[30:], y[30:]), grid=3)  # the same architecture
    assert surf.values["train_loss"].shape == (3,)


def test_a_checkpoint_with_nan_weights_is_refused_by_name():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        b.weight[0, 0] = float("nan")
    for make in (lambda: Line.through(a, b, names=("a", "diverged")), lambda: Plane.random(b, name="diverged")):
        with pytest.raises(GeometryError, match="checkpoint diverged holds NaN or infinite weights"):
            make()


class _Tied(torch.nn.Module):
    """A language model whose output layer is its embedding (one tensor under two names)."""

    def __init__(self):
        super().__init__()
        self.emb, self.out = torch.nn.Embedding(7, 4), torch.nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x)))


def test_a_tied_models_own_state_dicts_place_it_and_untied_ones_are_refused():
    """A state_dict holds a tied tensor under both names: both are the model's (the second was
    refused as "not in the model"); a checkpoint whose two names hold other values is not this model."""
    torch.manual_seed(0)
    net, other = _Tied(), _Tied()
    line = Line.through(net.state_dict(), other.state_dict(), model=net)
    assert line.directions.shape == (1, Layout.of(net).num_params) == (1, 28)
    modules = Line.through(net, other)
    assert torch.equal(modules.origin, line.origin) and torch.equal(modules.directions, line.directions)
    second_only = {"out.weight": other.state_dict()["out.weight"]}  # as safetensors' save_model keeps it
    assert torch.equal(Line.through(net.state_dict(), second_only, model=net).directions, line.directions)
    untied = dict(other.state_dict(), **{"out.weight": torch.zeros(7, 4)})
    with pytest.raises(ModelError, match="'out.weight' is tied to 'emb.weight' in the model"):
        Line.through(net.state_dict(), untied, model=net)


def test_an_integer_buffer_float32_cannot_hold_is_refused_by_name():
    """Buffers are kept as float32: 2**31 - 1 came back as 2**31, silently (the surface at the
    checkpoint was another model's). Counters such as num_batches_tracked stay welcome."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    net[1].num_batches_tracked.fill_(2 ** 24)
    other = copy.deepcopy(net)
    torch.nn.init.zeros_(other[0].weight)
    Line.through(net, other)
    for m in (net, other):
        m.register_buffer("prime", torch.tensor(2 ** 31 - 1))
    for ends in ((net, other), (net.state_dict(), other.state_dict())):
        with pytest.raises(ModelError, match="buffer 'prime' holds the integer 2,147,483,647, which float32"):
            Line.through(*ends, model=net)


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_an_old_style_normed_model_is_evaluated_as_it_computes_itself(norm):
    """Old-style nn.utils.weight_norm and spectral_norm keep the weight they compute, with its graph, as
    a plain attribute, which copy.deepcopy refused (a traceback after one training step): the evaluator's
    copy computes it again, and the line's values at both ends are the two models' own losses (spectral
    norm's power-iteration vectors are buffers that differ between them: interpolated)."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))

    def make():
        net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        getattr(torch.nn.utils, norm)(net[0])
        return net
    a, b = make(), make()
    opt = torch.optim.SGD(b.parameters(), lr=0.1)
    F.cross_entropy(b(x), y).backward()  # a forward in train mode: the weight kept has its graph
    opt.step()
    line = Line.through(a, b)
    surface = evaluate_surface(b, line, (x, y, x, y), Grid((0.0, line.derived["length"]), 2))
    with torch.no_grad():
        own = [float(F.cross_entropy(net.eval()(x), y)) for net in (a, b)]
    np.testing.assert_allclose(surface.values["train_loss"], own, rtol=1e-5)


def test_a_lazy_module_not_run_yet_is_one_line():
    net = torch.nn.Sequential(torch.nn.LazyLinear(3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    with pytest.raises(ModelError, match=r"^0\.weight is not initialized yet \(a lazy module\): run the model once"):
        Plane.random(net)
    net(torch.randn(4, 5))
    assert Plane.random(net).origin.numel() == 5 * 3 + 3 + 3 * 2 + 2


def test_a_plane_through_nets_pruned_to_other_masks_holds_each_at_its_point():
    """Pruning masks are buffers (torch.nn.utils.prune): a model without BatchNorm whose checkpoints'
    buffers differ has them interpolated (the origin's mask at every point gave checkpoint b another
    net's loss, silently); its value at every checkpoint's point is that checkpoint's own loss."""
    import torch.nn.functional as F
    from torch.nn.utils import prune
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    nets = []
    for amount in (0.0, 0.5, 0.8):
        torch.manual_seed(len(nets))
        net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        prune.l1_unstructured(net[0], "weight", amount=amount)
        nets.append(net.eval())
    plane = Plane.through(*nets, names=("a", "b", "c"))
    points = plane.derived["points"]
    grid = Grid((points["c"][0], points["b"][0]), 2, (0.0, points["c"][1]), 2)  # a at (0, 0)
    surface = evaluate_surface(nets[0], plane, (x, y, x, y), grid=grid)
    assert surface.spec["bn"]["policy"] == "interpolate"
    at_a = evaluate_surface(nets[0], plane, (x, y, x, y), grid=Grid((0.0, 1.0), 2, (0.0, 1.0), 2))
    with torch.no_grad():
        own = [float(F.cross_entropy(net(x), y)) for net in nets]
    values = surface.values["train_loss"]
    np.testing.assert_allclose([at_a.values["train_loss"][0, 0], values[1, 0], values[0, 1]], own, rtol=1e-5)
    others = [copy.deepcopy(nets[0]) for _ in range(2)]
    for k, net in enumerate(others):
        with torch.no_grad():
            net[2 * k].bias.add_(1.0)
    same_masks = evaluate_surface(nets[0], Plane.through(nets[0], *others), (x, y, x, y), (2, 2))
    assert same_masks.spec["bn"]["policy"] == "none"
    with pytest.raises(ConfigError, match="unknown BatchNorm policy 'recompte'"):
        evaluate_surface(nets[0], plane, (x, y, x, y), grid=grid, bn="recompte")


def test_interpolated_running_variances_of_an_instance_norm_stay_at_least_0():
    """InstanceNorm with running statistics is no BatchNorm: its checkpoints' differing buffers are
    interpolated, and the plane's margin extrapolates its running variances, which are clipped at 0
    as BatchNorm's are (39 of 121 points were NaN)."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 8), torch.randint(0, 2, (32,))
    nets = []
    for k in range(3):
        net = torch.nn.Sequential(torch.nn.Conv1d(3, 4, 3), torch.nn.InstanceNorm1d(4, track_running_stats=True),
                                  torch.nn.Flatten(), torch.nn.Linear(24, 2))
        with torch.no_grad():
            net(x * (1 + 3 * k))  # running statistics of other scales
        nets.append(net.eval())
    surface = evaluate_surface(nets[0], Plane.through(*nets), (x, y, x, y), (11, 11), margin=1.0)
    assert surface.spec["bn"]["policy"] == "interpolate"
    assert np.isfinite(surface.values["train_loss"]).all()


def test_sharpness_numbers_of_another_model_are_not_shown_beside_a_planes_checkpoints():
    """Live results carry no trajectory to tell them apart: a sharpness result of a model of another size
    whose checkpoints happen to share the plane's names is not joined to them (its table still shows)."""
    import warnings
    from landscape.plot.interactive import explorer_html
    from landscape.sharpness import SharpnessSpec, evaluate_sharpness
    torch.manual_seed(0)
    small = [torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2)) for _ in range(3)]
    big = [torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.ReLU(), torch.nn.Linear(9, 2)) for _ in range(2)]
    x, y = torch.randn(40, 4), torch.randint(0, 2, (40,))
    data = (x[:30], y[:30], x[30:], y[30:])
    names = ("sgd", "swa/average", "init")
    plane = evaluate_surface(small[0], Plane.through(*small, names=names), data, (3, 3))
    spec = SharpnessSpec(top_k=1, iterations=5, probes=2, ascent_steps=0)
    for models, joined in ((big, False), (small[:2], True)):
        sharp = evaluate_sharpness(models[0], data, dict(zip(names, models)), spec=spec)
        top = f"top Hessian eigenvalue {sharp.results[0]['eigenvalues'][0]:.4g}"
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            page = explorer_html([plane], sharpness=sharp)
        assert (top in page) == joined and "Flatness numbers" in page  # (the hover text beside a checkpoint)
        assert [str(w.message) for w in said if "not shown beside" in str(w.message)] == \
            ([] if joined else ["the sharpness numbers are of a model of 65 parameters, the plane's of 44; they are not "
                                "shown beside that plane's checkpoints"])
