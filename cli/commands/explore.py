"""Write one self-contained HTML page to explore surface files in a browser, offline (plotly.js is
embedded). Per plane: a 3D surface and a contour map, buttons for the metric (train/test loss/error)
and for a log or linear colour scale, every run's trajectory with its checkpoints (hover: run, epoch,
coordinates, value), and a slider over epochs. Per line or rays file: the metrics along it.

Examples:
  landscape explore plane.h5 -o explore.html
  landscape explore plane.h5 line.h5 rays-swa.h5 -o explore.html
  landscape explore plane.h5 --sharpness sharpness.h5 -o explore.html
"""
from __future__ import annotations

HELP = "write an interactive HTML page (offline) of surface files"


def add_arguments(p) -> None:
    p.add_argument("surfaces", nargs="+", metavar="SURFACE", help="surface files (.h5) from landscape plane / line")
    p.add_argument("-o", "--out", default="explore.html", help="HTML file to write")
    p.add_argument("--title", default="landscape explorer", help="page title")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--sharpness", metavar="FILE", default=None,
                   help="a sharpness file (landscape sharpness): its numbers in a table and beside each checkpoint")


def run(args) -> int:
    from landscape.plot.interactive import write_explorer  # plotly and matplotlib, only when writing
    out = write_explorer(args.surfaces, args.out, title=args.title, overwrite=args.overwrite,
                         sharpness=args.sharpness)
    print(out)
    return 0
