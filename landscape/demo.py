"""The demo: every method on MNIST-1D, the planes and lines the figures need, the figures, the explorer,
and the flatness table (:func:`run_flatness`).

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
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .config import TrainConfig
from .device import resolve_device
from .errors import FileFormatError, StalePartialError
from .geometry import Line, Plane
from .sharpness import SharpnessSpec
from .store import open_surface, open_trajectory
from .store.files import sha256
from .surface import compute_surface
from .train import train, trained_with

# ----------------------------------------------------------------------------------------------
# configuration: the measured MNIST-1D recipe for every method, then what is evaluated


@dataclass(frozen=True)
class DemoConfig:
    # grafting without its no-grafting baseline: with the defaults one baseline network *is* the sgd run
    # and no figure draws them (benchmarks/methods.py trains the baseline for the README table)
    train: TrainConfig = TrainConfig(methods=("sgd", "swa", "ema", "swap", "lookahead", "lookahead-adam", "grafting"),
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
    # flatness table: every method's final checkpoint, and averages of SGD's checkpoints made after
    # the fact (landscape average): its last 10 (latest weight averaging) and SWA's window on SGD
    flatness: tuple = ("sgd", "swa/average", "ema/average", "swap/average", "lookahead/slow",
                       "lookahead-adam/slow", "grafting/net0", "grafting/net1")
    after_the_fact: tuple = (("sgd:-10:", "uniform", None), ("sgd:100:", "uniform", None))
    sharpness: SharpnessSpec = SharpnessSpec(top_k=3, probes=50, density=True, density_runs=1, density_steps=60,
                                             epsilon=0.01, ascent_steps=10)

    def quick(self) -> "DemoConfig":
        """A small version for tests and a first look: same steps, minutes become seconds."""
        t = replace(self.train, epochs=8, swa_start=5, swap_phase1_epochs=4, swap_threshold=80.0,
                    swap_phase2_epochs=2)
        return replace(self, train=t, plane_grid=(7, 7), line_points=11, rays=2, ray_points=7,
                       after_the_fact=(("sgd:-3:", "uniform", None), ("sgd:5:", "uniform", None)),
                       flatness=("sgd", "swa/average", "ema/average", "swap/average", "lookahead/slow", "grafting/net0"),
                       sharpness=replace(self.sharpness, samples=500, iterations=10, probes=4, density_steps=10,
                                         ascent_steps=2))


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
    if trained_with(run_path, cfg.train):
        log(f"reusing {run_path}")
    else:
        # one thread per method, as many methods at once as the machine has cores: the same file on any machine
        log(f"training {', '.join(cfg.train.methods)} on {cfg.train.data.name} ...")
        train(cfg.train, run_path, overwrite=True, quiet=quiet, processes=os.cpu_count() or 1)
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
    seconds["figures"] = time.perf_counter() - start

    # 4. flatness as numbers: averages after the fact, sharpness, basin widths of every method
    start = time.perf_counter()
    flat = run_flatness(cfg, out, run_path, surfaces, device, quiet, log)
    seconds["flatness"] = time.perf_counter() - start
    explorer = write_explorer(surfaces, out / "explore.html", title="landscape demo: MNIST-1D", overwrite=True,
                              sharpness=flat["sharpness_file"])

    summary = {"out": str(out), "trajectory": str(run_path), "surfaces": [str(s) for s in surfaces],
               "figures": [str(f) for f in res.figures], "numbers": str(res.numbers_path),
               "explorer": str(explorer), "seconds": seconds, "final": _finals(traj), "flatness": flat,
               "swap": _swap_numbers(traj), "lines": res.lines,
               "claims": _claims(res.numbers, open_surface(out / "plane-swa.h5"), open_surface(out / "plane-swap.h5"), cfg)
               + flat["claims"]}
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


# ----------------------------------------------------------------------------------------------
# flatness as numbers

def run_flatness(cfg: DemoConfig, out: Path, run_path: Path, surfaces: list, device: str, quiet: bool, log) -> dict:
    """Averages of SGD made after the fact (``run+avg.h5``), the sharpness of every method's final
    checkpoint (``sharpness.h5``), random rays from each for its basin width, the flatness table
    (printed by the CLI, drawn as ``figures/flatness-table``) and ``figures/flatness``. Reuses what a
    previous run of the same trajectory made."""
    from .average import Average, Window, add_averages
    from .plot.figures import save
    from .plot.flatness import flatness_figure, flatness_table_figure
    from .sharpness import compute_sharpness
    from .store.sharpness import open_sharpness

    run_sha = sha256(run_path)
    avg_path = out / "run+avg.h5"
    averages = [Average(Window.parse(w), mode, decay) for w, mode, decay in cfg.after_the_fact]
    if avg_path.exists() and open_trajectory(avg_path).config.get("source_sha256") == run_sha:
        log(f"reusing {avg_path}")
    else:
        log("averaging SGD's checkpoints after the fact ...")
        add_averages(run_path, averages, avg_path, device=device, overwrite=True, quiet=quiet,
                     extra_config={"source_sha256": run_sha})
    traj = open_trajectory(avg_path)
    avg_sha = sha256(avg_path)
    made = [a.run_name(a.window.rows(traj)) for a in averages]
    names = [n for n in cfg.flatness if n in traj.runs] + made
    sharp_path = out / "sharpness.h5"
    sharp = None
    if sharp_path.exists():
        sharp = open_sharpness(sharp_path)
        if sharp.trajectory_sha256 != avg_sha or sharp.spec.get("sharpness") != cfg.sharpness.to_dict():
            sharp = None
    if sharp is None:
        log(f"sharpness of {len(names)} checkpoints ...")
        sharp = compute_sharpness(traj, names, cfg.sharpness, device=device, out=sharp_path, overwrite=True,
                                  quiet=quiet)
    else:
        log(f"reusing {sharp_path}")
    # basin widths: the demo's rays from sgd and swa/average, and as many from every other checkpoint
    rays = {}
    for path in surfaces:
        s = open_surface(path)
        if s.rays:
            rays[s.spec.get("origin")] = s
    for r in sharp.results:
        name = r["checkpoint"]
        if name in rays:
            continue
        path = out / f"flat-rays-{name.replace('/', '-').replace(':', '-')}.h5"
        if path.exists() and open_surface(path).trajectory_sha256 == avg_sha:
            log(f"reusing {path}")
        else:
            log(f"evaluating {cfg.rays} random rays from {name} ...")
            compute_surface(traj, Line.random_rays(traj, name, cfg.rays, seed=0, max_distance=cfg.ray_distance),
                            (cfg.ray_points,), out=path, overwrite=True, quiet=True, device=device)
        rays[name] = open_surface(path)
    table = flatness_table(sharp, rays, cfg.rises)
    figures_dir = out / "figures"
    figs = save(flatness_figure(sharp), figures_dir, "flatness")
    figs += save(flatness_table_figure(table, sharp.epsilon, cfg.rises), figures_dir, "flatness-table")
    return {"sharpness_file": str(sharp_path), "trajectory": str(avg_path), "table": table,
            "epsilon": sharp.epsilon, "rises": list(cfg.rises), "figures": [str(f) for f in figs],
            "claims": flatness_claims(table, cfg.rises)}


def basin_width(surface, rise: float) -> dict:
    """Mean distance along the random rays of ``surface`` to where the train loss has risen by ``rise``
    (rays that never rise that much within their length count at their length: a lower bound), as
    the edge-vs-center figure and the report measure it."""
    from .plot.analysis import ray_rise_distances
    return ray_rise_distances([(surface.x, row) for row in surface.values["train_loss"]], rise)


def flatness_table(sharp, rays: dict, rises) -> list:
    """One row per checkpoint of ``sharp``: test error, top eigenvalue, trace, epsilon-sharpness and
    the basin widths at every rise."""
    rows = []
    for r in sharp.results:
        name = r["checkpoint"]
        run = name.rsplit(":", 1)[0]
        widths = {f"{rise:g}": basin_width(rays[name], rise) for rise in rises} if name in rays else {}
        rows.append({"checkpoint": name, "run": run, "test_err": r["metrics"]["test_err"],
                     "train_loss": r["metrics"]["train_loss"], "top_eigenvalue": float(r["eigenvalues"][0]),
                     "eigenvalues": [float(v) for v in r["eigenvalues"]], "trace": r["trace"],
                     "trace_stderr": r["trace_stderr"], "epsilon_sharpness": r["epsilon_sharpness"],
                     "basin_width": widths})
    return rows


def flatness_claims(table: list, rises, margin: float = 0.05) -> list:
    """For every average (and Lookahead's slow weights), whether it sits in a flatter region than SGD.
    Each measure says flatter, sharper or about the same: a lower top eigenvalue, a lower
    epsilon-sharpness or a wider basin (mean over the rays) counts when it differs from SGD's by more
    than ``margin`` (relative); a lower trace when also by more than two standard errors of the
    difference. The claim holds when every measure says flatter."""
    from .plot.style import role
    sgd = next((r for r in table if r["run"] == "sgd"), None)
    if sgd is None:
        return []

    def compare(mine, theirs, lower_is_flatter=True, noise=0.0):
        diff = (theirs - mine) if lower_is_flatter else (mine - theirs)
        if abs(diff) <= max(margin * abs(theirs), noise):
            return "about the same"
        return "flatter" if diff > 0 else "sharper"

    claims = []
    for r in table:
        if r["run"] == "sgd" or not (r["run"].endswith(("average", "slow")) or r["run"].startswith("avg/")):
            continue
        verdict = {"top eigenvalue": compare(r["top_eigenvalue"], sgd["top_eigenvalue"]),
                   "trace": compare(r["trace"], sgd["trace"],
                                    noise=2 * (r["trace_stderr"] ** 2 + sgd["trace_stderr"] ** 2) ** 0.5),
                   "epsilon-sharpness": compare(r["epsilon_sharpness"], sgd["epsilon_sharpness"])}
        for rise in rises:
            k = f"{rise:g}"
            if k in r["basin_width"] and k in sgd["basin_width"]:
                verdict[f"basin width at +{k}"] = compare(r["basin_width"][k]["mean"], sgd["basin_width"][k]["mean"],
                                                          lower_is_flatter=False)
        groups = {v: [k for k, x in verdict.items() if x == v] for v in ("flatter", "about the same", "sharper")}
        said = "; ".join(f"{v} by {', '.join(ks)}" for v, ks in groups.items() if ks)
        claims.append({
            "claim": f"{role(r['run']).label} sits in a flatter region than SGD",
            "holds": len(groups["flatter"]) == len(verdict),
            "evidence": f"{said} (top eigenvalue {r['top_eigenvalue']:.3g} vs {sgd['top_eigenvalue']:.3g}, trace "
                        f"{r['trace']:.3g} +- {r['trace_stderr']:.2g} vs {sgd['trace']:.3g} +- {sgd['trace_stderr']:.2g}, "
                        f"epsilon-sharpness {r['epsilon_sharpness']:.3g} vs {sgd['epsilon_sharpness']:.3g}; "
                        f"differences within {margin:.0%} count as the same)"})
    return claims
