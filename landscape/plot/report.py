"""Every figure that a set of surface files (and optionally a trajectory file) allows, in one call.

:func:`plot_files` is what ``landscape plot`` (and the demo) runs: it decides which figures it can
draw from what it is given, writes them as PNG and PDF, and returns the headline numbers, which it
also stores in ``numbers.json`` next to the figures:

- a plane -> ``<stem>-landscape`` (train loss and test error side by side) and ``<stem>-offset``
  (train-vs-test minima and their offset);
- a line through two checkpoints -> ``<stem>-edge-center``, with the rays of any rays file whose origin
  is one of the line's two checkpoints (of the same trajectory: another run's names name other
  checkpoints);
- a rays file no line uses -> ``<stem>-rays``;
- a trajectory with ``lookahead/slow`` + ``lookahead/fast`` (or ``lookahead-adam/...``) ->
  ``lookahead`` (``lookahead-adam``); with ``grafting/net<i>`` -> ``grafting``;
- a sharpness file -> ``flatness`` (spectral densities, sharpness against test error).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, FileFormatError
from ..store.files import OutputLock, finite_json, probe_writable, publish, reason, same_file
from . import figures, static
from .analysis import FORMATS, MAX_LEVELS, SMOOTH, format_rise, ray_rise_distances

STAGING = ".landscape-plot.partial"  # figures are drawn here, then moved into place together
BY_FILE = ("offset", "edge_center", "rays")  # numbers.json's sections keyed by surface file


@dataclass
class PlotResult:
    figures: list = field(default_factory=list)   # paths written
    numbers: dict = field(default_factory=dict)   # {"offset": {file: ...}, "edge_center": {file: ...}}
    numbers_path: Path | None = None
    lines: list = field(default_factory=list)     # human-readable summary, one line each


def plot_files(surfaces, out_dir, trajectory=None, rises=(0.1,), formats=FORMATS, off_plane: float = 0.05,
               levels: int = 7, train_metric: str = "train_loss", test_metric: str | None = None,
               smooth: float = SMOOTH, sharpness=None) -> PlotResult:
    """Draw every figure the inputs allow into ``out_dir`` (created if missing; its parent must exist).

    ``surfaces``: paths of surface files or :class:`~landscape.store.Surface` objects; ``trajectory``:
    path of a trajectory file or a Trajectory (Lookahead and grafting figures); ``rises``: train-loss
    rises for the edge-vs-center distances; ``off_plane``: fraction of the plane's larger side beyond
    which a checkpoint counts as off the plane; ``smooth``: Gaussian smoothing (grid cells) of the
    planes before their minima are located for the offset (0: the raw grid minima; at most the
    larger side of every plane's grid, beyond which the plane is flat); ``sharpness``: a sharpness file
    (``landscape sharpness``) or its SharpnessFile -> ``flatness`` (spectral densities, sharpness
    against test error) and its numbers under ``sharpness``.

    Everything is checked before ``out_dir`` is touched; the figures are drawn into a hidden folder
    inside it and moved into place, ``numbers.json`` last, only when every one is drawn, so a failure
    leaves the folder as it was."""
    from ..store import Surface, Trajectory, open_surface, open_trajectory

    rises = tuple(float(r) for r in rises)
    if not rises or any(not r > 0 for r in rises):
        raise ConfigError(f"rises must be positive numbers, got {list(rises)}")
    bad = [f for f in formats if f not in ("png", "pdf", "svg")]
    if bad:
        raise ConfigError(f"unknown figure format {bad[0]!r}; choose from png, pdf, svg")
    if not 0 < off_plane:
        raise ConfigError(f"off-plane fraction must be positive, got {off_plane}")
    if isinstance(levels, bool) or not (1 <= levels <= MAX_LEVELS and int(levels) == levels):
        raise ConfigError(f"contour levels must be a whole number from 1 to {MAX_LEVELS}, got {levels}")
    if not (smooth >= 0 and math.isfinite(smooth)):
        raise ConfigError(f"smoothing must be a non-negative number of grid cells, got {smooth}")
    surfs = [s if isinstance(s, Surface) else open_surface(s) for s in surfaces]
    for s in surfs:
        if s.kind == "plane":
            static.require_metric(s, train_metric)
            static.require_metric(s, test_metric or s.primary_metric)
        if s.kind == "plane" and smooth > max(s.done.shape):
            raise ConfigError(f"smoothing of {smooth:g} grid cells is more than {_key(s)}'s grid of "
                              f"{' x '.join(map(str, s.done.shape))}; give at most {max(s.done.shape)}")
    traj = trajectory if trajectory is None or isinstance(trajectory, Trajectory) else open_trajectory(trajectory)
    sharp = None
    if sharpness is not None:
        from ..store.sharpness import SharpnessFile, open_sharpness
        sharp = sharpness if isinstance(sharpness, SharpnessFile) else open_sharpness(sharpness)
    out = Path(out_dir)
    created = _prepare_dir(out)
    lock = OutputLock(out.resolve())  # one plot into a folder at a time (they would share the staging folder)
    staging = out / STAGING
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        res = _draw(surfs, traj, staging, rises, formats, off_plane, levels, train_metric, test_metric, smooth, sharp)
        inputs = ([s.path for s in surfs if s.path is not None] + ([traj.path] if traj is not None else [])
                  + ([sharp.path] if sharp is not None and sharp.path is not None else []))
        names = [p.name for p in res.figures] + ["numbers.json"]
        for name in names:
            for source in inputs:
                if (out / name).exists() and same_file(out / name, source):
                    raise FileFormatError(f"figure {out / name} would replace the input {source}; "
                                          f"choose another output folder")
        res.numbers_path = _write_json(staging / "numbers.json", _with_earlier(out / "numbers.json", res.numbers))
        for name in names:  # numbers.json last: a folder with a new numbers.json holds every new figure
            publish(staging / name, out / name)
        staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        lock.release()
    res.figures = [out / p.name for p in res.figures]
    res.numbers_path = out / "numbers.json"
    return res


def _prepare_dir(out: Path) -> bool:
    """Make sure figures can be written into ``out``; create it if missing (return whether it was)."""
    if out.exists() and not out.is_dir():
        raise FileFormatError(f"output {out} exists and is not a directory")
    if out.is_dir():
        probe_writable(out, f"figures into {out}")
        return False
    if not out.parent.exists():
        raise FileFormatError(f"cannot create {out}: directory {out.parent} does not exist")
    try:
        out.mkdir()
    except OSError as e:
        raise FileFormatError(f"cannot create {out}: {reason(e)}") from None
    return True


def _draw(surfs, traj, out, rises, formats, off_plane, levels, train_metric, test_metric, smooth,
          sharp=None) -> PlotResult:
    res = PlotResult()
    stems = _stems(surfs)
    planes = [s for s in surfs if s.kind == "plane"]
    lines = [s for s in surfs if s.kind == "line" and not static.is_rays(s)]
    rays = [s for s in surfs if static.is_rays(s)]
    drawn_with_a_line = set()

    for s in planes:
        static.require_area(s)
        stem = stems[id(s)]
        res.figures += figures.save(figures.plane_figure(s, train_metric=train_metric, test_metric=test_metric,
                                                         levels=levels, off_plane=off_plane),
                                    out, f"{stem}-landscape", formats)
        off = static.offset_of(s, train_metric, test_metric, smooth)
        res.figures += figures.save(figures.offset_figure(s, train_metric=train_metric, test_metric=test_metric,
                                                          levels=levels, off_plane=off_plane, result=off),
                                    out, f"{stem}-offset", formats)
        res.numbers.setdefault("offset", {})[_key(s)] = off
        res.lines.append(f"offset {_key(s)}: {train_metric} {off['best'][0]} at ({off['train_min'][0]:.3g}, "
                         f"{off['train_min'][1]:.3g}), {off['test_metric']} {off['best'][1]} at ({off['test_min'][0]:.3g}, "
                         f"{off['test_min'][1]:.3g}): {off['length']:.3g} weight-space units apart")
    for s in lines:
        stem = stems[id(s)]
        sols = static.line_solutions(s)
        mine = [r for r in rays if static.same_trajectory(r, s)]  # names of another run name other checkpoints
        matched, used = static.match_rays(static.rays_of(mine), sols)
        drawn_with_a_line |= {id(r) for r in mine if static.ray_origin(r) in used}
        nums = static.edge_center_of(s, matched, rises, sols)
        res.figures += figures.save(figures.edge_center_figure(s, matched, rises, numbers=nums, solutions=sols),
                                    out, f"{stem}-edge-center", formats)
        res.numbers.setdefault("edge_center", {})[_key(s)] = nums
        res.lines += [f"edge-vs-center {_key(s)}: {t}" for t in _edge_lines(nums, rises)]
    for s in rays:
        if id(s) in drawn_with_a_line:
            continue
        stem = stems[id(s)]
        mine = static.rays_of([s])
        nums = {name: {"rise": {format_rise(r): ray_rise_distances(curves, r) for r in rises}}
                for name, curves in mine.items()}
        res.figures += figures.save(figures.rays_figure(mine, rises[0]), out, f"{stem}-rays", formats)
        res.numbers.setdefault("rays", {})[_key(s)] = nums
        for name, entry in nums.items():
            for r, d in entry["rise"].items():
                res.lines.append(f"rays {_key(s)}: from {name}, distance to train loss + {r}: {_ray_mean(d)}")
    if traj is not None:
        for prefix in figures.LOOKAHEAD_PREFIXES:
            if f"{prefix}/fast" in traj.runs and f"{prefix}/slow" in traj.runs and traj.num_checkpoints(f"{prefix}/fast"):
                res.figures += figures.save(figures.lookahead_figure_from(traj, prefix), out, prefix, formats)
        if any(r.startswith("grafting/net") for r in traj.runs):
            res.figures += figures.save(figures.grafting_figure_from(traj), out, "grafting", formats)
    if sharp is not None:
        from .flatness import flatness_figure
        res.figures += figures.save(flatness_figure(sharp), out, "flatness", formats)
        res.numbers["sharpness"] = sharp.summary()
        shown = sharp.test_metric
        for r in sharp.summary():
            value = f"{'test error' if shown == 'test_err' else shown.replace('_', ' ')} {sharp.format_test_metric(r[shown])}"
            res.lines.append(f"flatness {r['checkpoint']}: top Hessian eigenvalue {r['eigenvalues'][0]:.4g}, "
                             f"trace {r['trace']:.4g} +- {r['trace_stderr']:.2g}, epsilon-sharpness "
                             f"{r['epsilon_sharpness']:.4g} (epsilon {r['epsilon']:g}), {value}")
    if not res.figures:
        what = ", ".join(str(s.path) for s in surfs) or "no surface files"
        raise ConfigError(f"nothing to draw from {what}" + (f" and {traj.path}" if traj is not None else "") +
                          ": give a plane, a line, rays, or a trajectory with Lookahead or grafting runs")
    res.numbers["rises"] = list(rises)
    res.numbers["units"] = {"distance": "weight-space units (Euclidean norm of the weight difference)",
                            "error": "%"}
    return res


def _ray_mean(d: dict) -> str:
    """``mean 4.27 over 3 rays``; a lower bound when rays never rose that much within their length."""
    if not d["not_reached"]:
        return f"mean {d['mean']:.3g} over {d['rays']} rays"
    return (f"mean > {d['mean']:.3g} over {d['rays']} rays ({d['not_reached']} did not rise that much within "
            "their length, counted at it)")


def _edge_lines(nums: dict, rises) -> list:
    out = []
    for r in rises:
        key = format_rise(r)
        for name, e in nums.items():
            parts = [f"{label} {_num(d['distance'], d['searched'])}" for label, d in e["rise"][key]["line"].items()]
            rays = e["rise"][key].get("rays")
            if rays:
                parts.append(f"rays {_ray_mean(rays)}")
            out.append(f"{name} (train loss {e['train_loss']:.4g}): distance to loss + {key}: " + ", ".join(parts))
    return out


def _num(d, searched=None) -> str:
    if d is None:
        return f"> {searched:.3g}" if searched is not None else "not reached"
    return f"{d:.3g}"


def _key(s) -> str:
    return str(s.path) if s.path is not None else "surface"


def _stems(surfs) -> dict:
    """A file-name stem per surface, unique even when two inputs share a name."""
    out, seen = {}, {}
    for s in surfs:
        stem = Path(s.path).stem if s.path is not None else s.kind
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        out[id(s)] = stem if n == 0 else f"{stem}-{n + 1}"
    return out


def _with_earlier(path: Path, numbers: dict) -> dict:
    """``numbers`` over those of an earlier plot into the same folder, whose figures stay there: the
    sections keyed by surface file (``offset``, ``edge_center``, ``rays``) keep the earlier files'
    entries, every other value is the new one where there is one (a numbers.json that is not a JSON
    object is replaced)."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return numbers
    if not isinstance(earlier, dict):
        return numbers
    merged = {**earlier, **numbers}
    for key in BY_FILE:
        if isinstance(earlier.get(key), dict) and key in numbers:
            merged[key] = {**earlier[key], **numbers[key]}
    return merged


def _write_json(path: Path, obj) -> Path:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(finite_json(obj), indent=2, sort_keys=True) + "\n")  # NaN: null
    os.replace(tmp, path)
    return path

