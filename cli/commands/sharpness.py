"""Flatness as numbers for one checkpoint or many (e.g. the final checkpoint of every run): the top-k
Hessian eigenvalues (Lanczos on Hessian-vector products), the Hessian trace (Hutchinson, with its
standard error), optionally the eigenvalue spectral density (stochastic Lanczos quadrature), and the
epsilon-sharpness: the largest train-loss increase within the filter-normalized ball
||d_f|| <= epsilon ||w_f|| (every filter f; biases and BatchNorm parameters fixed), found by projected
gradient ascent. All of them of the mean train loss, with the evaluator's data handling and
BatchNorm policy (recompute: statistics recomputed at the checkpoint, then held fixed). The results
go to a sharpness file (docs/FORMAT.md); `landscape plot --sharpness FILE` draws them.

Examples:
  landscape sharpness run.h5 sgd swa/average swap/average -o sharpness.h5
  landscape sharpness run.h5 sgd:100 sgd --density --top-k 3 -o sgd-sharpness.h5 --json
"""
from __future__ import annotations

from landscape.sharpness import SharpnessSpec, check_checkpoints, compute_sharpness
from landscape.store.files import prepare_output

from ..common import add_output_flags, add_trust_arguments, open_trusted_trajectory, print_json, seed_int

HELP = "Hessian eigenvalues, trace, spectral density and epsilon-sharpness of checkpoints"
D = SharpnessSpec()


def add_arguments(p) -> None:
    p.add_argument("file", help="trajectory file (.h5)")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoints: RUN (its last) or RUN:INDEX")
    p.add_argument("-o", "--out", default="sharpness.h5", help="sharpness file to write")
    h = p.add_argument_group("Hessian")
    h.add_argument("--top-k", type=int, default=D.top_k, help="number of largest eigenvalues")
    h.add_argument("--iterations", type=int, default=D.iterations, help="Lanczos steps at most")
    h.add_argument("--tol", type=float, default=D.tol,
                   help="stop once every residual bound is below this fraction of the top eigenvalue")
    h.add_argument("--probes", type=int, default=D.probes, help="Hutchinson probes for the trace")
    h.add_argument("--density", action="store_true", help="also the spectral density (stochastic Lanczos quadrature)")
    h.add_argument("--density-runs", type=int, default=D.density_runs, help="SLQ runs")
    h.add_argument("--density-steps", type=int, default=D.density_steps, help="Lanczos steps per SLQ run")
    e = p.add_argument_group("epsilon-sharpness")
    e.add_argument("--epsilon", type=float, default=D.epsilon,
                   help="radius of the filter-normalized ball, as a fraction of each filter's norm")
    e.add_argument("--ascent-steps", type=int, default=D.ascent_steps, help="projected gradient ascent steps per start")
    d = p.add_argument_group("data and evaluation")
    d.add_argument("--samples", type=int, default=None,
                   help="use a fixed random subset of this many training samples (default: all)")
    d.add_argument("--seed", type=seed_int, default=D.seed, help="seed of starting vectors, probes and subset")
    d.add_argument("--bn", default="auto", choices=("auto", "recompute", "stored"),
                   help="BatchNorm statistics at the checkpoint: recomputed from the training set "
                        "(auto, for models with BatchNorm) or the recorded ones")
    d.add_argument("--batch-size", type=int, default=D.batch_size, help="data batch of every pass (speed only)")
    d.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_output_flags(p)
    add_trust_arguments(p)


def run(args) -> int:
    spec = SharpnessSpec(top_k=args.top_k, iterations=args.iterations, tol=args.tol, probes=args.probes,
                         density=args.density, density_runs=args.density_runs, density_steps=args.density_steps,
                         epsilon=args.epsilon, ascent_steps=args.ascent_steps, samples=args.samples,
                         seed=args.seed, batch_size=args.batch_size)
    spec.check()
    traj = open_trusted_trajectory(args)
    check_checkpoints(traj, args.checkpoints)
    spec.check(traj.layout.num_params)
    prepare_output(args.out, args.overwrite, inputs=(traj.path,))
    res = compute_sharpness(traj, args.checkpoints, spec, bn=args.bn, device=args.device, out=args.out,
                            overwrite=args.overwrite, quiet=args.quiet)
    if args.json:
        print_json(res.summary())
        return 0
    print(f"wrote {res.path} ({len(res.results)} checkpoint(s) in {res.seconds:.1f} s; "
          f"epsilon = {res.epsilon:g} of each filter's norm)")
    print_table(res)
    return 0


def print_table(res) -> None:
    """One row per checkpoint of a sharpness file (also what ``landscape info`` shows of one)."""
    shown = res.test_metric  # the task's primary test value: test_err (%) for classification
    print(f"{'checkpoint':<22}{shown.replace('_', ' '):>9}{'top eigenvalues':>34}{'trace':>20}{'eps-sharp':>11}")
    for r in res.summary():
        eig = " ".join(f"{v:.4g}" for v in r["eigenvalues"][:4])
        print(f"{r['checkpoint']:<22}{res.format_test_metric(r[shown]).replace(' ', ''):>9}{' ' + eig:>34}"
              f"{r['trace']:>12.4g} +-{r['trace_stderr']:<6.2g}{r['epsilon_sharpness']:>11.4g}")
