"""Draw the papers' figures from surface files (and a trajectory file) as PNG and PDF.

What is drawn depends on what is given: a plane gives the train-loss/test-error plane figure and the
train-vs-test offset figure; a line through two checkpoints gives the edge-vs-center figure, with the
random rays of any rays file (`landscape line --ray-from`) that start at one of its two checkpoints; a
trajectory file with Lookahead or grafting runs gives the Lookahead sawtooth and the grafting
entropy/mixing-weight figures; a sharpness file (--sharpness) the flatness figure. The headline
numbers (offset length; distances to where the train loss
rises by --rise along the line and the rays) are printed and stored in DIR/numbers.json.

Examples:
  landscape plot plane.h5 -o figures
  landscape plot line.h5 rays-sgd.h5 rays-swa.h5 --rise 0.05 0.1 -o figures
  landscape plot plane.h5 --trajectory run.h5 -o figures
  landscape plot --sharpness sharpness.h5 -o figures
"""
from __future__ import annotations

from landscape.plot.analysis import FORMATS, MAX_LEVELS, SMOOTH

from ..common import print_json

HELP = "draw plane, offset, edge-vs-center, Lookahead and grafting figures (PNG, PDF)"


def add_arguments(p) -> None:
    p.add_argument("surfaces", nargs="*", metavar="SURFACE", help="surface files (.h5) from landscape plane / line")
    p.add_argument("-o", "--out", default="figures", help="directory for the figures and numbers.json "
                                                        "(created if missing; existing figures are replaced)")
    p.add_argument("--trajectory", metavar="RUN", default=None,
                   help="trajectory file (.h5) for the Lookahead and grafting figures")
    p.add_argument("--sharpness", metavar="FILE", default=None,
                   help="sharpness file (landscape sharpness) for the flatness figure: spectral densities "
                        "and sharpness against test error")
    p.add_argument("--rise", nargs="+", type=float, default=[0.1], metavar="R",
                   help="train-loss rise(s) for the edge-vs-center distances (loss units); the figure "
                        "shows the first")
    p.add_argument("--format", nargs="+", default=list(FORMATS), choices=("png", "pdf", "svg"),
                   help="file formats to write")
    p.add_argument("--off-plane", type=float, default=0.05,
                   help="a checkpoint farther from the plane than this fraction of the plane's larger "
                        "side is drawn hollow and labelled with its distance")
    p.add_argument("--levels", type=int, default=7,
                   help=f"log-spaced contour bands below the top band (1 to {MAX_LEVELS})")
    p.add_argument("--smooth", type=float, default=SMOOTH, metavar="CELLS",
                   help="Gaussian smoothing (standard deviation in grid cells) of each plane before its "
                        "train and test minima are located for the offset; 0 takes the raw grid minima, "
                        "at most the plane's larger number of grid points")
    p.add_argument("--train-metric", default="train_loss", help="left panel and offset start")
    p.add_argument("--test-metric", default=None,
                   help="right panel and offset end (default: the task's primary metric, test_err for classification)")
    p.add_argument("--json", action="store_true", help="print figures and numbers as JSON")


def run(args) -> int:
    from landscape.plot.report import plot_files  # matplotlib, only when drawing
    res = plot_files(args.surfaces, args.out, trajectory=args.trajectory, rises=args.rise, formats=args.format,
                     off_plane=args.off_plane, levels=args.levels, train_metric=args.train_metric,
                     test_metric=args.test_metric, smooth=args.smooth, sharpness=args.sharpness)
    if args.json:
        print_json({"figures": [str(p) for p in res.figures], "numbers_file": str(res.numbers_path),
                    "numbers": res.numbers})
        return 0
    for p in res.figures:
        print(p)
    print(res.numbers_path)
    for line in res.lines:
        print(line)
    return 0
