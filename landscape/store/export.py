"""Exports of finished surface files for other viewers: tomgoldstein/loss-landscape's HDF5 layout
(:func:`export_loss_landscape`, in :mod:`.surface`), VTK for ParaView, and CSV.

VTK (:func:`export_vtk`): ``OUT.vtm``, a multiblock file ParaView opens in one go, naming the files of
the folder ``OUT/``: ``surface.vts``, a structured grid of nx x ny points (nx x 1 for a line) at
``(x[i], y[j], 0)`` with every metric as point data (the value ``values[m][i, j]`` sits on the point
of ``x[i]``, ``y[j]``: point index ``i + nx * j``, x varying fastest, as VTK orders structured points),
and ``paths.vtp``, every projected trajectory as one polyline (point data: ``epoch`` and the
checkpoint's ``distance`` from the plane; cell data: ``run`` index, names in field data ``runs``).
ASCII XML, so any text tool reads it too. (loss-landscape's own ``h52vtp`` lays a non-square grid
out with the axes swapped; here the point order follows the extents.) Use ParaView's "Warp By
Scalar" to lift the grid by a metric.

CSV (:func:`export_csv`): one row per point, ``x,y,<metrics>`` for planes, ``x,<metrics>`` for a
line, ``ray,x,<metrics>`` for rays; errors in percent, as in the surface file.

Example::

    surf = open_surface("plane.h5")
    export_vtk(surf, "plane.vtm")          # plane.vtm + plane/surface.vts + plane/paths.vtp
    export_csv(surf, "plane.csv")
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

from ..errors import FileFormatError
from .files import claim_output, partial_path, prepare_output, publish, reason
from .surface import Surface, export_loss_landscape

FORMATS = ("loss-landscape", "vtk", "csv")
SUFFIX = {"loss-landscape": ".loss-landscape.h5", "vtk": ".vtm", "csv": ".csv"}
VTK_PIECES = ("surface.vts", "paths.vtp")  # the files of OUT/ that a VTK export writes


def default_out(surface_path, to: str) -> Path:
    p = Path(surface_path)
    return p.with_name(p.stem + SUFFIX[to])


def export_surface(surface: Surface, to: str, out, overwrite: bool = False) -> Path:
    """Write ``surface`` in format ``to`` (loss-landscape | vtk | csv) to ``out``."""
    if to not in FORMATS:
        raise FileFormatError(f"unknown export format {to!r}; use {', '.join(FORMATS)}")
    return {"loss-landscape": export_loss_landscape, "vtk": export_vtk, "csv": export_csv}[to](
        surface, out, overwrite=overwrite)


def check_export(surface: Surface, to: str) -> None:
    """Refuse, before anything is written, what a format cannot hold."""
    if surface.rays and to in ("vtk", "loss-landscape"):
        raise FileFormatError(f"a rays file has no common grid for {to}; export it with --to csv")


# ----------------------------------------------------------------------------------------------
# VTK

def _floats(a) -> str:
    return " ".join(repr(float(v)) if np.isfinite(v) else ("nan" if np.isnan(v) else ("inf" if v > 0 else "-inf"))
                    for v in np.asarray(a, np.float64).reshape(-1))


def _array(name: str, values, components: int = 1, kind: str = "Float64") -> str:
    text = _floats(values) if kind.startswith("Float") else " ".join(str(int(v)) for v in np.asarray(values).reshape(-1))
    return (f'        <DataArray type="{kind}" Name={quoteattr(name)} NumberOfComponents="{components}" '
            f'format="ascii">\n          {text}\n        </DataArray>\n')


def vts_text(surface: Surface) -> str:
    """The structured grid of ``surface`` as VTK XML (see the module doc)."""
    x = np.asarray(surface.x, np.float64)
    y = np.zeros(1) if surface.y is None else np.asarray(surface.y, np.float64)
    nx, ny = len(x), len(y)
    X, Y = np.meshgrid(x, y)                      # (ny, nx): row j, column i -> point i + nx j
    points = np.stack([X.reshape(-1), Y.reshape(-1), np.zeros(nx * ny)], axis=1)
    extent = f"0 {nx - 1} 0 {ny - 1} 0 0"
    out = ['<?xml version="1.0"?>\n',
           '<VTKFile type="StructuredGrid" version="1.0" byte_order="LittleEndian">\n',
           f'  <StructuredGrid WholeExtent="{extent}">\n', f'    <Piece Extent="{extent}">\n',
           '      <PointData>\n']
    for name, v in surface.values.items():
        v = np.asarray(v, np.float64)
        v = v[:, None] if surface.y is None else v     # ours: [i, j] belongs to (x[i], y[j])
        out.append(_array(name, v.T))                  # VTK's: x fastest, so the transpose, flattened
    out.append('      </PointData>\n      <Points>\n')
    out.append(_array("Points", points, 3))
    out.append('      </Points>\n    </Piece>\n  </StructuredGrid>\n</VTKFile>\n')
    return "".join(out)


def vtp_text(surface: Surface) -> str:
    """Every projected trajectory of ``surface`` as a polyline (VTK XML PolyData)."""
    runs = [r for r, p in surface.paths.items() if len(p.coords)]
    pts, epochs, dists, conn, offsets, n = [], [], [], [], [], 0
    for r in runs:
        p = surface.paths[r]
        c = np.asarray(p.coords, np.float64)
        xy = np.zeros((len(c), 3))
        xy[:, :c.shape[1]] = c
        pts.append(xy)
        epochs.append(np.asarray(p.epoch, np.float64))
        dists.append(np.asarray(p.distance, np.float64))
        conn.extend(range(n, n + len(c)))
        n += len(c)
        offsets.append(n)
    points = np.concatenate(pts) if pts else np.zeros((0, 3))
    out = ['<?xml version="1.0"?>\n', '<VTKFile type="PolyData" version="1.0" byte_order="LittleEndian">\n',
           '  <PolyData>\n', '    <FieldData>\n']
    if runs:  # VTK's ASCII strings: the bytes of each, NUL-terminated, as numbers
        codes = " ".join(str(b) for r in runs for b in r.encode() + bytes(1))
        out.append(f'      <Array type="String" Name="runs" NumberOfTuples="{len(runs)}" format="ascii">'
                   f'{codes}</Array>\n')
    out.append('    </FieldData>\n')
    out.append(f'    <Piece NumberOfPoints="{len(points)}" NumberOfVerts="0" NumberOfLines="{len(runs)}" '
               f'NumberOfStrips="0" NumberOfPolys="0">\n      <PointData>\n')
    out.append(_array("epoch", np.concatenate(epochs) if epochs else []))
    out.append(_array("distance", np.concatenate(dists) if dists else []))
    out.append('      </PointData>\n      <CellData>\n')
    out.append(_array("run", np.arange(len(runs)), kind="Int32"))
    out.append('      </CellData>\n      <Points>\n')
    out.append(_array("Points", points, 3))
    out.append('      </Points>\n      <Lines>\n')
    out.append(_array("connectivity", conn, kind="Int64"))
    out.append(_array("offsets", offsets, kind="Int64"))
    out.append('      </Lines>\n    </Piece>\n  </PolyData>\n</VTKFile>\n')
    return "".join(out)


def vtm_text(folder: str, with_paths: bool) -> str:
    blocks = [f'    <DataSet index="0" name="surface" file={quoteattr(folder + "/surface.vts")}/>\n']
    if with_paths:
        blocks.append(f'    <DataSet index="1" name="paths" file={quoteattr(folder + "/paths.vtp")}/>\n')
    return ('<?xml version="1.0"?>\n<VTKFile type="vtkMultiBlockDataSet" version="1.0" byte_order="LittleEndian">\n'
            '  <vtkMultiBlockDataSet>\n' + "".join(blocks) + '  </vtkMultiBlockDataSet>\n</VTKFile>\n')


def export_vtk(surface: Surface, out, overwrite: bool = False, inputs=()) -> Path:
    """Write ``OUT.vtm`` and the folder ``OUT/`` (``surface.vts``, ``paths.vtp``); see the module doc.
    An existing folder keeps every other file: only these two are the export's (replaced with
    ``overwrite``, refused without it)."""
    check_export(surface, "vtk")
    if Path(out).suffix != ".vtm":
        raise FileFormatError(f"a VTK export is a multiblock file: name it NAME.vtm, got {Path(out).name}")
    out = prepare_output(out, overwrite, inputs=(surface.path, *inputs))
    folder = out.with_suffix("")
    if folder.exists() and not folder.is_dir():
        raise FileFormatError(f"{folder} exists and is not a directory")
    held = [folder / name for name in VTK_PIECES if (folder / name).exists()]
    if held and not overwrite:
        raise FileFormatError(f"{held[0]} already exists; pass --overwrite (in Python: overwrite=True) to replace it")
    with claim_output(out, overwrite):  # one writer per output: a second export is refused
        tmp_dir, tmp = partial_path(folder), partial_path(out)
        try:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp_dir.mkdir()
            (tmp_dir / "surface.vts").write_text(vts_text(surface))
            with_paths = any(len(p.coords) for p in surface.paths.values())
            if with_paths:
                (tmp_dir / "paths.vtp").write_text(vtp_text(surface))
            tmp.write_text(vtm_text(folder.name, with_paths))
            if folder.exists():
                _replace_pieces(tmp_dir, folder, out)
            else:
                publish(tmp_dir, folder)
            publish(tmp, out)
        except OSError as e:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp.unlink(missing_ok=True)
            raise FileFormatError(f"cannot write {out}: {reason(e)}") from None
        return out


def _replace_pieces(new: Path, folder: Path, vtm: Path) -> None:
    """Move the export's pieces from ``new`` into the existing ``folder``, one by one, leaving its other
    files alone. The old ``vtm`` goes first: stopped halfway, no multiblock file names a mix of old
    and new pieces."""
    vtm.unlink(missing_ok=True)
    for name in VTK_PIECES:
        if (new / name).exists():
            publish(new / name, folder / name)
        else:  # this surface has no paths: the old export's must not stay beside the new one
            (folder / name).unlink(missing_ok=True)
    new.rmdir()


# ----------------------------------------------------------------------------------------------
# CSV

def export_csv(surface: Surface, out, overwrite: bool = False, inputs=()) -> Path:
    """One row per point (see the module doc)."""
    out = prepare_output(out, overwrite, inputs=(surface.path, *inputs))
    with claim_output(out, overwrite):  # one writer per output: a second export is refused
        names = list(surface.values)
        tmp = partial_path(out)
        try:
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                if surface.y is not None:
                    w.writerow(["x", "y", *names])
                    for i, x in enumerate(surface.x):
                        for j, y in enumerate(surface.y):
                            w.writerow([repr(float(x)), repr(float(y)), *(repr(float(surface.values[m][i, j])) for m in names)])
                elif surface.rays:
                    w.writerow(["ray", "x", *names])
                    for r in range(surface.done.shape[0]):
                        for i, x in enumerate(surface.x):
                            w.writerow([r, repr(float(x)), *(repr(float(surface.values[m][r, i])) for m in names)])
                else:
                    w.writerow(["x", *names])
                    for i, x in enumerate(surface.x):
                        w.writerow([repr(float(x)), *(repr(float(surface.values[m][i])) for m in names)])
            publish(tmp, out)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise FileFormatError(f"cannot write {out}: {reason(e)}") from None
        return out
