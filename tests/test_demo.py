"""`landscape demo --quick` end to end: every method trained, every surface computed, every figure and the
explorer written, and a rerun reuses the finished work instead of redoing it."""
import json

import numpy as np
import pytest

from landscape.store import open_surface, open_trajectory
from landscape.store.files import sha256

pytestmark = pytest.mark.slow

FIGURES = ("plane-swa-landscape", "plane-swa-offset", "plane-methods-landscape", "plane-methods-offset",
           "plane-swap-landscape",
           "line-edge-center", "lookahead", "lookahead-adam", "grafting", "flatness", "flatness-table")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from landscape.cli.main import main
    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", "--quick", "--quiet", "-o", str(out)]) == 0
    return out


def test_demo_writes_every_figure_and_the_explorer(demo):
    summary = json.loads((demo / "summary.json").read_text())
    for name in FIGURES:
        for ext in ("png", "pdf"):
            path = demo / "figures" / f"{name}.{ext}"
            assert path.stat().st_size > 10_000, path
        assert (demo / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (demo / "explore.html").read_text()
    assert "plotly" in html and "<script" in html
    # the flatness numbers (of the averaged copy of the run) beside the planes' checkpoints
    assert "top Hessian eigenvalue " in html  # (was warned away: the sharpness file is of run+avg.h5)
    numbers = json.loads((demo / "figures" / "numbers.json").read_text())
    # an offset for each of the three planes, edge-vs-center distances for the line's two solutions
    assert len(numbers["offset"]) == 3 and all(o["length"] >= 0 and len(o["vector"]) == 2
                                               for o in numbers["offset"].values())
    (line,) = numbers["edge_center"].values()
    assert {name.split(":")[0] for name in line} == {"sgd", "swa/average"}
    assert set(summary["seconds"]) == {"train", "surfaces", "figures", "flatness"}
    # the claims are checked against the run's numbers (on this tiny run they need not hold): three of
    # the papers' and one flatter-than-SGD check per average and Lookahead's slow weights
    averages = [r for r in summary["flatness"]["table"] if r["run"] != "sgd" and not r["run"].startswith("grafting")]
    assert [type(c["holds"]) for c in summary["claims"]] == [bool] * (3 + len(averages))
    assert "Flatness numbers" in html


def test_demo_records_every_method_and_reports_its_final_error(demo):
    traj = open_trajectory(demo / "run.h5")
    for run in ("sgd", "swa/average", "swa/iterates", "swap/phase1", "swap/average", "lookahead/slow",
                "lookahead/fast", "lookahead-adam/slow", "grafting/net0", "grafting/net1"):
        assert run in traj.runs, run
    summary = json.loads((demo / "summary.json").read_text())
    for run, final in summary["final"].items():
        assert final["test_err"] == pytest.approx(float(traj.run(run).metrics["test_err"][-1]))
    # the SWAP average is the mean of its workers' final weights
    workers = [r for r in traj.runs if r.startswith("swap/worker")]
    mean = np.mean([traj.params(w, -1).astype(np.float64) for w in workers], axis=0)
    np.testing.assert_allclose(traj.params("swap/average", -1), mean, rtol=0, atol=1e-6)
    assert summary["swap"]["average_to_centroid"] < 1e-4


def test_demo_flatness_table(demo):
    """Every method of the run and both averages made after the fact, with finite numbers; the
    averages made after the fact are those of SGD's rows."""
    summary = json.loads((demo / "summary.json").read_text())
    table = summary["flatness"]["table"]
    runs = [r["run"] for r in table]
    assert runs[:6] == ["sgd", "swa/average", "ema/average", "swap/average", "lookahead/slow", "grafting/net0"]
    assert runs[6:] == ["avg/sgd/uniform_6_9", "avg/sgd/uniform_5_9"]
    for r in table:
        assert np.isfinite([r["test_err"], r["top_eigenvalue"], r["trace"], r["epsilon_sharpness"]]).all()
        assert set(r["basin_width"]) == {"0.05", "0.1"}
    traj = open_trajectory(demo / "run+avg.h5")
    np.testing.assert_allclose(traj.params("avg/sgd/uniform_6_9", -1), traj.params("sgd", slice(6, 9)).mean(0),
                               rtol=1e-5, atol=1e-6)


def test_demo_surfaces_belong_to_the_trajectory_and_are_complete(demo):
    run_sha = sha256(demo / "run.h5")
    for path in json.loads((demo / "summary.json").read_text())["surfaces"]:
        surface = open_surface(path)
        assert surface.trajectory_sha256 == run_sha
        assert surface.done.all()
        assert np.isfinite(surface.values["train_loss"]).all()


def test_demo_rerun_reuses_finished_work(demo, capsys):
    from landscape.cli.main import main
    before = {p.name: sha256(p) for p in demo.glob("*.h5")}
    assert main(["demo", "--quick", "-o", str(demo)]) == 0
    err = capsys.readouterr().err
    assert err.count("reusing") == len(before)
    assert {p.name: sha256(p) for p in demo.glob("*.h5")} == before


def test_demo_refuses_a_missing_device_even_when_all_is_reused(demo, capsys):
    import torch

    from landscape.cli.main import main
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["demo", "--quick", "-o", str(demo), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
