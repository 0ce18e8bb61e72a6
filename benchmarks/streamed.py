"""Benchmark: peak memory and time of a plane over a streamed dataset as the dataset grows, and the
in-memory fast path on the same data.

Each measurement runs in a fresh Python process (so one peak does not hide another) that builds a small
BatchNorm MLP, a random filter-normalized plane through its weights, and evaluates the plane with
BatchNorm recompute and train and test loss and error at every point:

- ``stream``: the data come from a function that generates batch b of a split from a generator seeded
  with b, so the dataset never exists in memory as a whole (as with a loader over files);
- ``memory``: the same samples generated up front as tensors (the fast path).

The peak resident memory of the process (``ru_maxrss``; also before the evaluation starts, with the
model, the plane and, in memory mode, the data built) and the seconds per grid point are reported.
With ``--baseline DIR`` the memory mode also runs with the library found in DIR (e.g. an export of an
earlier commit), and a speed test of the in-memory batched evaluator at K = 1, 8 and 32 points per
call runs with both, interleaved: the fast path must keep its speed.

Usage::

    python benchmarks/streamed.py                                   # sizes 10k, 40k, 160k
    python benchmarks/streamed.py --sizes 2000 8000 --grid 2 2     # a quick run
    python benchmarks/streamed.py --json benchmarks/streamed-results.json --baseline /tmp/base
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
import time
from pathlib import Path

from common import commit, cpu_name

ROOT = Path(__file__).resolve().parents[1]
FEATURES, CLASSES, BATCH = 128, 10, 1000


def batch(split: str, b: int, n: int):
    """Batch ``b`` of a split of ``n`` samples: Gaussian class clusters, generated from a seed."""
    import torch
    g = torch.Generator().manual_seed((0 if split == "train" else 1) * 10 ** 9 + b)
    size = min(BATCH, n - b * BATCH)
    y = torch.randint(0, CLASSES, (size,), generator=g)
    centers = torch.Generator().manual_seed(7)
    x = torch.randn(CLASSES, FEATURES, generator=centers)[y] + 2.0 * torch.randn(size, FEATURES, generator=g)
    return x, y


def materialize(batches, n: int) -> tuple:
    """The batches' samples as two tensors, filled in place (no transient second copy)."""
    import torch
    x, y, i = torch.empty(n, FEATURES), torch.empty(n, dtype=torch.long), 0
    for xb, yb in batches:
        x[i:i + len(xb)], y[i:i + len(xb)] = xb, yb
        i += len(xb)
    return x, y


def one(mode: str, n: int, grid) -> dict:
    """One measurement in this process: the plane over ``n`` training and ``n // 4`` test samples."""
    import torch
    from torch import nn

    import landscape as ls
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(FEATURES, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, CLASSES))
    sizes = {"train": n, "test": n // 4}
    source = {s: (lambda s=s, m=m: (batch(s, b, m) for b in range((m + BATCH - 1) // BATCH))) for s, m in sizes.items()}
    if mode == "stream":
        data = (source["train"], source["test"])
    else:
        data = tuple(t for s in ("train", "test") for t in materialize(source[s](), sizes[s]))
    plane = ls.Plane.random(net, seed=0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    # (in memory: BatchNorm batches of BATCH, as the source's own batches are when streamed)
    surf = ls.evaluate_surface(net, plane, data, grid, bn="recompute", batch_size=BATCH, points_per_call=1,
                               **({} if mode == "stream" else {"bn_batch_size": BATCH}))
    seconds = time.perf_counter() - start
    return {"mode": mode, "train_samples": n, "test_samples": n // 4, "points": int(surf.done.sum()),
            "seconds": seconds, "seconds_per_point": seconds / surf.done.sum(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mb": before,
            "test_err_mean": float(surf.values["test_err"].mean())}


def speed(points=(1, 8, 32), repeats: int = 7) -> dict:
    """Milliseconds per point of the in-memory batched evaluator at K points per call (an MLP with
    BatchNorm recompute, 4,000 train / 1,000 test samples, one thread), best of ``repeats`` calls."""
    import torch
    from torch import nn

    from landscape.data import as_data
    from landscape.evaluate import BatchNormPolicy, Evaluator
    from landscape.params import Layout
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = nn.Sequential(nn.Linear(40, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    x, y = torch.randn(5000, 40), torch.randint(0, 10, (5000,))
    layout = Layout.of(net)
    ev = Evaluator(net, layout, as_data((x[:4000], y[:4000], x[4000:], y[4000:])),
                   BatchNormPolicy("recompute", batch_size=500), batch_size=1000)
    out = {}
    for k in points:
        w = layout.params_to_vector(net)[None] + 0.1 * torch.randn(k, layout.num_params)
        b = layout.buffers_to_vector(net)[None].expand(k, -1).clone()
        ev(w, b)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            ev(w, b)
            best = min(best, time.perf_counter() - t)
        out[str(k)] = 1000 * best / k
    return out


def measure(mode: str, n: int, grid, library: Path = ROOT) -> dict:
    env = dict(os.environ, PYTHONPATH=str(library))
    one_args = ["--speed"] if mode == "speed" else ["--one", mode, str(n), "--grid", *map(str, grid)]
    r = subprocess.run([sys.executable, __file__, *one_args],
                       capture_output=True, text=True, env=env, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[10_000, 40_000, 160_000])
    p.add_argument("--grid", nargs=2, type=int, default=[3, 3])
    p.add_argument("--baseline", type=Path, help="a folder holding an earlier landscape package (memory mode)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--speed-rounds", type=int, default=3, help="interleaved rounds of the K-points speed test")
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--speed", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one or args.speed:
        print(json.dumps(speed() if args.speed else one(args.one[0], int(args.one[1]), tuple(args.grid))))
        return
    speeds = {"this": [], "baseline": []}
    for _ in range(args.speed_rounds):  # interleaved, so that load from other processes hits both alike
        for name, lib in (("this", ROOT), ("baseline", args.baseline)):
            if lib is not None:
                speeds[name].append(measure("speed", 0, args.grid, lib))
                print(name, json.dumps(speeds[name][-1]), flush=True)
    best = {name: {k: min(r[k] for r in runs) for k in runs[0]} for name, runs in speeds.items() if runs}
    rows = []
    for n in args.sizes:
        for mode in ("stream", "memory"):
            rows.append(measure(mode, n, args.grid))
            print(json.dumps(rows[-1]), flush=True)
        if args.baseline:
            rows.append(dict(measure("memory", n, args.grid, args.baseline), mode="memory (baseline)"))
            print(json.dumps(rows[-1]), flush=True)
    for n in args.sizes:  # the two modes read the same samples: the same values
        same = {r["mode"]: r["test_err_mean"] for r in rows if r["train_samples"] == n}
        assert max(same.values()) - min(same.values()) < 1e-9, same
    if args.json:
        import torch
        args.json.write_text(json.dumps({
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"), "commit": commit(),
            "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.platform()}",
            "torch": torch.__version__, "grid": args.grid, "rows": rows,
            "ms_per_point_at_k_best": best, "ms_per_point_at_k_runs": speeds}, indent=1))


if __name__ == "__main__":
    main()
