"""GPU benchmark: points batched per call against one point at a time, on the same GPU, in one command.

Workloads (BatchNorm recomputed at every point, sample-weighted, batches of 128):

- ``cnn1d-bn`` on MNIST-1D (4000 / 1000 samples): a plane through three checkpoints of a short SGD run
  trained here;
- ``resnet20`` on CIFAR-shaped data, 50,000 / 10,000 images 3 x 32 x 32 (CIFAR-10 from ``--cifar-root``
  when given, else synthetic images with the same shapes: the speed does not depend on the pixels):
  a plane through the initialization and two short runs.

Contenders, on the same points, checked to agree: ``landscape.evaluate_surface`` with the points per
call it measures (batched: vmap over points), the same evaluator one point per call, and a per-point
loop in the style of dnn-mode-connectivity's plane script (weights copied in, a BatchNorm pass, a train
and a test pass, batches of 128, data already on the GPU). Printed: points/s, images/s (every point
passes the training set twice and the test set once), achieved TFLOP/s against the GPU's fp32 matrix
multiply measured in the same run, peak GPU memory, and the time a 51 x 51 resnet20 plane would take.
Everything runs in float32: TF32, torch's default for convolutions on Ampere and newer GPUs, is off.

Usage::

    python benchmarks/gpu.py                       # on CUDA; a few minutes on one H200-class GPU
    python benchmarks/gpu.py --json benchmarks/gpu-results.json
    python benchmarks/gpu.py --smoke --device cpu  # tiny sizes: checks that the script runs (tests)
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from landscape import Plane, evaluate_surface  # noqa: E402
from landscape.data import Data, DataSpec, load_data  # noqa: E402
from landscape.device import resolve_device  # noqa: E402
from landscape.models import ModelSpec, build_model  # noqa: E402
from landscape.params import Layout  # noqa: E402
from plane_cpu import compare, flops_per_sample, machine, test, update_bn  # noqa: E402

BN_BATCH = 128


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device, n: int) -> float:
    """fp32 matrix multiply timed on ``device``: the rate the workloads are compared with."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e12


def cifar_shaped(root, n_train: int, n_test: int) -> Data:
    if root:
        return load_data(DataSpec("cifar10", {"root": root}))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_test, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    return Data(x[:n_train], y[:n_train], x[n_train:], y[n_train:], 10)


def short_runs(model, data, device, epochs: int, batch: int = 128) -> list:
    """Three checkpoints: the initialization and two short SGD runs from it with different seeds."""
    out = [copy.deepcopy(model)]
    for seed in (1, 2):
        net = copy.deepcopy(model).to(device).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for idx in torch.randperm(len(data.x_train), generator=g).split(batch):
                idx = idx.to(device)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(data.x_train[idx]), data.y_train[idx]).backward()
                opt.step()
        out.append(net)
    return out


def reference_loop(model, layout, plane, grid, data, flat) -> np.ndarray:
    """dnn-mode-connectivity's per-point structure: load the point, BatchNorm pass, train and test
    passes (loss and error), batches of 128 over tensors already on the GPU."""
    from landscape.geometry import buffers_at, weights_at
    model = copy.deepcopy(model)
    # batches sliced from the tensors on the GPU (a DataLoader would stack them sample by sample)
    train_loader = [(data.x_train[i:i + BN_BATCH], data.y_train[i:i + BN_BATCH]) for i in range(0, len(data.x_train), BN_BATCH)]
    test_loader = [(data.x_test[i:i + BN_BATCH], data.y_test[i:i + BN_BATCH]) for i in range(0, len(data.x_test), BN_BATCH)]
    out = np.zeros((4, len(flat)))
    for n, c in enumerate(plane.coefficients(grid, flat)):
        c = torch.as_tensor(c[None], device=data.x_train.device)
        layout.load(model, weights_at(plane, c)[0], buffers_at(plane, c)[0])
        update_bn(train_loader, model)
        out[0, n], out[1, n] = test(train_loader, model)
        out[2, n], out[3, n] = test(test_loader, model)
    return out


def run_workload(name, model, data, device, shape, ref_points, plane_51, mm):
    layout = Layout.of(model)
    a, b, c = short_runs(model, data, device, epochs=1)
    plane = Plane.through(a, b, c, names=("init", "run1", "run2")).to(device)
    images = 2 * len(data.x_train) + len(data.x_test)
    flops = flops_per_sample(model.cpu(), Data(data.x_train[:100].cpu(), data.y_train[:100].cpu(),
                                               data.x_test[:10].cpu(), data.y_test[:10].cpu(), 10)) * images
    model = model.to(device)
    result = {"model": name, "grid": list(shape), "train": len(data.x_train), "test": len(data.x_test),
              "images_per_point": images, "tflop_per_point": flops / 1e12, "contenders": {}}
    print(f"\n{name}: {len(data.x_train)} / {len(data.x_test)} samples, {flops / 1e9:.2f} GFLOP per point", flush=True)
    points = int(np.prod(shape))
    runs = {}
    for label, k in (("batched (measured K)", None), ("one point per call", 1)):
        evaluate_surface(model, plane, data, (2, 2), bn="recompute", batch_size=BN_BATCH, points_per_call=k or 2,
                         device=device)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t = time.perf_counter()
        surf = evaluate_surface(model, plane, data, shape if k is None else (1, ref_points), bn="recompute",
                                batch_size=BN_BATCH, points_per_call=k, device=device)
        sync(device)
        n = points if k is None else ref_points
        runs[label] = surf
        result["contenders"][label] = {"points": n, "seconds": time.perf_counter() - t,
                                       "points_per_call": surf.points_per_call,
                                       "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2 ** 30
                                                           if device.type == "cuda" else None)}
    flat = np.arange(ref_points)
    sync(device)
    t = time.perf_counter()
    ref = reference_loop(model, layout, plane, plane.default_grid((1, ref_points)), data, flat)
    sync(device)
    result["contenders"]["dnn-mode-connectivity style loop"] = {"points": ref_points,
                                                                "seconds": time.perf_counter() - t}
    one = runs["one point per call"].values
    result["agreement"] = compare({k: v.reshape(-1) for k, v in one.items()}, ref.reshape(4, -1))
    for label, r in result["contenders"].items():
        r["points_per_s"] = r["points"] / r["seconds"]
        r["images_per_s"] = r["points_per_s"] * images
        r["tflops"] = r["points_per_s"] * flops / 1e12
        r["share_of_matmul"] = r["tflops"] / mm
        print(f"  {label:<34} {r['points_per_s']:9.2f} points/s {r['images_per_s'] / 1e6:9.2f} M images/s "
              f"{r['tflops']:7.2f} TFLOP/s ({100 * r['share_of_matmul']:.0f} % of fp32 matmul)"
              + (f", K = {r['points_per_call']}" if r.get("points_per_call") else "")
              + (f", peak {r['peak_memory_gib']:.1f} GiB" if r.get("peak_memory_gib") else ""), flush=True)
    best = result["contenders"]["batched (measured K)"]
    result["batching_speedup"] = best["points_per_s"] / result["contenders"]["one point per call"]["points_per_s"]
    result["speedup_over_reference_loop"] = (best["points_per_s"]
                                             / result["contenders"]["dnn-mode-connectivity style loop"]["points_per_s"])
    if plane_51:
        result["plane_51x51_minutes"] = 51 * 51 / best["points_per_s"] / 60
    print(f"  batching: {result['batching_speedup']:.1f}x one point per call, "
          f"{result['speedup_over_reference_loop']:.1f}x the reference loop"
          + (f"; a 51 x 51 plane: {result['plane_51x51_minutes']:.1f} min" if plane_51 else ""), flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda[:N] (or cpu, for --smoke)")
    p.add_argument("--cifar-root", default=None, help="CIFAR-10 python folder; default: synthetic CIFAR-shaped data")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check that the script runs")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    info = machine()
    # float32 throughout, the workloads as the matrix multiply they are compared with: TF32 (torch's default
    # for convolutions on Ampere and newer) would round their inputs to 10 mantissa bits and run faster
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    info["tf32"] = False
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    mm = matmul_tflops(device, 512 if args.smoke else 8192)
    info["matmul_fp32_tflops"] = mm
    print(json.dumps(info), f"\nfp32 matmul: {mm:.1f} TFLOP/s", flush=True)
    torch.manual_seed(0)
    mnist = load_data(DataSpec("synthetic", {"n_train": 300, "n_test": 100, "shape": [1, 40], "classes": 10})
                      if args.smoke else DataSpec("mnist1d"), device)
    cifar = cifar_shaped(args.cifar_root, *((200, 50) if args.smoke else (50_000, 10_000))).to(device)
    results = [
        run_workload("cnn1d-bn", build_model(ModelSpec("cnn1d-bn"), mnist.input_shape, 10), mnist, device,
                     (4, 4) if args.smoke else (21, 21), 2 if args.smoke else 21, False, mm),
        run_workload("resnet20", build_model(ModelSpec("resnet20"), cifar.input_shape, 10), cifar, device,
                     (2, 3) if args.smoke else (8, 8), 2 if args.smoke else 4, True, mm),
    ]
    ok = all(r["agreement"]["max_rel_loss_diff"] < 1e-3 and r["agreement"]["max_err_diff_percent"] <= 0.1
             for r in results)
    print("\nresults agree" if ok else "\nRESULTS DIFFER", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
