"""Matplotlib drawing functions: each takes an Axes (or two), draws, and returns it.

They read :class:`~landscape.store.Surface` objects or plain arrays and never evaluate a loss.
:mod:`landscape.plot.figures` composes them into the papers' figures.
"""
from __future__ import annotations

import numpy as np
from matplotlib import colors as mcolors
from matplotlib import patheffects

from ..errors import ConfigError, FileFormatError
from . import analysis
from .style import CMAP, DISTANCE, TEST_COLOR, TRAIN_COLOR, axis_label, metric_label, metric_name, metric_value, role

# a thin dark outline keeps light markers visible on light backgrounds and vice versa
_OUTLINE = [patheffects.withStroke(linewidth=2.2, foreground="black")]


# ---------------------------------------------------------------------------------------------
# checks shared by every function that reads a surface

def require_metric(surface, metric: str) -> np.ndarray:
    if metric not in surface.values:
        raise FileFormatError(f"{surface.path} has no {metric!r} values; it has {', '.join(surface.values)}")
    return np.asarray(surface.values[metric], dtype=np.float64)


def require_kind(surface, kind: str) -> None:
    """``kind``: plane, line (one line) or rays."""
    have = "rays" if surface.kind == "line" and np.ndim(surface.done) == 2 else surface.kind
    if have != kind:
        where = surface.path if surface.path is not None else "this surface"  # in memory, not saved
        raise FileFormatError(f"{where} holds {'a ' if have != 'rays' else ''}{have}, not "
                              f"{'a ' if kind != 'rays' else ''}{kind}")


def require_area(surface) -> None:
    """Refuse a plane of one row or column: its contours (and surface) need at least 2 x 2 points."""
    if min(len(surface.x), len(surface.y)) < 2:
        where = surface.path if surface.path is not None else "this surface"
        raise ConfigError(f"{where} is a plane of {len(surface.x)} x {len(surface.y)} points; its contours need "
                          "at least 2 x 2 (a line of points is drawn from `landscape line`)")


def _distinct_labels(values) -> list:
    """Labels for monotonic values with as many significant digits as it takes (up to 6) for
    neighbours to read differently: levels packed close together stay distinguishable."""
    for digits in range(3, 7):
        labels = [f"{v:.{digits}g}" if 0 < abs(v) < 100 or abs(v) >= 1e5 else _fmt(v) for v in values]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def _fmt(v: float) -> str:
    if not np.isfinite(v):
        return str(v)
    a = abs(v)
    if a >= 1e5:  # (a diverged plane's 1e37 would be a 38-digit integer)
        return f"{v:.3g}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 0.01 or a == 0:
        return f"{v:.3g}"
    return f"{v:.2g}"


# ---------------------------------------------------------------------------------------------
# planes

def banded(surface, metric: str, levels: int = 7, log_alpha: float | None = None, vmax: float | None = None):
    """``(z, lv, top, sign)``: what a contour plot of ``metric`` draws, its values ``z`` ([iy, ix], as
    contourf wants them, NaN masked) and log-spaced levels ``lv`` (:func:`analysis.log_levels`) that
    are dense near the best value and share one band past ``vmax`` (default: the 85 % of the plane
    nearest the best value get the detail). A maximized metric (an accuracy) is drawn negated
    (``sign`` -1), so that its bands, too, widen away from its best value and its best band has the
    colour a loss's minimum has; its values are ``sign * lv``, its last band "< x"."""
    sign = -1.0 if surface.maximized(metric) else 1.0
    v = sign * require_metric(surface, metric)
    cap = analysis.default_vmax(v) if vmax is None else sign * vmax
    lv, top = analysis.log_levels(v, levels, log_alpha, cap)
    return np.ma.masked_invalid(v.T), lv, top, sign


def draw_plane(ax, surface, metric: str = "train_loss", *, levels: int = 7, log_alpha: float | None = None,
               vmax: float | None = None, cmap: str = CMAP, colorbar: bool = True, title: str | None = None):
    """Filled log-spaced contours of ``metric`` over a plane, with a colour bar whose top band reads
    "> x" (values above ``vmax``, by default the 85th percentile of the plane, share one band).
    ``log_alpha``: see :func:`analysis.log_levels` (default: the first band ends a quarter of the
    minimum above it). A metric the task maximizes is banded downward from its maximum instead (its
    last band "< x", ``vmax`` then the value below which values share it): see :func:`banded`."""
    require_kind(surface, "plane")
    require_area(surface)
    x, y = surface.x, surface.y
    z, lv, top, sign = banded(surface, metric, levels, log_alpha, vmax)
    cm = mcolors.ListedColormap(_sample_cmap(cmap, len(lv) - 1))
    norm = mcolors.BoundaryNorm(lv, cm.N)
    cf = ax.contourf(x, y, z, levels=lv, cmap=cm, norm=norm, zorder=0)
    ax.contour(x, y, z, levels=lv[1:-1], colors="white", linewidths=0.5, alpha=0.6, zorder=1)
    if colorbar:
        cb = ax.figure.colorbar(cf, ax=ax, fraction=0.046, pad=0.03, spacing="uniform")
        ticks = list(lv[:-1]) + [0.5 * (lv[-2] + lv[-1])]
        cb.set_ticks(ticks)
        cb.set_ticklabels(_distinct_labels(sign * lv[:-1]) + [f"{'>' if sign > 0 else '<'} {_fmt(sign * top)}"])
        cb.ax.tick_params(labelsize=8)
        cb.set_label(_label(surface, metric))
    _plane_axes(ax, surface)
    ax.set_title(title if title is not None else metric_label(metric)[0].upper() + metric_label(metric)[1:])
    return ax


def _label(surface, metric: str) -> str:
    """``metric``'s axis label, with "(%)" where the surface's task gives it in percent (an error's
    label has it already; a user's accuracy had none)."""
    label = metric_label(metric)
    return label + " (%)" if surface.in_percent(metric) and "(%)" not in label else label


def _value(surface, metric: str, v: float) -> str:
    text = metric_value(metric, v)
    return text + " %" if surface.in_percent(metric) and not text.endswith("%") and text != "n/a" else text


def _sample_cmap(name: str, n: int):
    import matplotlib
    cm = matplotlib.colormaps[name]
    return cm(np.linspace(0.0, 1.0, n))


def _plane_axes(ax, surface) -> None:
    ax.set_xlim(surface.x[0], surface.x[-1])
    ax.set_ylim(surface.y[0], surface.y[-1])
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel(axis_label("u", surface.spec))
    ax.set_ylabel(axis_label("v", surface.spec))


# which runs are drawn as whole paths (the others by their checkpoints only)
PATH_RUNS = ("lookahead/slow", "lookahead/fast", "lookahead-adam/slow", "lookahead-adam/fast", "swa/iterates")
# the legend entry naming the checkpoints and paths left out of a plane (figures put it under the title)
NOT_DRAWN = "not drawn"
# runs whose last checkpoint is not drawn as a point of its own
POINT_RUNS_SKIP = ("swa/iterates", "lookahead/fast", "lookahead-adam/fast", "swap/phase1")


def spec_checkpoints(surface) -> list:
    """The checkpoints a plane or line was made of (``spec["checkpoints"]``: a dict a, b, c or a list)
    plus its origin, in order, as stored (canonical ``RUN:INDEX`` names)."""
    spec = surface.spec or {}
    ck = spec.get("checkpoints") or []
    names = list(ck.values()) if isinstance(ck, dict) else list(ck)
    if spec.get("origin") and spec["origin"] not in names:
        names.insert(0, spec["origin"])
    return [str(n) for n in names]


def is_rays(surface) -> bool:
    """A line file holding several random rays (values of shape (R, nx))."""
    return surface.y is None and np.ndim(surface.done) == 2


def checkpoints_of_interest(surface, skip_runs=()) -> dict:
    """name -> (coords, distance from the plane/line) of the checkpoints a figure marks: the named
    points of the surface (but not the last rows of runs drawn otherwise: SWA iterates, Lookahead fast
    weights, SWAP phase 1, unless the geometry was made of them), plus the last checkpoint of every
    projected run none of whose checkpoints is named and which is not in ``skip_runs``."""
    made_of = set(spec_checkpoints(surface))
    out = {n: (np.asarray(p.coords, float), float(p.distance)) for n, p in surface.points.items()
           if n in made_of or (run_of(n) not in POINT_RUNS_SKIP and run_of(n) not in skip_runs)}
    named_runs = {run_of(n) for n in surface.points}
    for run, p in surface.paths.items():
        if run in named_runs or run in POINT_RUNS_SKIP or run in skip_runs or len(p.coords) == 0:
            continue
        out[f"{run}:{len(p.coords) - 1}"] = (np.asarray(p.coords[-1], float), float(p.distance[-1]))
    return dict(sorted(out.items(), key=lambda kv: (role(kv[0]).order, kv[0])))


def run_of(name: str) -> str:
    run, sep, index = name.rpartition(":")
    return run if sep and index.lstrip("-").isdigit() else name


def off_plane_threshold(surface, off_plane: float) -> float:
    """Distance from the plane beyond which a point is marked as lying off it: ``off_plane`` times
    the larger side of the drawn grid."""
    span = float(surface.x[-1] - surface.x[0])
    if surface.y is not None:
        span = max(span, float(surface.y[-1] - surface.y[0]))
    return off_plane * span


def draw_checkpoints(ax, surface, *, off_plane: float = 0.05, paths=PATH_RUNS, labels: bool = True):
    """Mark the checkpoints of interest on a plane (markers per method, see :func:`style.role`) and
    draw the projected paths of the runs in ``paths``. Checkpoints farther from the plane than
    ``off_plane`` x the grid's larger side are drawn hollow and their legend entry gives the distance;
    those outside the grid or farther from the plane than the grid's larger side are left out, and one
    legend entry names them."""
    require_kind(surface, "plane")
    far = off_plane_threshold(surface, off_plane)
    # farther from the plane than the plane is wide, a projection says nothing about the values drawn
    # under it: such checkpoints and paths are left out, like those outside the grid
    too_far = off_plane_threshold(surface, 1.0)
    left_out = []
    for run in paths:
        p = surface.paths.get(run)
        if p is None or len(p.coords) == 0:
            continue
        if not _inside(surface, p.coords).any() or np.min(p.distance) > too_far:
            left_out.append(run)
            continue
        r = role(run)
        c = np.asarray(p.coords, float)
        if run.endswith("/fast"):
            ax.plot(c[:, 0], c[:, 1], "-", color=r.color, lw=0.8, alpha=0.9, label=f"{r.label} path", zorder=3)
        elif run == "swa/iterates":
            ax.plot(c[:, 0], c[:, 1], linestyle="none", marker=".", ms=3.5, color=r.color, alpha=0.9,
                    label=f"{r.label} (projected)", zorder=3)
        else:  # markers only while they stay apart; a light halo keeps the line visible on any colour
            ax.plot(c[:, 0], c[:, 1], "-", color=r.color, lw=1.5, marker=r.marker if len(c) <= 40 else None,
                    ms=3.5, mec="white", mew=0.5, label=f"{r.label} path", zorder=3,
                    path_effects=[patheffects.withStroke(linewidth=2.6, foreground="white", alpha=0.6)])
    drawn = tuple(r for r in paths if r in surface.paths)
    for name, (coords, dist) in checkpoints_of_interest(surface, skip_runs=drawn).items():
        if not _inside(surface, coords).all() or dist > too_far:  # no marker: named below
            left_out.append(name)
            continue
        r = role(name)
        hollow = dist > far
        marker, size, label = r.marker, r.size, r.label
        if run_of(name) in POINT_RUNS_SKIP:  # one checkpoint of a run otherwise drawn as dots
            marker, size, label = "o", 7, f"{r.label} ({name})"
        label += f" ({dist:.2g} off plane)" if hollow else ""
        ax.plot(coords[0], coords[1], linestyle="none", marker=marker, ms=size,
                mfc="none" if hollow else r.color, mec=r.color if hollow else "white",
                mew=2.0 if hollow else 0.9, label=label, zorder=5, path_effects=_OUTLINE,
                alpha=0.65 if hollow else 1.0)
    if left_out:
        more = f" and {len(left_out) - 3} more" if len(left_out) > 3 else ""
        ax.plot([], [], linestyle="none", label=f"{NOT_DRAWN} (outside or far off): {', '.join(left_out[:3])}{more}")
    return ax


def _inside(surface, coords) -> np.ndarray:
    """Which of the (..., 2) plane coordinates lie within the surface's grid."""
    c = np.asarray(coords, float).reshape(-1, 2)
    return ((c[:, 0] >= surface.x[0]) & (c[:, 0] <= surface.x[-1])
            & (c[:, 1] >= surface.y[0]) & (c[:, 1] <= surface.y[-1]))


# ---------------------------------------------------------------------------------------------
# train-vs-test offset

SMOOTH = analysis.SMOOTH  # (its home is analysis; this name is part of static's interface)


def offset_of(surface, train_metric: str = "train_loss", test_metric: str | None = None, smooth: float = SMOOTH) -> dict:
    """The offset between the minima of ``train_metric`` and ``test_metric`` (None: the task's primary
    metric) over a plane (each surface smoothed over ``smooth`` grid cells first; 0 for the raw grid
    minima)."""
    require_kind(surface, "plane")
    test_metric = test_metric or surface.primary_metric
    res = analysis.offset(surface.x, surface.y, require_metric(surface, train_metric),
                          require_metric(surface, test_metric), smooth=smooth,
                          maximize=(surface.maximized(train_metric), surface.maximized(test_metric)))
    res.update({"train_metric": train_metric, "test_metric": test_metric, "units": DISTANCE})
    return res


def draw_offset(ax, surface, train_metric: str = "train_loss", test_metric: str | None = None, *,
                levels: int = 7, result: dict | None = None):
    """Train and test contour lines overlaid on one plane, each minimum marked, an arrow from the
    train minimum to the test minimum and its length written next to it."""
    require_kind(surface, "plane")
    test_metric = test_metric or surface.primary_metric
    res = result or offset_of(surface, train_metric, test_metric)
    x, y = surface.x, surface.y
    for metric, color, ls in ((train_metric, TRAIN_COLOR, "solid"), (test_metric, TEST_COLOR, "dashed")):
        z, lv, _, _ = banded(surface, metric, levels)  # thickest nearest each best value
        ax.contour(x, y, z, levels=lv[1:-1], colors=color, linestyles=ls,
                   linewidths=np.linspace(1.8, 0.6, len(lv) - 2), zorder=2)
    a, b = np.array(res["train_min"]), np.array(res["test_min"])
    ax.plot(*a, linestyle="none", marker="o", ms=9, mfc=TRAIN_COLOR, mec="white", mew=1.2, zorder=6,
            label=f"{metric_name(train_metric)} {res['best'][0]} ({_value(surface, train_metric, res['train_min_value'])})")
    ax.plot(*b, linestyle="none", marker="s", ms=8, mfc=TEST_COLOR, mec="white", mew=1.2, zorder=6,
            label=f"{metric_name(test_metric)} {res['best'][1]} ({_value(surface, test_metric, res['test_min_value'])})")
    if res["length"] > 0:
        ax.annotate("", xy=b, xytext=a, zorder=7,
                    arrowprops=dict(arrowstyle="-|>", lw=2.0, color="black", shrinkA=6, shrinkB=6,
                                    mutation_scale=14))
    # the length, beside the arrow's middle on the side away from the plane's centre
    mid = 0.5 * (a + b)
    vec = b - a
    normal = np.array([-vec[1], vec[0]]) / (np.hypot(*vec) or 1.0)
    centre = np.array([np.mean(x[[0, -1]]), np.mean(y[[0, -1]])])
    if np.dot(normal, mid - centre) < 0:
        normal = -normal
    if not np.any(normal):
        normal = np.array([0.0, 1.0])
    text = f"offset {res['length']:.3g}"
    half_w, half_h = 0.33 * 10 * len(text) + 3, 9.0  # the label's half extents in points (10 pt bold)
    dist = 6 + abs(normal[0]) * half_w + abs(normal[1]) * half_h
    ax.annotate(text, xy=mid, xytext=tuple(dist * normal), textcoords="offset points",
                ha="center", va="center", fontsize=10, fontweight="bold", zorder=8,
                bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="0.6", alpha=0.9))
    ax.plot([], [], color=TRAIN_COLOR, lw=1.2, label=f"{metric_name(train_metric)} contours")
    ax.plot([], [], color=TEST_COLOR, lw=1.2, ls="dashed", label=f"{metric_name(test_metric)} contours")
    _plane_axes(ax, surface)
    return ax


# ---------------------------------------------------------------------------------------------
# lines: edge vs center

def line_solutions(surface, names=None) -> dict:
    """name -> coordinate on a line of the solutions it was drawn through: ``names`` if given (a run
    name matches its named checkpoint), else the line's two checkpoints from its spec, else SGD and the
    SWA average, else its first two named points."""
    require_kind(surface, "line")
    pts = {n: float(np.asarray(p.coords, float).reshape(-1)[0]) for n, p in surface.points.items()}

    def find(n):
        if n in pts:
            return n
        hits = [k for k in pts if run_of(k) == n]
        return hits[0] if hits else None
    if names:
        found = {n: find(n) for n in names}
        missing = [n for n, k in found.items() if k is None]
        if missing:
            raise FileFormatError(f"{surface.path} has no point {missing[0]!r} on its line; "
                                  f"it has {', '.join(pts) or 'none'}")
        return {k: pts[k] for k in found.values()}
    for candidates in (spec_checkpoints(surface), ["sgd", "swa/average"]):
        keys = [find(n) for n in candidates]
        keys = [k for k in dict.fromkeys(keys) if k is not None]
        if len(keys) >= 2:
            return {k: pts[k] for k in keys[:2]}
    if not pts:
        raise FileFormatError(f"{surface.path} names no checkpoints on its line")
    return dict(list(pts.items())[:2])


def rays_of(surfaces, metric: str = "train_loss") -> dict:
    """origin checkpoint name -> list of ``(distance, values)`` of every ray in the given ray files."""
    out = {}
    for s in surfaces:
        if not is_rays(s):
            continue
        v = require_metric(s, metric)
        out.setdefault(ray_origin(s), []).extend((np.asarray(s.x, float), row) for row in v)
    return out


def ray_origin(surface) -> str:
    """The checkpoint a rays file's rays start from."""
    origin = (surface.spec or {}).get("origin") or next(iter(surface.points), None)
    if origin is None:
        raise FileFormatError(f"{surface.path}: a rays file that names no origin")
    return origin


def same_trajectory(a, b) -> bool:
    """Whether two files' checkpoint names name the same checkpoints: computed from one trajectory
    (its recorded SHA-256), or one from a trajectory that holds the other's runs as they are (an
    averaged file records its input's as ``source_sha256``), or either of live objects (nothing to
    tell them apart by) whose models have as many parameters."""
    def known(f):
        return {s for s in (getattr(f, "trajectory_sha256", None), getattr(f, "source_sha256", None)) if s}
    sizes = {n for n in (getattr(a, "num_params", None), getattr(b, "num_params", None)) if n is not None}
    if len(sizes) > 1:  # (models of other sizes: their checkpoint names name other things, whatever the names)
        return False
    ours, theirs = known(a), known(b)
    return not ours or not theirs or bool(ours & theirs)


def match_rays(rays: dict, solutions: dict) -> tuple:
    """``(rays keyed by the line's solution names, the ray origins used)``. A ray origin matches a
    solution of the same name, or of the same run when either is given as a bare run name."""
    out, used = {}, set()
    for name in solutions:
        for origin, curves in rays.items():
            same_run = run_of(origin) == run_of(name) and (origin == run_of(origin) or name == run_of(name))
            if origin == name or same_run:
                out.setdefault(name, []).extend(curves)
                used.add(origin)
    return out, used


def draw_line(ax, surface, metric: str = "train_loss", *, color: str | None = None, log: bool | None = None,
              solutions: dict | None = None, label: str | None = None, mark: bool = True):
    """``metric`` along a line against distance, the solutions marked on the curve (``mark``)."""
    require_kind(surface, "line")
    v = require_metric(surface, metric)
    color = color or (TEST_COLOR if "test" in metric else TRAIN_COLOR)
    ax.plot(surface.x, v, color=color, lw=2, label=label or metric_name(metric), zorder=3,
            ls="dashed" if "test" in metric else "solid")
    if log if log is not None else metric.endswith("loss"):
        ax.set_yscale("log")
    ax.set_xlabel(f"distance along the line ({DISTANCE})")
    ax.set_ylabel(_label(surface, metric), color=color)
    ax.tick_params(axis="y", colors=color)
    ax.set_xlim(surface.x[0], surface.x[-1])
    for name, t0 in (solutions if solutions is not None else line_solutions(surface)).items() if mark else ():
        r = role(name)
        val = analysis.interp_line(surface.x, v, t0)
        ax.plot([t0], [val], linestyle="none", marker=r.marker, ms=r.size, mfc=r.color, mec="white", mew=0.9,
                zorder=6, path_effects=_OUTLINE)
    return ax


def mark_solutions(ax, solutions: dict) -> None:
    """Vertical lines at the solutions' coordinates, labelled at the top of the axes."""
    for name, t0 in solutions.items():
        r = role(name)
        ax.axvline(t0, color=r.color, lw=1.0, ls=":", zorder=1)
        ax.annotate(r.label, xy=(t0, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=9, color=r.color,
                    fontweight="bold")


def draw_rays(ax, rays, line=None, solutions: dict | None = None, rise: float | None = None):
    """Train loss against distance from each solution along random rays (thin lines, one colour per
    solution) and, when ``line`` is given, along the line in both directions (thick). With ``rise``,
    the point where each curve has risen by that much is marked. ``rays``: a rays surface
    (``Line.random_rays``), a list of them, or ``{origin: [(distance, values), ...]}`` (:func:`rays_of`)."""
    if not isinstance(rays, dict):
        surfaces = list(rays) if isinstance(rays, (list, tuple)) else [rays]
        if not all(hasattr(s, "done") and is_rays(s) for s in surfaces):
            raise ConfigError("draw_rays takes a rays surface (Line.random_rays), a list of them, or "
                              "{origin: [(distance, values), ...]}")
        rays = rays_of(surfaces)
    for name, curves in rays.items():
        r = role(name)
        for k, (t, v) in enumerate(curves):
            ax.plot(t, v, color=r.color, lw=0.9, alpha=0.55, zorder=2,
                    label=f"{r.label}: random rays" if k == 0 else None)
            if rise is not None:
                d, _ = analysis.rise_distance(t, v, 0.0, rise, +1)
                if d is not None:
                    ax.plot([d], [analysis.interp_line(t, v, d)], "o", ms=3.5, color=r.color, zorder=4)
    if line is not None:
        v = require_metric(line, "train_loss")
        sols = solutions if solutions is not None else line_solutions(line)
        names = list(sols)
        for name in names:
            r = role(name)
            t0 = sols[name]
            other = [n for n in names if n != name]
            toward = (1 if sols[other[0]] >= t0 else -1) if other else 1
            for sign, ls, what in ((toward, "-", f"toward {role(other[0]).label}" if other else "forward"),
                                   (-toward, "--", f"away from {role(other[0]).label}" if other else "backward")):
                d = (line.x - t0) * sign
                keep = d > 1e-9 * max(1.0, abs(t0))
                order = np.argsort(d[keep])
                base = float(analysis.interp_line(line.x, v, t0))
                dd, vv = np.concatenate([[0.0], d[keep][order]]), np.concatenate([[base], v[keep][order]])
                ax.plot(dd, vv, ls, color=r.color, lw=2.2, zorder=3, label=f"{r.label}: line {what}",
                        path_effects=[patheffects.withStroke(linewidth=3.4, foreground="white")])
                if rise is not None and len(dd) > 1:
                    hit, _ = analysis.rise_distance(dd, vv, 0.0, rise, +1)
                    if hit is not None:
                        ax.plot([hit], [base + rise], marker="o", ms=6, mfc="white", mec=r.color, mew=2, zorder=5)
    ax.set_yscale("log")
    ax.set_xlabel(f"distance from the solution ({DISTANCE})")
    ax.set_ylabel(metric_label("train_loss"))
    ax.set_xlim(left=0)
    return ax


def edge_center_of(line, rays: dict | None = None, rises=(0.1,), solutions: dict | None = None) -> dict:
    """The edge-vs-center numbers of a line surface (and random rays): see :func:`analysis.edge_center`."""
    require_kind(line, "line")
    sols = solutions if solutions is not None else line_solutions(line)
    res = analysis.edge_center(line.x, require_metric(line, "train_loss"), sols, rays or {}, rises)
    test = line.primary_metric  # test_err for classification
    te = line.values.get(test) if test != "test_loss" else None
    for name, entry in res.items():
        entry["label"] = role(name).label
        if te is not None:
            entry[test] = float(analysis.interp_line(line.x, te, sols[name]))
    return res


def draw_rise_bars(ax, line, numbers: dict, rise: float) -> None:
    """For each solution, a horizontal bar at (its train loss + rise) spanning the stretch of the line
    where the loss stays below that level: the basin's width along the line."""
    key = analysis.format_rise(rise)
    for name, entry in numbers.items():
        r = role(name)
        t0 = entry["coordinate"]
        ends = [t0 + d["direction"] * (d["distance"] if d["distance"] is not None else d["searched"])
                for d in entry["rise"][key]["line"].values()]
        lo, hi = min(ends), max(ends)
        y = entry["train_loss"] + rise
        ax.plot([lo, hi], [y, y], color=r.color, lw=2.5, solid_capstyle="butt", zorder=4,
                label=f"{r.label}: stretch within +{rise:g} of its loss")
        ax.plot([lo, hi], [y, y], linestyle="none", marker="|", ms=10, mew=2, color=r.color, zorder=4)
    return ax


# ---------------------------------------------------------------------------------------------
# Lookahead and grafting (plain arrays; the figures module adapts trajectory runs)

def draw_lookahead(ax, fast_step, fast_values, slow_step=None, slow_values=None, *, metric: str = "train_loss",
                   log: bool | None = None):
    """The sawtooth of Lookahead: ``metric`` of the weights the model holds at every inner step. The
    fast weights move for k steps (dots); at a synchronization the row at that step is the fast
    theta_k, then the weights jump to the new slow weights (squares, on faint vertical lines), from
    which the next k fast steps start. Slow rows outside the fast window are not drawn."""
    fs, fv = np.asarray(fast_step, float), np.asarray(fast_values, float)
    fr, sr = role("lookahead/fast"), role("lookahead/slow")
    ss = np.asarray(slow_step if slow_step is not None else [], float)
    sv = np.asarray(slow_values if slow_values is not None else [], float)
    if len(fs) and len(ss):
        keep = (ss >= fs.min()) & (ss <= fs.max())
        ss, sv = ss[keep], sv[keep]
    # the sequence of weights held: at equal steps the fast theta_k comes before the new slow phi
    steps = np.concatenate([fs, ss])
    vals = np.concatenate([fv, sv])
    order = np.lexsort((np.concatenate([np.zeros(len(fs)), np.ones(len(ss))]), steps))
    ax.plot(steps[order], vals[order], "-", color=fr.color, lw=1.0, zorder=2)
    ax.plot(fs, fv, linestyle="none", marker="o", ms=3, color=fr.color, label="fast weights (every inner step)",
            zorder=3)
    for k, s in enumerate(ss):
        ax.axvline(s, color="0.6", lw=0.6, ls=":", zorder=1, label="synchronization" if k == 0 else None)
    if len(ss):
        ax.plot(ss, sv, linestyle="none", marker=sr.marker, ms=6, mfc=sr.color, mec="black", mew=0.8,
                label="slow weights (after synchronization)", zorder=5)
    if log if log is not None else metric.endswith("loss"):
        ax.set_yscale("log")
        plain_log_ticks(ax)
    ax.set_xlabel("training step (mini-batches)")
    ax.set_ylabel(metric_label(metric))
    return ax


def plain_log_ticks(ax) -> None:
    """On a log axis spanning less than about a decade, label ticks as plain numbers (0.3, 0.4)
    instead of powers of ten (3 x 10^-1)."""
    from matplotlib.ticker import FuncFormatter
    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo < 12:
        fmt = FuncFormatter(lambda v, _: f"{v:.3g}")
        ax.yaxis.set_major_formatter(fmt)
        ax.yaxis.set_minor_formatter(fmt)


def draw_grafting(ax, epoch, values, layers=None, *, ylabel: str = "", title: str | None = None, hline=None,
                  markers: bool = False):
    """One curve per layer of a (T, L) array over epochs (entropy or mixing weight of one network)."""
    import matplotlib
    e, v = np.asarray(epoch, float), np.asarray(values, float)
    if v.ndim == 1:
        v = v[:, None]
    if v.shape[0] != len(e):
        raise ConfigError(f"{v.shape[0]} rows of values for {len(e)} epochs")
    layers = list(layers) if layers is not None else [f"layer {i}" for i in range(v.shape[1])]
    cm = matplotlib.colormaps["viridis"]
    n = v.shape[1]
    for i in range(n):
        # markers: values that jump from epoch to epoch (the mixing weights) read better as points
        ax.plot(e, v[:, i], lw=0 if markers else 1.4, color=cm(0.9 * i / max(n - 1, 1)),
                label=layers[i] if i < len(layers) else None, marker="o" if markers else None,
                ms=3, alpha=0.75 if markers else 1.0)
    if hline is not None:
        ax.axhline(hline, color="0.5", lw=0.8, ls=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return ax


def dedupe_legend(axes):
    """Handles and labels of several axes, each label once, methods in their fixed order."""
    seen = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab and not lab.startswith("_") and lab not in seen:
                seen[lab] = h
    labels = sorted(seen, key=lambda lab: (_legend_order(lab), list(seen).index(lab)))
    return [seen[lab] for lab in labels], labels


_ROLE_LABELS = None


def _legend_order(label: str) -> int:
    global _ROLE_LABELS
    if _ROLE_LABELS is None:
        names = ["sgd", "swa/average", "swa/iterates", "swap/average", "swap/phase1"] + \
            [f"swap/worker{i}" for i in range(16)] + \
            ["lookahead/slow", "lookahead/fast", "lookahead-adam/slow", "lookahead-adam/fast"] + \
            [f"grafting/net{i}" for i in range(16)] + [f"grafting/baseline{i}" for i in range(16)]
        _ROLE_LABELS = sorted(((role(n).label, role(n).order) for n in names), key=lambda lo: -len(lo[0]))
    if label.startswith(NOT_DRAWN):
        return 1000  # last
    for text, order in _ROLE_LABELS:
        if label.startswith(text):
            return order
    return -1  # metrics and other annotations first


__all__ = ["draw_plane", "draw_checkpoints", "draw_offset", "draw_line", "draw_rays", "draw_rise_bars",
           "draw_lookahead", "draw_grafting", "mark_solutions", "offset_of", "edge_center_of", "line_solutions",
           "rays_of", "match_rays", "checkpoints_of_interest", "spec_checkpoints", "is_rays", "require_metric",
           "require_kind", "dedupe_legend", "plain_log_ticks"]
