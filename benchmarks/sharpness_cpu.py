"""Benchmark: the Hessian numbers of one checkpoint, ours against a PyHessian-style loop.

Workload: the final SGD checkpoint of the MNIST-1D recipe (``cnn1d``, 5,210 parameters; trained once
and cached, as ``plane_cpu.py`` does), the mean train cross-entropy over its 4,000 training samples in
batches of 1,000, eval mode. Both contenders compute the same three things:

- the top 3 Hessian eigenvalues. PyHessian (Yao et al. 2020, ``hessian.eigenvalues``): power iteration
  with deflation, at most 100 products per eigenvalue, stopping when the Rayleigh quotient changes by
  less than 1e-3 (relative). Ours: one Lanczos run with full reorthogonalization, stopping when the
  three residual bounds fall below 1e-3 of the largest (``SharpnessSpec.tol``);
- the trace by Hutchinson's estimator from 50 Rademacher probes (PyHessian's ``trace`` with
  ``maxIter=50`` and no early stop, so that both draw 50);
- one 60-step stochastic Lanczos quadrature run (``density(iter=60, n_v=1)``).

The PyHessian-style loop is a port of ``pyhessian/hessian.py`` in its ``dataloader`` (full data set)
mode: lists of per-parameter tensors, and for every Hessian-vector product a forward, a backward with
``create_graph=True`` and a second backward per data batch. Ours is ``landscape.evaluate_sharpness`` on
the live model (its epsilon-sharpness ascent switched off: ``ascent_steps=0``), timed end to end.

The results are compared: the eigenvalues (relative difference), the traces (their difference in
standard errors of the difference: different probes, so they agree only statistically) and the density
runs' largest node against the top eigenvalue. Each contender runs with the machine's torch threads
(as a user gets it) and with one thread; contenders are interleaved round by round, so that load from
other processes slows them alike. ``--processes N`` adds ours on one thread in each of N processes
forked at once, each computing the checkpoint:
the wall time over N is what a checkpoint would cost if sharpness ran its work in processes instead of
threads.

Usage::

    python benchmarks/sharpness_cpu.py                         # trains the checkpoint once (cached)
    python benchmarks/sharpness_cpu.py --rounds 3 --json out.json
    python benchmarks/sharpness_cpu.py --rounds 3 --processes 2   # also: processes instead of threads
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from landscape.data import cache_dir  # noqa: E402
from landscape.geometry import load_checkpoint  # noqa: E402
from landscape.rebuild import rebuild_data, rebuild_model  # noqa: E402
from landscape.sharpness import SharpnessSpec, evaluate_sharpness  # noqa: E402
from landscape.store import open_trajectory  # noqa: E402
from common import commit  # noqa: E402
from plane_cpu import machine, trajectory  # noqa: E402

BATCH = 1000
TOP_N, PROBES, DENSITY_STEPS, TOL, MAX_ITER = 3, 50, 60, 1e-3, 100


# ----------------------------------------------------------------------------------------------
# PyHessian's algorithms, ported in its style (pyhessian/hessian.py and pyhessian/utils.py)

def group_product(xs, ys):
    return sum(torch.sum(x * y) for x, y in zip(xs, ys))


def group_add(params, update, alpha=1.0):
    for i, _ in enumerate(params):
        params[i].data.add_(update[i] * alpha)
    return params


def normalization(v):
    s = float(group_product(v, v)) ** 0.5
    return [vi / (s + 1e-6) for vi in v]


def orthnormal(w, v_list):
    for v in v_list:
        w = group_add(w, v, alpha=-group_product(w, v))
    return normalization(w)


class PyHessianStyle:
    """``pyhessian.hessian`` with a data loader: every product rebuilds the gradient graph batch by batch."""

    def __init__(self, model, loader):
        self.model, self.data = model.eval(), loader
        self.criterion = torch.nn.CrossEntropyLoss()
        self.params = [p for p in model.parameters() if p.requires_grad]
        # (its backward(create_graph=True) into .grad: torch warns of the reference cycle it makes)
        warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")

    def hv(self, v):
        num_data, THv = 0, [torch.zeros_like(p) for p in self.params]
        for inputs, targets in self.data:
            self.model.zero_grad()
            loss = self.criterion(self.model(inputs), targets)
            loss.backward(create_graph=True)
            gradsH = [p.grad + 0.0 for p in self.params]
            self.model.zero_grad()
            Hv = torch.autograd.grad(gradsH, self.params, grad_outputs=v, only_inputs=True, retain_graph=False)
            THv = [t + h * float(inputs.size(0)) + 0.0 for t, h in zip(THv, Hv)]
            num_data += inputs.size(0)
        THv = [t / float(num_data) for t in THv]
        return float(group_product(THv, v)), THv

    def eigenvalues(self, maxIter=MAX_ITER, tol=TOL, top_n=TOP_N):
        eigenvalues, eigenvectors, products = [], [], 0
        while len(eigenvalues) < top_n:
            eigenvalue = None
            v = normalization([torch.randn(p.size()) for p in self.params])
            for _ in range(maxIter):
                v = orthnormal(v, eigenvectors)
                tmp, Hv = self.hv(v)
                products += 1
                v = normalization(Hv)
                if eigenvalue is not None and abs(eigenvalue - tmp) / (abs(eigenvalue) + 1e-6) < tol:
                    break
                eigenvalue = tmp
            eigenvalues.append(eigenvalue)
            eigenvectors.append(v)
        return eigenvalues, products

    def trace(self, maxIter=PROBES):
        values = []
        for _ in range(maxIter):
            v = [torch.randint_like(p, high=2) for p in self.params]
            for v_i in v:
                v_i[v_i == 0] = -1
            _, Hv = self.hv(v)
            values.append(float(group_product(Hv, v)))
        return values

    def density(self, iter=DENSITY_STEPS):
        v = [torch.randint_like(p, high=2) for p in self.params]
        for v_i in v:
            v_i[v_i == 0] = -1
        v = normalization(v)
        v_list, alpha_list, beta_list = [v], [], []
        for i in range(iter):
            if i == 0:
                _, w_prime = self.hv(v)
                alpha = group_product(w_prime, v)
                alpha_list.append(float(alpha))
                w = group_add(w_prime, v, alpha=-alpha)
            else:
                beta = torch.sqrt(group_product(w, w))
                beta_list.append(float(beta))
                v = orthnormal(w, v_list)
                v_list.append(v)
                _, w_prime = self.hv(v)
                alpha = group_product(w_prime, v)
                alpha_list.append(float(alpha))
                w = group_add(group_add(w_prime, v, alpha=-alpha), v_list[-2], alpha=-beta)
        T = torch.diag(torch.tensor(alpha_list)) + torch.diag(torch.tensor(beta_list), 1) + \
            torch.diag(torch.tensor(beta_list), -1)
        return torch.linalg.eigvalsh(T).tolist()


def pyhessian_style(model, x, y, seed: int) -> dict:
    torch.manual_seed(seed)
    h = PyHessianStyle(model, DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False))
    t0 = time.perf_counter()
    eigenvalues, products = h.eigenvalues()
    t1 = time.perf_counter()
    probes = np.array(h.trace())
    t2 = time.perf_counter()
    nodes = h.density()
    t3 = time.perf_counter()
    return {"seconds": t3 - t0, "parts": {"eigenvalues": t1 - t0, "trace": t2 - t1, "density": t3 - t2},
            "eigenvalues": sorted(eigenvalues, reverse=True), "eigen_products": products,
            "trace": float(probes.mean()), "trace_stderr": float(probes.std(ddof=1) / math.sqrt(len(probes))),
            "density_top_node": max(nodes), "products": products + PROBES + DENSITY_STEPS}


def ours(model, x, y, seed: int) -> dict:
    spec = SharpnessSpec(top_k=TOP_N, iterations=MAX_ITER, tol=TOL, probes=PROBES, density=True, density_runs=1,
                         density_steps=DENSITY_STEPS, ascent_steps=0, seed=seed, batch_size=BATCH)
    t0 = time.perf_counter()
    r = evaluate_sharpness(model, (x, y, x[:BATCH], y[:BATCH]), spec=spec, bn="stored").results[0]
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "eigenvalues": [float(v) for v in r["eigenvalues"]],
            "eigen_products": int(r["lanczos_steps"]), "trace": float(r["trace"]),
            "trace_stderr": float(r["trace_stderr"]), "density_top_node": float(np.nanmax(r["density_nodes"])),
            "products": int(r["lanczos_steps"]) + PROBES + DENSITY_STEPS}


_FORKED = {}  # what the forked processes compute on: (model, x, y), set before they are forked


def _ours_on_one_thread(seed: int) -> dict:
    torch.set_num_threads(1)
    return ours(*_FORKED["args"], seed=seed)


def ours_in_processes(model, x, y, seed: int, processes: int) -> dict:
    """``ours`` on one thread in each of ``processes`` processes forked at once, one checkpoint each:
    the wall time per checkpoint."""
    _FORKED["args"] = (model, x, y)
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        results = pool.map(_ours_on_one_thread, [seed] * processes, chunksize=1)
    return dict(results[0], seconds=(time.perf_counter() - t0) / processes,
                seconds_each=[r["seconds"] for r in results])


def agreement(a: dict, b: dict) -> dict:
    ea, eb = np.array(a["eigenvalues"]), np.array(b["eigenvalues"])
    return {"eigenvalues_max_rel_diff": float(np.max(np.abs(ea - eb) / np.abs(eb))),
            "trace_diff_in_stderr": abs(a["trace"] - b["trace"]) / math.hypot(a["trace_stderr"], b["trace_stderr"]),
            "density_top_node_rel_to_top_eigenvalue": max(abs(a["density_top_node"] - ea[0]) / ea[0],
                                                          abs(b["density_top_node"] - eb[0]) / eb[0])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (every contender once a round)")
    p.add_argument("--epochs", type=int, default=150, help="epochs of the trained trajectory")
    p.add_argument("--workdir", default=str(cache_dir() / "bench"), help="where the trajectory is cached")
    p.add_argument("--processes", type=int, default=1,
                   help="also ours on one thread in each of this many processes at once (seconds per checkpoint)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    traj = open_trajectory(trajectory("cnn1d", workdir, args.epochs))
    data = rebuild_data(traj, "cpu")
    model = rebuild_model(traj, data)
    c = load_checkpoint(traj, "sgd")
    traj.layout.load(model, c.params, c.buffers)
    x, y = data.x_train, data.y_train
    info = machine()
    print(json.dumps(info), flush=True)
    threads = torch.get_num_threads()
    contenders = {f"ours, {threads} threads": (ours, threads), f"PyHessian style, {threads} threads": (pyhessian_style, threads),
                  "ours, 1 thread": (ours, 1), "PyHessian style, 1 thread": (pyhessian_style, 1)}
    if args.processes > 1:
        n = args.processes
        contenders[f"ours, 1 thread in each of {n} processes (per checkpoint)"] = (
            lambda *a, seed, n=n: ours_in_processes(*a, seed=seed, processes=n), 1)
    runs = {name: [] for name in contenders}
    for r in range(args.rounds):
        for name, (fn, n) in contenders.items():
            torch.set_num_threads(n)
            runs[name].append(fn(model, x, y, seed=r))
            print(f"round {r + 1}: {name}: {runs[name][-1]['seconds']:.1f} s", flush=True)
    torch.set_num_threads(threads)
    info.update(commit=commit(), load_avg_1min_at_end=os.getloadavg()[0])
    print("\n| contender | products (eigenvalues + trace + density) | time per round (s) | ours faster by |")
    print("|---|---|---|---|")
    for name, rs in runs.items():
        other = name.replace("PyHessian style", "ours")
        speed = ", ".join(f"{theirs['seconds'] / mine['seconds']:.1f}x" for mine, theirs in zip(runs[other], rs)) \
            if other != name else "-"
        times = " / ".join(f"{x['seconds']:.1f}" for x in rs)
        print(f"| {name} | {rs[0]['eigen_products']} + {PROBES} + {DENSITY_STEPS} | {times} | {speed} |")
    checks = [agreement(runs[f"ours, {n}"][r], runs[f"PyHessian style, {n}"][r])
              for n in (f"{threads} threads", "1 thread") for r in range(args.rounds)]
    first = runs[f"ours, {threads} threads"][0], runs[f"PyHessian style, {threads} threads"][0]
    print(f"\ntop eigenvalues, ours: {np.round(first[0]['eigenvalues'], 4).tolist()}, PyHessian style: "
          f"{np.round(first[1]['eigenvalues'], 4).tolist()}; traces {first[0]['trace']:.3f} +- "
          f"{first[0]['trace_stderr']:.3f} and {first[1]['trace']:.3f} +- {first[1]['trace_stderr']:.3f}")
    worst = {k: max(c[k] for c in checks) for k in checks[0]}
    print("worst agreement over the rounds: " + ", ".join(f"{k} {v:.2g}" for k, v in worst.items()))
    ok = worst["eigenvalues_max_rel_diff"] < 1e-2 and worst["trace_diff_in_stderr"] < 4 \
        and worst["density_top_node_rel_to_top_eigenvalue"] < 1e-2
    print("results agree" if ok else "RESULTS DIFFER")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "runs": runs, "agreement": checks}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
