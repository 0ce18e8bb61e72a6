"""Exports of finished surfaces: VTK read back with a small reader of our own puts every value at its
(x, y) on a 5 x 4 grid and every trajectory on its polyline; CSV rows; loss-landscape through the CLI;
rays refused where a format has no grid for them."""
import csv
import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from landscape.cli.main import main
from landscape.errors import FileFormatError
from landscape.store import PathData, PointData, SurfaceWriter, open_surface
from landscape.store.export import export_csv, export_vtk


def read_vtk_array(node) -> np.ndarray:
    return np.array([float(v) for v in node.text.split()])


def read_vts(path):
    """Our own reader of an ASCII VTK StructuredGrid: (points (n, 3), extent, {name: (n,) values})."""
    root = ET.parse(path).getroot()
    assert root.get("type") == "StructuredGrid"
    piece = root.find("StructuredGrid/Piece")
    extent = [int(v) for v in piece.get("Extent").split()]
    points = read_vtk_array(piece.find("Points/DataArray")).reshape(-1, 3)
    data = {a.get("Name"): read_vtk_array(a) for a in piece.find("PointData")}
    return points, extent, data


def read_vtp(path):
    root = ET.parse(path).getroot()
    piece = root.find("PolyData/Piece")
    points = read_vtk_array(piece.find("Points/DataArray")).reshape(-1, 3)
    lines = {a.get("Name"): read_vtk_array(a).astype(int) for a in piece.find("Lines")}
    point_data = {a.get("Name"): read_vtk_array(a) for a in piece.find("PointData")}
    return points, lines, point_data


@pytest.fixture
def plane(tmp_path):
    """A finished 5 x 4 plane whose values encode their own coordinates."""
    x, y = np.linspace(-1, 3, 5), np.linspace(10, 40, 4)
    paths = {"sgd": PathData(np.array([[0.0, 10.0], [1.0, 20.0], [2.0, 25.0]]), np.array([0.0, 0.5, 0.1]),
                             np.array([0.0, 1.0, 2.0])),
             "swa/average": PathData(np.array([[3.0, 40.0], [2.5, 30.0]]), np.zeros(2), np.array([5.0, 6.0]))}
    w = SurfaceWriter.create(tmp_path / "plane.h5", {"kind": "plane"}, x, y, {"origin": np.zeros(3)},
                             {"sgd:2": PointData(np.array([2.0, 25.0]), 0.1)}, paths)
    X, Y = np.meshgrid(x, y, indexing="ij")
    w.write(np.arange(20), {"train_loss": (X * 100 + Y).reshape(-1), "train_err": X.reshape(-1),
                            "test_loss": Y.reshape(-1), "test_err": (X - Y).reshape(-1)})
    w.close()
    return open_surface(tmp_path / "plane.h5")


def test_vtk_puts_every_value_at_its_point_on_a_non_square_grid(plane, tmp_path):
    out = export_vtk(plane, tmp_path / "plane.vtm")
    root = ET.parse(out).getroot()
    files = [d.get("file") for d in root.iter("DataSet")]
    assert files == ["plane/surface.vts", "plane/paths.vtp"]
    points, extent, data = read_vts(tmp_path / files[0])
    assert extent == [0, 4, 0, 3, 0, 0]
    assert len(points) == 20 and set(data) == {"train_loss", "train_err", "test_loss", "test_err"}
    for k, (px, py, pz) in enumerate(points):
        assert pz == 0
        assert data["train_loss"][k] == pytest.approx(px * 100 + py)
        assert data["train_err"][k] == pytest.approx(px) and data["test_loss"][k] == pytest.approx(py)
        assert data["test_err"][k] == pytest.approx(px - py)
    # structured order: x fastest; every (x, y) of the grid exactly once
    assert sorted(map(tuple, points[:, :2])) == sorted((a, b) for a in plane.x for b in plane.y)
    np.testing.assert_allclose(points[:5, 0], plane.x)
    np.testing.assert_allclose(points[::5, 1], plane.y)
    pts, lines, pd = read_vtp(tmp_path / files[1])
    assert list(lines["offsets"]) == [3, 5]
    np.testing.assert_allclose(pts[lines["connectivity"][:3], :2], plane.paths["sgd"].coords)
    np.testing.assert_allclose(pts[lines["connectivity"][3:], :2], plane.paths["swa/average"].coords)
    np.testing.assert_allclose(pd["epoch"], [0, 1, 2, 5, 6])


def test_csv_rows(plane, tmp_path):
    out = export_csv(plane, tmp_path / "plane.csv")
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 20
    for r in rows:
        assert float(r["train_loss"]) == pytest.approx(float(r["x"]) * 100 + float(r["y"]))


def test_exports_reach_the_disk_before_they_get_their_names(plane, tmp_path, monkeypatch):
    """Every file of an export (VTK: the folder's files, the folder, the .vtm; CSV) is synced before
    the rename that names it, and its folder after: a power cut leaves no named file with missing bytes."""
    import os
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
                        or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", str(a), str(b))) or replace(a, b))
    export_vtk(plane, tmp_path / "plane.vtm")
    export_csv(plane, tmp_path / "plane.csv")
    renames = [i for i, e in enumerate(events) if e[0] == "rename"]
    assert [Path(events[i][2]).name for i in renames] == ["plane", "plane.vtm", "plane.csv"]
    for i in renames:
        src = events[i][1]
        synced = {e[1] for e in events[:i] if e[0] == "sync"}
        inside = [str(f) for f in Path(events[i][2]).rglob("*")] if Path(events[i][2]).is_dir() else []
        assert src in synced and all(str(f).replace(events[i][2], src, 1) in synced for f in inside)
        assert ("sync", str(tmp_path)) in events[i + 1:]  # the folder holding the new name


def test_vtk_export_into_a_folder_of_the_users_keeps_its_other_files(plane, tmp_path):
    """OUT/ may be a folder of the user's: an export adds its pieces, and --overwrite replaces only
    them (a surface without paths removes the old paths.vtp), never the user's files."""
    (tmp_path / "plane").mkdir()
    (tmp_path / "plane" / "notes.txt").write_text("mine")
    export_vtk(plane, tmp_path / "plane.vtm")
    assert sorted(p.name for p in (tmp_path / "plane").iterdir()) == ["notes.txt", "paths.vtp", "surface.vts"]
    (tmp_path / "plane.vtm").unlink()
    with pytest.raises(FileFormatError, match="surface.vts already exists; pass --overwrite"):
        export_vtk(plane, tmp_path / "plane.vtm")
    no_paths = dataclasses.replace(plane, paths={})
    export_vtk(no_paths, tmp_path / "plane.vtm", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "plane").iterdir()) == ["notes.txt", "surface.vts"]
    assert (tmp_path / "plane" / "notes.txt").read_text() == "mine"
    assert "paths.vtp" not in (tmp_path / "plane.vtm").read_text()
    assert read_vts(tmp_path / "plane" / "surface.vts")[2]["train_loss"].size == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plane", "plane.h5", "plane.vtm"]


def test_cli_exports_and_refuses(plane, tmp_path, capsys):
    src = str(plane.path)
    assert main(["export", src, "--to", "csv"]) == 0
    assert (tmp_path / "plane.csv").exists()
    assert main(["export", src, "--to", "vtk"]) == 0
    assert (tmp_path / "plane.vtm").exists() and (tmp_path / "plane" / "surface.vts").exists()
    assert main(["export", src, "--to", "vtk"]) == 2          # exists: refused
    assert "already exists" in capsys.readouterr().err
    assert main(["export", src, "--to", "vtk", "--overwrite"]) == 0
    assert main(["export", src, "--to", "loss-landscape", "-o", str(tmp_path / "ll.h5")]) == 0
    import h5py
    with h5py.File(tmp_path / "ll.h5") as f:
        assert f["train_loss"].shape == (4, 5)
    assert main(["export", src, "--to", "vtk", "-o", str(tmp_path / "x.vts")]) == 2
    assert "NAME.vtm" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.partial"))


def test_rays_go_to_csv_only(tmp_path, capsys):
    x = np.linspace(0, 2, 3)
    w = SurfaceWriter.create(tmp_path / "rays.h5", {"kind": "line", "values_shape": ["rays", "x"]}, x, None,
                             {"origin": np.zeros(3)}, {}, {}, shape=(2, 3))
    w.write(np.arange(6), {m: np.arange(6.0) for m in ("train_loss", "train_err", "test_loss", "test_err")})
    w.close()
    for to in ("vtk", "loss-landscape"):
        assert main(["export", str(tmp_path / "rays.h5"), "--to", to]) == 2
        err = capsys.readouterr().err
        assert err.startswith("landscape: error: ") and "--to csv" in err and err.count("\n") == 1
    assert main(["export", str(tmp_path / "rays.h5"), "--to", "csv"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "rays.csv")))
    assert [(r["ray"], float(r["x"]), float(r["train_loss"])) for r in rows] == [
        ("0", 0.0, 0.0), ("0", 1.0, 1.0), ("0", 2.0, 2.0), ("1", 0.0, 3.0), ("1", 1.0, 4.0), ("1", 2.0, 5.0)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rays.csv", "rays.h5"]


@pytest.mark.parametrize("to", ["csv", "vtk"])
def test_an_export_holds_its_output_while_it_writes(plane, tmp_path, to, monkeypatch):
    """Two exports to one output at once: the second is refused while the first writes (csv and vtk
    took no lock, and two at once renamed a CSV mixing both surfaces' rows into place)."""
    import landscape.store.export as export
    from landscape.store.files import OutputLock
    out, seen = tmp_path / f"out{export.SUFFIX[to]}", []
    publish = export.publish

    def publish_while_a_second_export_tries(src, dst):
        with pytest.raises(FileFormatError, match="is being written by process"):
            OutputLock(out)
        seen.append(dst)
        return publish(src, dst)
    monkeypatch.setattr(export, "publish", publish_while_a_second_export_tries)
    assert export.export_surface(plane, to, out) == out and out.exists() and out in seen
