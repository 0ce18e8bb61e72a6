"""Evaluate train/test loss and error (%) over a plane in weight space and write a surface file.

The plane is either the one through three checkpoints A B C (origin A, u along B - A, v from C - A
by Gram-Schmidt; coordinates are Euclidean distances; the default grid covers the three points with
a margin), or an origin plus two directions: checkpoint differences (--dir), random filter-normalized
directions (--random), the first two PCA components of a run (--pca), or the top two Hessian
eigenvectors (--hessian). Checkpoints are RUN or RUN:INDEX (e.g. sgd, swa/average, swa/iterates:0).
Every checkpoint of every run is projected into the plane. Killed and run again, it computes only
the missing points. Under torchrun the grid is shared among the processes.

Examples:
  landscape plane run.h5 sgd swa/average swa/iterates:0 -o plane.h5
  landscape plane run.h5 --origin swa/average --random --seed 0 -o rand.h5
  landscape plane run.h5 --pca sgd -o pca.h5
  landscape plane run.h5 --origin sgd --dir swa/average --dir swa/iterates:0 sgd:50 -o dirs.h5
"""
from __future__ import annotations

from landscape.errors import ConfigError
from landscape.geometry import Plane
from landscape.surface import check_points, make_grid

from ..common import Given, add_trust_arguments, given, open_trusted_trajectory, refuse_inapplicable, seed_int
from ._surface import add_evaluation_arguments, check_outputs, named_files, run_surface

HELP = "evaluate loss and error over a plane through checkpoints or directions"


def add_arguments(p) -> None:
    p.add_argument("file", help="trajectory file (.h5)")
    p.add_argument("checkpoints", nargs="*", metavar="CKPT",
                   help="three checkpoints A B C: the plane through them (origin A)")
    p.add_argument("-o", "--out", default="plane.h5", help="surface file to write")
    d = p.add_argument_group("origin and directions (instead of three checkpoints)")
    d.add_argument("--origin", metavar="CKPT", help="the plane's origin (--dir, --random, --hessian; --pca: "
                                                    "default the run's last checkpoint)")
    d.add_argument("--dir", nargs="+", action="append", metavar="CKPT",
                   help="END [START]: a direction END - START (START defaults to the origin); give it twice")
    d.add_argument("--random", action="store_true",
                   help="two random Gaussian directions, filter-normalized (Li et al. 2018)")
    d.add_argument("--seed", type=seed_int, default=0, action=Given,
                   help="seed of the random directions (--random, --hessian)")
    d.add_argument("--no-filter-norm", action="store_true", help="--random: plain Gaussian directions")
    d.add_argument("--ignore", choices=("biasbn", "none"), default="biasbn", action=Given,
                   help="--random: zero the directions of biases and BatchNorm parameters (biasbn), or "
                        "treat them as Li et al. do without ignore (none)")
    d.add_argument("--pca", metavar="RUN", help="the first two principal components of RUN's checkpoints")
    d.add_argument("--hessian", action="store_true",
                   help="the two Hessian eigenvectors with the largest |eigenvalue| at the origin")
    d.add_argument("--hessian-samples", type=int, default=2000, action=Given,
                   help="--hessian: training samples of the loss whose Hessian is taken")
    d.add_argument("--hessian-iterations", type=int, default=100, action=Given,
                   help="--hessian: most subspace iterations")
    g = p.add_argument_group("grid")
    g.add_argument("--grid", nargs=2, type=int, default=list(Plane.default_shape), metavar=("NX", "NY"),
                   help="points along u and along v")
    g.add_argument("--margin", type=float, default=0.2, action=Given,
                   help="space around the checkpoints (or PCA path), as a fraction of their extent per side")
    g.add_argument("--xrange", nargs=2, type=float, default=None, metavar=("LO", "HI"),
                   help="coordinates along u (distances; default from the checkpoints)")
    g.add_argument("--yrange", nargs=2, type=float, default=None, metavar=("LO", "HI"),
                   help="coordinates along v")
    add_evaluation_arguments(p)
    add_trust_arguments(p)


def plane_mode(args) -> str:
    """Which plane the options ask for (three checkpoints, --dir, --random, --pca, --hessian); refuses
    a missing or doubled choice and options that do not apply to it, before any file is read."""
    modes = [m for m, on in (("three checkpoints", bool(args.checkpoints)), ("--dir", bool(args.dir)),
                             ("--random", args.random), ("--pca", bool(args.pca)), ("--hessian", args.hessian)) if on]
    if len(modes) != 1:
        raise ConfigError("give three checkpoints, or --origin with one of --dir (twice), --random, --hessian, "
                          "or --pca RUN" + (f" (got {' and '.join(modes)})" if modes else ""))
    mode = modes[0]
    if args.checkpoints:
        if len(args.checkpoints) != 3:
            raise ConfigError(f"a plane through checkpoints needs three of them, got {len(args.checkpoints)}")
        if args.origin:
            raise ConfigError("--origin is the first of the three checkpoints; give one or the other")
    elif not args.pca and not args.origin:
        raise ConfigError(f"{mode} needs --origin CKPT")
    if args.dir and len(args.dir) != 2:
        raise ConfigError(f"give --dir twice (two directions), got {len(args.dir)}")
    refuse_inapplicable(args, {"seed": "--seed"}, mode in ("--random", "--hessian"), "--random and --hessian")
    refuse_inapplicable(args, {"no_filter_norm": "--no-filter-norm", "ignore": "--ignore"}, mode == "--random",
                        "--random")
    refuse_inapplicable(args, {"hessian_samples": "--hessian-samples", "hessian_iterations": "--hessian-iterations"},
                        mode == "--hessian", "--hessian")
    if mode in ("--random", "--hessian"):
        refuse_inapplicable(args, {"margin": "--margin"}, False,
                            f"planes through checkpoints, --dir and --pca ({mode} sets its grid from the "
                            f"directions' scale; give --xrange/--yrange instead)")
    elif args.xrange is not None and args.yrange is not None and given(args, "margin"):
        raise ConfigError("--margin pads the ranges taken from the checkpoints; with --xrange and --yrange "
                          "both given it has no effect")
    if mode == "--hessian":
        for flag, value in (("--hessian-samples", args.hessian_samples),
                            ("--hessian-iterations", args.hessian_iterations)):
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
    check_points(args.grid, "plane grid")
    return mode


def make_plane(args, traj) -> Plane:
    """The geometry the (already checked) options ask for."""
    if args.checkpoints:
        return Plane.through(traj, *args.checkpoints)
    if args.pca:
        return Plane.pca(traj, args.pca, args.origin)
    if args.dir:
        return Plane.directions(traj, args.origin, *args.dir)
    if args.random:
        return Plane.random(traj, args.origin, args.seed, not args.no_filter_norm, args.ignore)
    from landscape.device import resolve_device
    from landscape.dist import process_device
    # (under torchrun every process on its own GPU, as it evaluates there; rank 0's plane is the one used)
    return Plane.hessian(traj, args.origin, samples=args.hessian_samples, seed=args.seed,
                         iterations=args.hessian_iterations, device=process_device(resolve_device(args.device)))


def run(args) -> int:
    plane_mode(args)
    check_outputs(args, named_files(args, args.checkpoints, args.origin, args.dir, args.pca))
    traj = open_trusted_trajectory(args)
    plane = make_plane(args, traj)
    grid = make_grid(plane, tuple(args.grid), args.margin, args.xrange, args.yrange)
    return run_surface(args, traj, plane, grid)
