"""Tasks and data sources: every task scores the same in the batched evaluator (K points a call) as
one point at a time and as evaluate_model; streamed data gives the in-memory values; a dict-batch
model with ``.loss`` evaluates; a subset's standard errors match the spread of repeated subsets; bad
input is refused in one line before any long work; each task runs train -> plane -> plot -> explore."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import landscape as ls
from landscape.bn import recompute_bn
from landscape.data import StreamData, as_data
from landscape.errors import DataError, LandscapeError, ModelError
from landscape.evaluate import BatchNormPolicy, Evaluator, evaluate_model
from landscape.models import Transformer
from landscape.params import Layout
from landscape.tasks import IGNORE_INDEX, Evaluation, Task, get_task

from _cli import one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")


def _classification():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(90, 6, generator=g), torch.randint(0, 3, (90,), generator=g)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    return net, (x[:60], y[:60], x[60:], y[60:]), "classification"


def _regression():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(90, 4, generator=g)
    y = x.sum(1, keepdim=True).sin() + 0.1 * torch.randn(90, 1, generator=g)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    return net, (x[:60], y[:60, 0], x[60:], y[60:, 0]), "regression"


def _language_model():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 7, (50, 5), generator=g)
    y = torch.roll(x, -1, 1)
    y[:, -1] = IGNORE_INDEX
    y[::3, :2] = IGNORE_INDEX  # padding of uneven length: a token-level mean differs from a per-sample one
    net = Transformer((5,), 7, dim=8, heads=2, layers=1)
    return net, (x[:30], y[:30], x[30:], y[30:]), "language-model"


CASES = {"classification": _classification, "regression": _regression, "language-model": _language_model}


def _points(net, k: int = 3, scale: float = 0.3):
    """k weight vectors near the model's and its buffers: (k, P), (k, B)."""
    torch.manual_seed(3)
    layout = Layout.of(net)
    w = layout.params_to_vector(net)
    return layout, w + scale * torch.randn(k, w.numel()), layout.buffers_to_vector(net).expand(k, -1).clone()


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_equals_one_at_a_time_and_evaluate_model(case):
    net, tensors, task = CASES[case]()
    data = as_data(tensors, task=task)
    bn = BatchNormPolicy("recompute", batch_size=20) if case == "classification" else BatchNormPolicy("none")
    layout, weights, buffers = _points(net)
    ev = Evaluator(net, layout, data, bn, batch_size=16)
    batched = ev(weights, buffers)
    assert set(batched) == set(data.task.value_names())
    for k in range(len(weights)):
        single = ev(weights[k:k + 1], buffers[k:k + 1])
        for name, v in batched.items():
            np.testing.assert_allclose(v[k], single[name][0], rtol=1e-5, atol=1e-6, err_msg=name)
    if case != "classification":  # (with BatchNorm, evaluate_model reads the stored statistics)
        layout.vector_to_params(weights[1], net)
        one = evaluate_model(net, data, batch_size=16)
        for name, v in batched.items():
            np.testing.assert_allclose(v[1], one[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_token_level_loss_and_perplexity():
    """The language-model loss is the mean over the tokens kept, not over samples; ppl = exp(loss)."""
    net, tensors, _ = _language_model()
    data = as_data(tensors, task="language-model")
    out = evaluate_model(net, data)
    x, y = tensors[0], tensors[1]
    with torch.no_grad():
        expected = nn.functional.cross_entropy(net(x).transpose(1, 2), y, ignore_index=IGNORE_INDEX)
    assert out["train_loss"] == pytest.approx(float(expected), rel=1e-6)
    assert out["train_ppl"] == pytest.approx(np.exp(out["train_loss"]), rel=1e-9)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_hessian_is_of_the_mean_loss_a_surface_stores(case):
    """Sharpness and Hessian planes differentiate the loss surfaces report: for a language model the
    mean over scored tokens (it was the sum over a sequence's tokens over sequences, 2 to 4 times too
    large here). Checked in batches against the loss and H v of the task's mean over the whole split."""
    from torch.func import functional_call

    from landscape.geometry import HessianOperator
    from landscape.tasks import output_tree
    net, tensors, task = CASES[case]()
    data = as_data(tensors, task=task)
    layout = Layout.of(net.eval())
    w, buffers = layout.params_to_vector(net), layout.split_buffers(layout.buffers_to_vector(net))
    op = HessianOperator(net, layout, w, layout.buffers_to_vector(net), data.x_train, data.y_train, batch_size=7,
                         task=data.task)

    def mean_loss(v):
        output = output_tree(functional_call(net, (layout.split_params(v), buffers), (data.x_train,)))
        return data.task.loss(output, (data.x_train, data.y_train))
    assert op.loss() == pytest.approx(evaluate_model(net, data)["train_loss"], rel=1e-6)
    v = torch.randn(layout.num_params, generator=torch.Generator().manual_seed(0))
    _, hv = torch.autograd.functional.hvp(mean_loss, w, v)
    np.testing.assert_allclose(op(v[None])[0].numpy(), hv.double().numpy(), rtol=1e-4, atol=1e-6)


def test_a_checkpoints_scored_tokens_are_counted_once_for_all_its_sharpness_pieces(monkeypatch):
    """Every piece of a checkpoint's sharpness (Lanczos, probes, density, ascents) divides by the same
    scored tokens: counted by one forward pass, not one per piece."""
    from landscape.evaluate import BatchNormPolicy
    from landscape.geometry import HessianOperator
    from landscape.sharpness import SharpnessSpec, checkpoint_sharpness
    net, tensors, task = _language_model()
    data, layout = as_data(tensors, task=task), Layout.of(net.eval())
    counted, count = [], HessianOperator._count_units
    monkeypatch.setattr(HessianOperator, "_count_units", lambda op: counted.append(1) or count(op))
    spec = SharpnessSpec(top_k=1, iterations=5, probes=20, density=True, density_runs=2, density_steps=4,
                         ascent_steps=1)
    r = checkpoint_sharpness(net, layout, layout.params_to_vector(net), layout.buffers_to_vector(net), data,
                             spec, BatchNormPolicy("none"), workers=2)
    assert len(counted) == 1 and r["loss"] == pytest.approx(evaluate_model(net, data)["train_loss"], rel=1e-6)


def test_swap_large_batches_of_a_language_model_step_along_the_mean_over_tokens():
    """SWAP's phase 1 sums its shards' gradients: for a language model the step is that of the whole
    batch's mean over scored tokens, as a single-process step on it would be."""
    from landscape.train.swap import phase1_epoch
    _, (x, y, *_), _ = _language_model()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(7, 4), nn.Tanh(), nn.Linear(4, 7))
    expected = Layout.of(net).params_to_vector(net)
    loss = nn.functional.cross_entropy(net(x).transpose(1, 2), y, ignore_index=IGNORE_INDEX)
    expected -= 0.5 * torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(net.parameters()))])
    phase1_epoch(net, torch.optim.SGD(net.parameters(), lr=0.5), as_data((x, y, x, y), task="language-model"),
                 workers=3, batch_size=10, generator=torch.Generator().manual_seed(0))  # one batch of 30, 3 shards
    np.testing.assert_allclose(Layout.of(net).params_to_vector(net).detach().numpy(), expected.detach().numpy(),
                               rtol=1e-5, atol=1e-7)


def test_passes_side_by_side_each_draw_what_a_pass_alone_draws():
    """The evaluator's threads read a streamed source side by side: a source that draws noise from
    torch gives each pass the batches of a pass alone, and the caller's random state is left as it was
    (both failed with two threads: the passes reseeded the one global state in turn)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, generator=g), torch.randint(0, 2, (64,), generator=g)

    def noisy():
        return ((x[i:i + 16] + torch.randn(16, 3), y[i:i + 16]) for i in range(0, 64, 16))

    class NoisyDataset(torch.utils.data.Dataset):  # a random transform, as torchvision's draw
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return x[i] + torch.randn(3), y[i]
    loader = DataLoader(NoisyDataset(), batch_size=16, shuffle=True)
    for data in (as_data((noisy, noisy)), as_data((loader, loader))):
        alone = [batch[0] for batch in data.batches("train")]
        torch.manual_seed(5)
        caller_next = torch.rand(2)
        torch.manual_seed(5)
        a, b = data.batches("train"), data.batches("train")
        for expected in alone:  # what two threads do, one batch each in turn
            assert torch.equal(next(a)[0], expected) and torch.equal(next(b)[0], expected)
        assert torch.equal(torch.rand(2), caller_next)
        assert not torch.equal(alone[0], x[:16])


class _OpenedInWorkers(torch.utils.data.Dataset):
    """A dataset whose storage each loader worker opens (the h5py pattern): unreadable without it."""

    def __init__(self, x, y):
        self.x, self.y, self.storage = x, y, None

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.storage[0][i], self.storage[1][i]


def _open_storage(worker_id):
    dataset = torch.utils.data.get_worker_info().dataset
    dataset.storage = (dataset.x, dataset.y)


def test_a_loaders_worker_init_fn_opens_its_storage_in_every_pass():
    """The loader read in index order keeps the user's worker_init_fn (it was dropped: the workers
    failed on storage never opened)."""
    net, (x_tr, y_tr, x_te, y_te), _ = _classification()
    loaders = [DataLoader(_OpenedInWorkers(x, y), batch_size=20, shuffle=True, num_workers=1,
                          worker_init_fn=_open_storage) for x, y in ((x_tr, y_tr), (x_te, y_te))]
    streamed = evaluate_model(net, as_data(tuple(loaders)))
    in_memory = evaluate_model(net, as_data((x_tr, y_tr, x_te, y_te)))
    assert streamed == pytest.approx(in_memory, rel=1e-6)


class _PairNet(nn.Module):
    """A two-input model: its batches are ((a, b), y)."""

    def __init__(self):
        super().__init__()
        self.f, self.h = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, inputs):
        a, b = inputs
        return self.h(torch.tanh(self.f(a)) * torch.tanh(self.f(b)))


def test_a_two_input_model_on_nested_batches_gives_its_own_loss():
    """Inputs that are a tuple of tensors are sliced sample by sample (the probe cut the tuple of
    inputs instead and refused the batch: "targets [2]"); the value at a checkpoint is its loss."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 4, generator=g), torch.randn(64, 4, generator=g)
    y = ((a * b).sum(1) > 0).long()
    pairs = [((a[i], b[i]), y[i]) for i in range(64)]
    loaders = (DataLoader(pairs[:40], batch_size=16), DataLoader(pairs[40:], batch_size=16))
    torch.manual_seed(0)
    start, end = _PairNet(), _PairNet()
    line = ls.Line.through(start, end)
    length = float((Layout.of(end).params_to_vector(end) - Layout.of(start).params_to_vector(start)).norm())
    grid = ls.Grid((0.0, length), 3)  # start, halfway, end
    values = [ls.evaluate_surface(end, line, loaders, grid=grid, points_per_call=k).values for k in (1, 3)]
    np.testing.assert_allclose(values[0]["train_loss"], values[1]["train_loss"], rtol=1e-6)
    with torch.no_grad():
        direct = nn.functional.cross_entropy(end((a[:40], b[:40])), y[:40])
    assert values[0]["train_loss"][-1] == pytest.approx(float(direct), rel=1e-5)


def test_streamed_equals_in_memory_with_batchnorm_recompute():
    net, (x_tr, y_tr, x_te, y_te), _ = _classification()
    in_memory = as_data((x_tr, y_tr, x_te, y_te))
    shuffled = DataLoader(TensorDataset(x_tr, y_tr), batch_size=20, shuffle=True)  # read in index order anyway
    streamed = as_data((shuffled, lambda: ((x_te[i:i + 16], y_te[i:i + 16]) for i in range(0, len(x_te), 16))))
    assert isinstance(streamed, StreamData)
    layout, weights, buffers = _points(net)
    bn = BatchNormPolicy("recompute", batch_size=20)
    a = Evaluator(net, layout, in_memory, bn, batch_size=16)(weights, buffers)
    b = Evaluator(net, layout, streamed, bn, batch_size=16)(weights, buffers)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-6, atol=1e-9, err_msg=name)


@dataclass
class Output:
    loss: torch.Tensor
    logits: torch.Tensor


class DictModel(nn.Module):
    """A Hugging-Face-style model: keyword inputs, an output object with loss and logits."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(7, 8), nn.Linear(8, 7)

    def forward(self, input_ids, labels=None):
        logits = self.head(self.emb(input_ids))
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX)
        return Output(loss, logits)


def _dict_loader(x, y, batch_size=10):
    return DataLoader([{"input_ids": a, "labels": b} for a, b in zip(x, y)], batch_size=batch_size)


@pytest.mark.parametrize("task", ["model-loss", "language-model"])
def test_dict_batch_model_with_loss_evaluates_on_a_line(task):
    _, (x_tr, y_tr, x_te, y_te), _ = _language_model()
    net, other = DictModel(), DictModel()
    data = (_dict_loader(x_tr, y_tr), _dict_loader(x_te, y_te))
    line = ls.Line.through(net, other)
    surf = ls.evaluate_surface(net, line, data, 4, task=task, points_per_call=2)
    assert np.isfinite(surf.values["test_loss"]).all()
    one = [ls.evaluate_surface(net, line, data, 4, task=task, points_per_call=1).values[m] for m in surf.values]
    for got, v in zip(surf.values.values(), one):
        np.testing.assert_allclose(got, v, rtol=1e-5)
    if task == "model-loss":  # the model's own mean loss, batch by batch, weighted by batch size
        with torch.no_grad():
            expected = np.mean([float(net(x_tr[i:i + 10], y_tr[i:i + 10]).loss) for i in range(0, 30, 10)])
        assert evaluate_model(net, as_data(data, task=task))["train_loss"] == pytest.approx(expected, rel=1e-6)
        # a subset's standard errors: not known from batch means given to every sample (they read 0 when the
        # subset was one batch, too small otherwise)
        subset = ls.evaluate_surface(net, line, data, 4, task=task, samples=20)
        assert np.isnan(subset.values["train_loss_se"]).all() and np.isfinite(subset.values["train_loss"]).all()


class _AutoEncoder(nn.Module):
    """A model whose output is its own loss alone: no logits."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(6, 2), nn.Linear(2, 6)

    def forward(self, x):
        return {"loss": (self.dec(torch.tanh(self.enc(x))) - x).square().mean()}


def test_a_model_that_returns_only_its_loss_evaluates_and_measures_its_sharpness():
    """``model-loss`` for a model whose output is its loss alone (it was refused as having no
    logits): a line's values are the model's own losses at its points, K points a call as one, and its
    Hessian's top eigenvalue is the exact one's."""
    from torch.func import functional_call, hessian
    from landscape.sharpness import SharpnessSpec, evaluate_sharpness
    torch.manual_seed(0)
    net, other, x = _AutoEncoder(), _AutoEncoder(), torch.randn(90, 6)
    data = (x[:60], torch.zeros(60), x[60:], torch.zeros(30))
    line = ls.Line.through(net, other, range=(0.0, 1.0))
    surf = ls.evaluate_surface(net, line, data, 3, task="model-loss", points_per_call=2)
    one = ls.evaluate_surface(net, line, data, 3, task="model-loss", points_per_call=1)
    np.testing.assert_allclose(surf.values["train_loss"], one.values["train_loss"], rtol=1e-6)
    with torch.no_grad():
        ends = [float(m(x[:60])["loss"]) for m in (net, other)]
    np.testing.assert_allclose(surf.values["train_loss"][[0, -1]], ends, rtol=1e-5)
    res = evaluate_sharpness(net, data, spec=SharpnessSpec(top_k=1, probes=2, ascent_steps=1), task="model-loss")
    layout = Layout.of(net)
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss(w):
        return functional_call(net, layout.split_params(w), (x[:60],))["loss"]
    exact = torch.linalg.eigvalsh(hessian(loss)(flat).double())[-1].item()
    assert res.results[0]["eigenvalues"][0] == pytest.approx(exact, rel=1e-3)


def test_subset_standard_error_matches_the_spread_of_repeated_subsets():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(4000, 5, generator=g), torch.randint(0, 3, (4000,), generator=g)
    net = nn.Sequential(nn.Linear(5, 3))
    data = as_data((x[:2000], y[:2000], x[2000:], y[2000:]))
    layout, weights, buffers = _points(net, k=1, scale=0.0)
    estimates, errors = [], []
    for seed in range(40):
        ev = Evaluator(net, layout, data.subset(100, seed), BatchNormPolicy("none"), stderr=True)
        out = ev(weights, buffers)
        estimates.append([out["test_loss"][0], out["test_err"][0]])
        errors.append([out["test_loss_se"][0], out["test_err_se"][0]])
    spread, predicted = np.std(estimates, axis=0, ddof=1), np.mean(errors, axis=0)
    assert np.all(np.abs(spread / predicted - 1) < 0.35), (spread, predicted)
    full = Evaluator(net, layout, data.subset(2000, 0), BatchNormPolicy("none"), stderr=True)(weights, buffers)
    assert full["test_loss_se"][0] == 0.0  # the whole split: the value is exact


def test_subset_surface_stores_standard_errors_beside_the_values():
    net, tensors, _ = _regression()
    surf = ls.evaluate_surface(net, ls.Line.through(net, _regression()[0]), tensors, 3, task="regression",
                               samples=20, points_per_call=1)
    assert {"test_mae", "test_mae_se", "train_loss_se"} <= set(surf.values)
    assert surf.spec["task"]["samples"] == 20 and "test_mae_se" in surf.spec["task"]["values"]
    assert (surf.values["test_mae_se"] > 0).all()


def _bn_net(seed: int):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("bn_samples", [None, 30])
def test_a_subset_surface_recomputes_batchnorm_from_what_its_spec_says(bn_samples):
    """``samples=N`` on a BatchNorm model: the statistics come from the same training subset (recorded as
    the policy's samples and seed), or, with ``bn_samples``, from that many of the whole training set
    (it recorded "the whole training set" while it read the subset)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 5, generator=g), torch.randint(0, 3, (300,), generator=g)
    net, other = _bn_net(0), _bn_net(1)
    data = as_data((x[:200], y[:200], x[200:], y[200:]))
    surf = ls.evaluate_surface(net, ls.Line.through(net, other), data, 2, xrange=(0.0, 1.0), samples=40, seed=3,
                               bn_samples=bn_samples)
    bn = surf.spec["bn"]
    assert (bn["samples"], bn["seed"]) == ((40, 3) if bn_samples is None else (30, 0))
    # by hand at the line's start (the net itself): statistics from what the spec names, loss on the subset
    recompute_from = data.subset(bn["samples"], bn["seed"], splits=("train",)).x_train
    at = copy.deepcopy(net)
    recompute_bn(at, recompute_from, bn["batch_size"])
    subset = data.subset(40, 3)
    with torch.no_grad():
        loss = nn.functional.cross_entropy(at.eval()(subset.x_train), subset.y_train).item()
    assert surf.values["train_loss"][0] == pytest.approx(loss, rel=1e-5)


def test_streamed_int32_labels_and_float64_inputs_are_taken_as_in_memory():
    """Labels as numpy's int32 and float64 inputs: converted per batch as data in memory is (int64,
    float32); cross-entropy raised a traceback on int32 labels from a DataLoader."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(100, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (100,), generator=g)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    line = ls.Line.through(net, other)
    loaders = tuple(DataLoader(TensorDataset(a, b.int()), batch_size=16) for a, b in ((x[:60], y[:60]), (x[60:], y[60:])))
    streamed = ls.evaluate_surface(net, line, loaders, 3)
    in_memory = ls.evaluate_surface(net, line, (x[:60].float(), y[:60], x[60:].float(), y[60:]), 3)
    for name in ("train_loss", "test_loss", "test_err"):
        np.testing.assert_allclose(streamed.values[name], in_memory.values[name], rtol=1e-6)


class WrongLength(Task):
    name, metrics, primary = "wrong-length", ("half",), "half"

    def evaluate(self, output, batch):
        losses = (output - 0).square().mean(1)
        return Evaluation(losses, {"half": losses[:-1]})  # one value short


@pytest.mark.parametrize("make, error, words", [
    (lambda: (nn.Linear(6, 3), _classification()[1], "regression"), ModelError, ["regression", "[2, 3]"]),
    (lambda: (nn.Linear(6, 3), (DataLoader(TensorDataset(torch.randn(40, 5), torch.zeros(40).long()), batch_size=8),
                               DataLoader(TensorDataset(torch.randn(9, 6), torch.zeros(9).long()))), None),
     DataError, ["cannot take a batch"]),
    (lambda: (nn.Linear(6, 3), _classification()[1], WrongLength()), ModelError, ["half", "[1]", "expected [2]"]),
    # float targets under the default task: the task that fits them is named
    (lambda: (nn.Linear(6, 3), (torch.randn(20, 6), torch.randn(20), torch.randn(10, 6), torch.randn(10)), None),
     ModelError, ["integer labels", "for float targets (values to fit) give the task 'regression'"]),
    # the test split is probed too: features of another size there
    (lambda: (nn.Linear(6, 3), (DataLoader(TensorDataset(torch.randn(40, 6), torch.zeros(40).long()), batch_size=8),
                               DataLoader(TensorDataset(torch.randn(9, 7), torch.zeros(9).long()))), None),
     DataError, ["cannot take a batch of the test data"]),
    (lambda: (nn.Linear(6, 3), (DataLoader(TensorDataset(torch.randn(0, 6), torch.zeros(0).long())),
                               DataLoader(TensorDataset(torch.randn(9, 6), torch.zeros(9).long()))), None),
     DataError, ["the train data yields no batches"]),
    # a label past the logits, anywhere in a split held in memory (here the last test sample)
    (lambda: (nn.Linear(6, 3), _classification()[1][:3] + (torch.cat([_classification()[1][3][:-1],
                                                                      torch.tensor([3])]),), None),
     DataError, ["the test labels run from 0 to 3, but the model gives 3 logits"]),
])
def test_bad_input_is_one_line_before_any_work(make, error, words):
    net, data, task = make()
    with pytest.raises(error) as e:
        ls.evaluate_surface(net, ls.Line.through(net, nn.Linear(6, 3)), data, 10 ** 6, task=task)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_a_loader_whose_later_batch_changes_shape_is_refused_in_one_line():
    batches = [(torch.randn(8, 6), torch.zeros(8).long()), (torch.randn(8, 6), torch.zeros(5).long())]
    data = StreamData(lambda: iter(batches), lambda: iter(batches))
    with pytest.raises(DataError, match="batch 1 of the train data holds tensors of \\[5, 8\\] samples"):
        evaluate_model(nn.Linear(6, 3), data)


@pytest.mark.parametrize("where", ["inputs", "targets"])
def test_a_streamed_batch_holding_nan_is_refused_naming_its_sample(where):
    """A DataLoader's batch holding NaN (inputs, or regression targets) is refused where it is read,
    naming the split, the batch and the sample, as data in memory is: it gave a surface of NaN that
    looked complete."""
    torch.manual_seed(0)
    net, other = nn.Linear(5, 1), nn.Linear(5, 1)
    x, y = torch.randn(100, 5), torch.randn(100)
    bad_x, bad_y = x.clone(), y.clone()
    if where == "inputs":
        bad_x[37, 0] = float("nan")
    else:
        bad_y[37] = float("inf")
    data = (DataLoader(TensorDataset(x, y), batch_size=32), DataLoader(TensorDataset(bad_x, bad_y), batch_size=32))
    with pytest.raises(DataError) as e:
        ls.evaluate_surface(net, ls.Line.through(net, other), data, 3, task="regression")
    assert str(e.value) == ("batch 1 of the test data holds NaN or infinite values (in its sample 5); no loss can "
                            "be computed over them")


def test_a_loader_with_a_subset_sampler_reads_its_samples_and_another_sampler_is_refused():
    """One dataset, two loaders that pick the train and test samples (a common split): each split is
    its own samples, read in their order, in values, populations and subsets alike."""
    net, (x_tr, y_tr, x_te, y_te), _ = _classification()
    whole = TensorDataset(torch.cat([x_tr, x_te]), torch.cat([y_tr, y_te]))
    train_idx, test_idx = list(range(len(x_tr))), list(range(len(x_tr), len(x_tr) + len(x_te)))
    by_sampler = StreamData(DataLoader(whole, batch_size=16, sampler=torch.utils.data.SubsetRandomSampler(train_idx)),
                            DataLoader(whole, batch_size=16, sampler=np.array(test_idx)))
    expect = evaluate_model(net, as_data((x_tr, y_tr, x_te, y_te)), batch_size=16)
    got = evaluate_model(net, by_sampler, batch_size=16)
    for name in expect:
        np.testing.assert_allclose(got[name], expect[name], rtol=1e-6, err_msg=name)
    assert by_sampler.population("train") == len(x_tr) and by_sampler.population("test") == len(x_te)
    sub = by_sampler.subset(10, seed=1)
    test_rows = torch.cat([b[0] for b in sub.batches("test")])
    assert len(test_rows) == 10 and all(any(torch.equal(r, t) for t in x_te) for r in test_rows)
    weighted = torch.utils.data.WeightedRandomSampler(torch.ones(len(whole)), len(x_tr))
    with pytest.raises(DataError, match="train DataLoader draws its samples with a WeightedRandomSampler"):
        StreamData(DataLoader(whole, batch_size=16, sampler=weighted), DataLoader(whole, batch_size=16))
    # under torchrun the processes share the points, not the data: a DistributedSampler reads it all
    shard = torch.utils.data.DistributedSampler(whole, num_replicas=2, rank=1, shuffle=False)
    assert StreamData(DataLoader(whole, batch_size=16, sampler=shard), by_sampler.test).population("train") == len(whole)
    batched = DataLoader(whole, batch_sampler=torch.utils.data.BatchSampler(range(len(whole)), 16, False))
    with pytest.raises(DataError, match="the train source is a DataLoader with a batch_sampler"):
        StreamData(batched, by_sampler.test).subset(10)


def test_labels_are_classes_for_token_inputs_and_the_vocabulary_for_next_token_labels():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 12, (40, 6), generator=g)
    labels = torch.randint(0, 3, (40,), generator=g)  # one class per sequence
    assert as_data((tokens[:30], labels[:30], tokens[30:], labels[30:])).num_classes == 3
    next_tokens = torch.roll(tokens, -1, 1).clamp(max=9)  # per-position labels: a language model's
    assert as_data((tokens[:30], next_tokens[:30], tokens[30:], next_tokens[30:])).num_classes == 12


def test_a_user_task_object_and_a_non_task():
    class Huber(Task):
        name, metrics, primary = "huber", ("mae",), "mae"

        def evaluate(self, output, batch):
            d = output[:, 0] - batch[1]
            return Evaluation(nn.functional.huber_loss(output[:, 0], batch[1], reduction="none"), {"mae": d.abs()})

    net, tensors, _ = _regression()
    out = evaluate_model(net, as_data(tensors, task=Huber()))
    assert set(out) == {"train_loss", "train_mae", "test_loss", "test_mae"}
    with pytest.raises(LandscapeError, match="lacks .*evaluate"):
        get_task(object())


class Accuracy(Task):
    """A task whose primary metric grows with quality."""
    name, metrics, primary, percent, maximize = "accuracy", ("acc",), "acc", ("acc",), ("acc",)

    def evaluate(self, output, batch):
        y = batch[1]
        return Evaluation(nn.functional.cross_entropy(output, y, reduction="none"),
                          {"acc": 100.0 * (output.argmax(1) == y).double()})


def test_a_metric_where_larger_is_better_has_its_maximum_taken(tmp_path):
    """The offset (numbers, report, figure) goes to the best test accuracy, not to its worst point;
    the task's maximize is recorded with the surface and read back."""
    from landscape.plot import offset_of
    from landscape.store import open_surface
    net, tensors, _ = _classification()
    torch.manual_seed(4)
    a, b, c = (_shifted(net, scale) for scale in (0.0, 0.8, 1.6))
    surf = ls.evaluate_surface(a, ls.Plane.through(a, b, c), tensors, grid=(7, 7), task=Accuracy())
    off = offset_of(surf, smooth=0.0)
    acc = surf.values["test_acc"]
    assert off["best"] == ["minimum", "maximum"] and off["test_min_value"] == acc.max() > acc.min()
    from landscape.cli.commands._surface import summarize  # what `landscape plane` prints and --json gives
    best = summarize(surf, 0.0)["minima"]["test_acc"]
    assert best["value"] == acc.max() and best["best"] == "maximum"
    assert open_surface(surf.save(tmp_path / "p.h5")).maximized("test_acc")
    with pytest.raises(LandscapeError, match="maximize names 'ppl', not one of its metrics"):
        get_task(type("Odd", (Accuracy,), {"maximize": ("ppl",)})())


def test_a_maximized_metric_is_banded_down_from_its_maximum():
    """The plane panel of an accuracy bands downward from its best value, as a loss's bands go up from
    its minimum: the best band has the first colour and the finest levels, the last band reads "< x"
    (the worst 15 %), and the offset figure's thickest contour is the one nearest the maximum; the
    explorer's linear colour scale is reversed (its log scale is of the distance below the best, in
    test_explore)."""
    from matplotlib.figure import Figure
    from landscape.plot import static
    net, tensors, _ = _classification()
    torch.manual_seed(4)
    a, b, c = (_shifted(net, scale) for scale in (0.0, 0.8, 1.6))
    surf = ls.evaluate_surface(a, ls.Plane.through(a, b, c), tensors, grid=(7, 7), task=Accuracy())
    acc = surf.values["test_acc"]
    ax = Figure().subplots()
    static.draw_plane(ax, surf, "test_acc")
    levels = -ax.collections[0].levels[:-1]  # the values at the band edges, best first
    assert levels[0] == acc.max() and np.all(np.diff(levels) < 0)
    assert np.all(np.diff(np.diff(levels)) < 0)  # the bands widen away from the best value
    assert levels[-1] == pytest.approx(np.quantile(acc, 0.15))
    labels = [t.get_text() for t in ax.figure.axes[1].get_yticklabels()]
    assert float(labels[0]) == pytest.approx(acc.max(), rel=1e-3) and labels[-1].startswith("< ")
    ax = Figure().subplots()
    static.draw_offset(ax, surf, "train_loss", "test_acc")
    dashed = ax.collections[1]  # the test metric's contours, thickest first
    assert -dashed.levels[0] < acc.max() and -dashed.levels[0] > -dashed.levels[-1]
    from landscape.plot.interactive import plane_figure  # the explorer: the best values dark, as a loss's
    fig = plane_figure(surf, metric="test_acc", scale="linear")
    assert fig.data[0].reversescale and fig.data[1].reversescale
    assert not plane_figure(surf, metric="test_acc").data[0].reversescale  # log: of the distance below the best
    assert {m: d["best"] for m, d in fig.layout.meta["metrics"].items()} == \
        {"train_loss": None, "test_loss": None, "train_acc": surf.values["train_acc"].max(), "test_acc": acc.max()}


def _shifted(net, scale):
    moved = copy.deepcopy(net)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(scale * torch.randn_like(p))
    return moved


def _train_plane_plot_explore(capsys, tmp_path, task, model, dataset, *extra):
    from landscape.cli.main import main
    run, plane = tmp_path / "run.h5", tmp_path / "plane.h5"
    assert main(["train", "--task", task, "--model", model, "--dataset", dataset, *extra, "--methods", "sgd,swa",
                 "--epochs", "3", "--swa-start", "2", "--batch-size", "16", "--lr", "0.05", "--swa-lr", "0.05",
                 "-o", str(run), "--quiet"]) == 0
    assert main(["plane", str(run), "sgd", "swa/average", "sgd:0", "--grid", "3", "3", "-o", str(plane), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["plot", str(plane), "--out", str(tmp_path / "fig"), "--format", "png", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)["figures"]
    assert figures and all(f.endswith(".png") for f in figures)
    assert main(["explore", str(plane), "-o", str(tmp_path / "explore.html")]) == 0
    surf = ls.open_surface(plane)
    return surf, (tmp_path / "explore.html").read_text()


def test_regression_end_to_end(capsys, tmp_path):
    surf, html = _train_plane_plot_explore(capsys, tmp_path, "regression", "mlp", "regression",
                                           "--model-arg", "hidden=[8]", "--data-option", "n_train=64",
                                           "--data-option", "n_test=32")
    assert surf.primary_metric == "test_mae" and np.isfinite(surf.values["test_mae"]).all()
    assert "test mean absolute error" in html and "errors in %" not in html  # no error, no percent
    from landscape.cli.main import main
    capsys.readouterr()
    assert main(["line", str(tmp_path / "run.h5"), "sgd", "swa/average", "--points", "3", "--samples", "20",
                 "-o", str(tmp_path / "line.h5")]) == 0
    said = capsys.readouterr().out
    assert "min test_mae " in said and "_se" not in said  # a standard error has no best point to report
    line = ls.open_surface(tmp_path / "line.h5")
    assert line.spec["task"]["samples"] == 20 and (line.values["test_mae_se"] > 0).all()


def test_language_model_end_to_end(capsys, tmp_path):
    surf, html = _train_plane_plot_explore(capsys, tmp_path, "language-model", "transformer", "modular",
                                           "--model-arg", "dim=8", "--model-arg", "heads=2", "--model-arg", "layers=1",
                                           "--data-option", "modulus=5")
    assert surf.primary_metric == "test_err" and surf.task["name"] == "language-model"
    assert np.isfinite(surf.values["test_ppl"]).all() and "test perplexity" in html and "errors in %" in html


def test_a_task_that_does_not_fit_the_model_is_one_line_before_training(capsys, tmp_path):
    one_line_error(capsys, ["train", "--task", "regression", "--dataset", "synthetic", "--model", "mlp",
                            "--epochs", "1", "-o", tmp_path / "r.h5", "--quiet"], "task 'regression'")
    assert not list(tmp_path.iterdir())


USER_TASK = '''
import torch
from landscape.tasks import Evaluation, Task


class Absolute(Task):
    name, metrics, primary = "absolute", ("mae",), "mae"

    def evaluate(self, output, batch):
        d = (output[:, 0] - batch[1]).abs()
        return Evaluation(d, {"mae": d})


task = Absolute()
'''


def test_a_user_task_by_import_path_trains_and_is_recorded(tmp_path, monkeypatch, capsys):
    """Typed, the import path runs; recorded in the file, it runs again only when allowed."""
    from landscape.cli.main import main
    (tmp_path / "mytasks.py").write_text(USER_TASK)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--task", "mytasks:task", "--dataset", "regression", "--data-option", "n_train=32",
                 "--data-option", "n_test=16", "--model", "mlp", "--model-arg", "hidden=[4]", "--methods", "sgd",
                 "--epochs", "1", "-o", "r.h5", "--quiet"]) == 0
    traj = ls.open_trajectory(tmp_path / "r.h5")
    assert traj.config["task"] == "mytasks:task" and "test_mae" in traj.run("sgd").metrics
    monkeypatch.delenv("LANDSCAPE_TRUST_CODE", raising=False)
    monkeypatch.delenv("LANDSCAPE_TRUSTED_MODULES", raising=False)
    line = ["line", "r.h5", "sgd:0", "sgd", "--points", "3", "-o", "l.h5", "--quiet"]
    one_line_error(capsys, line, "'mytasks:task'", "--task mytasks:task")
    one_line_error(capsys, line + ["--task", "mytasks:other"], "--task mytasks:other does not match")
    assert main(line + ["--task", "mytasks:task"]) == 0
    assert ls.open_surface(tmp_path / "l.h5").primary_metric == "test_mae"


def test_export_writes_accuracy_only_for_a_task_with_an_error(tmp_path):
    import h5py

    from landscape.store import export_loss_landscape
    for case, acc in (("regression", False), ("language-model", True)):
        net, tensors, task = CASES[case]()
        other = CASES[case]()[0]
        torch.manual_seed(5)
        for p in other.parameters():
            p.data.add_(torch.randn_like(p))
        surf = ls.evaluate_surface(net, ls.Line.through(net, other), tensors, 3, task=task)
        with h5py.File(export_loss_landscape(surf, tmp_path / f"{case}.h5"), "r") as f:
            assert ("test_acc" in f) == acc and "test_loss" in f, list(f)
            if acc:
                np.testing.assert_allclose(f["test_acc"][()], 100.0 - surf.values["test_err"])


def test_every_method_trains_with_the_task_loss(tmp_path):
    """Each method records the task's values (SWAP's gathered rows included) for a regression task."""
    from landscape.config import TrainConfig
    from landscape.train import train
    cfg = TrainConfig(model=ls.ModelSpec("mlp", {"hidden": [4]}), task="regression", epochs=2, batch_size=16,
                      data=ls.DataSpec("regression", {"n_train": 32, "n_test": 16, "features": 3}),
                      methods=("sgd", "swa", "ema", "swap", "lookahead", "lookahead-adam", "grafting"),
                      swap_workers=2, swap_phase1_epochs=1, swap_phase2_epochs=1, grafting_baseline=False,
                      lookahead_fast_epochs=0)
    with pytest.warns(UserWarning, match="threshold"):  # no training accuracy: phase 1 runs to its cap
        finals = train(cfg, tmp_path / "all.h5", quiet=True)["final"]
    assert len(finals) > 10
    for run, m in finals.items():
        assert {"train_mae", "test_mae"} <= set(m) and np.isfinite(m["test_mae"]) and "test_err" not in m, run


class ScaledByBatch(Task):
    """Reads a number out of a tensor (``float``), which vmap cannot batch: the evaluator falls back to
    one call of the task per point."""
    name, metrics, primary = "scaled", ("mae",), "mae"

    def evaluate(self, output, batch):
        d = output[:, 0] - batch[1]
        scale = 1.0 + float(output.abs().max())  # a number read from this point's output
        return Evaluation(d.square() / scale, {"mae": d.abs()})


def test_a_task_vmap_cannot_batch_gives_the_same_values():
    net, tensors, _ = _regression()
    data = as_data(tensors, task=ScaledByBatch())
    layout, weights, buffers = _points(net)
    ev = Evaluator(net, layout, data, BatchNormPolicy("none"), batch_size=16)
    batched = ev(weights, buffers)
    assert not ev._vmap_task
    for k in range(len(weights)):
        single = ev(weights[k:k + 1], buffers[k:k + 1])
        for name, v in batched.items():
            np.testing.assert_allclose(v[k], single[name][0], rtol=1e-6, err_msg=name)


def test_a_user_task_on_dict_batches_without_labels_is_checked_and_evaluated():
    """Only the tasks with class labels have them read before any work: a task of its own reads its
    batches as it likes."""
    class OwnKeys(Task):
        name, metrics, primary = "own", ("mae",), "mae"

        def evaluate(self, output, batch):
            d = output[:, 0] - batch["target"]
            return Evaluation(d.square(), {"mae": d.abs()})

    class KeywordNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, features, target=None):
            return self.lin(features)

    g = torch.Generator().manual_seed(0)
    rows = [{"features": torch.randn(4, generator=g), "target": torch.randn((), generator=g)} for _ in range(30)]
    data = (DataLoader(rows[:20], batch_size=8), DataLoader(rows[20:], batch_size=8))
    a, b = KeywordNet(), KeywordNet()
    surf = ls.evaluate_surface(a, ls.Line.through(a, b), data, 3, task=OwnKeys())
    assert np.isfinite(surf.values["test_mae"]).all()


def test_a_hessian_plane_takes_the_task_and_refuses_one_that_does_not_fit():
    net, tensors, _ = _regression()
    plane = ls.Plane.hessian(net, data=tensors, task="regression", samples=60)
    same = ls.Plane.hessian(net, data=as_data(tensors, task="regression"), samples=60)
    assert plane.derived["eigenvalues"] == same.derived["eigenvalues"]
    with pytest.raises(ModelError, match="task 'classification' needs logits"):  # float targets, the default task
        ls.Plane.hessian(net, data=tensors, samples=60)


def test_a_streamed_recompute_pass_joins_a_one_sample_batch_and_takes_the_sources_batches():
    """BatchNorm recompute from a DataLoader whose last batch holds one sample: that batch's variance
    is 0 / 0, and every value of the surface was NaN; it joins the batch before it, as in memory, and
    the values are those of the same data in memory. The source's batches are the BatchNorm batches:
    recorded as 0, and a bn_batch_size it would ignore is refused."""
    from torch.utils.data import DataLoader, TensorDataset
    from landscape import evaluate_surface
    from landscape.errors import ConfigError
    from landscape.geometry import Grid, Line
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    other = copy.deepcopy(net)
    torch.nn.init.normal_(other[0].weight)
    x, y, xt, yt = torch.randn(33, 4), torch.randint(0, 3, (33,)), torch.randn(12, 4), torch.randint(0, 3, (12,))
    line = Line.through(net, other)
    grid = Grid((0.0, line.derived["length"]), 3)
    streamed = evaluate_surface(net, line, (DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True),
                                            DataLoader(TensorDataset(xt, yt), batch_size=8)), grid, bn="recompute")
    in_memory = evaluate_surface(net, line, (x, y, xt, yt), grid, bn="recompute", bn_batch_size=8)
    np.testing.assert_allclose(streamed.values["train_loss"], in_memory.values["train_loss"], rtol=1e-6)
    assert streamed.spec["bn"]["batch_size"] == 0
    with pytest.raises(ConfigError, match="bn_batch_size does not apply to a data source"):
        evaluate_surface(net, line, (DataLoader(TensorDataset(x, y), batch_size=8),
                                     DataLoader(TensorDataset(xt, yt), batch_size=8)), grid, bn_batch_size=4)
    from landscape.evaluate import BatchNormPolicy
    with pytest.raises(ConfigError, match="a BatchNormPolicy batch_size does not apply to a data source"):
        evaluate_surface(net, line, (DataLoader(TensorDataset(x, y), batch_size=8),
                                     DataLoader(TensorDataset(xt, yt), batch_size=8)), grid,
                         bn=BatchNormPolicy("recompute", batch_size=4))
    # sequences padded per batch: a one-sample batch gives BatchNorm its L values per channel and stays
    # alone (joining it to a batch of another length failed)
    conv = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3, padding=1), torch.nn.BatchNorm1d(3),
                               torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2))
    wide = copy.deepcopy(conv)
    torch.nn.init.normal_(wide[0].weight)
    batches = [(torch.randn(4, 2, 9), torch.randint(0, 2, (4,))), (torch.randn(1, 2, 5), torch.randint(0, 2, (1,)))]
    seq = evaluate_surface(conv, Line.through(conv, wide), (lambda: iter(batches), lambda: iter(batches)), 3)
    assert np.isfinite(seq.values["train_loss"]).all()


def test_a_classification_subclass_with_its_own_loss_is_differentiated_with_it():
    """A Classification subclass whose evaluate() scales the logits (a temperature): its Hessian is of its
    own loss (it was plain cross-entropy's, 0.57 for the task's 1.90: the fast path ignored evaluate())."""
    import torch.nn.functional as F
    from torch.func import functional_call, hessian
    from landscape.data import as_data
    from landscape.evaluate import BatchNormPolicy
    from landscape.params import Layout
    from landscape.sharpness import SharpnessSpec, checkpoint_sharpness
    from landscape.tasks import Classification, Evaluation, logits_of, targets_of

    class Tempered(Classification):
        name = "tempered"

        def evaluate(self, output, batch):
            logits, y = logits_of(output), targets_of(batch)
            return Evaluation(F.cross_entropy(logits / 0.5, y, reduction="none"),
                              {"err": 100.0 * (logits.argmax(-1) != y).double()})
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(40, 3), torch.randint(0, 3, (40,))
    layout = Layout.of(net)
    w = layout.params_to_vector(net).detach()
    H = hessian(lambda v: F.cross_entropy(functional_call(net, layout.split_params(v), (x,)) / 0.5, y))(w).double()
    r = checkpoint_sharpness(net, layout, w, layout.buffers_to_vector(net), as_data((x, y, x, y), task=Tempered()),
                             SharpnessSpec(top_k=2, probes=4, ascent_steps=0), BatchNormPolicy("none"))
    np.testing.assert_allclose(r["eigenvalues"], torch.linalg.eigvalsh(0.5 * (H + H.T)).flip(0)[:2].numpy(), rtol=1e-4)
    assert Tempered().loss(net(x), (x, y), reduction="none").shape == (40,)  # (per sample, as before)


def test_a_label_past_the_logits_in_a_later_streamed_batch_is_one_line():
    """The check before the work reads the first batch; a later one's class labels are checked on the
    host as it is read, before it goes to the device (on a GPU, a label past the logits stops the
    process; here it was torch's IndexError with its traceback), naming the batch."""
    from landscape.errors import DataError
    torch.manual_seed(0)
    net, other = nn.Sequential(nn.Linear(3, 4)), nn.Sequential(nn.Linear(3, 4))
    x, y = torch.randn(20, 3), torch.randint(0, 4, (20,))
    train = lambda: iter([(x[:8], y[:8]), (x[8:], y[8:] + 4)])  # noqa: E731
    with pytest.raises(DataError) as e:
        ls.evaluate_surface(net, ls.Line.through(net, other), (train, lambda: iter([(x, y)])), 3)
    assert str(e.value) == "the train labels of batch 1 run from 4 to 7, but the model gives 4 logits (labels 0 to 3)"
