"""Benchmark: how file size, memory and time grow with the model, the recipe, the grid and the data.

Every measurement runs in a fresh Python process, so that one peak (``VmHWM``) cannot hide another.
Models: ``cnn1d`` on MNIST-1D (5,210 parameters), ``resnet20`` (0.27 M) and ``vgg16`` (15.2 M) on
CIFAR-shaped synthetic data (3 x 32 x 32, 10 classes). Three parts:

- ``files``: ``landscape train`` with the demo's seven methods over a few epochs, recording thinned by
  model size as by default (``record_every`` 0): the file's size, its rows per run, the peak memory of
  training, then the peak memory of a PCA plane through the run with the most rows (read in a fresh
  process; streamed when its rows exceed 256 MB and streaming needs less memory).
- ``recipe``: the rows that the *default* recipe (150 epochs, every method) keeps on the full data
  sizes (MNIST-1D 4,000 samples; CIFAR 50,000, 782 steps an epoch), counted by training it for real
  with a two-weight MLP on data of the same sizes and the model's ``record_every`` (which rows are
  kept depends on epochs, steps, the methods and ``record_every``, not on the weights; SWAP's phase 1
  runs to its cap). The file size is those rows times the model's bytes per row.
- ``plane``: ``evaluate_surface`` of a random filter-normalized plane through a freshly initialized
  model (BatchNorm recompute for resnet20), train and test loss and error at every point, against the
  grid's points, the samples (train; test a quarter of it) and the model: wall time, seconds per point
  and peak memory.

Usage::

    python benchmarks/scale.py                         # every part (about an hour on 2 cores)
    python benchmarks/scale.py --parts plane --json benchmarks/scale-results.json
    python benchmarks/scale.py --smoke                 # tiny sizes, a minute
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common import commit, cpu_name

ROOT = Path(__file__).resolve().parents[1]
CIFAR = {"shape": [3, 32, 32], "classes": 10}
MODELS = {  # name -> data of the few-epoch files and of the planes
    "cnn1d": {"name": "mnist1d", "options": {}},
    "resnet20": {"name": "synthetic", "options": dict(CIFAR, n_train=256, n_test=64)},
    "vgg16": {"name": "synthetic", "options": dict(CIFAR, n_train=256, n_test=64)},
}
FULL_SIZES = {"cnn1d": [4000, 1000, [1, 40], 10],  # train, test, input shape, classes of the default recipe
              "resnet20": [50000, 10000, [3, 32, 32], 10], "vgg16": [50000, 10000, [3, 32, 32], 10]}
METHODS = ("sgd", "swa", "ema", "swap", "lookahead", "lookahead-adam", "grafting")


def peak_mb() -> float:
    """This process's peak resident memory: ``VmHWM`` (``ru_maxrss`` would carry the peak of the
    process that started it, which it keeps across ``exec``)."""
    try:
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def few_epochs(epochs: int) -> dict:
    """The default recipe over ``epochs`` epochs (SWA, SWAP and Lookahead's window scaled alike)."""
    return dict(epochs=epochs, swa_start=max(1, epochs * 2 // 3), swap_phase1_epochs=max(1, epochs // 2),
                swap_phase2_epochs=max(1, epochs // 4), swap_threshold=100.0)


# ---- the jobs, each in its own process ----------------------------------------------------------
def job_train(model: str, data: dict, recipe: dict, threads: int, record_every: int = 0) -> dict:
    from landscape import TrainConfig, open_trajectory
    from landscape.train import train
    model = model if isinstance(model, dict) else {"name": model}
    cfg = TrainConfig.from_dict(dict(recipe, model=model, data=data, methods=METHODS, threads=threads,
                                     record_every=record_every, device="cpu"))
    with tempfile.TemporaryDirectory(dir=os.environ.get("SCALE_TMP")) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SWAP's threshold warning
        before = peak_mb()
        start = time.perf_counter()
        path = train(cfg, Path(tmp) / "run.h5", quiet=True)["path"]
        seconds = time.perf_counter() - start
        traj = open_trajectory(path)
        info = traj.info()
        out = {"seconds": seconds, "peak_mb": peak_mb(), "peak_before_mb": before, "file_bytes": info["bytes"],
               "params": traj.layout.num_params, "leftovers": sorted(p.name for p in Path(tmp).iterdir()),
               "recorded_every": info["config"]["recorded_every"],
               "runs": {r: {"rows": v["checkpoints"], "bytes": v["bytes"]} for r, v in info["runs"].items()}}
        if record_every == 0:  # a real file: the PCA of its longest run, in a fresh process
            longest = max(out["runs"], key=lambda r: out["runs"][r]["rows"])
            out["pca"] = dict(run(["pca", path, longest]), run=longest)
    return out


def job_pca(path: str, run_name: str) -> dict:
    from landscape import Plane, open_trajectory
    traj = open_trajectory(path)
    before, start = peak_mb(), time.perf_counter()
    plane = Plane.pca(traj, run_name)
    return {"seconds": time.perf_counter() - start, "peak_mb": peak_mb(), "peak_before_mb": before,
            "explained": plane.derived["explained_variance_ratio"]}


def job_plane(model: str, data: dict, n_train: int, grid: int) -> dict:
    import torch
    from landscape import DataSpec, ModelSpec, Plane, build_model, evaluate_surface, load_data
    spec = DataSpec(data["name"], dict(data["options"], **({"n_train": n_train, "n_test": n_train // 4}
                                                            if data["name"] == "synthetic" else {})))
    d = load_data(spec, "cpu")  # MNIST-1D: its first n_train / n_train / 4 samples
    torch.manual_seed(0)
    net = build_model(ModelSpec(model), d.input_shape, d.num_classes)
    plane = Plane.random(net, seed=0)
    before, start = peak_mb(), time.perf_counter()
    surf = evaluate_surface(net, plane, (d.x_train[:n_train], d.y_train[:n_train], d.x_test[:n_train // 4],
                                         d.y_test[:n_train // 4]), grid=(grid, grid))
    seconds = time.perf_counter() - start
    finite = all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in surf.values.values())
    return {"seconds": seconds, "per_point": seconds / grid ** 2, "peak_mb": peak_mb(), "peak_before_mb": before,
            "params": sum(p.numel() for p in net.parameters()), "bn": surf.spec["bn"]["policy"], "finite": finite,
            "points_per_call": surf.points_per_call}


def run(job: list) -> dict:
    """``job`` in a fresh interpreter; its JSON answer."""
    done = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if done.returncode:
        raise SystemExit(f"job {job} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


JOBS = {"train": job_train, "pca": job_pca, "plane": job_plane}


# ---- the parts ----------------------------------------------------------------------------------
def part_files(models, epochs: int, threads: int) -> list:
    out = []
    for m in models:
        r = run(["train", m, MODELS[m], few_epochs(epochs), threads])
        out.append(dict(r, model=m, epochs=epochs))
        print(f"files {m}: {r['file_bytes'] / 1e6:.1f} MB, every {r['recorded_every']}, {r['seconds']:.0f} s, "
              f"peak {r['peak_mb']:.0f} MB, PCA peak {r['pca']['peak_mb']:.0f} MB", file=sys.stderr, flush=True)
    return out


def part_recipe(models, epochs: int, threads: int) -> list:
    """Rows of the default recipe, counted with a two-weight stand-in on data of the full size."""
    from landscape.models import ModelSpec, build_model
    from landscape.params import Layout
    from landscape.train import recorded_every
    out = []
    for m in models:
        n_train, n_test, shape, classes = FULL_SIZES[m]
        layout = Layout.of(build_model(ModelSpec(m), tuple(shape), classes))
        every = recorded_every(layout.num_params)
        stand_in = {"name": "synthetic", "options": {"n_train": n_train, "n_test": n_test, "shape": [1, 2],
                                                     "classes": 2}}
        # SWAP's phase 1 to its cap (threshold 100 %): the most rows it can keep
        recipe = {"swap_threshold": 100.0} if epochs == 150 else few_epochs(epochs)
        counted = run(["train", {"name": "mlp", "kwargs": {"hidden": [1]}}, stand_in, recipe, threads, every])
        row_bytes = 4 * (layout.num_params + layout.num_buffers)
        rows = {r: v["rows"] for r, v in counted["runs"].items()}
        out.append({"model": m, "params": layout.num_params, "record_every": every, "epochs": epochs,
                    "rows": rows, "row_bytes": row_bytes, "bytes": row_bytes * sum(rows.values()),
                    "seconds": counted["seconds"]})
        print(f"recipe {m}: {sum(rows.values())} rows x {row_bytes / 1e6:.2f} MB = "
              f"{out[-1]['bytes'] / 1e9:.2f} GB", file=sys.stderr, flush=True)
    return out


def part_plane(models, sizes: dict) -> list:
    out = []
    for m in models:
        for n_train, grid in sizes[m]:
            r = run(["plane", m, MODELS[m], n_train, grid])
            out.append(dict(r, model=m, n_train=n_train, grid=grid))
            print(f"plane {m} {grid}x{grid} on {n_train}: {r['seconds']:.1f} s, {r['per_point']:.3f} s/point, "
                  f"peak {r['peak_mb']:.0f} MB", file=sys.stderr, flush=True)
    return out


PLANE_SIZES = {"cnn1d": [(1000, 4), (1000, 8), (4000, 4), (4000, 8)],
               "resnet20": [(1000, 2), (1000, 4), (4000, 2)],
               "vgg16": [(1000, 2), (1000, 3), (4000, 2)]}
SMOKE_SIZES = {m: [(256, 2)] for m in MODELS}


def machine() -> str:
    import torch
    return (f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"commit {commit()}")


def checkpoint_share(files_result: dict) -> float:
    """The share of the file that its runs' datasets take (the rest: HDF5's own bookkeeping)."""
    return sum(v["bytes"] for v in files_result["runs"].values()) / files_result["file_bytes"]


def tables(results: dict) -> str:
    lines = []
    if results.get("files"):
        lines += ["| model | parameters | epochs | record every | file | of it, checkpoints | rows (largest runs) "
                  "| train peak | PCA run | PCA peak |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["files"]:
            top = sorted(r["runs"].items(), key=lambda kv: -kv[1]["bytes"])[:3]
            lines.append(f"| {r['model']} | {r['params']:,} | {r['epochs']} | {r['recorded_every']} | "
                         f"{r['file_bytes'] / 1e6:.1f} MB | {checkpoint_share(r):.1%} "
                         f"| {sum(v['rows'] for v in r['runs'].values())} ("
                         + ", ".join(f"{k} {v['rows']}" for k, v in top) + f") | {r['peak_mb']:.0f} MB | "
                         f"{r['pca']['run']} | {r['pca']['peak_mb']:.0f} MB |")
    if results.get("recipe"):
        lines += ["", "| model | parameters | record every | rows, default recipe | per row | file |",
                  "|---|---|---|---|---|---|"]
        for r in results["recipe"]:
            lines.append(f"| {r['model']} | {r['params']:,} | {r['record_every']} | {sum(r['rows'].values()):,} | "
                         f"{r['row_bytes'] / 1e6:.3f} MB | {r['bytes'] / 1e9:.2f} GB |")
    if results.get("plane"):
        lines += ["", "| model | parameters | train / test samples | grid | points per call | time | s / point | "
                  "peak memory |", "|---|---|---|---|---|---|---|---|"]
        for r in results["plane"]:
            lines.append(f"| {r['model']} | {r['params']:,} | {r['n_train']:,} / {r['n_train'] // 4:,} | "
                         f"{r['grid']} x {r['grid']} | {r['points_per_call']} | {r['seconds']:.1f} s | "
                         f"{r['per_point']:.3f} | {r['peak_mb']:.0f} MB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--parts", nargs="+", default=["files", "recipe", "plane"], choices=["files", "recipe", "plane"])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--epochs", type=int, default=3, help="epochs of the few-epoch files")
    p.add_argument("--recipe-epochs", type=int, default=150, help="epochs of the counted recipe (150: the default)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, measures nothing")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.job:
        name, *rest = json.loads(args.job)
        print(json.dumps(JOBS[name](*rest)))
        return 0
    sizes = SMOKE_SIZES if args.smoke else PLANE_SIZES
    if args.smoke:
        for m in MODELS:
            MODELS[m]["options"].update(n_train=64, n_test=32) if m != "cnn1d" else None
            FULL_SIZES[m][:2] = (256, 64)
    results = {"machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")}
    started = time.perf_counter()
    if "files" in args.parts:
        results["files"] = part_files(args.models, 2 if args.smoke else args.epochs, args.threads)
    if "recipe" in args.parts:
        results["recipe"] = part_recipe(args.models, 3 if args.smoke else args.recipe_epochs, args.threads)
    if "plane" in args.parts:
        results["plane"] = part_plane(args.models, sizes)
    results["seconds"] = time.perf_counter() - started
    print(f"{results['machine']}; {results['date']}\n\n{tables(results)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
