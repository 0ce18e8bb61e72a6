"""The file work of training, per model, in the pattern training writes: at every epoch's end a row
with the four metrics in each of three runs (as SWA writes them), the first rows since the last save
point (which reopened the file); inside the epoch, weights-only rows in a run of their own (Lookahead
writes 12.6 an epoch on MNIST-1D); then the epoch's save point (``save_progress`` with a resume state
the size of the model and its optimizer's momentum).

Rows go through ``TrajectoryWriter`` into a real ``NAME.partial`` in a temporary folder; the best of
``--repeats``.

    .venv/bin/python benchmarks/rows.py
    # the library before, in the same session: its own copy runs its own library
    git archive 740cd56 landscape | tar -x -C /tmp/base && mkdir -p /tmp/base/benchmarks
    cp benchmarks/rows.py benchmarks/common.py /tmp/base/benchmarks/ && python /tmp/base/benchmarks/rows.py
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from landscape.models import ModelSpec, build_model  # noqa: E402
from landscape.params import Layout  # noqa: E402
from landscape.store import TrajectoryWriter  # noqa: E402
from common import machine  # noqa: E402

MODELS = {"cnn1d": ((1, 40), 10), "resnet20": ((3, 32, 32), 10)}
RUNS = ("swa/iterates", "swa/average", "sgd")
METRICS = dict(train_loss=0.1, train_err=2.0, test_loss=0.2, test_err=3.0)


def time_rows(layout: Layout, folder: Path, epochs: int, inner: int = 12) -> dict:
    """Milliseconds per epoch-end row, per row inside an epoch and per save point, for one model."""
    params = torch.randn(layout.num_params)
    state = torch.randn(2 * layout.num_params).numpy().tobytes()  # weights and momentum, as torch.save has them
    w = TrajectoryWriter(folder / "t.h5", {"benchmark": "rows"}, layout, overwrite=True)
    try:
        times = {"epoch-end row": 0.0, "row inside an epoch": 0.0, "save point": 0.0}
        for i in range(epochs):
            start = time.perf_counter()
            for j in range(inner):
                w.append("fast", params, None, epoch=i + j / inner, step=i * inner + j)
            times["row inside an epoch"] += (time.perf_counter() - start) / inner
            start = time.perf_counter()
            for run in RUNS:
                w.append(run, params, None, epoch=float(i), step=i, **METRICS)
            times["epoch-end row"] += (time.perf_counter() - start) / len(RUNS)
            start = time.perf_counter()
            w.save_progress("benchmark", state)
            times["save point"] += time.perf_counter() - start
    finally:
        w.abort()
    return {k: 1000 * v / epochs for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=100, help="epochs (save points) per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (shape, classes) in MODELS.items():
            layout = Layout.of(build_model(ModelSpec(name), shape, classes))
            runs = [time_rows(layout, Path(tmp), args.epochs) for _ in range(args.repeats)]
            results[name] = {"parameters": layout.num_params, **{k: min(r[k] for r in runs) for k in runs[0]}}
    print(f"File work of training, best of {args.repeats} x {args.epochs} epochs; {machine()}\n")
    print("| model | parameters | epoch-end row (ms) | row inside an epoch (ms) | save point (ms) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['parameters']:,} | {r['epoch-end row']:.2f} | {r['row inside an epoch']:.2f} | "
              f"{r['save point']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "epochs": args.epochs, "repeats": args.repeats,
                                               "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
