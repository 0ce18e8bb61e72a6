"""Show what a file holds: a trajectory's runs, checkpoint counts, final metrics and configuration; a
surface's grid, values and checkpoints; a sharpness file's numbers. Nothing recorded in the file is
imported."""
from __future__ import annotations

import json

import numpy as np

from landscape.errors import FileFormatError
from landscape.store import open_surface, open_trajectory
from landscape.store.surface import open_partial_surface
from landscape.store.trajectory import partial_info
from landscape.store.files import format_of
from landscape.store.sharpness import open_sharpness, read_progress

from ..common import print_json
from .sharpness import print_table

HELP = "show what a trajectory, surface or sharpness file holds"


def add_arguments(p) -> None:
    p.add_argument("file", help="trajectory, surface or sharpness file (.h5)")
    p.add_argument("--json", action="store_true", help="print everything as JSON")


def run(args) -> int:
    kind = format_of(args.file)
    partial = args.file.endswith(".partial")  # an interrupted run's: its last save, read under its lock
    progress = read_progress(args.file) if partial and kind is None else None
    if progress is not None:
        return _sharpness_progress(args.file, progress, args.json)
    if partial and kind not in ("landscape.surface", "landscape.trajectory", None):
        raise FileFormatError(f"{args.file} is the partial file of a {kind!r} file; info reads those of trajectories "
                              "and surfaces")
    if kind == "landscape.surface":
        return _surface(open_partial_surface(args.file) if partial else open_surface(args.file), args.json)
    if kind == "landscape.sharpness":
        return _sharpness(open_sharpness(args.file), args.json)
    if kind is not None and kind != "landscape.trajectory":  # (None: unreadable, named by open_trajectory)
        what = f"a {kind!r} file" if kind else "not a file of landscape's (no format attribute)"
        raise FileFormatError(f"{args.file} is {what}; info reads trajectory, surface and sharpness files")
    info = partial_info(args.file) if partial else open_trajectory(args.file).info()
    if args.json:
        print_json(info)
        return 0
    print(f"{info['path']}: trajectory v{info['version']}, {info['num_params']:,} parameters, "
          f"{info['num_buffers']:,} buffer values, {_size(info['bytes'])}")
    if not info["complete"]:
        recorder = {"recorder": "Recorder", "lightning": "Lightning callback"}.get(info["config"].get("source"))
        print("incomplete: " + (f"the {recorder} did not finish; these rows are what it keeps and goes on from with "
                                "resume=True" if recorder else
                                "training did not finish; these rows are what the same train command keeps and goes on from"))
    # the task's first metric beside the loss (error % for classification), read from the file: nothing imported
    finals = [r["final"] for r in info["runs"].values()]
    metric = next((k[5:] for f in finals for k in f if k.startswith("test_") and k != "test_loss"
                   and not k.endswith("_se")), "err")
    unit = "%" if metric == "err" else ""
    print(f"{'run':<20}{'ckpts':>6}{'size':>10}{'epochs':>14}{'train loss':>12}{'train ' + metric:>11}"
          f"{'test loss':>11}{'test ' + metric:>10}")
    for name, r in info["runs"].items():
        f = r["final"]
        ep = f"{r['epochs'][0]:g}-{r['epochs'][1]:g}" if r["epochs"] else "-"
        cell = lambda k, fmt: format(f[k], fmt) if k in f else "-"  # noqa: E731
        value = ".2f" if unit else ".4f"
        print(f"{name:<20}{r['checkpoints']:>6}{_size(r['bytes']):>10}{ep:>14}{cell('train_loss', '.4f'):>12}"
              f"{cell('train_' + metric, value) + unit:>11}{cell('test_loss', '.4f'):>11}"
              f"{cell('test_' + metric, value) + unit:>10}")
    for name, r in info["runs"].items():
        if r["frozen"]:  # what directions and Hessians of its checkpoints leave alone
            print(f"{name}: {len(r['frozen'])} parameter tensors never trained (frozen): {', '.join(r['frozen'])}")
    print("config:", json.dumps(info["config"], sort_keys=True))
    return 0


def _surface(surface, as_json: bool) -> int:
    info = surface.info()
    if as_json:
        print_json(info)
        return 0
    grid = " x ".join(map(str, info["shape"]))
    axes = f"x {info['x'][0]:.4g} to {info['x'][1]:.4g}" + (
        f", y {info['y'][0]:.4g} to {info['y'][1]:.4g}" if info["y"] else "")
    print(f"{info['path']}: surface v{info['version']}, {info['kind']} of {grid} points ({info['done']:,} computed), "
          f"{axes}; task {info['task']}; from {info['trajectory'] or 'objects in memory'}")
    if info["done"] < np.prod(info["shape"]):
        print("incomplete: the command that made it computes the other points when run again")
    for name, span in info["values"].items():
        print(f"  {name:<16}" + (f"{span[0]:.4g} to {span[1]:.4g}" if span else "no finite value"))
    for name, coords in info["points"].items():
        print(f"  {name:<24} at ({', '.join(f'{c:.4g}' for c in coords)})")
    return 0


def _sharpness(sharp, as_json: bool) -> int:
    if as_json:
        print_json({"path": str(sharp.path), "trajectory": sharp.trajectory, "spec": sharp.spec,
                    "checkpoints": sharp.summary()})
        return 0
    source = sharp.trajectory if sharp.trajectory is not None else "live objects (evaluate_sharpness)"
    print(f"{sharp.path}: sharpness of {len(sharp.results)} checkpoint(s) of {source}; "
          f"epsilon = {sharp.epsilon:g} of each filter's norm")
    print_table(sharp)
    return 0


def _sharpness_progress(path: str, progress: dict, as_json: bool) -> int:
    """An interrupted ``landscape sharpness``'s partial: how many checkpoints' numbers it keeps (by
    their weights: the names are given to the command), and the settings."""
    kept = len(progress["results"])
    if as_json:
        print_json({"path": path, "complete": False, "kept": kept, "spec": progress.get("spec")})
        return 0
    print(f"{path}: an interrupted sharpness computation; it keeps the numbers of {kept} checkpoint"
          f"{'s' * (kept != 1)} (the same landscape sharpness command goes on from them)")
    print("spec:", json.dumps(progress.get("spec"), sort_keys=True))
    return 0


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
