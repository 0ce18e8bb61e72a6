"""Train every method with the default MNIST-1D recipe (seed 0) and print a markdown table of final
test errors and wall times, with the machine it ran on.

Each method is trained on its own (one ``landscape.train.train`` call, one trajectory file), so each
wall time is that method's alone: SGD and SWA are trained separately even though ``landscape train``
can record both in one file. Run it on a quiet machine; timings under contention mean little.

    .venv/bin/python benchmarks/methods.py                  # the README table (about 2 minutes on 2 cores)
    .venv/bin/python benchmarks/methods.py --threads 2      # torch threads per method (default 1, as train's)
    .venv/bin/python benchmarks/methods.py --quick          # a few epochs, to check that it runs
    .venv/bin/python benchmarks/methods.py --json out.json  # also write the numbers
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from landscape.config import TrainConfig  # noqa: E402
from landscape.store import open_trajectory  # noqa: E402
from landscape.train import train  # noqa: E402
from common import cpu_name  # noqa: E402

# method -> [(label, run whose last row is reported)]
ROWS = {
    "sgd": [("SGD", "sgd")],
    "swa": [("SWA", "swa/average")],
    "swap": [("SWAP (average of 4 workers)", "swap/average")],
    "lookahead": [("Lookahead (SGD inner)", "lookahead/slow")],
    "lookahead-adam": [("Lookahead (Adam inner)", "lookahead-adam/slow")],
    "grafting": [("Filter Grafting, net 0 (lr x0.5)", "grafting/net0"),
                 ("Filter Grafting, net 1 (lr x1)", "grafting/net1"),
                 ("no-grafting baseline, net 0 (lr x0.5)", "grafting/baseline0"),
                 ("no-grafting baseline, net 1 (lr x1)", "grafting/baseline1")],
}


def machine() -> str:
    return (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"Python {platform.python_version()}")


def details(t, method: str) -> str:
    if method == "swa":
        return f"{int(t.run('swa/average').metrics['n_averaged'][-1])} epochs averaged"
    if method == "swap":
        a = t.run("swap/phase1").attrs
        workers = sorted(r for r in t.runs if r.startswith("swap/worker"))
        errs = [float(t.run(w).metrics["test_err"][-1]) for w in workers]
        return (f"phase 1: {a['epochs']} epochs to {a['train_accuracy']:.1f}% train accuracy; workers "
                + ", ".join(f"{e:.2f}" for e in errs) + " %")
    return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(ROWS), help="comma-separated methods")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each method (TrainConfig.threads)")
    p.add_argument("--quick", action="store_true", help="a few epochs only, to check that the script runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)  # what machine() reports; training sets it from the config
    base = TrainConfig(seed=args.seed, device="cpu", threads=args.threads)
    if args.quick:
        base = base.replace(epochs=4, swa_start=3, swap_phase1_epochs=2, swap_phase2_epochs=1)
    results = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the SWAP threshold warning of --quick
        # warm-up: the first optimizer imports torch._dynamo (a second or two), and the first load of
        # the dataset may generate its cache; neither is charged to the first method
        train(base.replace(methods=("sgd",), epochs=1), Path(tmp) / "warmup.h5", quiet=True)
        for method in args.methods.split(","):
            cfg = base.replace(methods=(method,))
            summary = train(cfg, Path(tmp) / f"{method}.h5", quiet=True)
            t = open_trajectory(summary["path"])
            for k, (label, run) in enumerate(ROWS[method]):
                results.append({"method": method, "label": label, "run": run,
                                "test_err": float(t.run(run).metrics["test_err"][-1]),
                                "seconds": summary["seconds"] if k == 0 else None,
                                "details": details(t, method) if k == 0 else ""})
            print(f"{method}: {summary['seconds']:.1f} s", file=sys.stderr, flush=True)
    print(f"Default MNIST-1D recipe (cnn1d), seed {args.seed}{' (--quick)' if args.quick else ''}; "
          f"{machine()}\n")
    print("| method | run | final test error | wall time |")
    print("|---|---|---|---|")
    for r in results:
        secs = f"{r['seconds']:.1f} s" if r["seconds"] is not None else "(same run)"
        note = f" ({r['details']})" if r["details"] else ""
        print(f"| {r['label']} | `{r['run']}` | {r['test_err']:.2f} %{note} | {secs} |")
    total = sum(r["seconds"] for r in results if r["seconds"] is not None)
    print(f"\nTotal training time: {total:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "seed": args.seed, "quick": args.quick,
                                               "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
