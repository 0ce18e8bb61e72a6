"""Benchmark: K points of a convolutional model as matrix products, against the evaluator's two paths.

The question (issue 14): can K points share large matrix products on a CPU, instead of the grouped
convolutions ``vmap`` makes of a model's convolutions? Workload: ``cnn1d-bn`` on MNIST-1D (4,000 train
/ 1,000 test samples), train and test loss and error at K points near a fresh initialization, BatchNorm
with its stored statistics (an evaluation pass; the recompute pass runs the same convolutions), batches
of 1,000 samples, one thread (as each of the evaluator's workers runs on a CPU). Contenders, interleaved,
the best of ``--repeats`` kept:

- **one point per call**: ``Evaluator`` called K times (its CPU path: oneDNN convolutions, 1-D ones run
  as 2-D on channels-last memory);
- **K points per call (vmap)**: ``Evaluator`` called once with K points (grouped convolutions);
- **unfold + matmul**: every convolution as an unfolded input times the weights. The first layer's
  input is the same at every point, so its K points are one matrix product (N * L, C_in * k) x
  (C_in * k, K * C_out); later layers are a batched product of K (N * L, C_in * k) x (C_in * k, C_out).
  BatchNorm and bias are one per-channel affine map. Rows of the unfolded input are contiguous slices of
  the channels-last activations (order (k, C_in)), so unfolding is one copy.

The script checks that the three agree (losses to 1e-5 relative, errors to one sample) and prints ms per
point. Usage::

    python benchmarks/conv_matmul.py --json benchmarks/conv_matmul-results.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from landscape.data import DataSpec, load_data  # noqa: E402
from landscape.evaluate import BatchNormPolicy, Evaluator  # noqa: E402
from landscape.models import ModelSpec, build_model  # noqa: E402
from landscape.params import Layout  # noqa: E402
from common import commit  # noqa: E402
from plane_cpu import machine, matmul_gflops  # noqa: E402

BATCH = 1000


def points(model, layout, K: int, seed: int = 0):
    """K points near the model's weights: (K, P) parameters and (K, B) buffers."""
    g = torch.Generator().manual_seed(seed)
    theta = layout.params_to_vector(model)
    params = theta + 0.05 * theta.abs().mean() * torch.randn(K, theta.numel(), generator=g)
    return params, layout.buffers_to_vector(model).expand(K, -1).clone()


class MatmulCNN:
    """``cnn1d-bn`` in evaluation mode at K points, every convolution a matrix product."""

    def __init__(self, model, layout, params, buffers):
        self.K = params.shape[0]
        p, b = layout.split_params(params), layout.split_buffers(buffers)       # name -> (K, ...)
        convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv1d)]
        bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm1d)]
        linear = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
        self.layers = []
        for (name, conv), bn in zip(convs, bns):
            w = p[f"{name}.weight"]                                                     # (K, C_out, C_in, k)
            eps = model.get_submodule(bn).eps
            scale = p[f"{bn}.weight"] * torch.rsqrt(b[f"{bn}.running_var"] + eps)       # (K, C_out)
            shift = p[f"{bn}.bias"] + (p[f"{name}.bias"] - b[f"{bn}.running_mean"]) * scale
            k_out, c_out, c_in, k = w.shape
            w = (w * scale[:, :, None, None]).permute(0, 3, 2, 1).reshape(k_out, k * c_in, c_out)  # (k, C_in) rows
            self.layers.append((w, shift[:, None, :], conv.kernel_size[0], conv.stride[0], conv.padding[0]))
        self.w_out = p[f"{linear}.weight"].transpose(1, 2)                          # (K, C * L, classes)
        self.b_out = p[f"{linear}.bias"][:, None, :]

    def logits(self, x):
        """(N, 1, L) inputs -> (K, N, classes)."""
        h = x.transpose(1, 2)                                                        # (N, L, C) rows
        for i, (w, shift, k, stride, pad) in enumerate(self.layers):
            cols = F.pad(h, (0, 0, pad, pad)).unfold(-2, k, stride).transpose(-1, -2)  # (.., N, L', k, C_in)
            n, length = cols.shape[-4], cols.shape[-3]
            if i == 0:                            # the same input at every point: one product
                a = cols.reshape(n * length, -1)
                y = (a @ w.transpose(0, 1).reshape(a.shape[1], -1)).view(n * length, self.K, -1).transpose(0, 1)
            else:
                y = torch.bmm(cols.reshape(self.K, n * length, -1), w)
            h = torch.relu_(y.add_(shift)).view(self.K, n, length, -1)
        h = h.transpose(2, 3).reshape(self.K, h.shape[1], -1)                        # Flatten's (C, L) order
        return torch.baddbmm(self.b_out, h, self.w_out)

    def __call__(self, data) -> dict:
        out = {}
        for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
            loss = torch.zeros(self.K, dtype=torch.float64)
            wrong = torch.zeros(self.K, dtype=torch.float64)
            for i in range(0, len(x), BATCH):
                z, t = self.logits(x[i:i + BATCH]), y[i:i + BATCH]
                loss += F.cross_entropy(z.transpose(1, 2), t.expand(self.K, -1), reduction="none").sum(1)
                wrong += (z.argmax(-1) != t).sum(1)
            out[f"{split}_loss"], out[f"{split}_err"] = (loss / len(x)).numpy(), (100 * wrong / len(x)).numpy()
        return out


def contenders(model, layout, data, params, buffers):
    ev = Evaluator(model, layout, data, bn=BatchNormPolicy("stored"), batch_size=BATCH)

    def one_per_call():
        rows = [ev(params[k:k + 1], buffers[k:k + 1]) for k in range(params.shape[0])]
        return {m: torch.tensor([r[m][0] for r in rows]).numpy() for m in rows[0]}

    return {"one point per call": one_per_call,
            "K points per call (vmap)": lambda: ev(params, buffers),
            "unfold + matmul": lambda: MatmulCNN(model, layout, params, buffers)(data)}


def check_agree(results: dict) -> None:
    ref = results["one point per call"]
    for name, r in results.items():
        for m in ref:
            if m.endswith("loss"):
                rel = abs(r[m] - ref[m]).max() / abs(ref[m]).max()
                assert rel < 1e-5, f"{name}: {m} differs by {rel:.1e}"
            else:  # percent; a logit tie broken otherwise by rounding may flip one sample
                assert abs(r[m] - ref[m]).max() <= 100.5 / 1000, f"{name}: {m} differs"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="the K to time")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = load_data(DataSpec("mnist1d"))
    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn1d-bn"), input_shape=tuple(data.x_train.shape[1:]), num_classes=10).eval()
    layout = Layout.of(model)
    record = {"machine": machine(), "commit": commit(), "matmul_gflops_1_thread": matmul_gflops(), "rows": []}
    print(f"{record['machine']['cpu']}, 1 thread, fp32 matmul {record['matmul_gflops_1_thread']:.0f} GFLOP/s")
    print(f"{'K':>3} " + "".join(f"{name:>28}" for name in contenders(model, layout, data, *points(model, layout, 1))))
    for K in args.points:
        runs = contenders(model, layout, data, *points(model, layout, K))
        check_agree({name: run() for name, run in runs.items()})            # also the untimed warm-up
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(args.repeats):
            for name, run in runs.items():
                t = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - t)
        ms = {name: 1e3 * s / K for name, s in best.items()}
        record["rows"].append({"K": K, "ms_per_point": ms})
        print(f"{K:>3} " + "".join(f"{v:>25.1f} ms" for v in ms.values()))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
