"""Static figures and their numbers, on analytic surfaces whose answers are known in closed form.

Train loss is a bowl centred at (1, -0.5), test error a bowl centred at (2, 0.5): the offset between
the minima is sqrt(2). Along the line, loss = 0.01 + ((t - 7) / 4)^2 with SGD at t = 0 (on the wall)
and SWA at t = 7 (the bottom), so the distances to a rise are known exactly.
"""
from __future__ import annotations

import json
import math
import warnings

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from landscape.cli.main import main  # noqa: E402
from landscape.errors import ConfigError, FileFormatError  # noqa: E402
from landscape.params import Layout  # noqa: E402
from landscape.plot import analysis, figures, static  # noqa: E402
from landscape.plot.report import plot_files  # noqa: E402
from landscape.store import PathData, PointData, Surface, SurfaceWriter, TrajectoryWriter, open_surface  # noqa: E402

X = np.linspace(-2.0, 4.0, 13)  # step 0.5; deliberately not square
Y = np.linspace(-3.0, 3.0, 11)  # step 0.6
T = np.linspace(-7.0, 21.0, 281)  # step 0.1


def _bowls(x, y):
    gx, gy = np.meshgrid(x, y, indexing="ij")
    train = 0.01 + (gx - 1.0) ** 2 + (gy + 0.5) ** 2
    test = 5.0 + 10.0 * ((gx - 2.0) ** 2 + (gy - 0.5) ** 2)
    return {"train_loss": train, "train_err": 50 * train / train.max(), "test_loss": 0.1 * test, "test_err": test}


def make_plane(path, far: float = 5.0, maximized: bool = False) -> Surface:
    """A complete plane file: SGD at the origin, SWA at (3, 0), a SWAP worker lying ``far`` off the
    plane, a Lookahead slow/fast path, the SWA iterates. ``maximized``: of a task whose metric is an
    accuracy (``acc``, larger is better) instead of an error."""
    basis = {"origin": np.zeros(4), "u": np.eye(4)[0], "v": np.eye(4)[1]}
    points = {"sgd:10": PointData(np.array([0.0, 0.0]), 0.0), "swa/average:5": PointData(np.array([3.0, 0.0]), 0.0),
              "swa/iterates:0": PointData(np.array([1.0, 2.0]), 0.0),
              "swap/worker0:3": PointData(np.array([2.0, -2.0]), far)}
    paths = {"sgd": PathData(np.stack([np.linspace(-4, 0, 11), np.linspace(4, 0, 11)], 1), np.linspace(8, 0, 11),
                             np.arange(11.0)),
             "swa/iterates": PathData(np.array([[1.0, 2.0], [2.0, 1.0], [3.0, 0.5]]), np.zeros(3), np.array([6.0, 7, 8])),
             "lookahead/slow": PathData(np.array([[-1.0, -1.0], [0.0, -0.5], [1.0, -0.6]]), np.zeros(3),
                                        np.array([0.0, 1, 2])),
             "lookahead/fast": PathData(np.array([[-1.0, -1.0], [-0.4, -0.9], [0.0, -0.5]]), np.zeros(3),
                                        np.array([0.0, 0.5, 1])),
             "grafting/net1": PathData(np.array([[0.5, 1.0], [1.5, 1.5]]), np.array([0.0, 0.1]), np.array([0.0, 1]))}
    spec = {"kind": "plane", "method": "through", "origin": "sgd:10",
            "checkpoints": {"a": "sgd:10", "b": "swa/average:5", "c": "swa/iterates:0"}}
    v = _bowls(X, Y)
    if maximized:
        v = {k.replace("_err", "_acc"): 100.0 - a if k.endswith("_err") else a for k, a in v.items()}
        spec["task"] = {"name": "accuracy", "metrics": ["acc"], "primary": "acc", "percent": ["acc"],
                        "values": list(v), "maximize": ["acc"]}
    w = SurfaceWriter.create(path, spec, X, Y, basis, points, paths, metrics=tuple(v))
    w.write(np.arange(X.size * Y.size), {k: a.reshape(-1) for k, a in v.items()})
    w.close()
    return open_surface(path)


def line_values(t):
    loss = 0.01 + ((t - 7.0) / 4.0) ** 2
    return {"train_loss": loss, "train_err": np.minimum(100, 10 * loss), "test_loss": 2 * loss,
            "test_err": 3.0 + 0.05 * (t - 7.5) ** 2}


def make_line(path) -> Surface:
    spec = {"kind": "line", "method": "through", "origin": "sgd:10",
            "checkpoints": {"a": "sgd:10", "b": "swa/average:5"}, "range": [-1, 3]}
    points = {"sgd:10": PointData(np.array([0.0]), 0.0), "swa/average:5": PointData(np.array([7.0]), 0.0),
              "swa/iterates:5": PointData(np.array([6.0]), 1.5)}
    w = SurfaceWriter.create(path, spec, T, None, {"origin": np.zeros(4), "u": np.eye(4)[:1]}, points, {})
    w.write(np.arange(T.size), line_values(T))
    w.close()
    return open_surface(path)


def make_rays(origin: str, base: float, widths) -> Surface:
    """An in-memory rays surface (values (R, nx)): loss = base + (d / width)^2 along each ray."""
    d = np.linspace(0.0, 10.0, 101)
    rows = np.array([base + (d / w) ** 2 for w in widths])
    values = {"train_loss": rows, "train_err": rows, "test_loss": rows, "test_err": rows}
    return Surface(None, {"method": "ray", "origin": origin, "rays": len(widths)}, d, None, values,
                   np.ones(rows.shape, bool), {origin: PointData(np.zeros(1), 0.0)}, {})


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    return make_plane(tmp_path_factory.mktemp("plot") / "plane.h5")


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    return make_line(tmp_path_factory.mktemp("plot") / "line.h5")


# ---------------------------------------------------------------------------------------------
# analysis

def test_log_levels_are_log_spaced_with_a_top_band():
    v = np.array([0.01, 0.02, 0.5, 3.0, 50.0])
    assert analysis.default_log_alpha(v) == pytest.approx(math.log(0.0025))  # a quarter of the minimum
    levels, top = analysis.log_levels(v, n=5, log_alpha=-4.0, vmax=3.0)
    assert len(levels) == 7 and top == 3.0
    assert levels[0] == pytest.approx(0.01) and levels[5] == pytest.approx(3.0) and levels[6] > 1e3
    assert np.all(np.diff(levels) > 0)
    steps = np.diff(np.log(levels[1:5] - 0.01))  # equal steps in log(value - min)
    np.testing.assert_allclose(steps, steps[0])
    assert levels[1] - 0.01 == pytest.approx(math.exp(-4.0 + steps[0]))


def test_grid_minimum_refines_an_off_grid_quadratic_minimum():
    gx, gy = np.meshgrid(X, Y, indexing="ij")
    v = 2.0 + (gx - 1.13) ** 2 + 0.5 * (gy + 0.37) ** 2 + 0.2 * (gx - 1.13) * (gy + 0.37)
    p, val = analysis.grid_minimum(X, Y, v)
    np.testing.assert_allclose(p, [1.13, -0.37], atol=1e-9)
    assert val == pytest.approx(2.0)


def test_grid_minimum_of_a_flat_bottom_is_its_centroid():
    v = np.full((len(X), len(Y)), 9.0)
    v[4:7, 3:5] = 2.5  # a tied region, as test error has in steps of 0.1 %
    p, val = analysis.grid_minimum(X, Y, v)
    np.testing.assert_allclose(p, [X[4:7].mean(), Y[3:5].mean()])
    assert val == 2.5


def test_a_minimum_beside_a_diverged_region_is_the_grid_point_not_a_quadratic_below_it():
    """Next to values of 1e36 (a diverged training's plane) the 3x3 quadratic fit put the minimum at
    -2e36, far off the grid point: such a fit does not follow the values and is not used."""
    v = np.full((len(X), len(Y)), 1e36)
    v[4, 3], v[5, 3], v[4, 4] = 0.05, 0.4, 0.7
    v[0, 0] = np.inf
    p, val = analysis.grid_minimum(X, Y, v)
    np.testing.assert_allclose(p, [X[4], Y[3]])
    assert val == 0.05
    gx, gy = np.meshgrid(X, Y, indexing="ij")  # a bowl beside a wall of diverged columns: a quadratic fits
    bowl = np.where(gx > X[6], 1e3, 1.0 + (gx - X[6] + 0.2) ** 2 + (gy - 0.1) ** 2)  # the 3x3 values exactly
    p, val = analysis.grid_minimum(X, Y, bowl)  # (its vertex was -125 half a cell toward the wall)
    assert val > 1.0 and p[0] <= X[6]


def test_smoothing_finds_the_trend_minimum_of_a_noisy_surface():
    gx, gy = np.meshgrid(X, Y, indexing="ij")
    trend = 3.0 + 0.5 * ((gx - 2.0) ** 2 + (gy - 0.6) ** 2)
    noisy = trend + np.random.default_rng(0).choice([0.0, 0.3], size=trend.shape)
    noisy[1, 1] = 2.0  # one lucky grid point far from the trend's minimum
    assert np.allclose(analysis.grid_minimum(X, Y, noisy, refine=False)[0], [X[1], Y[1]])
    p, _ = analysis.grid_minimum(X, Y, noisy, smooth=1.0)
    assert np.hypot(*(p - [2.0, 0.6])) < 0.6


def test_offset_between_tilted_bowls(plane):
    res = static.offset_of(plane, smooth=0.0)
    np.testing.assert_allclose(res["train_min"], [1.0, -0.5], atol=1e-9)
    np.testing.assert_allclose(res["test_min"], [2.0, 0.5], atol=1e-9)
    assert res["length"] == pytest.approx(math.sqrt(2.0))
    assert res["test_min_value"] == pytest.approx(5.0)
    smoothed = static.offset_of(plane)  # the default smooths over one grid cell: same minima here
    assert smoothed["smooth"] == 1.0 and smoothed["length"] == pytest.approx(math.sqrt(2.0), abs=0.05)
    assert smoothed["unsmoothed"]["length"] == pytest.approx(math.sqrt(2.0))


def test_rise_distance_interpolates_and_reports_the_unreached():
    t = np.linspace(-5.0, 5.0, 11)
    v = np.abs(t - 2.0)
    assert analysis.rise_distance(t, v, 2.0, 1.5, +1) == (pytest.approx(1.5), pytest.approx(3.0))
    assert analysis.rise_distance(t, v, 2.0, 1.5, -1)[0] == pytest.approx(1.5)
    assert analysis.rise_distance(t, v, 2.5, 1.0, -1)[0] == pytest.approx(2.0)  # off-grid start: down, then up to 1.5
    d, searched = analysis.rise_distance(t, v, 2.0, 10.0, +1)
    assert d is None and searched == pytest.approx(3.0)
    with pytest.raises(ConfigError, match="outside"):
        analysis.rise_distance(t, v, 9.0, 1.0, +1)
    v[7] = np.nan  # a diverged value where the rise starts: said so, not "outside the line"
    with pytest.raises(ConfigError, match="value at coordinate 2 of the line is not finite"):
        analysis.rise_distance(t, v, 2.0, 1.0, +1)


def test_edge_center_numbers_put_sgd_at_the_edge_and_swa_in_the_center(line):
    rays = {"sgd:10": make_rays("sgd:10", 3.0725, [0.5, 0.6]).values["train_loss"],
            "swa/average:5": make_rays("swa/average:5", 0.01, [4.0, 5.0]).values["train_loss"]}
    d = np.linspace(0.0, 10.0, 101)
    res = static.edge_center_of(line, {k: [(d, r) for r in v] for k, v in rays.items()}, rises=(0.1,))
    sgd, swa = res["sgd:10"]["rise"]["0.1"], res["swa/average:5"]["rise"]["0.1"]
    # exact: SWA 4 sqrt(0.1) both ways; SGD 4 sqrt(3.1625) - 7 outward, 7 + 4 sqrt(3.1625) inward
    assert swa["line"]["toward sgd:10"]["distance"] == pytest.approx(4 * math.sqrt(0.1), abs=2e-3)
    assert swa["line"]["away from sgd:10"]["distance"] == pytest.approx(4 * math.sqrt(0.1), abs=2e-3)
    assert sgd["line"]["away from swa/average:5"]["distance"] == pytest.approx(4 * math.sqrt(3.1625) - 7, abs=2e-3)
    assert sgd["line"]["toward swa/average:5"]["distance"] == pytest.approx(7 + 4 * math.sqrt(3.1625), abs=2e-3)
    assert sgd["line"]["away from swa/average:5"]["direction"] == -1
    assert swa["rays"]["distances"] == [pytest.approx(4 * math.sqrt(0.1), abs=2e-3),
                                        pytest.approx(5 * math.sqrt(0.1), abs=2e-3)]
    assert sgd["rays"]["mean"] < swa["rays"]["mean"]
    assert res["swa/average:5"]["test_err"] == pytest.approx(3.0 + 0.05 * 0.25)


def test_rays_of_another_trajectory_are_not_joined_to_a_line_by_name(line, tmp_path):
    """Checkpoint names of another run name other checkpoints: rays from another trajectory's sgd:10
    are drawn on their own, not beside this line's sgd:10 (they were, by name)."""
    import dataclasses
    ours = dataclasses.replace(line, trajectory_sha256="a" * 64)
    theirs = dataclasses.replace(make_rays("sgd:10", 3.0, [0.5, 0.6]), trajectory_sha256="b" * 64)
    res = plot_files([ours, theirs], tmp_path / "figs", formats=("png",))
    assert "rays" not in res.numbers["edge_center"][str(line.path)]["sgd:10"]["rise"]["0.1"]
    assert list(res.numbers["rays"]["surface"]) == ["sgd:10"]
    same = dataclasses.replace(theirs, trajectory_sha256="a" * 64)
    res = plot_files([ours, same], tmp_path / "figs2", formats=("png",))
    assert res.numbers["edge_center"][str(line.path)]["sgd:10"]["rise"]["0.1"]["rays"]["rays"] == 2
    assert "rays" not in res.numbers


def test_rays_that_never_rise_count_at_their_length_in_every_width(tmp_path):
    """A flat ray (width 1000: +0.0001 over its 10 units) counts at 10, a lower bound, in the report,
    the edge-vs-center numbers and the demo's basin width alike (it was dropped from the report's
    mean, so a flatter basin could print a smaller width)."""
    from landscape.demo import basin_width
    rays = make_rays("sgd:10", 1.0, [1.0, 1000.0])
    d = np.linspace(0.0, 10.0, 101)
    width = analysis.ray_rise_distances([(d, r) for r in rays.values["train_loss"]], 0.1)
    assert width["distances"] == [pytest.approx(math.sqrt(0.1), abs=3e-3), None]  # linear between grid points
    assert width["mean"] == pytest.approx((width["distances"][0] + 10.0) / 2)
    assert (width["not_reached"], width["rays"], width["max"]) == (1, 2, 10.0)
    assert basin_width(rays, 0.1) == width
    res = plot_files([rays], tmp_path / "figs", formats=("png",))
    assert res.numbers["rays"]["surface"]["sgd:10"]["rise"]["0.1"] == width
    assert any("mean > 5.16 over 2 rays (1 did not rise" in line for line in res.lines), res.lines


# ---------------------------------------------------------------------------------------------
# drawing functions take an Axes and return it

def test_drawing_functions_return_their_axes(plane, line):
    from matplotlib.figure import Figure
    fig = Figure()
    axes = fig.subplots(2, 4).ravel()
    assert static.draw_plane(axes[0], plane, "test_err") is axes[0]
    assert static.draw_checkpoints(axes[0], plane) is axes[0]
    assert static.draw_offset(axes[1], plane) is axes[1]
    assert static.draw_line(axes[2], line, "train_loss") is axes[2]
    assert static.draw_rays(axes[3], {"sgd:10": [(T[:5] - T[0], np.arange(1.0, 6.0))]}, line=line, rise=1.0) is axes[3]
    assert static.draw_lookahead(axes[4], [1, 2, 3, 4], [0.5, 0.4, 0.3, 0.35], [2, 4], [0.2, 0.25]) is axes[4]
    assert static.draw_grafting(axes[5], [0, 1, 2], np.ones((3, 2)), ["a", "b"]) is axes[5]
    # the top colour band of the plane is labelled "> x"
    cbar_labels = [t.get_text() for t in fig.axes[-1].get_yticklabels()]
    assert any(lbl.startswith("> ") for lbl in cbar_labels)


def test_plane_figure_marks_checkpoints_and_points_off_the_plane(plane):
    fig = figures.plane_figure(plane)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "SGD" in labels and "SWA average" in labels and "Lookahead slow path" in labels
    assert "SWA iterates (projected)" in labels and "Grafting net 1" in labels
    assert "SWA iterates (swa/iterates:0)" in labels  # the plane was made of it
    assert any(lbl.startswith("SWAP worker 0 (5 off plane)") for lbl in labels)  # far: drawn hollow
    assert len(fig.axes) == 4  # two planes, two colour bars
    near = make_plane_surface_with_far(plane, 0.1)
    labels = [t.get_text() for t in figures.plane_figure(near).legends[0].get_texts()]
    assert "SWAP worker 0" in labels and not any(lbl.startswith("not drawn") for lbl in labels)
    beyond = make_plane_surface_with_far(plane, 100.0)  # farther off than the plane is wide: left out, named
    legend = figures.plane_figure(beyond).legends[0]
    assert not any(t.get_text().startswith("SWAP worker 0") for t in legend.get_texts())
    assert legend.get_title().get_text() == "not drawn (outside or far off): swap/worker0:3"  # above the entries


def make_plane_surface_with_far(plane, far):
    pts = dict(plane.points)
    pts["swap/worker0:3"] = PointData(pts["swap/worker0:3"].coords, far)
    return Surface(plane.path, plane.spec, plane.x, plane.y, plane.values, plane.done, pts, plane.paths)


def test_checkpoints_of_interest_adds_unnamed_run_ends_and_skips_iterate_ends(plane):
    names = static.checkpoints_of_interest(plane)
    assert "grafting/net1:1" in names  # a run without a named point: its last checkpoint
    assert "swa/iterates:0" in names   # named because the plane was made of it
    assert list(names)[0] == "sgd:10"  # in the methods' order


def test_lookahead_and_grafting_figures_from_a_trajectory(tmp_path):
    layout = Layout.of(torch.nn.Linear(2, 1))
    path = tmp_path / "t.h5"
    with TrajectoryWriter(path, {"methods": ["lookahead", "grafting"]}, layout) as w:
        w.append("lookahead/slow", torch.zeros(3), epoch=0.0, step=0, train_loss=1.0, test_err=50.0, sync=0)
        for s in range(1, 11):
            fast_loss = 1.0 - 0.05 * s + 0.1 * (s % 5)
            w.append("lookahead/fast", torch.zeros(3), epoch=s / 10, step=s, train_loss=fast_loss,
                     test_err=40.0 + s % 5, inner_step=s % 5 or 5)
            if s % 5 == 0:
                w.append("lookahead/slow", torch.zeros(3), epoch=s / 10, step=s, train_loss=0.8 - 0.05 * s,
                         test_err=30.0, sync=s // 5)
        w.set_attrs("lookahead/slow", k=5, alpha=0.5, inner_optimizer="SGD")
        for i in range(2):
            run = f"grafting/net{i}"
            w.append(run, torch.zeros(3), epoch=0.0, step=0, grafted=0, entropy=[2.3, 2.2],
                     donor_entropy=[np.nan] * 2, graft_weight=[np.nan] * 2)
            for e in (1, 2):
                w.append(run, torch.zeros(3), epoch=e, step=e, grafted=0, entropy=[2.0 - 0.1 * e, 1.5],
                         donor_entropy=[np.nan] * 2, graft_weight=[np.nan] * 2)
                w.append(run, torch.zeros(3), epoch=e, step=e, grafted=1, entropy=[2.0, 1.5],
                         donor_entropy=[1.9, 1.6], graft_weight=[0.6 + 0.05 * i, 0.4])
            w.set_attrs(run, layers=["conv.weight", "fc.weight"])
    from landscape.store import open_trajectory
    traj = open_trajectory(path)
    fs, fm, ss, sm = figures.lookahead_arrays(traj)
    assert list(ss) == [5.0, 10.0] and len(fs) == 10  # slow rows within the fast window only
    nets, layers = figures.grafting_arrays(traj)
    assert layers == ["conv.weight", "fc.weight"]
    epoch, entropy, weight, w_epoch = nets["grafting/net1"]
    assert list(epoch) == [0, 1, 2] and entropy.shape == (3, 2) and list(w_epoch) == [1, 2]
    np.testing.assert_allclose(weight[:, 0], [0.65, 0.65])
    res = plot_files([], tmp_path / "figs", trajectory=path, formats=("png",))
    assert sorted(p.name for p in res.figures) == ["grafting.png", "lookahead.png"]


# ---------------------------------------------------------------------------------------------
# the command

def test_plot_command_writes_figures_and_numbers(plane, line, tmp_path, capsys):
    out = tmp_path / "figs"
    assert main(["plot", str(plane.path), str(line.path), "-o", str(out), "--rise", "0.1", "0.5"]) == 0
    stdout = capsys.readouterr().out
    for name in ("plane-landscape", "plane-offset", "line-edge-center"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    nums = json.loads((out / "numbers.json").read_text())
    assert nums["offset"][str(plane.path)]["length"] == pytest.approx(math.sqrt(2.0), abs=0.05)
    ec = nums["edge_center"][str(line.path)]
    assert set(ec) == {"sgd:10", "swa/average:5"} and set(ec["sgd:10"]["rise"]) == {"0.1", "0.5"}
    assert "1.41 weight-space units apart" in stdout and "away from swa/average:5" in stdout
    assert not list(out.glob("*.partial"))


def test_figures_and_the_explorer_reach_the_disk_before_they_get_their_names(plane, tmp_path, monkeypatch):
    """Every figure, numbers.json and the explorer page are synced before the rename that gives them
    their final names (and their folder after): a power cut leaves no named file with missing bytes."""
    import os
    from pathlib import Path
    from landscape.plot.interactive import write_explorer
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
                        or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", str(a), str(b))) or replace(a, b))
    out = tmp_path / "figs"
    res = plot_files([plane], out, formats=("png",))
    write_explorer([plane], tmp_path / "explore.html")
    finals = {str(p) for p in res.figures} | {str(out / "numbers.json"), str(tmp_path / "explore.html")}
    named = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] in finals]
    assert {events[i][2] for i in named} == finals
    for i in named:
        assert ("sync", events[i][1]) in events[:i] and ("sync", str(Path(events[i][2]).parent)) in events[i + 1:]


def test_plot_files_pairs_rays_with_the_line(line, tmp_path):
    rays = [make_rays("sgd:10", 3.0725, [0.5, 0.6]), make_rays("swa/average:5", 0.01, [4.0, 5.0]),
            make_rays("swap/average:2", 0.02, [3.0])]
    res = plot_files([line] + rays, tmp_path, rises=(0.1,), formats=("png",))
    names = [p.name for p in res.figures]
    assert len(names) == 2 and names[0] == "line-edge-center.png"
    assert names[1].endswith("-rays.png")  # the unmatched rays get their own figure
    ec = res.numbers["edge_center"][str(line.path)]
    assert len(ec["swa/average:5"]["rise"]["0.1"]["rays"]["distances"]) == 2
    assert "rays" in res.numbers
    # the figure functions take the rays surfaces too, paired with the line's solutions the same way
    from landscape.plot import edge_center_figure, rays_figure
    from landscape.plot.static import edge_center_of, match_rays, rays_of, line_solutions
    fig = edge_center_figure(line, rays, rises=(0.1,))
    matched = match_rays(rays_of(rays), line_solutions(line))[0]
    assert edge_center_of(line, matched, (0.1,)) == ec
    assert any(label.endswith("random rays") for label in fig.axes[1].get_legend_handles_labels()[1])
    assert len(rays_figure(rays[2]).axes[0].lines) == len(rays_figure(rays_of(rays[2:])).axes[0].lines) > 0


def test_plot_bad_input_is_one_line(plane, tmp_path, capsys):
    traj = tmp_path / "t.h5"
    with TrajectoryWriter(traj, {}, Layout.of(torch.nn.Linear(2, 1))) as w:
        w.append("sgd", torch.zeros(3), epoch=0.0, step=0)
    assert main(["plot", str(traj), "-o", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a surface file" in err
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    assert main(["plot", str(junk), "-o", str(tmp_path / "f")]) == 2
    assert "not an HDF5 file" in capsys.readouterr().err
    with pytest.raises(FileFormatError, match="no 'foo' values"):
        plot_files([plane], tmp_path / "f", test_metric="foo")
    with pytest.raises(ConfigError, match="nothing to draw"):
        plot_files([], tmp_path / "f")
    with pytest.raises(ConfigError, match="positive"):
        plot_files([plane], tmp_path / "f", rises=(0.0,))
    from dataclasses import replace
    thin = replace(plane, y=plane.y[:1], values={k: v[:, :1] for k, v in plane.values.items()})
    with pytest.raises(ConfigError, match="a plane of [0-9]+ x 1 points; its contours need at least 2 x 2"):
        plot_files([thin], tmp_path / "f")


def test_a_figure_that_cannot_be_written_is_one_line(plane, tmp_path, monkeypatch):
    import errno
    import os

    from landscape.errors import WriteError
    from matplotlib.figure import Figure

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Figure, "savefig", full)
    with pytest.raises(WriteError, match="no space left on device writing .*plane-landscape.png"):
        plot_files([plane], tmp_path / "f", formats=("png",))
    assert not (tmp_path / "f").exists() or not list((tmp_path / "f").glob("*.png"))


def test_rays_files_pair_with_the_line_by_their_origin(line, tmp_path):
    d = np.linspace(0.0, 10.0, 21)
    paths = []
    for origin, base, widths in (("sgd:10", 3.0725, [0.5, 0.6]), ("swa/average:5", 0.01, [4.0, 5.0, 6.0])):
        rows = np.array([base + (d / w) ** 2 for w in widths])
        p = tmp_path / f"rays-{origin.split('/')[0].split(':')[0]}.h5"
        w = SurfaceWriter.create(p, {"method": "ray", "origin": origin, "rays": len(widths)}, d, None,
                                 {"origin": np.zeros(4), "u": np.eye(4)[:len(widths)]},
                                 {origin: PointData(np.zeros(1), 0.0)}, {}, shape=rows.shape)
        w.write(np.arange(rows.size), {m: rows.reshape(-1) for m in ("train_loss", "train_err", "test_loss", "test_err")})
        w.close()
        paths.append(p)
    res = plot_files([line.path, *paths], tmp_path / "figs", formats=("png",))
    assert [p.name for p in res.figures] == ["line-edge-center.png"]
    ec = res.numbers["edge_center"][str(line.path)]
    assert len(ec["sgd:10"]["rise"]["0.1"]["rays"]["distances"]) == 2
    assert len(ec["swa/average:5"]["rise"]["0.1"]["rays"]["distances"]) == 3
    with pytest.raises(FileFormatError, match="holds rays, not a line"):
        static.draw_line(None, open_surface(paths[0]))


def test_figures_of_real_planes_lines_and_rays(tiny_run, tmp_path):
    """End to end on the shared tiny trajectory: plane, line and rays computed by landscape.surface,
    then every figure, the numbers and the explorer."""
    from landscape.geometry import Line, Plane
    from landscape.plot.interactive import write_explorer
    from landscape.store import open_trajectory
    from landscape.surface import compute_surface
    traj = open_trajectory(tiny_run)
    kw = dict(quiet=True, device="cpu")
    plane = compute_surface(traj, Plane.through(traj, "sgd", "swa/average", "swa/iterates:0"), (5, 4),
                            out=tmp_path / "plane.h5", **kw)
    line = compute_surface(traj, Line.through(traj, "sgd", "swa/average", range=(-1, 2)), (9,),
                           out=tmp_path / "line.h5", **kw)
    rays = compute_surface(traj, Line.random_rays(traj, "swa/average", 2, seed=0, max_distance=5.0), (5,),
                           out=tmp_path / "rays.h5", **kw)
    res = plot_files([plane.path, line.path, rays.path], tmp_path / "figs", trajectory=tiny_run,
                     rises=(0.05,), formats=("png",))
    assert [p.name for p in res.figures] == ["plane-landscape.png", "plane-offset.png", "line-edge-center.png"]
    ec = res.numbers["edge_center"][str(line.path)]
    sgd, swa = (f"sgd:{traj.num_checkpoints('sgd') - 1}", f"swa/average:{traj.num_checkpoints('swa/average') - 1}")
    assert set(ec) == {sgd, swa}
    assert len(ec[swa]["rise"]["0.05"]["rays"]["distances"]) == 2
    off = res.numbers["offset"][str(plane.path)]
    assert off["length"] == pytest.approx(float(np.hypot(*np.subtract(off["test_min"], off["train_min"]))))
    for end in ("train_min", "test_min"):  # both minima lie on the plane's grid
        assert plane.x[0] <= off[end][0] <= plane.x[-1] and plane.y[0] <= off[end][1] <= plane.y[-1]
    page = write_explorer([plane.path, line.path, rays.path], tmp_path / "e.html")
    assert page.read_text().count("<section") == 3


def test_a_plot_holds_its_folder_while_it_writes(plane, tmp_path, monkeypatch):
    """Two plots into one folder at once: the second is refused while the first writes (they shared one
    staging folder: one crashed with a traceback, or figures appeared without their numbers)."""
    import landscape.plot.report as report
    from landscape.errors import FileFormatError
    from landscape.store.files import OutputLock
    out, publish, seen = tmp_path / "figs", report.publish, []

    def publish_while_a_second_plot_tries(src, dst):
        with pytest.raises(FileFormatError, match="figs is being written by process"):
            OutputLock(out)
        seen.append(dst.name)
        return publish(src, dst)
    monkeypatch.setattr(report, "publish", publish_while_a_second_plot_tries)
    res = report.plot_files([plane.path], out, formats=("png",))
    assert "numbers.json" in seen and res.numbers_path.exists() and not (tmp_path / "figs.lock").exists()


def test_a_plane_of_one_column_is_refused_by_every_drawing_in_one_line(plane, tmp_path):
    """plot refused a 1 x N plane; explore wrote a page with empty panels for it (and draw_plane drew an
    empty Axes): all three refuse it, and no page is written."""
    from landscape.errors import ConfigError
    from landscape.plot.interactive import write_explorer
    from matplotlib.figure import Figure
    thin = Surface(None, plane.spec, plane.x[:1], plane.y, {k: v[:1] for k, v in plane.values.items()},
                   plane.done[:1], plane.points, plane.paths)
    flat = Surface(None, plane.spec, plane.x, plane.y[:1], {k: v[:, :1] for k, v in plane.values.items()},
                   plane.done[:, :1], plane.points, plane.paths)  # (one row: no height to divide by)
    for draw in (lambda: write_explorer([thin], tmp_path / "x.html"),
                 lambda: static.draw_plane(Figure().subplots(), thin),
                 lambda: plot_files([thin], tmp_path / "figs"),
                 lambda: figures.plane_figure(flat)):
        with pytest.raises(ConfigError, match=r"this surface is a plane of \d+ x \d+ points; its contours need"), \
                warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing said before the error
            draw()
    assert not (tmp_path / "x.html").exists() and not (tmp_path / "figs").exists()


def test_draw_rays_takes_a_rays_surface_and_save_makes_its_folder(tmp_path):
    """The notebook way: ``draw_rays(ax, surface)`` as ``draw_line(ax, surface)`` (it wanted the dict of
    curves), and ``save`` into a folder not made yet (it raised "no such file or directory")."""
    from matplotlib.figure import Figure
    from landscape import evaluate_surface
    from landscape.geometry import Line
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    data = (x[:30], y[:30], x[30:], y[30:])
    rays = evaluate_surface(net, Line.random_rays(net, n=3, max_distance=1.0), data, (4,))
    fig = Figure()
    ax = fig.subplots()
    assert static.draw_rays(ax, rays) is ax and len(ax.lines) == 3
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), rays.values["train_loss"][1])
    line = evaluate_surface(net, Line.through(net, torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(),
                                                                      torch.nn.Linear(6, 3))), data, (4,))
    with pytest.raises(ConfigError, match="draw_rays takes a rays surface"):
        static.draw_rays(ax, line)
    assert [p.name for p in figures.save(fig, tmp_path / "new" / "figs", "rays", formats=("png",))] == ["rays.png"]


def test_figures_into_the_current_folder(plane, tmp_path, monkeypatch):
    """`plot -o .`: the folder's lock is taken by its real name (the path "." has none, and plot crashed)."""
    monkeypatch.chdir(tmp_path)
    res = plot_files([plane.path], ".", formats=("png",))
    assert (tmp_path / "numbers.json").exists() and res.figures


def test_huge_values_are_labelled_in_scientific_notation():
    """A diverged plane's colour bar read 38-digit integers that ran into the next panel."""
    assert static._fmt(1.234e37) == "1.23e+37" and static._fmt(12345.0) == "12345"
    assert static._distinct_labels([1e36, 1.0001e36, 2e36]) == ["1e+36", "1.0001e+36", "2e+36"]


def test_a_users_metric_in_percent_is_labelled_so(tmp_path):
    """A task that gives its accuracy in percent (``percent=("acc",)``) gets "(%)" on its colour bar and
    "%" on its best value, as an error does (its accuracy read as a bare number)."""
    acc = make_plane(tmp_path / "acc.h5", maximized=True)
    fig = figures.plane_figure(acc)
    assert fig.axes[-1].get_ylabel() == "test acc (%)"
    labels = [t.get_text() for t in figures.offset_figure(acc).legends[0].get_texts()]
    assert any(lbl.startswith("test acc maximum (") and lbl.endswith(" %)") for lbl in labels)
    assert figures.plane_figure(make_plane(tmp_path / "err.h5")).axes[-1].get_ylabel() == "test error (%)"


def test_a_constant_surface_is_banded_just_above_its_value():
    """Every value 1e-6: the bands span 1e-6 to 1.001e-6 (they spanned 1e-6 to 2e-6, a factor of two
    the surface does not have)."""
    levels, top = analysis.log_levels(np.full(9, 1e-6))
    assert levels[0] == 1e-6 and top == pytest.approx(1.001e-6)
    assert analysis.log_levels(np.zeros(9))[1] == pytest.approx(1e-6)
