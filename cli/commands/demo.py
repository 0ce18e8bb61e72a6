"""The whole pipeline on the embedded default, MNIST-1D, on the CPU in minutes: trains SGD, SWA, an
EMA of SGD, SWAP, Lookahead (SGD and Adam inner) and Filter Grafting from one initialization, evaluates
three planes, the SGD-to-SWA line and random rays from both solutions, and writes every figure (PNG and
PDF), numbers.json and explore.html into the output folder. Then the flatness table: averages of SGD's
checkpoints made after the fact (run+avg.h5), the Hessian eigenvalues, trace, spectral density and
epsilon-sharpness of every method's final checkpoint (sharpness.h5) and random rays from each for its
basin width, printed and drawn (figures/flatness*). Run it again to reuse what is done."""
from __future__ import annotations

from landscape.demo import run_demo

from ..common import add_output_flags, print_json

HELP = "train every method on MNIST-1D, evaluate planes and lines, draw every figure"


def add_arguments(p) -> None:
    p.add_argument("-o", "--out", default="landscape-demo", help="output folder")
    p.add_argument("--quick", action="store_true", help="a small, fast version (few epochs, coarse grids)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    add_output_flags(p)


def check_out_dir(out) -> None:
    """Refuse an output folder that cannot be made or written, before anything is trained: the
    nearest existing folder on the way must take a new entry (tried with a short-lived one)."""
    import os
    import tempfile
    from pathlib import Path

    from landscape.errors import FileFormatError
    from landscape.store.files import reason

    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise FileFormatError(f"output {out} exists and is not a directory")
    base = out
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise FileFormatError(f"cannot create {out}: {base} is not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=".landscape-demo-", suffix=".probe", dir=base)
    except OSError as e:
        raise FileFormatError(f"cannot {'write into' if base == out else 'create'} {out}: {reason(e)}") from None
    os.rmdir(probe)


def run(args) -> int:
    import sys
    check_out_dir(args.out)
    log = (lambda *a: None) if (args.quiet or args.json) else (lambda *a: print(*a, file=sys.stderr))
    s = run_demo(args.out, quick=args.quick, device=args.device, quiet=args.quiet, log=log)
    if args.json:
        print_json(s)
        return 0
    sec = s["seconds"]
    print(f"\nlandscape demo finished in {sum(sec.values()):.0f} s "
          f"(training {sec['train']:.0f} s, surfaces {sec['surfaces']:.0f} s, figures {sec['figures']:.0f} s, "
          f"flatness {sec['flatness']:.0f} s)")
    print("\nfinal test error of every method:")
    for run_name, m in s["final"].items():
        if run_name.count("/") <= 1 and not run_name.endswith(("fast", "iterates", "phase1")):
            print(f"  {run_name:<22} {m['test_err']:6.2f} %")
    if s["swap"]:
        w = s["swap"]
        print(f"\nSWAP: average {w['average_test_err']:.2f} % vs workers "
              + ", ".join(f"{e:.2f}" for e in w["workers_test_err"]) + " %; the average is the workers' centroid "
              f"({w['average_to_centroid']:.2g} from it, workers {w['workers_spread']:.3g} from it on average)")
    print("\nheadline numbers:")
    for line in s["lines"]:
        print(f"  {line}")
    print_flatness(s["flatness"])
    print("\nthe papers' claims on this run:")
    for c in s["claims"]:
        print(f"  [{'holds' if c['holds'] else 'does not hold'}] {c['claim']}: {c['evidence']}")
    print(f"\nfigures:  {s['out']}/figures/  ({len(s['figures'])} files; numbers in {s['numbers']})")
    print(f"explorer: {s['explorer']}  (open it in a browser; works offline)")
    return 0


def print_flatness(flat: dict) -> None:
    """The flatness table: every method's test error, top Hessian eigenvalue, trace, epsilon-sharpness
    and basin widths (mean distance along random rays to a train-loss rise; '>' when some ray did not
    rise that much within its length: a lower bound)."""
    from landscape.plot.analysis import width_text
    from landscape.plot.style import role
    rises = [f"{r:g}" for r in flat["rises"]]
    print(f"\nflatness of every method (train loss; epsilon-sharpness within the filter-normalized "
          f"{flat['epsilon']:g}-ball; basin width in weight-space units):")
    print(f"  {'':<30}{'test err':>9}{'top eig':>9}{'trace':>17}{'eps-sharp':>10}"
          + "".join(f"{'width +' + r:>12}" for r in rises))
    for r in flat["table"]:
        widths = []
        for k in rises:
            w = r["basin_width"].get(k)
            widths.append("-" if w is None else width_text(w))
        label = role(r["run"]).label
        print(f"  {label[:30]:<30}{r['test_err']:>8.2f}%{r['top_eigenvalue']:>9.3g}"
              f"{r['trace']:>10.3g} +-{r['trace_stderr']:<5.2g}{r['epsilon_sharpness']:>10.3g}"
              + "".join(f"{w:>12}" for w in widths))
