"""Surface files: resume keeps done points, a different spec is refused, export order is [iy, ix]."""
import h5py
import numpy as np
import pytest

from landscape.errors import FileFormatError
from landscape.store import PathData, PointData, SurfaceWriter, export_loss_landscape, open_surface

X, Y = np.linspace(-1, 1, 4), np.linspace(0, 2, 3)  # deliberately not square


def _writer(path, spec=None, overwrite=False):
    basis = {"origin": np.zeros(5), "u": np.eye(5)[0], "v": np.eye(5)[1]}
    points = {"sgd:3": PointData(np.array([0.0, 0.0]), 0.0), "swa/average:2": PointData(np.array([1.0, 0.5]), 0.1)}
    paths = {"sgd": PathData(np.zeros((4, 2)), np.zeros(4), np.arange(4.0))}
    return SurfaceWriter.create(path, spec or {"kind": "plane", "a": 1}, X, Y, basis, points, paths, overwrite=overwrite)


def _values(idx):
    v = np.asarray(idx, float)
    return {"train_loss": v, "train_err": v + 1, "test_loss": v + 2, "test_err": v + 3}


def test_resume_keeps_done_points_and_completes(tmp_path):
    out = tmp_path / "s.h5"
    w = _writer(out)
    w.write([0, 1, 2], _values([0, 1, 2]))
    w.suspend()  # as if interrupted
    assert not out.exists() and (tmp_path / "s.h5.partial").exists()
    w = _writer(out)
    assert w.done.reshape(-1)[:3].all() and not w.done.reshape(-1)[3:].any()
    rest = np.flatnonzero(~w.done.reshape(-1))
    w.write(rest, _values(rest))
    w.close()
    s = open_surface(out)
    np.testing.assert_array_equal(s.values["train_loss"].reshape(-1), np.arange(12.0))
    assert s.done.all() and s.values["train_loss"].shape == (4, 3)
    assert set(s.points) == {"sgd:3", "swa/average:2"}
    assert s.points["swa/average:2"].distance == pytest.approx(0.1)


def test_incomplete_close_keeps_partial(tmp_path):
    w = _writer(tmp_path / "s.h5")
    w.write([0], _values([0]))
    with pytest.raises(FileFormatError, match="missing points"):
        w.close()
    assert not (tmp_path / "s.h5").exists()


def test_different_spec_refused(tmp_path):
    w = _writer(tmp_path / "s.h5")
    w.write([0], _values([0]))
    w.suspend()
    with pytest.raises(FileFormatError, match="1 computed points for a different spec"):
        _writer(tmp_path / "s.h5", spec={"kind": "plane", "a": 2})


def test_partial_without_points_is_not_kept_and_never_blocks_another_spec(tmp_path):
    _writer(tmp_path / "s.h5").suspend()
    assert list(tmp_path.iterdir()) == []  # nothing computed: nothing left behind
    w = _writer(tmp_path / "s.h5")
    w.file.close()  # as if killed before the first point was saved
    w.lock.release()
    _writer(tmp_path / "s.h5", spec={"kind": "plane", "a": 2}).suspend()  # replaced, not refused


def test_export_loss_landscape_non_square(tmp_path):
    out = tmp_path / "s.h5"
    w = _writer(out)
    w.write(np.arange(12), _values(np.arange(12)))
    w.close()
    s = open_surface(out)
    export_loss_landscape(s, tmp_path / "ll.h5")
    with h5py.File(tmp_path / "ll.h5", "r") as f:
        assert f["train_loss"].shape == (3, 4)  # (ny, nx)
        for ix in range(4):
            for iy in range(3):
                assert f["train_loss"][iy, ix] == s.values["train_loss"][ix, iy]
                assert f["train_acc"][iy, ix] == 100 - s.values["train_err"][ix, iy]
        np.testing.assert_array_equal(f["xcoordinates"][:], X)
        np.testing.assert_array_equal(f["ycoordinates"][:], Y)


@pytest.mark.parametrize("edit, words", [
    (lambda f: f["values"].pop("train_loss"), "missing /values/train_loss, which the spec lists"),
    (lambda f: f.attrs.__setitem__("spec", '{"kind": "plane", "grid": {"x": [-1, 1, 1000000000], "y": [0, 2, 3]}}'),
     "the spec's grid x [-1, 1, 1000000000] disagrees with /grid/x of 4 points"),
    (lambda f: f.attrs.__setitem__("spec", '{"kind": "plane", "task": {"name": "mine", "metrics": ["acc"], '
                                           '"primary": "acc", "percent": [], "values": ["train_loss", "test_acc"]}}'),
     "missing /values/test_acc, which the spec lists"),
])
def test_a_surface_missing_what_its_spec_lists_is_refused(tmp_path, edit, words):
    """info, explore and export read a surface without its train loss (the CSV lost the column), or one
    whose spec's grid or task values disagree with its datasets: refused where it is opened."""
    out = tmp_path / "s.h5"
    w = _writer(out)
    w.write(np.arange(12), _values(np.arange(12)))
    w.close()
    with h5py.File(out, "r+") as f:
        edit(f)
    with pytest.raises(FileFormatError, match=words.replace("[", r"\[").replace("]", r"\]")):
        open_surface(out)
