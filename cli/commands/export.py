"""Export a finished surface file for another viewer:

  loss-landscape  the HDF5 layout tomgoldstein/loss-landscape's plot_2D.py / plot_1D.py read
                  (xcoordinates, ycoordinates, train_loss, train_acc, ... shaped (ny, nx))
  vtk             OUT.vtm for ParaView: a structured grid with every metric as point data
                  (OUT/surface.vts) and every projected trajectory as a polyline (OUT/paths.vtp);
                  correct on non-square grids; other files in OUT/ are left alone
  csv             one row per point: x, y (planes), ray (rays), then every metric

Examples:
  landscape export plane.h5 --to vtk -o plane.vtm
  landscape export plane.h5 --to csv
  landscape export line.h5 --to loss-landscape -o line-ll.h5
"""
from __future__ import annotations

from landscape.store import open_surface
from landscape.store.export import FORMATS, check_export, default_out, export_surface

HELP = "export a surface file for loss-landscape's plotters, ParaView (VTK) or spreadsheets (CSV)"


def add_arguments(p) -> None:
    p.add_argument("surface", metavar="SURFACE", help="surface file (.h5) from landscape plane / line")
    p.add_argument("--to", required=True, choices=FORMATS, help="export format")
    p.add_argument("-o", "--out", default=None,
                   help="file to write (default: SURFACE with .loss-landscape.h5, .vtm or .csv)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def run(args) -> int:
    surf = open_surface(args.surface)
    check_export(surf, args.to)
    out = export_surface(surf, args.to, args.out or default_out(args.surface, args.to), overwrite=args.overwrite)
    print(out)
    return 0
