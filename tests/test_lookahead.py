"""Lookahead (Zhang et al. 2019): the slow update, resuming from state_dict, SGD and Adam inside,
the recording policy and bad input -- asserted from the recorded trajectory files."""
from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch

from landscape.errors import ConfigError
from landscape.store import open_trajectory
from landscape.train import Lookahead, train
from landscape.train.loop import set_lr, swa_schedule, train_epoch
from landscape.rebuild import rebuild_data, rebuild_model

K, ALPHA, EPOCHS = 3, 0.5, 4  # 300 samples / batch 32 = 10 steps per epoch: epoch ends fall mid-cycle
PREFIXES = ("lookahead", "lookahead-adam")


@pytest.fixture(scope="module")
def la_run(tmp_path_factory, tiny_config):
    cfg = tiny_config.replace(methods=PREFIXES, epochs=EPOCHS, lookahead_k=K, lookahead_alpha=ALPHA,
                              lookahead_fast_from=1, lookahead_fast_epochs=2, adam_lr=0.01)
    path = tmp_path_factory.mktemp("lookahead") / "la.h5"
    train(cfg, path, quiet=True)
    return cfg, open_trajectory(path)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_every_synchronization_is_recorded(la_run, prefix):
    cfg, t = la_run
    per_epoch = 10
    slow = t.run(f"{prefix}/slow")
    steps = EPOCHS * per_epoch
    np.testing.assert_array_equal(slow.step, np.arange(0, steps + 1, K))  # row 0 + every k-th step
    np.testing.assert_array_equal(slow.metrics["sync"], np.arange(len(slow)))
    np.testing.assert_allclose(slow.epoch, slow.step / per_epoch)
    # metrics: row 0, the last synchronization of every epoch, every synchronization in the fast window
    evaluated = np.isfinite(slow.metrics["test_err"])
    epoch_of = (slow.step - 1) // per_epoch
    last_of_epoch = slow.step + K > (epoch_of + 1) * per_epoch
    in_window = (epoch_of >= 1) & (epoch_of < 3)
    expected = (slow.step == 0) | last_of_epoch | in_window
    np.testing.assert_array_equal(evaluated, expected)
    assert evaluated[-1]  # the final slow weights carry their metrics
    fast = t.run(f"{prefix}/fast")
    np.testing.assert_array_equal(fast.step, np.arange(per_epoch + 1, 3 * per_epoch + 1))  # epochs 1 and 2
    np.testing.assert_array_equal(fast.metrics["inner_step"], (fast.step - 1) % K + 1)
    assert np.isfinite(fast.metrics["train_loss"]).all() and np.isfinite(fast.metrics["test_err"]).all()


@pytest.mark.parametrize("prefix", PREFIXES)
def test_slow_update_is_phi_plus_alpha_theta_minus_phi_of_recorded_fast_weights(la_run, prefix):
    _, t = la_run
    slow, fast = t.run(f"{prefix}/slow"), t.run(f"{prefix}/fast")
    slow_w, fast_w = t.params(f"{prefix}/slow").astype(np.float64), t.params(f"{prefix}/fast").astype(np.float64)
    fast_row = {int(s): i for i, s in enumerate(fast.step)}
    checked = 0
    for j in range(1, len(slow)):
        s = int(slow.step[j])
        if s not in fast_row:
            continue
        theta = fast_w[fast_row[s]]  # theta_k, recorded just before the slow update
        assert fast.metrics["inner_step"][fast_row[s]] == K
        phi = slow_w[j - 1]
        np.testing.assert_allclose(slow_w[j], phi + ALPHA * (theta - phi), rtol=0, atol=1e-6)
        # and the update really moved: theta_k is not phi, the new slow weights are neither
        assert np.abs(theta - phi).max() > 1e-4 and np.abs(slow_w[j] - theta).max() > 1e-5
        checked += 1
    assert checked >= 6
    # the first fast step after a synchronization starts from the new slow weights: it is close to them
    for j in range(1, len(slow)):
        nxt = fast_row.get(int(slow.step[j]) + 1)
        if nxt is not None:
            assert np.linalg.norm(fast_w[nxt] - slow_w[j]) < np.linalg.norm(fast_w[nxt] - slow_w[j - 1])


@pytest.mark.parametrize("prefix, inner", [("lookahead", "SGD"), ("lookahead-adam", "Adam")])
def test_lookahead_trains_with_sgd_and_with_adam_inside(la_run, prefix, inner):
    cfg, t = la_run
    attrs = t.run(f"{prefix}/slow").attrs
    assert attrs["inner_optimizer"] == inner and attrs["k"] == K and attrs["alpha"] == ALPHA
    m = t.run(f"{prefix}/slow").metrics
    assert m["train_loss"][-1] < 0.5 * m["train_loss"][0]
    assert m["test_err"][-1] < 0.5 * m["test_err"][0]
    # both start from the shared initialization of every method
    np.testing.assert_array_equal(t.params("lookahead/slow", 0), t.params("lookahead-adam/slow", 0))


def _replay(t, cfg, prefix, interrupt_after=None):
    """Train ``prefix`` again from the file's initialization with the library's own pieces, optionally
    stopping after epoch ``interrupt_after``, saving everything to bytes and resuming in new objects.
    Returns (final parameters, final slow weights) as flat numpy vectors."""
    data = rebuild_data(t)

    def build(state=None):
        model = rebuild_model(t, data)
        row0 = t.checkpoint(f"{prefix}/slow:0")
        t.layout.load(model, row0.params, row0.buffers)
        if prefix == "lookahead":
            inner = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
        else:
            inner = torch.optim.Adam(model.parameters(), lr=cfg.adam_lr, weight_decay=cfg.weight_decay)
        # deliberately different options: load_state_dict must restore the saved ones
        opt = Lookahead(inner, k=K, alpha=ALPHA) if state is None else Lookahead(inner, k=K + 2, alpha=0.9)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
        return model, opt, gen

    model, opt, gen = build()
    base_lr = cfg.lr if prefix == "lookahead" else cfg.adam_lr
    for epoch in range(cfg.epochs):
        set_lr(opt, base_lr * swa_schedule(epoch, cfg.epochs, cfg.lr_ratio))
        train_epoch(model, opt, data, cfg.batch_size, gen)
        if epoch == interrupt_after:
            assert opt.step_count % K != 0  # interrupted between two synchronizations
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state()}, buf)
            del model, opt, gen
            buf.seek(0)
            model, opt, gen = build(torch.load(buf, weights_only=True))
            assert (opt.k, opt.alpha) == (K, ALPHA) and opt.step_count == (epoch + 1) * 10
    slow = torch.cat([opt.state[p]["slow"].reshape(-1) for p in model.parameters()])
    return t.layout.params_to_vector(model).numpy(), slow.numpy()


@pytest.mark.parametrize("prefix", PREFIXES)
def test_run_interrupted_and_resumed_from_state_dict_equals_the_recorded_run(la_run, prefix):
    from landscape.device import torch_threads
    cfg, t = la_run
    with torch_threads(cfg.threads):  # the thread count training used: float sums in the same order
        final_params, final_slow = _replay(t, cfg, prefix, interrupt_after=1)  # step 20: mid-cycle
        straight_params, straight_slow = _replay(t, cfg, prefix)
    recorded_last = t.params(f"{prefix}/slow", -1)  # 40 steps, k = 3: the last sync is at step 39
    np.testing.assert_array_equal(final_params, straight_params)  # bitwise
    np.testing.assert_array_equal(final_slow, straight_slow)
    np.testing.assert_array_equal(final_slow, recorded_last)  # and both are what the file holds


def test_state_dict_carries_the_slow_weights_and_refuses_a_plain_one():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4))
    opt = Lookahead(torch.optim.SGD([w], lr=0.1, momentum=0.9), k=5, alpha=0.5)
    for _ in range(3):
        opt.zero_grad()
        (w ** 2).sum().backward()
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    assert sd["lookahead"]["step"] == 3
    slow = sd["lookahead"]["state"][0]["slow"]
    assert not torch.equal(slow, w.detach())  # mid-cycle the slow weights differ from the parameters
    with pytest.raises(ConfigError, match="no slow weights"):
        opt.load_state_dict(torch.optim.SGD([w], lr=0.1).state_dict())


@pytest.mark.parametrize("policy", ["none", "reset", "pullback"])
def test_inner_state_policies_at_a_synchronization(policy):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6))
    opt = Lookahead(torch.optim.SGD([w], lr=0.05, momentum=0.9), k=2, alpha=0.5, inner_state=policy)
    seen = []  # the inner momentum at each synchronization, before the policy applies
    opt.register_sync_hook(lambda o: seen.append(o.optimizer.state[w]["momentum_buffer"].clone()))
    cached = torch.zeros(6)
    for _ in range(3):  # three cycles of k = 2 steps
        for _ in range(2):
            opt.zero_grad()
            ((w - 1.0) ** 4).sum().backward()
            opt.step()
        m, after = seen[-1], opt.optimizer.state[w]["momentum_buffer"]
        assert torch.count_nonzero(m) == 6
        if policy == "none":
            torch.testing.assert_close(after, m)
        elif policy == "reset":
            assert torch.count_nonzero(after) == 0
        else:  # m <- m_c + alpha (m - m_c), m_c <- m
            cached = cached + 0.5 * (m - cached)
            torch.testing.assert_close(after, cached)
    assert len(seen) == 3


@pytest.mark.parametrize("k, alpha, message", [(0, 0.5, "k must be an integer of at least 1"),
                                               (2, 0.0, r"alpha must be in \(0, 1\]"),
                                               (2, 1.5, r"alpha must be in \(0, 1\]")])
def test_bad_options_are_refused(k, alpha, message):
    w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ConfigError, match=message):
        Lookahead(torch.optim.SGD([w], lr=0.1), k=k, alpha=alpha)


@pytest.mark.parametrize("args, message", [
    (["--lookahead-k", "0"], "--lookahead-k must be at least 1"),
    (["--lookahead-alpha", "0"], "--lookahead-alpha must be in (0, 1]"),
    (["--lookahead-alpha", "1.5"], "--lookahead-alpha must be in (0, 1]"),
])
def test_cli_bad_lookahead_options_give_one_line_and_no_file(tmp_path, args, message, capsys, monkeypatch):
    from landscape.cli.main import main
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() sets its own
    rc = main(["train", "-o", str(tmp_path / "r.h5"), "--methods", "lookahead", "--dataset", "synthetic",
               "--epochs", "1", "--quiet", *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("landscape: error:") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_learning_rate_schedulers_reach_the_inner_optimizer_also_after_loading():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = Lookahead(torch.optim.SGD([w], lr=1.0, momentum=0.9), k=2)
    sd = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(sd)  # the inner optimizer replaces its param_groups here
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.zero_grad()
        w.sum().backward()
        opt.step()
        sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.25
