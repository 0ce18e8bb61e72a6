"""Filter Grafting (Meng et al. 2020): every recorded mix is the entropy rule applied to the recorded
entropies, in a ring i <- i-1; the baseline is the same networks without grafting."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from landscape.bn import recompute_bn
from landscape.store import open_trajectory
from landscape.train import train
from landscape.train.grafting import lr_factors
from landscape.rebuild import rebuild_data, rebuild_model

N, EPOCHS, A, C = 3, 3, 0.4, 500.0


@pytest.fixture(scope="module")
def graft_run(tmp_path_factory, tiny_config):
    cfg = tiny_config.replace(methods=("grafting",), epochs=EPOCHS, grafting_nets=N, grafting_a=A, grafting_c=C)
    path = tmp_path_factory.mktemp("grafting") / "g.h5"
    train(cfg, path, quiet=True)
    return cfg, open_trajectory(path)


def np_entropy(w: np.ndarray, bins: int = 10) -> float:
    """Entropy (nats) of the 10-bin histogram of a layer's weights over [min, max], written
    independently of the library (numpy puts the maximum in the last bin)."""
    counts, _ = np.histogram(w.astype(np.float64), bins=bins, range=(w.min(), w.max()))
    p = counts[counts > 0] / w.size
    return float(-(p * np.log(p)).sum())


def layer_slices(t, run):
    """For every layer recorded in the run's attrs: (weight slice, [slices of every parameter mixed with it])."""
    attrs = t.run(run).attrs
    by_name = {e.name: slice(e.offset, e.offset + e.numel) for e in t.layout.params}
    return [(by_name[layer], [by_name[n] for n in group]) for layer, group in zip(attrs["layers"], attrs["groups"])]


def test_runs_rows_and_attrs(graft_run):
    cfg, t = graft_run
    expected = {f"grafting/net{i}" for i in range(N)} | {f"grafting/baseline{i}" for i in range(N)}
    assert set(t.runs) == expected
    for i in range(N):
        net = t.run(f"grafting/net{i}")
        assert len(net) == 1 + 2 * EPOCHS
        np.testing.assert_array_equal(net.metrics["grafted"], [0] + [0, 1] * EPOCHS)
        assert net.attrs["donor"] == f"grafting/net{(i - 1) % N}"  # the ring: i receives from i-1
        assert math.isclose(net.attrs["lr"], cfg.lr * lr_factors(N)[i])
        assert len(t.run(f"grafting/baseline{i}")) == 1 + EPOCHS
    # the reference's learning rates: lr (1 + cos(pi (N - i) / N)) / 2 for its nets i = 1..N
    assert lr_factors(2) == pytest.approx([0.5, 1.0])
    assert lr_factors(3) == pytest.approx([0.25, 0.75, 1.0])
    assert t.run("grafting/net0").attrs["layers"] == ["0.weight", "3.weight", "6.weight", "10.weight"]


def test_recorded_entropies_are_those_of_the_recorded_weights(graft_run):
    _, t = graft_run
    for i in range(N):
        run = f"grafting/net{i}"
        params, ent = t.params(run), t.run(run).metrics["entropy"]
        for row in range(len(params)):
            for layer, (w, _) in enumerate(layer_slices(t, run)):
                assert ent[row, layer] == pytest.approx(np_entropy(params[row, w]), abs=1e-9)


def test_every_mix_is_the_entropy_rule_applied_to_the_recorded_entropies(graft_run):
    _, t = graft_run
    runs = [f"grafting/net{i}" for i in range(N)]
    data = {r: (t.params(r), t.buffers(r), t.run(r).metrics) for r in runs}
    weights_seen = []
    for i, run in enumerate(runs):
        donor = runs[(i - 1) % N]
        params, _, m = data[run]
        d_params, _, d_m = data[donor]
        for e in range(EPOCHS):
            trained, grafted = 1 + 2 * e, 2 + 2 * e  # rows: the epoch's training, then the graft
            assert m["grafted"][trained] == 0 and m["grafted"][grafted] == 1
            h_own, h_donor = m["entropy"][trained], d_m["entropy"][trained]
            np.testing.assert_array_equal(m["donor_entropy"][grafted], h_donor)
            w = A / np.pi * np.arctan(C * (h_own - h_donor)) + 0.5
            np.testing.assert_allclose(m["graft_weight"][grafted], w, rtol=0, atol=1e-12)
            for layer, (_, members) in enumerate(layer_slices(t, run)):
                for sl in members:  # the layer's weight and the parameters after it share its w
                    own, other = params[trained, sl], d_params[trained, sl]
                    expected = own * np.float32(w[layer]) + other * np.float32(1 - w[layer])
                    np.testing.assert_allclose(params[grafted, sl], expected, rtol=0, atol=2e-7)
            # the next epoch trains from the grafted weights: trained rows are the grafted ones moved on
            assert np.isnan(m["graft_weight"][trained]).all()
            weights_seen.extend(w)
    weights_seen = np.asarray(weights_seen)
    assert weights_seen.min() >= 0.5 - A / 2 and weights_seen.max() <= 0.5 + A / 2
    assert (np.abs(weights_seen - 0.5) > 0.05).any()  # the rule really favoured one side somewhere


def test_grafted_batchnorm_statistics_are_recomputed(graft_run):
    cfg, t = graft_run
    data = rebuild_data(t)
    model = rebuild_model(t, data)
    ckpt = t.checkpoint("grafting/net1:2")  # the first graft of net 1
    assert ckpt.metrics["grafted"] == 1
    t.layout.load(model, ckpt.params, torch.zeros_like(ckpt.buffers))
    recompute_bn(model, data.x_train, cfg.eval_batch_size)
    np.testing.assert_allclose(t.layout.buffers_to_vector(model).numpy(), ckpt.buffers.numpy(), rtol=1e-5, atol=1e-6)


def test_baseline_is_the_same_networks_without_grafting(graft_run):
    _, t = graft_run
    for i in range(N):
        net, base = t.params(f"grafting/net{i}"), t.params(f"grafting/baseline{i}")
        np.testing.assert_array_equal(net[0], base[0])  # same initialization
        np.testing.assert_array_equal(net[1], base[1])  # first epoch identical: same lr and data order
        assert np.abs(net[-1] - base[-1]).max() > 1e-3  # grafting changed the outcome
        ent = t.run(f"grafting/baseline{i}").metrics["entropy"]
        assert ent.shape == (1 + EPOCHS, 4) and np.isfinite(ent).all()


def test_vary_seed_gives_each_net_its_own_initialization(tmp_path, tiny_config):
    cfg = tiny_config.replace(methods=("grafting",), epochs=1, grafting_vary="seed", grafting_baseline=False)
    t = open_trajectory(train(cfg, tmp_path / "g.h5", quiet=True)["path"])
    assert set(t.runs) == {"grafting/net0", "grafting/net1"}
    assert np.abs(t.params("grafting/net0", 0) - t.params("grafting/net1", 0)).max() > 1e-2
    assert t.run("grafting/net0").attrs["lr"] == t.run("grafting/net1").attrs["lr"] == cfg.lr
