"""What `landscape plane` and `landscape line` share: evaluation options, running, reporting."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from landscape.dist import launch_rank
from landscape.errors import ConfigError
from landscape.geometry import checkpoint_file
from landscape.store import export_loss_landscape
from landscape.store.files import prepare_output, same_file
from landscape.surface import check_evaluation_options, compute_surface

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
    g.add_argument("--samples", type=int, default=None,
                   help="metric passes on a fixed random subset of this many samples of each split, with each "
                        "value's standard error over samples stored beside it (<value>_se); default: whole splits")
    g.add_argument("--samples-seed", type=int, default=0, help="which subset --samples draws")
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


def named_files(args, *names) -> list:
    """The trajectory file and any other file named by a checkpoint (``OTHER.h5:RUN:INDEX``) among
    ``names`` (strings, lists of them, or None): the inputs the output must not replace."""
    files, flat = [args.file], []
    for n in names:
        if isinstance(n, (list, tuple)):
            flat += [x for item in n for x in (item if isinstance(item, (list, tuple)) else [item])]
        elif n is not None:
            flat.append(n)
    return files + [f for f in map(checkpoint_file, flat) if f]


def check_outputs(args, inputs, rays: bool = False) -> None:
    """Refuse, before any file is opened or anything is computed, evaluation options no computation can
    use and outputs that cannot or must not be written (an input, an unwritable place, the export
    over the surface file)."""
    check_evaluation_options(args.batch_size, args.bn_batch_size, args.bn_samples, args.weight_decay,
                             args.points_per_call, args.samples)
    if args.bn in ("interpolate", "stored"):
        for dest, flag in (("bn_batch_size", "--bn-batch-size"), ("bn_samples", "--bn-samples")):
            if getattr(args, dest) is not None:
                raise ConfigError(f"{flag} applies only to --bn recompute (or auto), not --bn {args.bn}")
    if args.export_out is not None and not args.export:
        raise ConfigError("--export-out applies only to --export (give --export loss-landscape)")
    if rays and args.export:
        raise ConfigError("--export loss-landscape writes one line or one plane; rays have no such format")
    out = prepare_output(args.out, args.overwrite, inputs=inputs)
    exported = export_path(args)
    if exported is not None:
        if same_file(exported, out):
            raise ConfigError(f"--export-out {exported} is the surface file -o {out}; choose another path")
        prepare_output(exported, args.overwrite, inputs=inputs)


def export_path(args) -> Path | None:
    if not args.export:
        return None
    out = Path(args.out)
    return Path(args.export_out) if args.export_out else out.with_name(out.stem + ".loss-landscape.h5")


def run_surface(args, traj, geom, grid) -> int:
    """Compute, export, report (the outputs checked by :func:`check_outputs` first). SIGTERM is
    handled like Ctrl-C (cli.main), so a killed run stays resumable."""
    exported = export_path(args)
    start = time.perf_counter()
    surf = compute_surface(traj, geom, grid, bn=args.bn, out=args.out, overwrite=args.overwrite,
                           quiet=args.quiet, device=args.device, batch_size=args.batch_size,
                           bn_batch_size=args.bn_batch_size, bn_samples=args.bn_samples,
                           weight_decay=args.weight_decay, points_per_call=args.points_per_call,
                           samples=args.samples, seed=args.samples_seed)
    seconds = time.perf_counter() - start
    if surf is None or launch_rank() != 0:  # under torchrun, rank 0 reports
        return 0
    if exported is not None:
        export_loss_landscape(surf, exported, overwrite=args.overwrite, inputs=[traj.path])
    summary = summarize(surf, seconds)
    if not summary["minima"]:
        print(f"landscape: warning: every value in {surf.path} is NaN or infinite (the loss overflowed at every "
              "point); try a smaller range", file=sys.stderr)
    if exported is not None:
        summary["export"] = str(exported)
    if args.json:
        print_json(summary)
        return 0
    print(f"wrote {summary['path']}: {summary['kind']} {'x'.join(map(str, summary['shape']))} "
          f"({summary['points']} points) in {seconds:.1f} s")
    for name, m in summary["minima"].items():
        at = ", ".join(f"{c:.4g}" for c in m["at"])
        print(f"  {m['best'][:3]} {name:<11} {m['value']:.4g}{'%' if name.endswith('err') else ''} at ({at})")
    if exported is not None:
        print(f"  exported for loss-landscape: {exported}")
    return 0


def summarize(surf, seconds: float) -> dict:
    minima = {}
    for name, v in surf.values.items():
        if name.endswith("_se"):  # a value's standard error over samples has no best point
            continue
        if np.isfinite(v).any():  # the best value: the largest for a metric the task maximizes (an accuracy)
            largest = surf.maximized(name)
            idx = np.unravel_index((np.nanargmax if largest else np.nanargmin)(np.where(np.isfinite(v), v, np.nan)),
                                   v.shape)
            if surf.y is not None:
                at = [float(surf.x[idx[0]]), float(surf.y[idx[1]])]
            else:
                at = ([int(idx[0])] if surf.rays else []) + [float(surf.x[idx[-1]])]
            minima[name] = {"value": float(v[idx]), "at": at, "best": "maximum" if largest else "minimum"}
    return {"path": str(surf.path), "kind": surf.kind, "shape": list(surf.done.shape), "points": int(surf.done.size),
            "seconds": seconds, "minima": minima, "spec": surf.spec}
