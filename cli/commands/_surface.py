"""What `landscape plane` and `landscape line` share: evaluation options, running, reporting."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np

from landscape.errors import ConfigError
from landscape.store import export_loss_landscape
from landscape.surface import compute_surface

from ..common import add_output_flags, print_json

EXPORTS = ("loss-landscape",)


def add_evaluation_arguments(p) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--bn", default="auto", choices=("auto", "recompute", "interpolate", "stored"),
                   help="BatchNorm statistics at each point: recompute them from the training set "
                        "(sample-weighted; auto = recompute for models with BatchNorm), interpolate the "
                        "checkpoints' buffers like the weights, or keep the origin's stored ones")
    g.add_argument("--bn-batch-size", type=int, default=None,
                   help="batch size of the BatchNorm recompute pass (results depend on it); default: the "
                        "trajectory's eval batch size")
    g.add_argument("--bn-samples", type=int, default=None,
                   help="recompute BatchNorm from a fixed random subset of this many training samples "
                        "(default: the whole training set)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="data batch of the metric passes (speed only); default: the trajectory's eval batch size")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="also store train_loss_l2 = train_loss + wd/2 |w|^2 (e.g. the run's weight decay)")
    g.add_argument("--points-per-call", type=int, default=None,
                   help="grid points evaluated per batched call (default: chosen by a short measurement)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    o = p.add_argument_group("output")
    o.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (and discard its unfinished .partial)")
    o.add_argument("--export", choices=EXPORTS, default=None,
                   help="also write a copy that tomgoldstein/loss-landscape's plot_2D.py / plot_1D.py read")
    o.add_argument("--export-out", default=None,
                   help="path of the exported copy (default: OUT with .loss-landscape.h5)")
    add_output_flags(o)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def export_path(args) -> Path | None:
    if not args.export:
        return None
    out = Path(args.out)
    return Path(args.export_out) if args.export_out else out.with_name(out.stem + ".loss-landscape.h5")


def run_surface(args, traj, geom, grid) -> int:
    """Compute, export, report. SIGTERM is handled like Ctrl-C, so a killed run stays resumable."""
    if getattr(geom, "rays", False) and args.export:
        raise ConfigError("--export loss-landscape writes one line or one plane; rays have no such format")
    exported = export_path(args)
    if exported is not None and exported.exists() and not args.overwrite:
        raise ConfigError(f"export {exported} already exists; pass --overwrite to replace it")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    start = time.perf_counter()
    try:
        surf = compute_surface(traj, geom, grid, bn=args.bn, out=args.out, overwrite=args.overwrite,
                               quiet=args.quiet, device=args.device, batch_size=args.batch_size,
                               bn_batch_size=args.bn_batch_size, bn_samples=args.bn_samples,
                               weight_decay=args.weight_decay, points_per_call=args.points_per_call)
    finally:
        signal.signal(signal.SIGTERM, previous)
    seconds = time.perf_counter() - start
    if surf is None or int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    if exported is not None:
        export_loss_landscape(surf, exported, overwrite=args.overwrite)
    summary = summarize(surf, seconds)
    if exported is not None:
        summary["export"] = str(exported)
    if args.json:
        print_json(summary)
        return 0
    print(f"wrote {summary['path']}: {summary['kind']} {'x'.join(map(str, summary['shape']))} "
          f"({summary['points']} points) in {seconds:.1f} s")
    for name, m in summary["minima"].items():
        at = ", ".join(f"{c:.4g}" for c in m["at"])
        print(f"  min {name:<11} {m['value']:.4g}{'%' if name.endswith('err') else ''} at ({at})")
    if exported is not None:
        print(f"  exported for loss-landscape: {exported}")
    return 0


def summarize(surf, seconds: float) -> dict:
    minima = {}
    for name, v in surf.values.items():
        if np.isfinite(v).any():
            idx = np.unravel_index(np.nanargmin(np.where(np.isfinite(v), v, np.nan)), v.shape)
            if surf.y is not None:
                at = [float(surf.x[idx[0]]), float(surf.y[idx[1]])]
            else:
                at = ([int(idx[0])] if surf.rays else []) + [float(surf.x[idx[-1]])]
            minima[name] = {"value": float(v[idx]), "at": at}
    return {"path": str(surf.path), "kind": surf.kind, "shape": list(surf.done.shape), "points": int(surf.done.size),
            "seconds": seconds, "minima": minima, "spec": surf.spec}
