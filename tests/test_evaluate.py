"""The batched evaluator gives the numbers of the one-at-a-time loop (Layout.load + recompute_bn +
train.loop.evaluate), for every BatchNorm policy, on CPU and (when present) on CUDA."""
import copy
import time

import numpy as np
import pytest
import torch

from landscape.bn import recompute_bn
from landscape.evaluate import BatchNormPolicy, Evaluator, choose_points_per_call, resolve_policy
from landscape.errors import ConfigError
from landscape.geometry import Line, Plane, buffers_at, weights_at
from landscape.models import ModelSpec
from landscape.params import Layout
from landscape.store import open_trajectory
from landscape.train.loop import evaluate
from landscape.rebuild import rebuild_data, rebuild_model

THREE = ("sgd", "swa/average", "swa/iterates:0")


@pytest.fixture(scope="module")
def setup(tiny_run):
    traj = open_trajectory(tiny_run)
    data = rebuild_data(traj)
    return traj, data, rebuild_model(traj, data)


def _points(geom, shape, n):
    grid = geom.default_grid(shape)
    c = torch.as_tensor(geom.coefficients(grid, np.arange(n)))
    return c


def _sequential(model, layout, data, w, b, bn_batch, x_bn=None):
    """The reference: one model per point, loaded, BatchNorm recomputed, evaluated."""
    out = []
    for i in range(len(w)):
        m = copy.deepcopy(model)
        layout.load(m, w[i], b[i])
        if bn_batch:
            recompute_bn(m, data.x_train if x_bn is None else x_bn, bn_batch)
        out.append(evaluate(m, data, 128))
    return {k: np.array([o[k] for o in out]) for k in out[0]}


def _assert_same(batched, ref, rtol=1e-5):
    for k in ("train_loss", "test_loss"):
        np.testing.assert_allclose(batched[k], ref[k], rtol=rtol, atol=1e-7)
    for k in ("train_err", "test_err"):  # exact, up to a tie flipping one sample
        n = 300 if k == "train_err" else 120
        assert np.all(np.abs(batched[k] - ref[k]) <= 100.0 / n + 1e-9), (k, batched[k], ref[k])


@pytest.mark.parametrize("policy", ["recompute", "stored"])
def test_batched_equals_one_at_a_time(setup, policy):
    traj, data, model = setup
    plane = Plane.through(traj, *THREE)
    c = _points(plane, (3, 3), 9)
    w, b = weights_at(plane, c), buffers_at(plane, c)
    ref = _sequential(model, traj.layout, data, w, b, 100 if policy == "recompute" else 0)
    ev = Evaluator(model, traj.layout, data, BatchNormPolicy(policy, batch_size=100), batch_size=128)
    for k in (4, 1):  # vmap over 4 points (the last call has 1), and the plain model
        got = {m: [] for m in ref}
        for start in range(0, 9, k):
            out = ev(w[start:start + k], b[start:start + k])
            for m in ref:
                got[m].extend(out[m])
        _assert_same({m: np.array(v) for m, v in got.items()}, ref)


class _RecurrentNet(torch.nn.Module):
    """Tokens -> GRU -> BatchNorm -> logits: vmap has no batching rule for the GRU."""

    def __init__(self):
        super().__init__()
        self.emb, self.rnn = torch.nn.Embedding(12, 8), torch.nn.GRU(8, 8, batch_first=True)
        self.bn, self.head = torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.bn(self.rnn(self.emb(x))[0][:, -1]))


@pytest.mark.parametrize("policy", ["recompute", "stored"])
def test_a_model_vmap_cannot_batch_runs_its_points_one_by_one_with_the_same_values(policy):
    from landscape.data import as_data
    torch.manual_seed(0)
    x, y = torch.randint(0, 12, (60, 6)), torch.randint(0, 3, (60,))
    net = _RecurrentNet()
    layout = Layout.of(net)
    w = layout.params_to_vector(net) + 0.3 * torch.randn(3, layout.num_params)
    b = layout.buffers_to_vector(net).expand(3, -1).clone()
    ev = Evaluator(net, layout, as_data((x[:40], y[:40], x[40:], y[40:])), BatchNormPolicy(policy, batch_size=10),
                   batch_size=16)
    with pytest.warns(UserWarning, match="vmap cannot batch this model"):
        batched = ev(w, b)
    assert not ev._vmap_model  # it tried vmap once, then went point by point
    for k in range(3):
        single = ev(w[k:k + 1], b[k:k + 1])
        for name, values in batched.items():
            assert values[k] == single[name][0], (name, k)


def test_only_vmaps_own_refusals_make_the_points_run_one_by_one():
    from landscape.evaluate import _cannot_vmap
    assert _cannot_vmap(RuntimeError("Batching rule not implemented for aten::gru.input. We could not generate"))
    assert _cannot_vmap(RuntimeError("vmap: It looks like you're calling .item() on a Tensor."))
    assert not _cannot_vmap(RuntimeError("CUDA error: out of memory"))
    assert not _cannot_vmap(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_recompute_on_a_fixed_subset(setup):
    traj, data, model = setup
    line = Line.through(traj, "sgd", "swa/average")
    c = _points(line, (5,), 5)
    w, b = weights_at(line, c), buffers_at(line, c)
    pol = BatchNormPolicy("recompute", batch_size=64, samples=150, seed=2)
    ev = Evaluator(model, traj.layout, data, pol, batch_size=128)
    idx = torch.randperm(300, generator=torch.Generator().manual_seed(2))[:150].sort().values
    ref = _sequential(model, traj.layout, data, w, b, 64, x_bn=data.x_train[idx])
    _assert_same(ev(w, b), ref)
    full = Evaluator(model, traj.layout, data, BatchNormPolicy("recompute", 64), batch_size=128)(w, b)
    assert not np.allclose(full["train_loss"], ref["train_loss"], rtol=1e-9)  # the subset matters


def test_interpolate_reproduces_the_checkpoints(setup):
    traj, data, model = setup
    line = Line.through(traj, "sgd", "swa/average")
    length = line.derived["length"]
    c = torch.tensor([[0.0], [length]], dtype=torch.float64)
    ev = Evaluator(model, traj.layout, data, BatchNormPolicy("interpolate"), batch_size=128)
    got = ev(weights_at(line, c), buffers_at(line, c, interpolate=True))
    for i, name in enumerate(("sgd", "swa/average")):
        ck = traj.checkpoint(name)
        m = traj.layout.load(copy.deepcopy(model), ck.params, ck.buffers)
        ref = evaluate(m, data, 128)
        assert got["test_loss"][i] == pytest.approx(ref["test_loss"], rel=1e-4)
        assert got["test_err"][i] == pytest.approx(ref["test_err"], abs=100 / 120 + 1e-9)


def test_weight_decay_and_overflow(setup):
    traj, data, model = setup
    line = Line.through(traj, "sgd", "swa/average")
    c = torch.tensor([[0.0], [1e30], [float(line.derived["length"])]], dtype=torch.float64)
    w = weights_at(line, c)
    ev = Evaluator(model, traj.layout, data, BatchNormPolicy("recompute", 100), batch_size=128, weight_decay=5e-4)
    out = ev(w, buffers_at(line, c))
    assert np.isfinite(out["train_loss"][[0, 2]]).all()
    assert not np.isfinite(out["train_loss"][1]) and np.isnan(out["train_err"][1])  # stored as NaN, no crash
    sq = w[0].double().pow(2).sum().item()
    assert out["train_loss_l2"][0] == pytest.approx(out["train_loss"][0] + 0.5 * 5e-4 * sq, rel=1e-12)


def test_policy_resolution_and_measure(setup):
    traj, data, model = setup
    assert resolve_policy("auto", model, True).policy == "recompute"
    assert resolve_policy("stored", model, False).policy == "stored"
    with pytest.raises(ConfigError, match="interpolate"):
        resolve_policy("interpolate", model, False)
    with pytest.raises(ConfigError, match="unknown BatchNorm policy"):
        resolve_policy("fresh", model, True)
    from landscape.models import build_model
    plain = build_model(ModelSpec("cnn1d", {"channels": 4}), data.input_shape, data.num_classes)
    assert resolve_policy("recompute", plain, True).policy == "none"


def test_points_per_call_measured_on_real_points():
    """Every timed call is real work handed back to the caller; the sizes stop when points run out."""
    calls = []

    def call(k):  # a fake evaluator whose throughput peaks at 4 points per call; sleeps of tens of ms, so
        calls.append(k)  # that a loaded machine's few ms of lateness cannot reorder the sizes
        time.sleep(0.02 * k / {1: 1, 2: 1.5, 4: 3, 8: 1.2, 16: 1.0}[k])

    best, used = choose_points_per_call(call, 100, "cpu", candidates=(1, 2, 4, 8, 16, 32), budget_s=10)
    assert best == 4 and used == sum(calls) and calls == [1, 1, 2, 2, 4, 4, 8, 8, 16, 16]  # two slower sizes: stop
    calls.clear()
    best, used = choose_points_per_call(call, 7, "cpu")
    assert calls == [1, 1, 2, 2] and used == 6  # 4 + 4 would pass the 7 points available
    calls.clear()
    best, used = choose_points_per_call(call, 13, "cpu", workers=2)  # each call: k points on each of 2 workers
    assert calls == [1, 1, 2, 2] and used == 12


def test_models_with_convolutions_run_one_point_per_call_on_a_cpu(setup):
    """vmap makes grouped convolutions of a convolutional model's, slow on a CPU: K = 1 is not measured
    against larger K; a model without convolutions is."""
    traj, data, model = setup
    from landscape.models import build_model
    assert Evaluator(model, traj.layout, data).points_per_call_candidates() == (1,)
    mlp = build_model(ModelSpec("mlp", {"hidden": [8]}), data.input_shape, data.num_classes)
    assert Evaluator(mlp, Layout.of(mlp), data).points_per_call_candidates() is None


@pytest.mark.gpu
def test_batched_on_cuda_equals_one_at_a_time(setup):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    traj, data, model = setup
    plane = Plane.through(traj, *THREE)
    c = _points(plane, (4, 4), 16)
    w, b = weights_at(plane, c), buffers_at(plane, c)
    ref = _sequential(model, traj.layout, data, w, b, 100)
    cuda = torch.device("cuda")
    ev = Evaluator(model.to(cuda), traj.layout, data.to(cuda), BatchNormPolicy("recompute", 100), batch_size=128)
    got = ev(w.to(cuda), b.to(cuda))
    _assert_same(got, ref, rtol=1e-4)


class _UserNet(torch.nn.Module):
    """A user model of a kind the built-in ones are not: Dropout before BatchNorm, and optionally a
    BatchNorm that sees (samples x positions) rows instead of one row per sample."""

    def __init__(self, data, fold=False):
        super().__init__()
        self.fold, c, length = fold, data.input_shape[0], data.input_shape[-1]
        self.drop = torch.nn.Dropout(0.5)
        self.proj = torch.nn.Linear(c, 6)
        self.bn = torch.nn.BatchNorm1d(6)
        self.head = torch.nn.Linear(6 * length, data.num_classes)

    def forward(self, x):
        h = self.proj(self.drop(x).transpose(1, 2))           # (N, L, 6)
        if self.fold:
            h = self.bn(h.reshape(-1, 6)).reshape(h.shape)     # rows are (sample, position) pairs
        else:
            h = self.bn(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h.relu().flatten(1))


def _vectors(model):
    layout = Layout.of(model)
    return layout, layout.params_to_vector(model)[None], layout.buffers_to_vector(model)[None]


def test_recompute_ignores_dropout_in_training_and_evaluation(setup):
    """recompute_bn (used for the averages written during training) and the evaluator's recompute
    both run Dropout in eval mode, so a surface point at an average reproduces its recorded metrics."""
    _, data, _ = setup
    torch.manual_seed(0)
    model = _UserNet(data)
    layout, w, b = _vectors(model)
    got = Evaluator(model, layout, data, BatchNormPolicy("recompute", 100), batch_size=128)(w, b)
    ref = _sequential(model, layout, data, w, b, 100)
    _assert_same(got, ref)
    torch.manual_seed(1)  # a different dropout mask would change train-mode statistics
    again = _sequential(model, layout, data, w, b, 100)
    assert np.array_equal(again["train_loss"], ref["train_loss"])


def test_recompute_refuses_a_batchnorm_over_folded_rows(setup):
    _, data, _ = setup
    model = _UserNet(data, fold=True)
    layout, w, b = _vectors(model)
    with pytest.raises(ConfigError, match="one row per sample.*--bn stored"):
        Evaluator(model, layout, data, BatchNormPolicy("recompute", 100), batch_size=128)
    out = Evaluator(model, layout, data, BatchNormPolicy("stored"), batch_size=128)(w, b)
    assert np.isfinite(out["train_loss"]).all()


def test_overflowing_loss_with_finite_logits_has_no_error(setup):
    """Logits of +-3e38 are finite but their cross-entropy is inf: the error is NaN then too."""
    _, data, _ = setup
    model = _UserNet(data)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([3e38, -3e38] + [0.0] * (data.num_classes - 2)))
    layout, w, b = _vectors(model)
    out = Evaluator(model, layout, data, BatchNormPolicy("stored"), batch_size=128)(w, b)
    assert not np.isfinite(out["train_loss"][0]) and np.isnan(out["train_err"][0])


class _ConvNet(torch.nn.Module):
    """2-D convolutions with BatchNorm (or 1-D ones, with ``dims=1``); ``view`` flattens with
    ``.view``, which channels-last activations do not allow."""

    def __init__(self, view=False, dims=2):
        super().__init__()
        self.view = view
        conv, bn = (torch.nn.Conv2d, torch.nn.BatchNorm2d) if dims == 2 else (torch.nn.Conv1d, torch.nn.BatchNorm1d)
        mode = "zeros" if dims == 2 else "circular"  # (a 2-D one would return the plain layout)
        self.body = torch.nn.Sequential(conv(3, 8, 3, padding=1), bn(8), torch.nn.ReLU(),
                                        conv(8, 8, 3, stride=2, padding=1, padding_mode=mode), bn(8),
                                        torch.nn.ReLU(), conv(8, 8, 3, dilation=2, padding="same"), bn(8, affine=False),
                                        torch.nn.ReLU())
        self.head = torch.nn.Linear(8 * 4 * 4 if dims == 2 else 8 * 8, 4)

    def forward(self, x):
        x = self.body(x)
        return self.head(x.view(x.size(0), -1) if self.view else x.flatten(1))


@pytest.mark.parametrize("dims", [2, 1])
def test_evaluate_model_gives_a_conv_model_channels_last_inputs_and_the_plain_values(dims):
    """The evaluation of single models (training, the recorder) takes the evaluator's channels-last
    path on a CPU where the model allows it, with the values of the plain model; afterwards the model
    is as it was (no layer left switched, train mode restored)."""
    import torch.nn.functional as F
    from landscape.data import DataSpec, load_data
    from landscape.evaluate import _CHANNELS_LAST, evaluate_model
    shape = [3, 8, 8] if dims == 2 else [3, 16]
    data = load_data(DataSpec("synthetic", {"n_train": 300, "n_test": 120, "shape": shape}), "cpu")
    for view in (False, True):
        torch.manual_seed(0)
        model = _ConvNet(view, dims).train()
        got = evaluate_model(model, data, batch_size=128)
        assert (_CHANNELS_LAST[model][2] is not None) is not view
        assert model.training and not any("forward" in m.__dict__ for m in model.modules())
        with torch.no_grad():
            model.eval()
            ref = {}
            for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
                logits = model(x)
                ref[f"{split}_loss"] = F.cross_entropy(logits, y, reduction="none").double().mean().item()
                ref[f"{split}_err"] = 100.0 * (logits.argmax(1) != y).double().mean().item()
        _assert_same({k: np.array([v]) for k, v in got.items()}, {k: np.array([v]) for k, v in ref.items()})


class _Branches(torch.nn.Module):
    """conv_a -> bn_a, whose output a residual branch reads as well; conv_b, called twice, -> bn_b;
    conv_c -> bn_c alone (the one pair that folds)."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.conv_c, self.bn_c = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 4)

    def forward(self, x):
        a = self.conv_a(x)
        x = self.bn_a(a) + a
        x = self.bn_b(self.conv_b(x)) + self.conv_b(x)
        return self.head(self.bn_c(self.conv_c(x)).mean((2, 3)))


class _Branching(_Branches):
    """Control flow on the data, which torch.fx cannot trace."""

    def forward(self, x):
        return super().forward(x if x.sum() > 0 else -x)


def test_only_a_convolution_read_by_its_batchnorm_alone_is_folded():
    from landscape.evaluate import conv_batchnorm_pairs
    from landscape.models import build_model
    model = _Branches()
    assert conv_batchnorm_pairs(model) == [(model.conv_c, model.bn_c)]
    assert conv_batchnorm_pairs(_Branching()) == []  # fx cannot trace it: nothing folded
    assert len(conv_batchnorm_pairs(_ConvNet())) == 3
    net = build_model(ModelSpec("resnet20"), (3, 32, 32), 10)  # in each block conv1 -> bn2; the rest sum first
    assert [(c, b) for c, b in conv_batchnorm_pairs(net)] == [(blk.conv1, blk.bn2) for blk in net.blocks]
    assert conv_batchnorm_pairs(build_model(ModelSpec("cnn1d"), (1, 40), 10)) == []  # no BatchNorm
    # a forward hook is code fx does not see: a pre-hook of the BatchNorm would read the folded output
    hooked = _Branches()
    handle = hooked.bn_c.register_forward_pre_hook(lambda m, args: (args[0].clamp(-0.3, 0.3),))
    assert conv_batchnorm_pairs(hooked) == []
    handle.remove()
    handle = hooked.conv_c.register_forward_hook(lambda m, args, out: out * 2)
    assert conv_batchnorm_pairs(hooked) == []
    handle.remove()
    hooked.conv_c.register_forward_pre_hook(lambda m, args: None)  # runs before the folded forward as before
    assert conv_batchnorm_pairs(hooked) == [(hooked.conv_c, hooked.bn_c)]
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, args: None)
    try:
        assert conv_batchnorm_pairs(model) == []
    finally:
        handle.remove()
    assert conv_batchnorm_pairs(model) == [(model.conv_c, model.bn_c)]


@pytest.mark.parametrize("policy", ["recompute", "stored", "interpolate"])
def test_folded_batchnorm_gives_the_values_of_the_separate_layers(policy):
    """One point per call, a convolution and the eval-mode BatchNorm that alone reads it run as one
    convolution: the values equal those of the layers run apart, for 2-D and 1-D convolutions (on
    channels-last memory too), padding modes, dilation and a BatchNorm without affine weights; the
    recompute pass (train-mode BatchNorm) is not folded; afterwards no layer is left switched."""
    from landscape.data import DataSpec, load_data
    for model, shape in ((_ConvNet(dims=2), [3, 8, 8]), (_ConvNet(dims=1), [3, 16]), (_Branches(), [3, 6, 6])):
        data = load_data(DataSpec("synthetic", {"n_train": 300, "n_test": 120, "shape": shape, "classes": 4}), "cpu")
        torch.manual_seed(0)
        layout, w, b = _vectors(model)
        w = w + 0.05 * torch.randn(w.shape)
        b = b + 0.1 * torch.rand(b.shape)  # running statistics other than 0 and 1
        folded = Evaluator(model, layout, data, BatchNormPolicy(policy, 100), batch_size=128)
        apart = Evaluator(model, layout, data, BatchNormPolicy(policy, 100), batch_size=128)
        apart._folds = []
        assert len(folded._folds) == (1 if isinstance(model, _Branches) else 3)
        held = {k: (t, t.clone()) for k, t in folded.model.state_dict(keep_vars=True).items()}
        got, ref = folded(w, b), apart(w, b)
        _assert_same(got, ref)
        assert not any("forward" in m.__dict__ for m in folded.model.modules())
        # the point's tensors were swapped in for the call (once for all its passes) and out again
        after = folded.model.state_dict(keep_vars=True)
        assert all(after[k] is t and torch.equal(t, copy) for k, (t, copy) in held.items())


@pytest.mark.parametrize("dims", [2, 1])
def test_channels_last_inputs_give_the_values_of_the_plain_layout(dims):
    """On a CPU, models with 2-D convolutions get channels-last images, and models with 1-D ones
    channels-last sequences, their convolutions run as 2-D ones (faster convolutions), BatchNorm
    recompute included (padding modes, dilation, BatchNorm without affine weights); the values are
    those of the plain modules. A model that cannot take them (``.view`` on an activation) is given
    the plain layout."""
    from landscape.data import DataSpec, load_data
    shape = [3, 8, 8] if dims == 2 else [3, 16]
    data = load_data(DataSpec("synthetic", {"n_train": 300, "n_test": 120, "shape": shape}), "cpu")
    for view in (False, True):
        torch.manual_seed(0)
        model = _ConvNet(view, dims)
        layout, w, b = _vectors(model)
        w = torch.cat([w, w + 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))])
        b = b.expand(2, -1)
        ev = Evaluator(model, layout, data, BatchNormPolicy("recompute", 100), batch_size=128)
        assert ev._channels_last is not view
        got = {k: np.concatenate([ev(w[i:i + 1], b[i:i + 1])[k] for i in range(2)]) for k in ("train_loss", "test_loss",
                                                                                              "train_err", "test_err")}
        _assert_same(got, _sequential(model, layout, data, w, b, 100))
