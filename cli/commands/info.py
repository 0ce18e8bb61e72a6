"""Show what a trajectory file holds: its runs, checkpoint counts, final metrics and configuration."""
from __future__ import annotations

import json

from landscape.store import open_trajectory

from ..common import print_json

HELP = "show runs, checkpoints, metrics and configuration of a file"


def add_arguments(p) -> None:
    p.add_argument("file", help="trajectory file (.h5)")
    p.add_argument("--json", action="store_true", help="print everything as JSON")


def run(args) -> int:
    info = open_trajectory(args.file).info()
    if args.json:
        print_json(info)
        return 0
    print(f"{info['path']}: trajectory v{info['version']}, {info['num_params']:,} parameters, "
          f"{info['num_buffers']:,} buffer values, {_size(info['bytes'])}")
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
    print("config:", json.dumps(info["config"], sort_keys=True))
    return 0


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
