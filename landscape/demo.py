"""The demo: every method on MNIST-1D, the planes and lines the figures need, the figures, the explorer.

Everything the demo does is listed in the configuration below; each step writes a file into the
output folder and a rerun reuses what is already complete (surfaces resume from their ``.partial``
files), so an interrupted demo picks up where it stopped.

Example::

    from landscape.demo import run_demo
    summary = run_demo("landscape-demo")
    summary["figures"]     # paths of the PNG/PDF figures
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .config import TrainConfig
from .device import resolve_device
from .errors import FileFormatError, StalePartialError
from .geometry import Line, Plane
from .store import open_surface, open_trajectory
from .store.files import sha256
from .surface import compute_surface
from .train import train

# ----------------------------------------------------------------------------------------------
# configuration: the measured MNIST-1D recipe for every method, then what is evaluated


@dataclass(frozen=True)
class DemoConfig:
    # grafting without its no-grafting baseline: with the defaults one baseline network *is* the sgd run
    # and no figure draws them (benchmarks/methods.py trains the baseline for the README table)
    train: TrainConfig = TrainConfig(methods=("sgd", "swa", "swap", "lookahead", "lookahead-adam", "grafting"),
                                     grafting_baseline=False)
    plane_grid: tuple = (21, 21)
    # the SWA paper's picture: SGD, the SWA average and the first averaged iterate span a plane
    swa_plane: tuple = ("sgd", "swa/average", "swa/iterates:0")
    # every method's solution in one plane (SWAP workers, Lookahead and grafting project into it)
    methods_plane: tuple = ("sgd", "swa/average", "swap/average")
    # SWAP up close: three workers span the plane, the fourth and the average project into it
    swap_plane: tuple = ("swap/worker0", "swap/worker1", "swap/worker2")
    line: tuple = ("sgd", "swa/average")
    line_range: tuple = (-1.0, 3.0)       # in units of the SGD -> SWA segment
    line_points: int = 41
    rays: int = 5                          # random rays from each of the two solutions
    ray_points: int = 21
    ray_distance: float = 15.0             # weight-space units
    rises: tuple = (0.05, 0.1)             # train-loss rises that define the basin's width

    def quick(self) -> "DemoConfig":
        """A small version for tests and a first look: same steps, minutes become seconds."""
        t = replace(self.train, epochs=8, swa_start=5, swap_phase1_epochs=4, swap_threshold=80.0,
                    swap_phase2_epochs=2)
        return replace(self, train=t, plane_grid=(7, 7), line_points=11, rays=2, ray_points=7)


def _same_config(path: Path, config: TrainConfig) -> bool:
    try:
        recorded = open_trajectory(path).config
    except FileFormatError:
        return False
    mine = config.to_dict()
    return all(recorded.get(k) == json.loads(json.dumps(v)) for k, v in mine.items() if k != "device")


def _current(path: Path, run_sha: str) -> bool:
    """Whether ``path`` is a readable surface of this very trajectory (a stale one is removed)."""
    if not path.exists():
        return False
    try:
        if open_surface(path).trajectory_sha256 == run_sha:
            return True
    except FileFormatError:
        pass
    path.unlink()  # the demo's own output, made from another trajectory or damaged
    return False


def _evaluate(traj, geom, grid, path: Path, quiet: bool, device: str) -> None:
    """Evaluate a surface, going on from its ``.partial`` when an interrupted demo left one (one of
    another trajectory or spec is discarded: the folder is the demo's own)."""
    try:
        compute_surface(traj, geom, grid, out=path, quiet=quiet, device=device)
    except StalePartialError:
        compute_surface(traj, geom, grid, out=path, overwrite=True, quiet=quiet, device=device)


def run_demo(out_dir="landscape-demo", quick: bool = False, device: str = "auto", quiet: bool = False,
             log=print) -> dict:
    """Run the whole demo into ``out_dir``; return a summary (paths, numbers, seconds per step)."""
    from .plot import plot_files, write_explorer

    resolve_device(device)  # a device this machine lacks is refused even when everything is reused
    cfg = DemoConfig().quick() if quick else DemoConfig()
    cfg = replace(cfg, train=replace(cfg.train, device=device))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileFormatError(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}

    # 1. train every method from one initialization into one trajectory file
    run_path = out / "run.h5"
    start = time.perf_counter()
    if run_path.exists() and _same_config(run_path, cfg.train):
        log(f"reusing {run_path}")
    else:
        log(f"training {', '.join(cfg.train.methods)} on {cfg.train.data.name} ...")
        train(cfg.train, run_path, overwrite=True, quiet=quiet)
    seconds["train"] = time.perf_counter() - start
    traj = open_trajectory(run_path)
    run_sha = sha256(run_path)

    # 2. the planes, the line and the rays
    jobs = [
        ("plane-swa", lambda: Plane.through(traj, *cfg.swa_plane), cfg.plane_grid),
        ("plane-methods", lambda: Plane.through(traj, *cfg.methods_plane), cfg.plane_grid),
        ("plane-swap", lambda: Plane.through(traj, *cfg.swap_plane), cfg.plane_grid),
        ("line", lambda: Line.through(traj, *cfg.line, range=cfg.line_range), (cfg.line_points,)),
    ]
    for origin in cfg.line:
        jobs.append((f"rays-{origin.replace('/', '-')}",
                     lambda o=origin: Line.random_rays(traj, o, cfg.rays, seed=0, max_distance=cfg.ray_distance),
                     (cfg.ray_points,)))
    surfaces = []
    start = time.perf_counter()
    for name, make, grid in jobs:
        path = out / f"{name}.h5"
        if _current(path, run_sha):
            log(f"reusing {path}")
        else:
            log(f"evaluating {name} ({'x'.join(map(str, grid))} points) ...")
            _evaluate(traj, make(), grid, path, quiet, device)
        surfaces.append(path)
    seconds["surfaces"] = time.perf_counter() - start

    # 3. figures and the explorer
    start = time.perf_counter()
    figures_dir = out / "figures"
    res = plot_files(surfaces, figures_dir, trajectory=traj, rises=cfg.rises)
    explorer = write_explorer(surfaces, out / "explore.html", title="landscape demo: MNIST-1D", overwrite=True)
    seconds["figures"] = time.perf_counter() - start

    summary = {"out": str(out), "trajectory": str(run_path), "surfaces": [str(s) for s in surfaces],
               "figures": [str(f) for f in res.figures], "numbers": str(res.numbers_path),
               "explorer": str(explorer), "seconds": seconds, "final": _finals(traj),
               "swap": _swap_numbers(traj), "lines": res.lines,
               "claims": _claims(res.numbers, open_surface(out / "plane-swa.h5"), open_surface(out / "plane-swap.h5"), cfg)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _finals(traj) -> dict:
    """Final test error (%) and train loss of every run's last checkpoint."""
    out = {}
    for run in traj.runs:
        m = traj.run(run).metrics
        if "test_err" in m and len(m["test_err"]):
            out[run] = {"test_err": float(m["test_err"][-1]), "train_loss": float(m["train_loss"][-1])}
    return out


def _swap_numbers(traj) -> dict:
    """The SWAP average against its workers: test errors, and its distance to the workers' centroid
    relative to the workers' spread (0 = the average is the centroid, inside their hull)."""
    workers = sorted(r for r in traj.runs if r.startswith("swap/worker"))
    if not workers or "swap/average" not in traj.runs:
        return {}
    finals = np.stack([traj.params(w, -1) for w in workers]).astype(np.float64)
    avg = traj.params("swap/average", -1).astype(np.float64)
    centroid = finals.mean(0)
    spread = float(np.linalg.norm(finals - centroid, axis=1).mean())
    errs = [float(traj.run(w).metrics["test_err"][-1]) for w in workers]
    return {"workers_test_err": errs, "average_test_err": float(traj.run("swap/average").metrics["test_err"][-1]),
            "average_to_centroid": float(np.linalg.norm(avg - centroid)), "workers_spread": spread}


def _claims(numbers: dict, swa_plane, swap_plane, cfg: DemoConfig) -> list:
    """The papers' qualitative claims, each checked against this run's numbers:
    ``{"claim", "holds", "evidence"}``. Nothing here decides what the figures show; it reads them."""
    claims = []
    offset = next((v for k, v in numbers.get("offset", {}).items() if k.endswith("plane-swa.h5")), None)
    if offset:
        cell = float(np.hypot(swa_plane.x[1] - swa_plane.x[0], swa_plane.y[1] - swa_plane.y[0]))
        raw = offset.get("unsmoothed", offset)
        claims.append({
            "claim": "the test-error minimum is offset from the train-loss minimum (SWA plane)",
            "holds": bool(offset["length"] > cell),
            "evidence": f"minima {offset['length']:.3g} weight-space units apart on the smoothed surfaces "
                        f"({raw['length']:.3g} on the raw grid; one grid cell is {cell:.3g})"})
    line = next(iter(numbers.get("edge_center", {}).values()), None)
    if line:
        rise = f"{max(cfg.rises):g}"
        sgd, swa = (line[k] for k in sorted(line, key=lambda k: line[k]["coordinate"]))
        near = {who: min(d["distance"] for d in p["rise"][rise]["line"].values() if d["distance"] is not None)
                for who, p in (("sgd", sgd), ("swa", swa))}
        rays = {who: p["rise"][rise]["rays"]["mean"] for who, p in (("sgd", sgd), ("swa", swa))}
        claims.append({
            "claim": "along the SGD-SWA line SGD sits nearer the rim of the low-train-loss region than SWA",
            "holds": bool(near["sgd"] < near["swa"]),
            "evidence": f"nearest point where train loss has risen by {rise} along the line: {near['sgd']:.3g} "
                        f"from SGD, {near['swa']:.3g} from SWA; mean over random rays {rays['sgd']:.3g} "
                        f"vs {rays['swa']:.3g} (weight-space units)"})
    workers = [p.coords for n, p in swap_plane.points.items() if n.startswith("swap/worker")]
    average = next((p.coords for n, p in swap_plane.points.items() if n.startswith("swap/average")), None)
    if len(workers) >= 3 and average is not None:
        inside = _in_hull(np.asarray(average), np.asarray(workers))
        claims.append({
            "claim": "the SWAP average lies inside the hull of its workers (plane through three workers)",
            "holds": inside,
            "evidence": f"average at ({average[0]:.3g}, {average[1]:.3g}); {len(workers)} workers within "
                        f"{np.linalg.norm(np.asarray(workers) - average, axis=1).max():.3g} of it"})
    return claims


def _in_hull(point: np.ndarray, corners: np.ndarray) -> bool:
    """Whether a 2-D point lies in the convex hull of ``corners`` (Delaunay test; a degenerate, collinear
    set of corners holds only the points on its segment)."""
    from scipy.spatial import Delaunay, QhullError
    try:
        return bool(Delaunay(corners).find_simplex(point) >= 0)
    except QhullError:
        a, b = corners.min(0), corners.max(0)
        return bool(np.all(point >= a - 1e-9) and np.all(point <= b + 1e-9))
