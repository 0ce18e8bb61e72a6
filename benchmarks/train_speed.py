"""The demo's training, three ways side by side in one run, on this machine:

- ``in turn, 2 threads``: every method after the other in one process with two torch threads (how
  ``landscape train`` ran before methods got a fixed thread count);
- ``in turn, 1 thread``: the same on one thread (``landscape train`` today, ``--processes 1``);
- ``apart``: one thread per method, N methods at once in their own processes (``--processes N``, the
  demo's way, N = the machine's cores).

It prints wall times, the speed-up of ``apart`` over both, and whether ``apart`` wrote the same weights
and metrics as ``in turn, 1 thread`` (it must) and as ``in turn, 2 threads`` (it need not).

``--against DIR...`` also times the demo's training as other versions of the library run it (each
``DIR`` holds one's ``landscape`` package, e.g. from ``git archive``), alternated with this one over
``--rounds`` rounds, each a fresh process: its own ``DemoConfig`` scaled the same way, trained the way
its demo trains (``processes`` = the cores where its ``train`` takes that, else in turn).

    .venv/bin/python benchmarks/train_speed.py                 # 30 epochs of every method (minutes)
    .venv/bin/python benchmarks/train_speed.py --epochs 6      # a quick look
    git archive 3c9de6e landscape | tar -x -C /tmp/base        # a version before, side by side
    .venv/bin/python benchmarks/train_speed.py --epochs 20 --against /tmp/base --rounds 3

To time a copy of this library other than the installed one, run its own copy of this script with
PYTHONPATH set to it (the methods trained apart import the library in a server process that does not
see sys.path changes).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from landscape.demo import DemoConfig  # noqa: E402
from landscape.train import train  # noqa: E402
from common import machine  # noqa: E402


def config(epochs: int):
    """The demo's methods and recipe over ``epochs`` epochs (SWA and SWAP's phases scaled alike)."""
    return DemoConfig().train.replace(epochs=epochs, swa_start=max(1, round(epochs * 2 / 3)), device="cpu",
                                      swap_phase1_epochs=max(1, epochs // 3), swap_phase2_epochs=max(1, epochs // 6))


# The demo's training as the library in sys.path[0] runs it; prints the seconds it took.
DEMO_WAY = """
import inspect, sys, time, warnings
sys.path.insert(0, sys.argv[1])
from landscape.demo import DemoConfig
from landscape.train import train
epochs, processes = int(sys.argv[3]), int(sys.argv[4])
cfg = DemoConfig().train.replace(epochs=epochs, swa_start=max(1, round(epochs * 2 / 3)), device="cpu",
                                 swap_phase1_epochs=max(1, epochs // 3), swap_phase2_epochs=max(1, epochs // 6))
kwargs = {"processes": processes} if "processes" in inspect.signature(train).parameters else {}
warnings.simplefilter("ignore")
start = time.perf_counter()
train(cfg, sys.argv[2], quiet=True, overwrite=True, **kwargs)
print(time.perf_counter() - start)
"""


def side_by_side(libraries: list, epochs: int, processes: int, rounds: int, tmp: str) -> list:
    """Seconds of the demo's training by each library (a folder holding a ``landscape`` package), the
    libraries alternated in every round, each run a fresh process."""
    times = {lib: [] for lib in libraries}
    for r in range(rounds):
        for lib in libraries:
            out = Path(tmp) / f"side-{r}.h5"
            # PYTHONPATH, not only sys.path: the children that train apart fork from a server that imports
            # the library before it reads the parent's sys.path (Python 3.11's forkserver)
            done = subprocess.run([sys.executable, "-c", DEMO_WAY, lib, str(out), str(epochs), str(processes)],
                                  capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=lib))
            times[lib].append(float(done.stdout.split()[-1]))
            out.unlink()
            print(f"round {r + 1}, {lib}: {times[lib][-1]:.1f} s", file=sys.stderr, flush=True)
    return [{"library": lib, "seconds": t} for lib, t in times.items()]


def contents(path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        f["runs"].visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def same(a, b) -> bool:
    a, b = contents(a), contents(b)
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--against", nargs="+", default=[], metavar="DIR",
                   help="other versions of the library (folders holding a landscape package) to time side by side")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the side-by-side comparison")
    args = p.parse_args(argv)
    base = config(args.epochs)
    ways = [("in turn, 2 threads", base.replace(threads=2), 1), ("in turn, 1 thread", base, 1),
            (f"apart, {args.processes} processes x 1 thread", base, args.processes)]
    results, paths = [], []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SWAP's threshold warning at few epochs
        train(base.replace(methods=("sgd",), epochs=1), Path(tmp) / "warmup.h5", quiet=True)  # imports, dataset cache
        for i, (label, cfg, processes) in enumerate(ways):
            start = time.perf_counter()
            paths.append(train(cfg, Path(tmp) / f"{i}.h5", quiet=True, processes=processes)["path"])
            results.append({"way": label, "seconds": time.perf_counter() - start})
            print(f"{label}: {results[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
        identical = {"apart = in turn, 1 thread": same(paths[2], paths[1]),
                     "apart = in turn, 2 threads": same(paths[2], paths[0])}
        this = str(Path(__file__).resolve().parents[1])
        versions = side_by_side([this, *args.against], args.epochs, args.processes, args.rounds, tmp) \
            if args.against else []
    print(f"The demo's training ({', '.join(base.methods)}), {args.epochs} epochs; {machine()}\n")
    print("| way | wall time | apart is faster by |")
    print("|---|---|---|")
    for r in results:
        print(f"| {r['way']} | {r['seconds']:.1f} s | {r['seconds'] / results[-1]['seconds']:.2f}x |")
    print("\n" + "; ".join(f"{k}: {'identical' if v else 'different'}" for k, v in identical.items()))
    if versions:
        print("\n| library | " + " | ".join(f"round {r + 1}" for r in range(args.rounds)) + " | this one faster by |")
        print("|---|" + "---|" * (args.rounds + 1))
        ours = versions[0]["seconds"]
        for v in versions:
            ratios = ", ".join(f"{t / o:.2f}x" for t, o in zip(v["seconds"], ours))
            print(f"| {v['library']} | " + " | ".join(f"{t:.1f} s" for t in v["seconds"]) + f" | {ratios} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "epochs": args.epochs, "results": results,
                                               "identical": identical, "side_by_side": versions}, indent=2))
    return 0 if identical["apart = in turn, 1 thread"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
