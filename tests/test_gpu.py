"""The GPU path as a notebook user takes it, against what the CPU gives: a plane of live nets on
different devices, a surface evaluated on the GPU, a trajectory trained there, sharpness there, and
their own loop on the GPU recorded.

Marked ``gpu``: the default run and CI skip them; on a CUDA machine ``./run test -m gpu`` runs them.
``LANDSCAPE_GPU_TESTS_DEVICE=cpu ./run test -m gpu tests/test_gpu.py`` runs the same tests with the CPU
standing in for the GPU, which checks the tests themselves (not the GPU) on a machine without one."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from landscape import evaluate_surface
from landscape.geometry import Plane
from landscape.rebuild import rebuild_data, rebuild_model
from landscape.sharpness import SharpnessSpec, compute_sharpness
from landscape.store import open_trajectory
from landscape.train import train

pytestmark = pytest.mark.gpu

THREE = ("sgd", "swa/average", "swa/iterates:0")


@pytest.fixture(scope="module")
def gpu() -> torch.device:
    device = torch.device(os.environ.get("LANDSCAPE_GPU_TESTS_DEVICE", "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return device


def _assert_close(got: dict, ref: dict, n_train: int, n_test: int) -> None:
    """Losses to float32 rounding of a different device's kernels; errors to one sample (a logit tie
    may break the other way)."""
    for name, r in ref.items():
        if name.endswith("err"):
            one = 100.0 / (n_train if name.startswith("train") else n_test)
            np.testing.assert_allclose(got[name], r, rtol=0, atol=one + 1e-9, err_msg=name)
        else:
            np.testing.assert_allclose(got[name], r, rtol=1e-4, atol=1e-6, err_msg=name)


def test_a_plane_of_nets_on_two_devices_evaluates_on_the_gpu_as_on_the_cpu(tiny_run, gpu):
    """An initialization kept on the CPU and two nets on the GPU make one plane (the geometry is held
    on the CPU, as from a file); its surface on the GPU, K points per call, equals the CPU's."""
    traj = open_trajectory(tiny_run)
    data = rebuild_data(traj)
    nets = [traj.layout.load(rebuild_model(traj, data), c.params, c.buffers)
            for c in (traj.checkpoint(name) for name in THREE)]
    plane = Plane.through(nets[0], nets[1].to(gpu), nets[2].to(gpu), names=("sgd", "swa", "early"))
    named = Plane.through(traj, *THREE)
    for vector in ("origin", "u", "v", "buffers"):
        assert torch.equal(getattr(plane, vector), getattr(named, vector)), vector
    on_gpu = evaluate_surface(nets[1], plane, data, (4, 3), bn="recompute", device=gpu, points_per_call=4,
                              quiet=True)
    on_cpu = evaluate_surface(nets[0].cpu(), plane, data, (4, 3), bn="recompute", device="cpu", points_per_call=1,
                              quiet=True)
    assert np.all(on_gpu.done)
    _assert_close(on_gpu.values, on_cpu.values, len(data.x_train), len(data.x_test))


def test_training_on_the_gpu_keeps_swa_the_mean_of_its_iterates(tiny_config, tmp_path, gpu):
    """``train`` on the GPU: the file is written, every metric is finite, and the SWA average is the
    mean of the iterates it averages."""
    t = open_trajectory(train(tiny_config.replace(device=str(gpu)), tmp_path / "gpu.h5", quiet=True)["path"])
    iterates, averages = t.params("swa/iterates"), t.params("swa/average")
    for k in range(len(averages)):
        np.testing.assert_allclose(averages[k], iterates[: k + 1].astype(np.float64).mean(0), rtol=0, atol=2e-6)
    for run in t.runs:
        for name in ("train_loss", "test_loss", "train_err", "test_err"):
            assert np.all(np.isfinite(t.run(run).metrics[name])), (run, name)


def test_sharpness_on_the_gpu_equals_the_cpus(tiny_run, gpu):
    """Lanczos eigenvalues, the trace, the density's largest node and the epsilon-sharpness of a
    checkpoint, on the GPU and on the CPU, from the same starting vectors and probes."""
    traj = open_trajectory(tiny_run)
    spec = SharpnessSpec(top_k=2, probes=8, ascent_steps=3, tol=1e-6, density=True, density_runs=1, density_steps=8)
    got = compute_sharpness(traj, ["sgd"], spec, bn="stored", device=str(gpu)).results[0]
    ref = compute_sharpness(traj, ["sgd"], spec, bn="stored", device="cpu").results[0]
    np.testing.assert_allclose(got["eigenvalues"], ref["eigenvalues"], rtol=1e-3)
    np.testing.assert_allclose(got["trace"], ref["trace"], rtol=1e-3)
    np.testing.assert_allclose(got["epsilon_sharpness"], ref["epsilon_sharpness"], rtol=1e-2)
    np.testing.assert_allclose(np.nanmax(got["density_nodes"]), np.nanmax(ref["density_nodes"]), rtol=1e-3)


def test_live_sharpness_of_a_model_on_the_gpu_equals_the_cpus(tiny_run, gpu):
    """evaluate_sharpness of a module living on the GPU runs there (its device) with the CPU's numbers."""
    from landscape import evaluate_sharpness
    traj = open_trajectory(tiny_run)
    data, spec = rebuild_data(traj), SharpnessSpec(top_k=2, probes=8, ascent_steps=3, tol=1e-6)
    net = rebuild_model(traj, data)
    traj.layout.load(net, traj.checkpoint("sgd").params, traj.checkpoint("sgd").buffers)
    tensors = (data.x_train, data.y_train, data.x_test, data.y_test)
    ref = evaluate_sharpness(net, tensors, spec=spec, bn="stored").results[0]
    got = evaluate_sharpness(net.to(gpu), tensors, spec=spec, bn="stored").results[0]
    assert next(net.parameters()).device.type == gpu.type
    np.testing.assert_allclose(got["eigenvalues"], ref["eigenvalues"], rtol=1e-3)
    np.testing.assert_allclose(got["trace"], ref["trace"], rtol=1e-3)
    np.testing.assert_allclose(got["epsilon_sharpness"], ref["epsilon_sharpness"], rtol=1e-2)


def test_augmented_batches_on_the_gpu_are_the_cpus(gpu):
    """Random crops and flips drawn on the CPU (the run's data-order generator) and applied on the GPU."""
    from landscape.data import augment_batch
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    on_gpu = augment_batch(x.to(gpu), torch.Generator().manual_seed(0))
    assert on_gpu.device.type == gpu.type
    assert torch.equal(on_gpu.cpu(), augment_batch(x, torch.Generator().manual_seed(0)))


def test_recording_a_loop_on_the_gpu_keeps_its_weights_and_the_cpus_metrics(tmp_path, gpu):
    """A user's own loop on the GPU with the recorder: every row holds the weights the net had, and the
    metrics it evaluated there are those of the same weights on the CPU."""
    from _recording import DATA, MODEL, same_start
    from landscape.evaluate import evaluate_model
    from landscape.params import Layout
    from landscape.recorder import Recorder
    data, model, order = same_start()
    model, on_gpu, layout = model.to(gpu), data.to(gpu), Layout.of(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kept = []
    with Recorder(tmp_path / "gpu.h5", model=MODEL.name, model_kwargs=MODEL.kwargs, data=DATA.name,
                  data_options=DATA.options, evaluate=True) as rec:
        for epoch in range(3):
            for idx in torch.randperm(len(data.x_train), generator=order).split(32):
                idx = idx.to(gpu)
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(on_gpu.x_train[idx]), on_gpu.y_train[idx]).backward()
                opt.step()
            norms = [p.norm() for p in model.parameters()]  # a metric as a list of GPU tensors
            rec.record("sgd", model, epoch=epoch + 1, norms=norms)
            kept.append((layout.params_to_vector(model).cpu(), layout.buffers_to_vector(model).cpu()))
    traj = open_trajectory(tmp_path / "gpu.h5")
    for i, (params, buffers) in enumerate(kept):
        np.testing.assert_array_equal(traj.params("sgd")[i], params.numpy())
        np.testing.assert_array_equal(traj.buffers("sgd")[i], buffers.numpy())
    np.testing.assert_allclose(traj.run("sgd").metrics["norms"][-1], [float(n) for n in norms], rtol=1e-6)
    cpu_metrics = evaluate_model(layout.load(model.cpu(), *kept[-1]), data)
    _assert_close({k: traj.run("sgd").metrics[k][-1] for k in cpu_metrics}, cpu_metrics, len(data.x_train),
                  len(data.x_test))


def test_a_streamed_source_drawing_noise_on_the_gpu_repeats_it_on_every_pass(gpu):
    """A source that draws its noise on the GPU gives every pass the batches of a pass alone, two passes
    side by side (as the evaluator's threads read) included, and the caller's GPU random state is left
    as it was."""
    from landscape.data import StreamData
    x, y = torch.randn(64, 3, device=gpu), torch.randint(0, 2, (64,), device=gpu)

    def noisy():
        return ((x[i:i + 16] + torch.randn(16, 3, device=gpu), y[i:i + 16]) for i in range(0, 64, 16))
    data = StreamData(noisy, noisy)
    alone = [batch[0] for batch in data.batches("train")]
    torch.manual_seed(5)  # every device's generator
    caller_next = torch.rand(2, device=gpu)
    torch.manual_seed(5)
    a, b = data.batches("train"), data.batches("train")
    for expected in alone:
        assert torch.equal(next(a)[0], expected) and torch.equal(next(b)[0], expected)
    assert torch.equal(torch.rand(2, device=gpu), caller_next)
    assert not torch.equal(alone[0], x[:16])


def test_training_interrupted_on_cuda_goes_on_with_cuda_0(tiny_config, tmp_path, gpu, monkeypatch):
    """A run interrupted with ``--device cuda`` goes on with ``--device cuda:0``, the same GPU (it was
    refused as another configuration): the file records ``cuda:0``."""
    from landscape.train.loop import Context
    record, seen = Context.record, [0]

    def record_then_stop(self, run, *args, **kwargs):  # Ctrl-C in sgd's second epoch
        out = record(self, run, *args, **kwargs)
        seen[0] += run == "sgd"
        if seen[0] == 3:
            raise KeyboardInterrupt
        return out
    out = tmp_path / "cut.h5"
    with monkeypatch.context() as m:
        m.setattr(Context, "record", record_then_stop)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config.replace(device=gpu.type), out, quiet=True)
    assert out.with_name("cut.h5.partial").exists()
    indexed = f"{gpu.type}:0" if gpu.type == "cuda" else gpu.type
    train(tiny_config.replace(device=indexed), out, quiet=True)
    assert open_trajectory(out).config["device"] == indexed
