"""`landscape plane` and `landscape line` as a user meets them: the defaults and what the file records,
the progress bar, a different spec refused on resume, points that overflow, and bad input answered with
one `landscape: error:` line, a non-zero exit and no output file."""
import json

import h5py
import numpy as np
import pytest

from landscape.cli.main import main
from landscape.geometry import Plane
from landscape.models import ModelSpec, build_model
from landscape.params import Layout
from landscape.store import TrajectoryWriter, open_surface, open_trajectory
from landscape.surface import compute_surface
from landscape.rebuild import rebuild_data, rebuild_model

from _cli import one_line_error

THREE = ("sgd", "swa/average", "swa/iterates:0")


pytestmark = pytest.mark.usefixtures("one_thread")


def _write_traj(path, config, model, rows):
    with TrajectoryWriter(path, config.to_dict(), Layout.of(model)) as w:
        for r in rows:
            w.append("p", r, epoch=0.0)
    return path


@pytest.fixture(scope="module")
def crafted(tmp_path_factory, tiny_run, tiny_config):
    """A file of the tiny architecture whose run ``p`` holds a, b, a + 2 (b - a) (collinear), and a
    file of another architecture (4 channels instead of 8)."""
    d = tmp_path_factory.mktemp("crafted")
    traj = open_trajectory(tiny_run)
    a, b = traj.checkpoint("sgd:1").params, traj.checkpoint("sgd").params
    data = rebuild_data(traj)
    same = _write_traj(d / "same.h5", tiny_config, rebuild_model(traj, data), [a, b, a + 2 * (b - a)])
    other_cfg = tiny_config.replace(model=ModelSpec("cnn1d-bn", {"channels": 4}))
    other_model = build_model(other_cfg.model, data.input_shape, data.num_classes)
    other = _write_traj(d / "other.h5", other_cfg, other_model, [Layout.of(other_model).params_to_vector(other_model)])
    return same, other


def test_defaults_recorded_in_the_file(tiny_run, tmp_path, capsys):
    out = tmp_path / "rand.h5"
    assert main(["plane", str(tiny_run), "--origin", "swa/average", "--random", "--seed", "7", "--grid", "3", "2",
                 "-o", str(out), "--quiet", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    spec = open_surface(out).spec
    assert summary["spec"] == spec
    assert spec["method"] == "random" and spec["seed"] == 7 and spec["filter_norm"] is True
    assert spec["ignore"] == "biasbn" and spec["bn"]["policy"] == "recompute"  # BatchNorm model: recompute
    s = spec["derived"]["scale"]
    assert spec["grid"] == {"x": [pytest.approx(-s[0]), pytest.approx(s[0]), 3],
                            "y": [pytest.approx(-s[1]), pytest.approx(s[1]), 2]}
    # the CLI's defaults: 21 x 21 with a 0.2 margin (planes), -0.5 .. 1.5 of the segment with 41 points (lines)
    from landscape.cli.commands import line, plane
    import argparse
    p = argparse.ArgumentParser()
    plane.add_arguments(p)
    args = p.parse_args([str(tiny_run), *THREE])
    assert args.grid == [21, 21] and args.margin == 0.2
    p = argparse.ArgumentParser()
    line.add_arguments(p)
    args = p.parse_args([str(tiny_run), "sgd", "swa/average"])
    assert args.range == [-0.5, 1.5] and args.points == 41


def test_progress_bar_shows_rate_and_time_left(tiny_run, tmp_path, capsys):
    assert main(["line", str(tiny_run), "sgd", "swa/average", "--points", "6", "--points-per-call", "2",
                 "-o", str(tmp_path / "l.h5")]) == 0
    err = capsys.readouterr().err
    assert "line 6" in err and "pt/s" in err and "<" in err  # tqdm: [elapsed<left, rate pt/s]


def test_different_spec_on_unfinished_work_is_refused(tiny_run, tmp_path, capsys):
    traj = open_trajectory(tiny_run)
    out = tmp_path / "p.h5"
    with pytest.raises(KeyboardInterrupt):  # leaves 2 of 9 points in p.h5.partial
        compute_surface(traj, Plane.through(traj, *THREE), (3, 3), out=out, quiet=True, points_per_call=2,
                        write_every=0, on_write=lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    partial = tmp_path / "p.h5.partial"
    before = partial.read_bytes()
    argv = ["plane", str(tiny_run), *THREE, "--grid", "3", "3", "-o", str(out), "--quiet"]
    one_line_error(capsys, argv + ["--bn", "stored"], "different spec")
    one_line_error(capsys, ["plane", str(tiny_run), *THREE, "--grid", "3", "4", "-o", str(out), "--quiet"], "different spec")
    assert partial.read_bytes() == before and not out.exists()  # nothing mixed in
    assert main(["info", str(partial)]) == 0  # a look at the points kept, changing nothing
    said = capsys.readouterr().out
    assert "plane of 3 x 3 points (2 computed)" in said and "incomplete: the command that made it" in said
    assert partial.read_bytes() == before
    assert main(argv) == 0  # the same spec finishes it
    assert open_surface(out).done.all() and not partial.exists()


def test_overflowing_points_are_stored_and_the_run_continues(tiny_run, tmp_path, capsys):
    out = tmp_path / "far.h5"
    # "-1e9" is a number, not an option
    assert main(["line", str(tiny_run), "sgd", "swa/average", "--range", "-1e9", "1e9",
                 "--points", "5", "--bn", "stored", "-o", str(out), "--quiet"]) == 0
    surf = open_surface(out)
    assert surf.done.all() and surf.x[2] == 0.0
    for m in ("train_loss", "test_loss", "train_err", "test_err"):
        v = surf.values[m]
        assert np.isfinite(v[2]) and not np.isfinite(v[[0, 1, 3, 4]]).any(), (m, v)
    assert "min train_loss" in capsys.readouterr().out  # minima over the finite points


@pytest.mark.parametrize("args, message", [
    (["line", "{run}", "sgd", "swa/average", "--points", "0"], "no points"),
    (["line", "{run}", "--ray-from", "sgd", "--rays", "0"], "at least 1"),
    (["line", "{run}", "sgd", "sgd"], "given twice"),
    (["line", "{run}", "sgd", "nosuchrun"], "not found"),
    (["plane", "{run}", "sgd", "swa/average", "{same}:p:0"], None),  # same architecture, other file: fine
    (["plane", "{same}", "p:0", "p:1", "p:2"], "collinear"),
    (["plane", "{run}", "sgd", "swa/average", "{other}:p"], "different architectures"),
    (["line", "{surface}", "sgd", "swa/average"], "not a trajectory file"),
    (["plane", "{run}", "--origin", "sgd", "--dir", "swa/average"], "twice"),
    (["plane", "{run}", "--pca", "swa/average:0"], "not found"),
])
def test_bad_input_is_one_line(tiny_run, crafted, tmp_path, capsys, args, message):
    same, other = crafted
    surface = tmp_path / "s.h5"
    if "{surface}" in args:
        traj = open_trajectory(tiny_run)
        compute_surface(traj, Plane.through(traj, *THREE), (2, 2), out=surface, quiet=True, points_per_call=4)
    argv = [a.format(run=tiny_run, same=same, other=other, surface=surface) for a in args]
    out = tmp_path / "out.h5"
    argv += ["-o", str(out), "--quiet", "--grid" if argv[0] == "plane" else "--points", "2"] + \
        (["2"] if argv[0] == "plane" else [])
    if "--points" in args:  # the case's own --points comes last and wins
        argv += ["--points", args[args.index("--points") + 1]]
    if message is None:
        assert main(argv) == 0 and out.exists()
        return
    one_line_error(capsys, argv, message)
    assert not out.exists() and not (tmp_path / "out.h5.partial").exists()


def test_export_refuses_rays_and_keeps_loss_landscape_order(tiny_run, tmp_path, capsys):
    one_line_error(capsys, ["line", str(tiny_run), "--ray-from", "sgd", "--rays", "2", "--points", "2", "--export",
                    "loss-landscape", "-o", str(tmp_path / "r.h5"), "--quiet"], "rays")
    out = tmp_path / "l.h5"
    assert main(["line", str(tiny_run), "sgd", "swa/average", "--points", "3", "--export", "loss-landscape",
                 "-o", str(out), "--quiet"]) == 0
    surf = open_surface(out)
    with h5py.File(tmp_path / "l.loss-landscape.h5", "r") as f:
        assert "ycoordinates" not in f and f["train_loss"].shape == (3,)
        np.testing.assert_array_equal(f["train_acc"][()], 100 - surf.values["train_err"])
