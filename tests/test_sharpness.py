"""Sharpness: Lanczos eigenvalues and Hutchinson's trace against the exact Hessian of a model small enough
to form it; Lanczos against the subspace (power) iteration of the Hessian plane on a larger model;
epsilon-sharpness inside its ball and at least the rise along the top eigenvector; the file and the CLI."""
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, hessian

from landscape.cli.main import main
from landscape.data import DataSpec, load_data
from landscape.evaluate import BatchNormPolicy, Evaluator
from landscape.geometry import HessianOperator, top_hessian_eigen
from landscape.rebuild import rebuild_data, rebuild_model
from landscape.models import ModelSpec, build_model
from landscape.params import Layout
from landscape.sharpness import FilterBall, SharpnessSpec, checkpoint_sharpness, density_curve
from landscape.store import open_trajectory
from landscape.store.sharpness import open_sharpness


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small():
    """An MLP of 180 parameters trained a little on 200 synthetic samples, and its exact Hessian."""
    data = load_data(DataSpec("synthetic", {"n_train": 200, "n_test": 50, "shape": [1, 6]}))
    torch.manual_seed(0)
    model = build_model(ModelSpec("mlp", {"hidden": [16]}), data.input_shape, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(data.x_train), data.y_train).backward()
        opt.step()
    layout = Layout.of(model)
    w = layout.params_to_vector(model)

    def loss(v):
        return F.cross_entropy(functional_call(model, layout.split_params(v), (data.x_train,)), data.y_train)
    H = hessian(loss)(w).double()
    return data, model, layout, w, 0.5 * (H + H.T)


def test_top_eigenvalues_and_trace_match_the_exact_hessian(small):
    data, model, layout, w, H = small
    assert layout.num_params == 180
    exact = torch.linalg.eigvalsh(H).flip(0)
    r = checkpoint_sharpness(model, layout, w, layout.buffers_to_vector(model), data,
                             SharpnessSpec(top_k=4, probes=400, ascent_steps=2), BatchNormPolicy("none"))
    assert r["eigenvalues"] == sorted(r["eigenvalues"], reverse=True)
    np.testing.assert_allclose(r["eigenvalues"], exact[:4].numpy(), rtol=1e-4)
    trace = float(H.trace())
    assert abs(r["trace"] - trace) < 4 * r["trace_stderr"]
    assert r["trace_stderr"] < 0.05 * trace
    # Hutchinson's standard error is that of the probe values
    assert r["trace_stderr"] == pytest.approx(np.std(r["trace_probes"], ddof=1) / np.sqrt(400))


def test_live_objects_get_the_exact_hessians_numbers_and_save_the_file_the_command_writes(small, tmp_path):
    """evaluate_sharpness on a module and tensors in memory: the numbers of the exact Hessian, those of
    the checkpoint_sharpness core, for the model itself or named checkpoints (a module, a state_dict);
    the caller's model untouched; a checkpoint equal to another computed once; saved, the sharpness file
    every reader takes."""
    from landscape import evaluate_sharpness, sharpness
    from landscape.params import copy_module
    data, model, layout, w, H = small
    exact = torch.linalg.eigvalsh(H).flip(0)
    spec = SharpnessSpec(top_k=3, probes=40, ascent_steps=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = (data.x_train, data.y_train, data.x_test, data.y_test)
    res = evaluate_sharpness(model, tensors, spec=spec)
    core = checkpoint_sharpness(model, layout, w, layout.buffers_to_vector(model), data, spec, BatchNormPolicy("none"))
    r = res.results[0]
    assert r["checkpoint"] == "model" and res.path is None and res.spec["num_params"] == 180
    np.testing.assert_allclose(r["eigenvalues"], exact[:3].numpy(), rtol=1e-4)
    for key in ("eigenvalues", "trace", "epsilon_sharpness", "metrics"):
        np.testing.assert_equal(r[key], core[key])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    moved = copy_module(model)
    with torch.no_grad():
        moved[3].weight.mul_(1.5)
    computed = []
    work = sharpness.CheckpointWork.prepare
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sharpness.CheckpointWork, "prepare", lambda self, *a: computed.append(1) or work(self, *a))
        two = evaluate_sharpness(model, tensors, {"trained": model, "scaled": moved.state_dict(),
                                                  "again": model.state_dict()}, spec=spec)
    assert [t["checkpoint"] for t in two.results] == ["trained", "scaled", "again"] and len(computed) == 2
    assert two.results[2]["seconds"] == 0.0 and two.results[2]["eigenvalues"] == two.results[0]["eigenvalues"]
    np.testing.assert_equal(two.results[0]["eigenvalues"], r["eigenvalues"])
    assert two.results[1]["eigenvalues"][0] != pytest.approx(r["eigenvalues"][0], rel=1e-3)
    saved = two.save(tmp_path / "s.h5")
    np.testing.assert_equal(open_sharpness(saved.path).summary(), two.summary())  # (epoch NaN: no run)
    assert saved.trajectory is None
    assert main(["info", str(saved.path)]) == 0 and main(["plot", "--sharpness", str(saved.path),
                                                          "-o", str(tmp_path / "figs")]) == 0


def test_numbers_of_a_files_checkpoints_computed_in_memory_save_with_their_trajectory(tiny_run, tmp_path):
    from landscape.sharpness import compute_sharpness
    traj = open_trajectory(tiny_run)
    res = compute_sharpness(traj, ["sgd"], SharpnessSpec(top_k=1, probes=2, iterations=3, ascent_steps=1))
    saved = res.save(tmp_path / "s.h5")
    assert saved.trajectory == str(tiny_run) and saved.trajectory_sha256 == traj.sha256()
    np.testing.assert_equal(saved.summary(), res.summary())
    from landscape.errors import FileFormatError
    with pytest.raises(FileFormatError, match="is the input"):  # never over the trajectory it was computed from
        res.save(tiny_run, overwrite=True)


def test_eigenvalues_lanczos_cannot_reach_are_nan_and_the_numbers_save(tmp_path):
    """A dead unit's zero block: Lanczos ends on an invariant subspace before k Ritz values; the missing
    ones are NaN (two checkpoints with different counts could not be saved), and k counts the trained
    parameters only."""
    import torch.nn as nn
    from landscape import evaluate_sharpness
    from landscape.errors import ConfigError
    torch.manual_seed(8)
    x, y = torch.randn(60, 4), torch.randint(0, 2, (60,))
    data = (x[:40], y[:40], x[40:], y[40:])
    a, b = (nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)) for _ in range(2))
    with torch.no_grad():
        a[0].bias[0] = -50.0  # one dead unit
    res = evaluate_sharpness(a, data, {"a": a, "b": b}, spec=SharpnessSpec(top_k=23, iterations=23, probes=4, ascent_steps=1))
    eigs = [np.asarray(r["eigenvalues"]) for r in res.results]
    assert [len(e) for e in eigs] == [23, 23] and np.isnan(eigs[0]).any() and np.isfinite(eigs[0][:10]).all()
    np.testing.assert_equal(res.save(tmp_path / "s.h5").summary(), res.summary())
    import contextlib
    import io
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["info", str(tmp_path / "s.h5"), "--json"]) == 0
    strict = json.loads(printed.getvalue(), parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert strict["checkpoints"][0]["eigenvalues"][-1] is None and strict["checkpoints"][0]["epoch"] is None
    a[0].requires_grad_(False)  # 8 trained values left
    with pytest.raises(ConfigError, match="top k = 9 eigenvalues asked of a model with 8 trained parameters"):
        evaluate_sharpness(a, data, spec=SharpnessSpec(top_k=9, iterations=9))


def test_live_sharpness_refuses_what_it_cannot_take_in_one_line(small):
    from landscape import evaluate_sharpness
    from landscape.errors import LandscapeError
    data, model, *_ = small
    tensors = (data.x_train, data.y_train, data.x_test, data.y_test)
    nan = {k: v * float("nan") for k, v in model.state_dict().items()}
    with pytest.raises(LandscapeError, match="checkpoint diverged holds NaN or infinite weights"):
        evaluate_sharpness(model, tensors, {"diverged": nan})
    with pytest.raises(LandscapeError, match="x_train holds NaN or infinite values"):  # (refused as data)
        evaluate_sharpness(model, (data.x_train * float("inf"), *tensors[1:]))
    huge = {k: v * 1e30 for k, v in model.state_dict().items()}  # finite weights whose loss overflows
    with pytest.raises(LandscapeError, match="the training loss is (nan|inf) at this checkpoint"):
        evaluate_sharpness(model, tensors, {"huge": huge})
    with pytest.raises(LandscapeError, match="checkpoints is a list"):
        evaluate_sharpness(model, tensors, [model])
    with pytest.raises(LandscapeError, match="data .* holds DataLoader, NoneType"):
        from torch.utils.data import DataLoader, TensorDataset
        loader = DataLoader(TensorDataset(data.x_train, data.y_train))
        evaluate_sharpness(model, (loader, None, loader, None))


def test_live_sharpness_refuses_streamed_data_in_one_line(small):
    from torch.utils.data import DataLoader, TensorDataset
    from landscape import evaluate_sharpness
    from landscape.errors import ConfigError
    data, model, *_ = small
    loaders = (DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=50),
               DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=50))
    with pytest.raises(ConfigError, match="sharpness needs the data in memory"):
        evaluate_sharpness(model, loaders)


def test_trace_probes_are_drawn_as_one_piece_after_the_other_would(small):
    """The trace's probes come in pieces of 16, but each piece draws from the generator state at which
    a sequential computation would: after the Lanczos start, in order. Checked against z^T H z of the
    exact Hessian for the Rademacher vectors so drawn."""
    data, model, layout, w, H = small
    r = checkpoint_sharpness(model, layout, w, layout.buffers_to_vector(model), data,
                             SharpnessSpec(top_k=1, probes=40, ascent_steps=0), BatchNormPolicy("none"))
    g = torch.Generator().manual_seed(0)
    torch.randn(layout.num_params, generator=g, dtype=torch.float64)  # the Lanczos start
    z = torch.cat([torch.randint(0, 2, (n, layout.num_params), generator=g) for n in (16, 16, 8)]).double() * 2 - 1
    np.testing.assert_allclose(r["trace_probes"], ((z @ H) * z).sum(1).numpy(), rtol=1e-4)


def test_one_checkpoints_pieces_on_two_threads_give_the_numbers_of_one_thread(small):
    """Its Lanczos run, trace passes, density runs and ascents spread over two worker threads: every
    number exactly as when they run one after the other on one thread."""
    data, model, layout, w, _ = small
    spec = SharpnessSpec(top_k=2, iterations=20, probes=40, density=True, density_runs=2, density_steps=8,
                         ascent_steps=3)
    one, two = (checkpoint_sharpness(model, layout, w, layout.buffers_to_vector(model), data, spec,
                                     BatchNormPolicy("none"), workers=n) for n in (1, 2))
    assert one.keys() == two.keys()
    for key in one:
        a, b = (np.asarray(list(r[key].values()) if key == "metrics" else r[key], dtype=float) for r in (one, two))
        assert np.array_equal(a, b, equal_nan=True), key


def test_lanczos_run_to_the_dimension_is_the_whole_spectrum(small):
    """With as many steps as parameters the Ritz values are the eigenvalues (the SLQ nodes too)."""
    data, model, layout, w, H = small
    r = checkpoint_sharpness(model, layout, w, layout.buffers_to_vector(model), data,
                             SharpnessSpec(top_k=10, iterations=180, tol=1e-9, probes=2, density=True,
                                           density_runs=1, density_steps=180, ascent_steps=0),
                             BatchNormPolicy("none"))
    exact = torch.linalg.eigvalsh(H).flip(0).numpy()
    np.testing.assert_allclose(r["eigenvalues"], exact[:10], rtol=1e-3, atol=1e-5)
    nodes, weights = np.asarray(r["density_nodes"]), np.asarray(r["density_weights"])
    assert np.nansum(weights) == pytest.approx(1.0)
    assert np.nanmax(nodes) == pytest.approx(exact[0], rel=1e-3)
    grid = np.linspace(exact[-1] - 1, exact[0] + 1, 4001)
    curve = density_curve(nodes, weights, grid, sigma=0.05)
    assert np.trapezoid(curve, grid) == pytest.approx(1.0, rel=1e-3)


def test_a_conv1d_model_run_as_2d_has_the_exact_hessians_eigenvalues():
    """A small cnn1d-bn (stored BatchNorm statistics): its Hessian-vector products run its Conv1d
    layers as 2-D ones on channels-last memory (as the evaluator does on a CPU), and the eigenvalues
    and trace still are those of the exact Hessian of the plain model."""
    data = load_data(DataSpec("synthetic", {"n_train": 120, "n_test": 30, "shape": [1, 20]}))
    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn1d-bn", {"channels": 4}), data.input_shape, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(data.x_train), data.y_train).backward()
        opt.step()
    model.eval()
    layout = Layout.of(model)
    w, b = layout.params_to_vector(model), layout.buffers_to_vector(model)
    ev = Evaluator(model, layout, data, BatchNormPolicy("stored"))
    with ev.conv1d_as_2d():  # the 2-D path is the one tested
        assert all("forward" in m.__dict__ for m in ev.model.modules() if isinstance(m, torch.nn.Conv1d))
    buffers = layout.split_buffers(b)

    def loss(v):
        out = functional_call(model, (layout.split_params(v), buffers), (data.x_train,))
        return F.cross_entropy(out, data.y_train)
    H = hessian(loss)(w).double()
    exact = torch.linalg.eigvalsh(0.5 * (H + H.T)).flip(0)
    r = checkpoint_sharpness(model, layout, w, b, data, SharpnessSpec(top_k=3, probes=300, ascent_steps=0, tol=1e-7),
                             BatchNormPolicy("stored"))
    np.testing.assert_allclose(r["eigenvalues"], exact[:3].numpy(), rtol=1e-4)
    assert abs(r["trace"] - float(H.trace())) < 4 * r["trace_stderr"]


def test_a_frozen_layers_model_has_the_hessian_of_its_trained_parameters(small):
    """A model whose first layer is frozen (requires_grad=False, as in fine-tuning a head): eigenvalues,
    trace and the Hessian plane are those of the trained parameters' block of the exact Hessian, and
    the sharpness ball moves only them (every parameter's numbers were reported: 4x too large here)."""
    from landscape.geometry import Plane
    from landscape.params import copy_module
    data, model, layout, w, H = small
    frozen = copy_module(model)
    frozen[1].requires_grad_(False)  # the hidden layer (mlp: Flatten, Linear, ReLU, Linear)
    trained_layout = Layout.of(frozen)
    assert trained_layout.frozen == ["1.weight", "1.bias"]
    keep = trained_layout.trainable_mask().bool()
    block = H[keep][:, keep]
    exact = torch.linalg.eigvalsh(block).flip(0)
    r = checkpoint_sharpness(frozen, trained_layout, w, layout.buffers_to_vector(model), data,
                             SharpnessSpec(top_k=3, probes=400, ascent_steps=2), BatchNormPolicy("none"))
    np.testing.assert_allclose(r["eigenvalues"], exact[:3].numpy(), rtol=1e-4)
    assert abs(r["trace"] - float(block.trace())) < 4 * r["trace_stderr"]
    assert r["eigenvalues"][0] < 0.9 * float(torch.linalg.eigvalsh(H)[-1])  # (the whole model's is larger)
    from landscape import evaluate_sharpness  # the live objects' entry: the same rule
    live = evaluate_sharpness(frozen, (data.x_train, data.y_train, data.x_test, data.y_test),
                              spec=SharpnessSpec(top_k=3, probes=40, ascent_steps=0))
    np.testing.assert_allclose(live.results[0]["eigenvalues"], exact[:3].numpy(), rtol=1e-4)
    assert live.spec["frozen"] == {"model": ["1.weight", "1.bias"]}
    ball = FilterBall(trained_layout, w.double(), 0.01)
    assert [sl.start for sl, _ in ball.parts] == [e.offset for e in trained_layout.params if e.name == "3.weight"]
    plane = Plane.hessian(frozen, data=data, samples=200, iterations=60, tol=1e-7)
    np.testing.assert_allclose(plane.derived["eigenvalues"], exact[:2].numpy(), rtol=1e-3)
    assert float(plane.u[~keep].abs().max()) == 0 and float(plane.v[~keep].abs().max()) == 0
    assert plane.spec["frozen"] == ["1.weight", "1.bias"]


@pytest.mark.parametrize("style", ["parametrization", "hook"])
def test_a_weight_normed_models_hessian_is_the_exact_one(style):
    """Weight normalization (torch.nn.utils.parametrizations.weight_norm, and the old-style hook):
    the eigenvalues and Hessian-vector products are those of the exact Hessian, written out by hand
    (torch's own second derivative of its weight-norm op is wrong: 7 to 10 % off, not symmetric)."""
    data = load_data(DataSpec("synthetic", {"n_train": 120, "n_test": 30, "shape": [1, 5]}))
    torch.manual_seed(0)
    norm = torch.nn.utils.parametrizations.weight_norm if style == "parametrization" else torch.nn.utils.weight_norm
    model = torch.nn.Sequential(torch.nn.Flatten(), norm(torch.nn.Linear(5, 6)), torch.nn.Tanh(),
                                norm(torch.nn.Linear(6, 4))).eval()
    layout = Layout.of(model)
    w, b = layout.params_to_vector(model), layout.buffers_to_vector(model)
    names = [e.name for e in layout.params]

    def loss(v):  # the model by hand: weight = g * v / |v| row by row
        p = dict(zip(names, layout.split_params(v).values()))
        h = data.x_train.flatten(1)
        for i, act in ((1, torch.tanh), (3, lambda t: t)):
            g = next(p[n] for n in names if n.startswith(f"{i}.") and n.endswith(("weight_g", "original0")))
            d = next(p[n] for n in names if n.startswith(f"{i}.") and n.endswith(("weight_v", "original1")))
            h = act(h @ (g * d / d.norm(dim=1, keepdim=True)).T + p[f"{i}.bias"])
        return F.cross_entropy(h, data.y_train)
    H = hessian(loss)(w).double()
    assert float((H - H.T).abs().max()) < 1e-6
    op = HessianOperator(model, layout, w, b, data.x_train, data.y_train)
    products = op(torch.eye(layout.num_params))
    np.testing.assert_allclose(products.numpy(), H.numpy(), atol=2e-5 * float(H.abs().max()))
    r = checkpoint_sharpness(model, layout, w, b, data, SharpnessSpec(top_k=3, probes=100, ascent_steps=0),
                             BatchNormPolicy("none"))  # (on the evaluator's copy of the model)
    np.testing.assert_allclose(r["eigenvalues"], torch.linalg.eigvalsh(H).flip(0)[:3].numpy(), rtol=1e-4)


def test_lanczos_agrees_with_power_iteration(tiny_run):
    """On the tiny cnn1d-bn (596 parameters, with BatchNorm): the top eigenvalue of Lanczos and of the
    Hessian plane's subspace iteration, on the same loss (stored buffers, every training sample)."""
    traj = open_trajectory(tiny_run)
    data = rebuild_data(traj)
    model = rebuild_model(traj, data)
    c = traj.checkpoint("sgd")
    assert traj.layout.num_params > 500  # larger than the exact-Hessian model
    r = checkpoint_sharpness(model, traj.layout, c.params, c.buffers, data,
                             SharpnessSpec(top_k=2, probes=2, ascent_steps=0, tol=1e-6),
                             BatchNormPolicy("stored"))
    (l1, l2), _, _ = top_hessian_eigen(model, traj.layout, c.params, c.buffers, data, samples=len(data.x_train),
                                       iterations=500, tol=1e-7)
    assert l1 > 0
    assert r["eigenvalues"][0] == pytest.approx(l1, rel=1e-3)


def test_epsilon_sharpness_stays_in_its_ball_and_beats_the_top_eigenvector(small):
    data, model, layout, w, H = small
    evals, evecs = torch.linalg.eigh(H)
    top = evecs[:, -1]
    for eps in (0.01, 0.1):
        r = checkpoint_sharpness(model, layout, w, layout.buffers_to_vector(model), data,
                                 SharpnessSpec(top_k=1, probes=2, epsilon=eps, ascent_steps=10),
                                 BatchNormPolicy("none"))
        assert 0 < r["epsilon_ratio"] <= eps * (1 + 1e-6)
        # the rise along the exact top eigenvector, put on the ball's boundary, computed here
        op = HessianOperator(model, layout, w, layout.buffers_to_vector(model), data.x_train, data.y_train)
        ball = FilterBall(layout, w.double(), eps)
        d = ball.onto_boundary(top)
        assert ball.ratio(d) == pytest.approx(eps)
        base = op.loss()
        along = max(op.loss((w.double() + s * d).float()) for s in (1, -1)) - base
        assert r["epsilon_sharpness"] >= along - 1e-6
        assert r["epsilon_sharpness"] > 0
    # a ball ten times wider allows a larger rise
    assert r["epsilon_sharpness"] > 0


def test_filter_ball_projection():
    layout = Layout.of(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(layout.num_params, generator=g, dtype=torch.float64)
    ball = FilterBall(layout, w, 0.2)
    d = ball.project(10 * torch.randn(layout.num_params, generator=g, dtype=torch.float64))
    assert ball.ratio(d) == pytest.approx(0.2)
    for e, sl in layout.param_slices():
        rows = d[sl].view(e.shape[0], -1) if len(e.shape) > 1 else d[sl]
        if len(e.shape) == 1:
            assert (rows == 0).all()  # biases stay where they are
        else:
            np.testing.assert_allclose(rows.norm(dim=1), 0.2 * w[sl].view(e.shape[0], -1).norm(dim=1))


@pytest.fixture(scope="module")
def sharp_file(tiny_run, tmp_path_factory):
    """The CLI's file for two checkpoints of the tiny run, and what --json printed."""
    import contextlib
    import io
    out = tmp_path_factory.mktemp("sharp") / "sharp.h5"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["sharpness", str(tiny_run), "sgd", "swa/average:-1", "--top-k", "2", "--probes", "4",
                     "--ascent-steps", "2", "--density", "--density-runs", "1", "--density-steps", "8",
                     "-o", str(out), "--json", "--quiet"]) == 0
    return out, json.loads(buf.getvalue())


def test_cli_writes_the_file_and_json(sharp_file):
    out, printed = sharp_file
    assert [p["checkpoint"] for p in printed] == ["sgd:6", "swa/average:3"]
    for p in printed:
        assert {"checkpoint", "eigenvalues", "trace", "trace_stderr", "epsilon_sharpness"} <= set(p)
        assert p["eigenvalues"] == sorted(p["eigenvalues"], reverse=True) and len(p["eigenvalues"]) == 2
    s = open_sharpness(out)
    assert s.epsilon == 0.01 and s.spec["bn"]["policy"] == "recompute"
    assert [r["checkpoint"] for r in s.results] == ["sgd:6", "swa/average:3"]
    assert np.asarray(s.results[0]["density_nodes"]).shape == (1, 8)
    assert s.summary()[0]["trace"] == printed[0]["trace"]


def test_density_lines_of_one_colour_differ_in_style():
    """SWA's iterates and average share their method's colour: the density panel's lines (which have no
    markers) told them apart only by the legend."""
    from landscape.plot.flatness import _looks
    looks = _looks(["swa/iterates:2", "swa/average:3", "sgd:6", "lookahead/slow:1"])
    (c1, _, _, ls1, _), (c2, _, _, ls2, _) = looks["swa/iterates:2"], looks["swa/average:3"]
    assert c1 == c2 and ls1 != ls2
    assert looks["sgd:6"][3] == looks["lookahead/slow:1"][3] == "-"  # first of their colours: solid


def test_info_shows_a_sharpness_file(sharp_file, capsys):
    out, printed = sharp_file
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sharpness of 2 checkpoint(s)" in text and "sgd:6" in text and "swa/average:3" in text
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoints"] == printed


def test_flatness_figure_and_explorer_numbers(sharp_file, tmp_path, tiny_run):
    out, printed = sharp_file
    assert main(["plot", "--sharpness", str(out), "-o", str(tmp_path / "figs"), "--format", "png"]) == 0
    assert (tmp_path / "figs" / "flatness.png").stat().st_size > 10_000
    numbers = json.loads((tmp_path / "figs" / "numbers.json").read_text())
    assert numbers["sharpness"] == printed
    from landscape.geometry import Plane
    from landscape.plot.interactive import explorer_html
    from landscape.surface import compute_surface
    traj = open_trajectory(tiny_run)
    surf = compute_surface(traj, Plane.through(traj, "sgd", "swa/average", "swa/iterates:0"), (3, 3), quiet=True)
    page = explorer_html([surf], sharpness=out)
    assert "Flatness numbers" in page
    top = printed[0]["eigenvalues"][0]
    assert f"top Hessian eigenvalue {top:.4g}" in page      # in the hover text of sgd:6
    assert page.count("<tr>") == 1 + len(printed)
    import dataclasses
    other = dataclasses.replace(surf, trajectory_sha256="0" * 64)  # a plane of another run: names name others
    with pytest.warns(UserWarning, match="are of another trajectory"):
        page = explorer_html([other], sharpness=out)
    assert f"top Hessian eigenvalue {top:.4g}" not in page and page.count("<tr>") == 1 + len(printed)
    # a sharpness file of an averaged copy (the demo's) names the runs it copied from the plane's trajectory
    of_a_copy = dataclasses.replace(open_sharpness(out), trajectory_sha256="1" * 64,
                                    source_sha256=surf.trajectory_sha256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f"top Hessian eigenvalue {top:.4g}" in explorer_html([surf], sharpness=of_a_copy)


@pytest.mark.parametrize("argv, words", [
    (["nope"], ["'nope'", "not found"]),
    (["sgd:99"], ["sgd:99", "not found"]),
    (["sgd", "--epsilon", "0"], ["epsilon", "positive"]),
    (["sgd", "--epsilon", "-1"], ["epsilon", "positive"]),
    (["sgd", "--top-k", "100000"], ["top k", "parameters"]),
    (["sgd", "--probes", "1"], ["probes"]),
])
def test_bad_input_is_one_line_before_any_work(tiny_run, tmp_path, capsys, argv, words):
    out = tmp_path / "s.h5"
    assert main(["sharpness", str(tiny_run), *argv, "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("landscape: error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    assert not list(tmp_path.iterdir())


def test_missing_file_is_one_line(tmp_path, capsys):
    assert main(["sharpness", str(tmp_path / "none.h5"), "sgd", "-o", str(tmp_path / "s.h5")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_checkpoints_side_by_side_give_the_numbers_of_one_at_a_time(tiny_run):
    """On a CPU with two threads, two checkpoints' pieces are computed at once, each on one thread: the
    numbers are exactly those of each checkpoint alone on one thread."""
    from landscape.device import torch_threads
    from landscape.sharpness import compute_sharpness
    traj = open_trajectory(tiny_run)
    spec = SharpnessSpec(top_k=2, iterations=10, probes=4, ascent_steps=2, density=True, density_runs=1,
                         density_steps=6)
    with torch_threads(2):
        both = compute_sharpness(traj, ["sgd", "swa/average:-1"], spec, device="cpu").results
        assert torch.get_num_threads() == 2  # restored
    with torch_threads(1):
        alone = [compute_sharpness(traj, [name], spec, device="cpu").results[0] for name in ("sgd", "swa/average:-1")]
    assert [r["checkpoint"] for r in both] == ["sgd:6", "swa/average:3"]
    for a, b in zip(both, alone):
        for key in ("eigenvalues", "trace", "trace_probes", "density_nodes", "density_weights", "epsilon_sharpness",
                    "eigenvector_sharpness", "metrics"):
            assert np.array_equal(np.asarray(a[key] if key != "metrics" else list(a[key].values())),
                                  np.asarray(b[key] if key != "metrics" else list(b[key].values()))), key


def test_the_workers_evaluators_are_made_before_any_piece_runs(tiny_run, monkeypatch):
    """Making an evaluator traces the model with torch.fx, which patches torch.nn.Module for every thread
    while it runs: made in a worker thread, it sent the other worker's running piece through the trace
    (now and then other metrics, or fx's NameError). Every evaluator is made in the calling thread."""
    import threading
    import landscape.sharpness as sharpness
    from landscape.device import torch_threads
    made, make = [], sharpness.Evaluator.__init__
    monkeypatch.setattr(sharpness.Evaluator, "__init__",
                        lambda self, *a, **k: made.append(threading.current_thread()) or make(self, *a, **k))
    spec = SharpnessSpec(top_k=1, iterations=4, probes=2, ascent_steps=1)
    with torch_threads(2):
        sharpness.compute_sharpness(open_trajectory(tiny_run), ["sgd", "swa/average:-1"], spec, device="cpu")
    assert made and all(t is threading.main_thread() for t in made)


def test_an_interrupted_computation_keeps_its_finished_checkpoints_and_goes_on(tiny_run, tmp_path, monkeypatch,
                                                                              capsys):
    """Ctrl-C after the first checkpoint: it is kept in OUT.partial and not computed again, and the file
    holds the numbers of an uninterrupted run (everything was lost before); another spec is refused.
    ``landscape info OUT.partial`` says what it keeps (it said "not an HDF5 file")."""
    import json
    import landscape.sharpness as sharpness
    from landscape.cli.main import main
    from landscape.errors import StalePartialError
    from landscape.store.sharpness import SharpnessProgress
    traj = open_trajectory(tiny_run)
    spec = SharpnessSpec(top_k=1, iterations=5, probes=2, ascent_steps=1)
    whole = sharpness.compute_sharpness(traj, ["sgd", "swa/average", "sgd:-1"], spec, device="cpu",
                                        out=tmp_path / "whole.h5")
    add = SharpnessProgress.add

    def add_then_interrupt(self, key, result):
        add(self, key, result)
        raise KeyboardInterrupt
    monkeypatch.setattr(SharpnessProgress, "add", add_then_interrupt)
    out = tmp_path / "s.h5"
    with pytest.raises(KeyboardInterrupt, match=f"[12] of 3 checkpoints kept in {out}.partial; run the same"):
        sharpness.compute_sharpness(traj, ["sgd", "swa/average", "sgd:-1"], spec, device="cpu", out=out)
    monkeypatch.setattr(SharpnessProgress, "add", add)
    assert not out.exists() and (tmp_path / "s.h5.partial").exists()
    capsys.readouterr()
    assert main(["info", str(tmp_path / "s.h5.partial"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kept"] in (1, 2) and not shown["complete"] and shown["spec"]["sharpness"] == spec.to_dict()
    assert main(["info", str(tmp_path / "s.h5.partial")]) == 0
    assert f"an interrupted sharpness computation; it keeps the numbers of {shown['kept']} checkpoint" in \
        capsys.readouterr().out
    with pytest.raises(StalePartialError, match="other settings"):
        sharpness.compute_sharpness(traj, ["sgd"], SharpnessSpec(top_k=2, iterations=5, probes=2, ascent_steps=1),
                                    device="cpu", out=out)
    (tmp_path / "other.h5.partial").write_bytes(b"\x89HDF\r\n\x1a\n a plane's work")  # never replaced unasked
    with pytest.raises(StalePartialError, match="other work"):
        sharpness.compute_sharpness(traj, ["sgd"], spec, device="cpu", out=tmp_path / "other.h5")
    prepared = []
    prepare = sharpness.CheckpointWork.prepare
    monkeypatch.setattr(sharpness.CheckpointWork, "prepare", lambda self, *a: prepared.append(1) or prepare(self, *a))
    resumed = sharpness.compute_sharpness(traj, ["sgd", "swa/average", "sgd:-1"], spec, device="cpu", out=out)
    assert len(prepared) == 1 and not (tmp_path / "s.h5.partial").exists()
    for a, b in zip(resumed.results, whole.results):  # (rows of arrays read back are numpy arrays)
        np.testing.assert_equal({k: v for k, v in a.items() if k != "seconds"}, {k: v for k, v in b.items() if k != "seconds"})


def test_a_checkpoint_named_twice_is_computed_once(tiny_run, monkeypatch):
    """Checkpoints with the same weights and buffers (here one named twice) are computed once: the same
    numbers for both, and the second took no time of its own."""
    import landscape.sharpness as sharpness
    prepared = []
    prepare = sharpness.CheckpointWork.prepare
    monkeypatch.setattr(sharpness.CheckpointWork, "prepare", lambda self, *a: prepared.append(1) or prepare(self, *a))
    traj = open_trajectory(tiny_run)
    spec = SharpnessSpec(top_k=1, iterations=5, probes=2, ascent_steps=1)
    a, b, c = sharpness.compute_sharpness(traj, ["sgd", "swa/average", "sgd:-1"], spec, device="cpu").results
    assert len(prepared) == 2
    assert [r["checkpoint"] for r in (a, b, c)] == ["sgd:6", "swa/average:3", "sgd:6"]
    assert a["seconds"] > 0 and c["seconds"] == 0.0
    assert a["eigenvalues"] == c["eigenvalues"] and a["trace"] == c["trace"] and a["metrics"] == c["metrics"]
    assert b["eigenvalues"] != a["eigenvalues"]


def test_a_finished_checkpoint_keeps_its_numbers_and_no_tensor(tiny_run, monkeypatch):
    """Every checkpoint's work stays alive until the last is done: once its own numbers are made it holds
    no tensor (weights, data, Lanczos and ascent vectors; on a GPU P values each, for every checkpoint)."""
    import landscape.sharpness as sharpness
    works = []
    init = sharpness.CheckpointWork.__init__
    monkeypatch.setattr(sharpness.CheckpointWork, "__init__", lambda self, *a: works.append(self) or init(self, *a))
    traj = open_trajectory(tiny_run)
    spec = SharpnessSpec(top_k=2, iterations=5, probes=2, ascent_steps=2, density=True, density_runs=1,
                         density_steps=4)
    results = sharpness.compute_sharpness(traj, ["sgd", "swa/average"], spec, device="cpu").results

    def tensors(obj):
        if torch.is_tensor(obj):
            return 1
        if isinstance(obj, dict):
            return sum(tensors(v) for v in obj.values())
        return sum(tensors(v) for v in obj) if isinstance(obj, (list, tuple)) else 0
    assert len(works) == 2 and all(w.done for w in works)
    assert [tensors(vars(w)) for w in works] == [0, 0]
    assert [w.result()["eigenvalues"] for w in works] == [r["eigenvalues"] for r in results]


def test_a_stopped_hessian_operator_ends_at_its_next_batch(small):
    """Ctrl-C during checkpoints computed side by side sets the workers' stop event: their next Hessian
    pass ends with KeyboardInterrupt instead of running to the end of the checkpoint."""
    import threading
    data, model, layout, w, _ = small
    stop = threading.Event()
    op = HessianOperator(model, layout, w, layout.buffers_to_vector(model), data.x_train, data.y_train, 50,
                         stop=stop)
    assert op(torch.ones(1, layout.num_params)).shape == (1, layout.num_params)
    stop.set()
    with pytest.raises(KeyboardInterrupt):
        op(torch.ones(1, layout.num_params))
    with pytest.raises(KeyboardInterrupt):
        op.loss_and_grad()


def test_hessian_products_keep_their_graphs_only_where_they_fit(small, monkeypatch):
    """From the second call on, the gradient graphs are kept for the next products: those give the
    products of graphs built anew, bit for bit, and the exact Hessian's. Where they would not fit in
    memory they are not kept, and an operator's graphs and its share of memory go with it."""
    import gc
    import landscape.geometry as geometry
    data, model, layout, w, H = small
    args = (model, layout, w, layout.buffers_to_vector(model), data.x_train, data.y_train, 64)
    vs = torch.randn(3, layout.num_params, generator=torch.Generator().manual_seed(1))
    gc.collect()
    tensors_before = sum(torch.is_tensor(o) for o in gc.get_objects())
    kept = HessianOperator(*args)
    first = kept(vs[:2])
    assert kept._kept is None  # one call (a pass of trace probes) keeps nothing
    second, third = kept(vs), kept(vs)
    assert kept._kept is not None and len(kept._kept[1]) == 4  # 200 samples in batches of 64
    assert torch.equal(second, third)
    assert geometry._GRAPHS_KEPT[str(kept.device)] == kept._graph_bytes > 0
    monkeypatch.setattr(geometry, "free_memory", lambda device: 0)
    anew = HessianOperator(*args)
    assert torch.equal(anew(vs[:2]), first) and torch.equal(anew(vs), second) and torch.equal(anew(vs), third)
    assert anew._kept is None
    np.testing.assert_allclose(second.numpy(), (vs.double() @ H).numpy(), rtol=1e-4, atol=1e-6)
    unused = HessianOperator(*args)  # a first call whose graphs no product frees (no vectors)
    assert unused(vs[:0]).shape == (0, layout.num_params)
    del kept, anew, unused
    gc.collect()
    assert geometry._GRAPHS_KEPT[str(w.device)] == 0
    assert sum(torch.is_tensor(o) for o in gc.get_objects()) <= tensors_before + 4  # first, second, third, vs


def test_a_regression_trajectorys_sharpness_file_keeps_its_own_metrics(tmp_path, capsys):
    """The file, the command's table and the flatness figure take the task's values (test_mae for
    regression), not classification's."""
    from landscape.config import TrainConfig
    from landscape.plot.flatness import flatness_figure
    from landscape.sharpness import compute_sharpness
    from landscape.train import train
    cfg = TrainConfig(model=ModelSpec("mlp", {"hidden": [4]}), task="regression", epochs=2, batch_size=16,
                      data=DataSpec("regression", {"n_train": 32, "n_test": 16, "features": 3}), methods=("sgd",))
    traj = train(cfg, tmp_path / "r.h5", quiet=True)["path"]
    spec = SharpnessSpec(top_k=2, iterations=10, probes=4, ascent_steps=2)
    sharp = compute_sharpness(open_trajectory(traj), ["sgd"], spec, device="cpu", out=tmp_path / "s.h5")
    again = open_sharpness(tmp_path / "s.h5")
    assert set(again.results[0]["metrics"]) == {"train_loss", "train_mae", "test_loss", "test_mae"}
    assert again.results[0]["metrics"] == sharp.results[0]["metrics"] and again.test_metric == "test_mae"
    assert again.summary()[0]["test_mae"] == sharp.results[0]["metrics"]["test_mae"]
    fig = flatness_figure(again)
    assert fig.axes[0].get_ylabel() == "test mae"
    from landscape.plot.interactive import flatness_table_html
    assert "<th>test mae</th>" in flatness_table_html(again)
    from landscape.geometry import Plane
    data = load_data(DataSpec("regression", {"n_train": 32, "n_test": 16, "features": 3}), task="regression")
    tensors = (data.x_train, data.y_train, data.x_test, data.y_test)  # scored with the file's task
    plane = Plane.hessian(open_trajectory(traj), "sgd", data=tensors, samples=32)
    assert plane.derived["eigenvalues"] == Plane.hessian(open_trajectory(traj), "sgd", samples=32).derived["eigenvalues"]
    assert main(["sharpness", str(traj), "sgd", "--top-k", "2", "--iterations", "10", "--probes", "4",
                 "--ascent-steps", "2", "-o", str(tmp_path / "cli.h5"), "--quiet", "--device", "cpu"]) == 0
    assert "test mae" in capsys.readouterr().out
