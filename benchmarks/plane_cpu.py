"""Benchmark: a 21 x 21 plane through three MNIST-1D checkpoints, ours against two reference-style loops.

Workloads (the same points for every contender, results checked to agree):

- ``cnn1d-bn``, BatchNorm recompute: ours (``compute_surface``) against a loop in the style of
  dnn-mode-connectivity's ``plane.py`` (DataLoader with batch 128; at every point the weights are copied
  in, a BatchNorm update pass runs over the train loader, then a train pass and a test pass).
- ``cnn1d`` (no BatchNorm): ours against a loop in the style of tomgoldstein/loss-landscape's
  ``evaluation.eval_loss`` (DataLoader with batch 128, weights set point by point, ``model.eval()``),
  and against the dnn-mode-connectivity-style loop (which then has no BatchNorm pass).

Both reference loops evaluate the very weights ours does (``origin + x u + y v`` in float32), and the
BatchNorm pass uses the whole-set, sample-weighted statistics of ``landscape.bn`` with the same batches
(dnn-mode-connectivity's own ``update_bn`` averages per-batch variances, which is a different
quantity), so the numbers must agree to float rounding. The achieved GFLOP/s count the convolution and
linear FLOPs of every forward pass (torch.utils.flop_counter) and are compared with an fp32 matrix
multiply measured in the same run.

Ours is timed end to end: ``compute_surface`` reads the trajectory, builds data and model, projects
every checkpoint, measures the points per call on the grid's first points and evaluates the rest.
Every contender first runs once on two points (untimed) so that no one pays for one-time kernel set-up,
and the contenders are interleaved, so that load from other processes slows them alike; the best of
``--repeats`` timings is kept.

Usage::

    python benchmarks/plane_cpu.py                 # trains the two trajectories once (cached), then times
    python benchmarks/plane_cpu.py --grid 7 7      # a quick run
    python benchmarks/plane_cpu.py --json out.json
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from landscape.bn import MomentMerger, has_batchnorm  # noqa: E402
from landscape.config import TrainConfig  # noqa: E402
from landscape.data import cache_dir  # noqa: E402
from landscape.evaluate import BatchNormPolicy  # noqa: E402
from landscape.geometry import Plane, buffers_at, weights_at  # noqa: E402
from landscape.models import ModelSpec  # noqa: E402
from landscape.store import open_trajectory  # noqa: E402
import landscape.surface as surface_module  # noqa: E402
from landscape.surface import compute_surface  # noqa: E402
from landscape.rebuild import rebuild_data, rebuild_model  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402
from common import commit, cpu_name  # noqa: E402

THREE = ("sgd", "swa/average", "swa/iterates:0")
LOADER_BATCH = 128  # both reference repositories evaluate with batch 128
WORKLOADS = {"cnn1d-bn": ["dnn-mode-connectivity"],                     # model -> the reference loops it faces
             "cnn1d": ["loss-landscape", "dnn-mode-connectivity"]}
THREADS = "ours, thread workers"  # with --thread-workers: ours with its CPU workers as threads, not processes


# ----------------------------------------------------------------------------------------------
# the trajectories

def trajectory(model: str, workdir: Path, epochs: int) -> Path:
    """MNIST-1D, the default recipe (SGD and SWA), trained once and reused."""
    path = workdir / f"mnist1d-{model}-e{epochs}.h5"
    if not path.exists():
        from landscape.train import train
        cfg = TrainConfig(model=ModelSpec(model), epochs=epochs, swa_start=min(100, epochs * 2 // 3), device="cpu")
        print(f"training {model} ({epochs} epochs) -> {path}", flush=True)
        train(cfg, path, quiet=True)
    return path


# ----------------------------------------------------------------------------------------------
# reference-style loops

def loader(x, y):
    return DataLoader(TensorDataset(x, y), batch_size=LOADER_BATCH, shuffle=False)


def set_weights(model, layout, w):
    """loss-landscape's net_plotter.set_weights: parameter by parameter, ``p.data = ...``."""
    for p, (name, t) in zip(model.parameters(), layout.split_params(w).items()):
        p.data = t.clone()


def eval_loss(model, data_loader):
    """loss-landscape's evaluation.eval_loss (CrossEntropyLoss, model.eval(), float sums on the host)."""
    criterion = torch.nn.CrossEntropyLoss()
    correct, total_loss, total = 0, 0.0, 0
    model.eval()
    with torch.no_grad():
        for inputs, targets in data_loader:
            batch_size = inputs.size(0)
            total += batch_size
            outputs = model(inputs)
            loss = criterion(outputs, targets)
            total_loss += loss.item() * batch_size
            _, predicted = torch.max(outputs.data, 1)
            correct += predicted.eq(targets).sum().item()
    return total_loss / total, 100.0 - 100.0 * correct / total


def update_bn(data_loader, model):
    """dnn-mode-connectivity's utils.update_bn structure (reset, one train-mode pass over the train
    loader), with landscape's whole-set sample-weighted merge of the per-batch statistics."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not bns:
        return
    model.train()
    counts, mergers = {}, {bn: MomentMerger() for bn in bns}
    hooks = [bn.register_forward_pre_hook(lambda m, a: counts.__setitem__(m, a[0].numel() // a[0].shape[1]))
             for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = 1.0
    with torch.no_grad():
        for inputs, _ in data_loader:
            model(inputs)
            for bn in bns:
                mergers[bn].add(counts[bn], bn.running_mean, bn.running_var)
    for h in hooks:
        h.remove()
    for bn in bns:
        mean, var = mergers[bn].result()
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)


def test(data_loader, model):
    """dnn-mode-connectivity's utils.test."""
    criterion = torch.nn.CrossEntropyLoss()
    nll_sum, correct, n = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for inputs, target in data_loader:
            output = model(inputs)
            nll = criterion(output, target)
            nll_sum += nll.item() * inputs.size(0)
            pred = output.data.argmax(1, keepdim=True)
            correct += pred.eq(target.data.view_as(pred)).sum().item()
            n += inputs.size(0)
    return nll_sum / n, 100.0 - 100.0 * correct / n


def loss_landscape_loop(traj, plane, grid, data, model):
    model = copy.deepcopy(model)
    train_loader, test_loader = loader(data.x_train, data.y_train), loader(data.x_test, data.y_test)
    traj.layout.vector_to_buffers(plane.buffers, model)
    out = np.zeros((4,) + grid.shape)
    for flat in range(int(np.prod(grid.shape))):
        i, j = divmod(flat, grid.ny)
        w = weights_at(plane, torch.tensor([[grid.x[i], grid.y[j]]]))[0]
        set_weights(model, traj.layout, w)
        out[0, i, j], out[1, i, j] = eval_loss(model, train_loader)
        out[2, i, j], out[3, i, j] = eval_loss(model, test_loader)
    return out


def mode_connectivity_loop(traj, plane, grid, data, model):
    model = copy.deepcopy(model)
    train_loader, test_loader = loader(data.x_train, data.y_train), loader(data.x_test, data.y_test)
    out = np.zeros((4,) + grid.shape)
    for i, alpha in enumerate(grid.x):
        for j, beta in enumerate(grid.y):
            c = torch.tensor([[alpha, beta]])
            p = weights_at(plane, c)[0]
            traj.layout.load(model, p, buffers_at(plane, c)[0])
            update_bn(train_loader, model)
            out[0, i, j], out[1, i, j] = test(train_loader, model)
            out[2, i, j], out[3, i, j] = test(test_loader, model)
    return out


# ----------------------------------------------------------------------------------------------
# measurements

def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def flops_per_sample(model, data) -> float:
    model = copy.deepcopy(model).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(data.x_train[:100])
    return counter.get_total_flops() / 100


def compare(ours, ref) -> dict:
    """Largest relative loss difference and largest error difference (in samples)."""
    names = ("train_loss", "train_err", "test_loss", "test_err")
    loss = max(float(np.max(np.abs(ours[n] - ref[k]) / np.abs(ref[k]))) for k, n in ((0, names[0]), (2, names[2])))
    err = max(float(np.max(np.abs(ours[n] - ref[k]))) for k, n in ((1, names[1]), (3, names[3])))
    return {"max_rel_loss_diff": loss, "max_err_diff_percent": err}


def machine() -> dict:
    cpu = cpu_name()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "os": platform.platform(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"),
            "load_avg_1min_at_start": load}


_chosen = []


def _recording_choice(*args, **kwargs):
    """compute_surface's choice of points per call, recorded for the report."""
    k, used = _choose(*args, **kwargs)
    _chosen.append(k)
    return k, used


_choose = surface_module.choose_points_per_call
surface_module.choose_points_per_call = _recording_choice


def run_workload(model_name, workdir, epochs, shape, contenders, repeats):
    traj = open_trajectory(trajectory(model_name, workdir, epochs))
    data = rebuild_data(traj, "cpu")
    model = rebuild_model(traj, data)
    plane = Plane.through(traj, *THREE)
    grid = plane.default_grid(shape)
    points = int(np.prod(shape))
    bn = has_batchnorm(model)
    fps = flops_per_sample(model, data)
    samples = (2 if bn else 1) * len(data.x_train) + len(data.x_test)
    flops = fps * samples * points
    result = {"model": model_name, "grid": list(shape), "points": points, "bn": "recompute" if bn else "none",
              "flops_per_point": fps * samples, "contenders": {}}
    print(f"\n{model_name}: {points} points, {fps * samples / 1e9:.3f} GFLOP per point "
          f"({'BatchNorm recompute' if bn else 'no BatchNorm'})", flush=True)
    ours_values = None
    times = {}

    def ours(g, fork=True):
        forks = surface_module.can_fork
        if not fork:  # its workers as threads of this process, as on a system without fork
            surface_module.can_fork = lambda: False
        try:
            return compute_surface(traj, plane, g, bn=BatchNormPolicy("recompute", LOADER_BATCH), quiet=True,
                                   device="cpu")
        finally:
            surface_module.can_fork = forks

    few = plane.default_grid((1, 2))  # warm-up: every contender once, untimed
    ours(few)
    for name in contenders:
        if name == THREADS:
            ours(few, fork=False)
        else:
            (loss_landscape_loop if name == "loss-landscape" else mode_connectivity_loop)(traj, plane, few, data, model)
    _chosen.clear()
    for rep in range(repeats):  # interleaved, so that a busy machine slows every contender alike
        for name in ["ours"] + contenders:
            t = time.perf_counter()
            if name == "ours":
                ours_values = ours(grid).values
            elif name == THREADS:
                threads_values = ours(grid, fork=False).values
            elif name == "loss-landscape":
                ref = loss_landscape_loop(traj, plane, grid, data, model)
            else:
                ref = mode_connectivity_loop(traj, plane, grid, data, model)
            dt = time.perf_counter() - t
            times.setdefault(name, []).append(dt)
            if name == THREADS:  # the same evaluations in another process layout: the same values to the bit
                result["contenders"].setdefault(name, {})["identical"] = all(
                    np.array_equal(ours_values[m], threads_values[m]) for m in ours_values)
            elif name != "ours":
                result["contenders"].setdefault(name, {}).update(compare(ours_values, ref))
            print(f"  {name:<22} {dt:8.2f} s  {points / dt:8.1f} points/s", flush=True)
    for name, ts in times.items():
        best = min(ts)
        entry = result["contenders"].setdefault(name, {})
        entry.update(seconds=best, all_seconds=ts, points_per_s=points / best, gflops=flops / best / 1e9)
    result["points_per_call_chosen"] = list(_chosen)
    for name in contenders:
        result["contenders"][name]["speedup_of_ours"] = result["contenders"][name]["seconds"] / \
            result["contenders"]["ours"]["seconds"]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", nargs=2, type=int, default=[21, 21], metavar=("NX", "NY"))
    p.add_argument("--epochs", type=int, default=150, help="epochs of the trained trajectories")
    p.add_argument("--repeats", type=int, default=1, help="timings per contender (the best is kept)")
    p.add_argument("--workdir", default=str(cache_dir() / "bench"), help="where the trajectories are cached")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--thread-workers", action="store_true",
                   help="also time ours with its CPU workers as threads of one process (as where fork is unavailable)")
    p.add_argument("--workloads", default="cnn1d-bn,cnn1d",
                   help="which to time, comma-separated: cnn1d-bn (BatchNorm recompute), cnn1d (no BatchNorm)")
    args = p.parse_args(argv)
    workloads = args.workloads.split(",")
    if not workloads or any(w not in WORKLOADS for w in workloads):
        p.error(f"--workloads takes names from {', '.join(WORKLOADS)}, got {args.workloads!r}")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(json.dumps(info), flush=True)
    # train first, so that the timings below do not include it
    for m in workloads:
        trajectory(m, workdir, args.epochs)
    mm_before = matmul_gflops()
    results = [run_workload(m, workdir, args.epochs, tuple(args.grid), WORKLOADS[m] + [THREADS] * args.thread_workers,
                            args.repeats) for m in workloads]
    mm = max(mm_before, matmul_gflops())
    info["matmul_fp32_gflops"] = mm
    info["load_avg_1min_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    info["commit"] = commit()
    print(f"\nfp32 matmul (2048 x 2048): {mm:.1f} GFLOP/s")
    for r in results:
        print(f"{r['model']}: points per call chosen by ours: {r['points_per_call_chosen']}")
    print()
    print("| workload | contender | time (s) | points/s | GFLOP/s | % of matmul | ours faster by | agreement (max rel. loss diff, max error diff) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for name, c in r["contenders"].items():
            speed = f"{c['speedup_of_ours']:.1f}x" if "speedup_of_ours" in c else "-"
            agree = (f"{c['max_rel_loss_diff']:.1e}, {c['max_err_diff_percent']:.3f} %" if "max_rel_loss_diff" in c
                     else "identical" if c.get("identical") else "DIFFER" if "identical" in c else "-")
            print(f"| {r['model']} ({r['bn']}) | {name} | {c['seconds']:.2f} | {c['points_per_s']:.1f} | "
                  f"{c['gflops']:.1f} | {100 * c['gflops'] / mm:.1f} % | {speed} | {agree} |")
    ok = all(c.get("max_rel_loss_diff", 0) < 1e-4 and c.get("max_err_diff_percent", 0) <= 0.05 and c.get("identical", True)
             for r in results for c in r["contenders"].values())
    print("\nresults agree" if ok else "\nRESULTS DIFFER")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
