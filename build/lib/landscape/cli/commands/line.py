"""Evaluate train/test loss and error (%) along a line in weight space and write a surface file.

Either the line through two checkpoints A and B, extended on both sides (default from -0.5 to 1.5
times the segment A -> B: the SWA paper's "SGD at the edge, SWA in the center" line; x is the distance
from A), or random rays from one checkpoint (--ray-from): R random unit directions, x the distance
travelled along each, values stored as (R, points). Killed and run again, it computes only the
missing points. Under torchrun the points are shared among the processes.

Examples:
  landscape line run.h5 sgd swa/average -o line.h5
  landscape line run.h5 sgd swa/average --range -1 2 --points 61 -o line.h5
  landscape line run.h5 --ray-from swa/average --rays 5 --seed 0 -o rays-swa.h5
"""
from __future__ import annotations

from landscape.errors import ConfigError
from landscape.geometry import Line
from landscape.surface import check_points, make_grid

from ..common import Given, add_trust_arguments, open_trusted_trajectory, refuse_inapplicable, seed_int
from ._surface import add_evaluation_arguments, check_outputs, named_files, run_surface

HELP = "evaluate loss and error along a line through two checkpoints, or along random rays"


def add_arguments(p) -> None:
    p.add_argument("file", help="trajectory file (.h5)")
    p.add_argument("checkpoints", nargs="*", metavar="CKPT", help="two checkpoints A B: the line through them")
    p.add_argument("-o", "--out", default="line.h5", help="surface file to write")
    p.add_argument("--range", nargs=2, type=float, default=[-0.5, 1.5], metavar=("LO", "HI"), action=Given,
                   help="A B: the part of the line, in units of the segment A -> B (0 = A, 1 = B)")
    p.add_argument("--points", type=int, default=Line.default_shape[0], help="points along the line (per ray)")
    r = p.add_argument_group("random rays (instead of two checkpoints)")
    r.add_argument("--ray-from", metavar="CKPT", help="the checkpoint the rays start from")
    r.add_argument("--rays", type=int, default=5, action=Given, help="number of random directions")
    r.add_argument("--seed", type=seed_int, default=0, action=Given, help="seed of the random directions")
    r.add_argument("--max-distance", type=float, default=None, action=Given,
                   help="how far along each ray (weight-space distance; default: half the norm of the "
                        "checkpoint's weights)")
    r.add_argument("--filter-norm", action="store_true",
                   help="filter-normalize the directions to the checkpoint's weights before making them unit")
    add_evaluation_arguments(p)
    add_trust_arguments(p)


def check_line(args) -> None:
    """Refuse a missing or doubled choice of line, options that do not apply to it and too many points,
    before any file is read."""
    if args.ray_from and args.checkpoints:
        raise ConfigError("give two checkpoints or --ray-from CKPT, not both")
    if not args.ray_from and len(args.checkpoints) != 2:
        raise ConfigError(f"a line needs two checkpoints A B (or --ray-from CKPT), got {len(args.checkpoints)}")
    refuse_inapplicable(args, {"range": "--range"}, not args.ray_from,
                        "a line through two checkpoints (rays run from 0 to --max-distance)")
    refuse_inapplicable(args, {"rays": "--rays", "seed": "--seed", "max_distance": "--max-distance",
                               "filter_norm": "--filter-norm"}, bool(args.ray_from), "--ray-from")
    if args.ray_from:
        if args.rays < 1:
            raise ConfigError(f"number of rays must be at least 1, got {args.rays}")
        check_points((args.rays, args.points), "rays x points")
    else:
        check_points((args.points,), "line")


def make_line(args, traj) -> Line:
    """The geometry the (already checked) options ask for."""
    if args.ray_from:
        return Line.random_rays(traj, args.ray_from, args.rays, args.seed, args.max_distance,
                                filter_norm=args.filter_norm, ignore="biasbn" if args.filter_norm else "none")
    return Line.through(traj, *args.checkpoints, range=tuple(args.range))


def run(args) -> int:
    check_line(args)
    check_outputs(args, named_files(args, args.checkpoints, args.ray_from), rays=bool(args.ray_from))
    traj = open_trusted_trajectory(args)
    line = make_line(args, traj)
    grid = make_grid(line, (args.points,))
    return run_surface(args, traj, line, grid)
