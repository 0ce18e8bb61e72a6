"""Whole figures, composed from the drawing functions of :mod:`landscape.plot.static`.

Every function returns a :class:`matplotlib.figure.Figure` (made without pyplot, so nothing global
is touched); :func:`save` writes it as PNG and PDF.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..errors import FileFormatError
from . import analysis, static
from .style import DISTANCE, metric_title, role, style


def _legend_below(fig, axes, ncol: int | None = None, title: str | None = None, **kwargs) -> None:
    handles, labels = static.dedupe_legend(axes)
    chars = int(fig.get_figwidth() * 13)  # (about as many characters fit across the figure)
    notes = [lab for lab in labels if lab.startswith(static.NOT_DRAWN)]  # what was left out: under the title
    kept = [(h, lab) for h, lab in zip(handles, labels) if lab not in notes]
    title = "\n".join([title] * bool(title) + [textwrap.fill(n, chars) for n in notes]) or None
    if kept or title:
        ncol = ncol or min(4, max(len(kept), 1))
        fits = int(chars / (max((len(lab) for _, lab in kept), default=0) + 5))  # columns of the longest label's width
        fig.legend(*(zip(*kept) if kept else ([], [])), loc="outside lower center", ncol=max(1, min(ncol, fits)),
                   title=title, frameon=False, handlelength=1.6, columnspacing=1.4, **kwargs)


# ---------------------------------------------------------------------------------------------

def plane_figure(surface, *, train_metric: str = "train_loss", test_metric: str | None = None, levels: int = 7,
                 off_plane: float = 0.05, vmax: dict | None = None) -> Figure:
    """Train loss and test error side by side over the same plane, log-spaced bands (top band "> x"),
    every checkpoint of interest marked (hollow where it lies off the plane), legend below."""
    static.require_kind(surface, "plane")
    test_metric = test_metric or surface.primary_metric
    vmax = vmax or {}
    with style():
        width = 2 * _panel_width(surface) + 0.3
        fig = Figure(figsize=(width, 5.4), layout="constrained")
        axes = fig.subplots(1, 2)
        for ax, metric in zip(axes, (train_metric, test_metric)):
            static.draw_plane(ax, surface, metric, levels=levels, vmax=vmax.get(metric), title=metric_title(metric))
            static.draw_checkpoints(ax, surface, off_plane=off_plane)
        _legend_below(fig, axes, ncol=max(2, min(4, int(width / 2.6))))
        fig.suptitle(textwrap.fill(_plane_title(surface), int(width * 12)), fontsize=11)
    return fig


def _panel_width(surface, height: float = 3.9, chrome: float = 1.9) -> float:
    """Width (inches) of one plane panel: the axes keep true Euclidean proportions (equal aspect), so a
    tall plane gets a narrow panel instead of a wide one with empty margins."""
    static.require_area(surface)  # (before a single row's zero height divides)
    aspect = (surface.y[-1] - surface.y[0]) / max(surface.x[-1] - surface.x[0], 1e-12)
    return float(np.clip(height / aspect, 2.2, 4.6)) + chrome


def _plane_title(surface) -> str:
    spec = surface.spec or {}
    through = static.spec_checkpoints(surface)
    method = spec.get("method")
    if method == "through" and through:
        return "Plane through " + ", ".join(c if role(c).label == static.run_of(c) else f"{role(c).label} ({c})"
                                            for c in through)
    if method:
        return f"Plane: {method} directions at {spec.get('origin', '?')}"
    return f"Plane: {surface.path.name if surface.path else ''}"


def offset_figure(surface, *, train_metric: str = "train_loss", test_metric: str | None = None, levels: int = 7,
                  off_plane: float = 0.05, result: dict | None = None) -> Figure:
    """Train-loss and test-error contours overlaid on one plane; the two minima and the arrow between
    them, with the offset's length (weight-space units)."""
    test_metric = test_metric or surface.primary_metric
    res = result or static.offset_of(surface, train_metric, test_metric)
    with style():
        fig = Figure(figsize=(7.2, 6.4), layout="constrained")
        ax = fig.subplots()
        static.draw_offset(ax, surface, train_metric, test_metric, levels=levels, result=res)
        static.draw_checkpoints(ax, surface, off_plane=off_plane, paths=())
        best = "minima" if res.get("best", ["minimum"] * 2) == ["minimum"] * 2 else "best points"  # (an accuracy's: its maximum)
        ax.set_title(f"{metric_title(train_metric)} vs {metric_title(test_metric).lower()}: "
                     f"{best} {res['length']:.3g} {DISTANCE} apart")
        note = (f"{best} of the surfaces smoothed over {res['smooth']:g} grid cell(s) (Gaussian σ)"
                if res.get("smooth") else f"{best} of the grid values")
        _legend_below(fig, [ax], ncol=2, title=note, title_fontsize=8.5)
    return fig


def edge_center_figure(line, rays=None, rises=(0.1,), *, numbers: dict | None = None,
                       solutions: dict | None = None) -> Figure:
    """Left: train loss (log) and test error along the line through the two solutions, both marked
    (the test-error axis shows up to four times its minimum). Right: train loss against distance from
    each solution along the line (both directions) and along random rays, with the point where each
    curve has risen by ``rises[0]`` marked and the distances listed under the panel. ``rays``: rays
    surfaces (``Line.random_rays``; each joins the solution it starts from), or their curves by
    solution name as :func:`static.match_rays` gives them."""
    sols = solutions if solutions is not None else static.line_solutions(line)
    if rays is not None and not isinstance(rays, dict):
        rays = static.match_rays(_ray_curves(rays), sols)[0]
    numbers = numbers or static.edge_center_of(line, rays, rises, sols)
    rise = rises[0]
    with style():
        fig = Figure(figsize=(12.5, 6.2), layout="constrained")
        ax, ax_r = fig.subplots(1, 2)
        static.draw_line(ax, line, "train_loss", solutions=sols)
        axes = [ax]
        test = line.primary_metric
        if test != "test_loss":
            tw = ax.twinx()
            tw.spines["right"].set_visible(True)
            static.draw_line(tw, line, test, solutions=sols, mark=False)
            tw.set_xlabel("")
            axes.append(tw)
            ax.set_zorder(tw.get_zorder() + 1)  # train loss and the markers above the test curve
            ax.patch.set_visible(False)
            te = np.asarray(line.values[test], float)
            lo = np.nanmin(te)
            tw.set_ylim(max(0.0, lo - 0.5), min(np.nanmax(te), 4 * lo + 1) * 1.05)  # detail near the minimum
        static.mark_solutions(ax, sols)
        ax.set_title("Along the line through the solutions", pad=18)
        handles, labels = static.dedupe_legend(axes)
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
        static.draw_rays(ax_r, rays or {}, line=line, solutions=sols, rise=rise)
        _clip_rays_axes(ax_r, numbers, rise)
        ax_r.set_title(f"Basin width: distance until the train loss rises by {rise:g}", pad=18)
        handles, labels = static.dedupe_legend([ax_r])
        leg = ax_r.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False,
                          title=edge_center_text(numbers, rise), alignment="left",
                          title_fontproperties={"family": "DejaVu Sans Mono", "size": 8.5})
        leg.get_title().set_multialignment("left")
    return fig


def _clip_rays_axes(ax, numbers: dict, rise: float) -> None:
    """Show the rays up to well above the highest rise level rather than to wherever they end."""
    bases = [e["train_loss"] for e in numbers.values() if np.isfinite(e["train_loss"])]
    if bases:
        lo = min(bases) / 2
        hi = (max(bases) + rise) * 30
        cur = ax.get_ylim()
        ax.set_ylim(max(cur[0], lo) if cur[0] > 0 else lo, min(cur[1], hi))


def edge_center_text(numbers: dict, rise: float) -> str:
    """A few lines: for each solution, distance to a rise of ``rise`` in each direction and on rays."""
    key = analysis.format_rise(rise)
    lines = [f"distance to loss + {rise:g}:"]
    for name, entry in numbers.items():
        r = entry["rise"][key]
        parts = []
        for label, d in r["line"].items():
            short = "toward" if label.startswith("toward") else "away" if label.startswith("away") else label
            parts.append(f"{short} {_dist(d)}")
        if "rays" in r:
            parts.append(f"rays {analysis.width_text(r['rays'])}")
        lines.append(f"{role(name).label}: " + ", ".join(parts))
    return "\n".join(lines)


def _dist(d: dict) -> str:
    return f"{d['distance']:.3g}" if d["distance"] is not None else f">{d['searched']:.3g}"


# ---------------------------------------------------------------------------------------------
# trajectory-run figures

def lookahead_figure(fast_step, fast_metrics: dict, slow_step=None, slow_metrics: dict | None = None,
                     metrics=("train_loss", "test_err")) -> Figure:
    """Loss (and error) of the fast weights at every inner step, slow synchronizations marked."""
    metrics = [m for m in metrics if m in fast_metrics]
    if not metrics:
        raise FileFormatError("the Lookahead fast run records none of the metrics to draw")
    with style():
        fig = Figure(figsize=(6.2 * len(metrics), 4.6), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(metrics)))
        for ax, m in zip(axes, metrics):
            sv = (slow_metrics or {}).get(m)
            static.draw_lookahead(ax, fast_step, fast_metrics[m], slow_step if sv is not None else None, sv, metric=m)
            ax.set_title(f"{metric_title(m)} of the weights at every inner step")
        _legend_below(fig, list(axes), ncol=3)
    return fig


def grafting_figure(nets: dict, layers=None) -> Figure:
    """``nets``: name -> (epoch (T,), entropy (T, L), weight (T', L), weight_epoch (T',)). One column
    per network: the entropy of each layer's weight histogram on top, below the share w of its own
    weights each layer kept at each graft (0.5: an even mix; above: it had the higher entropy)."""
    if not nets:
        raise FileFormatError("no grafting networks to draw")
    with style():
        n = len(nets)
        fig = Figure(figsize=(4.4 * n + 0.6, 6.6), layout="constrained")
        axes = np.array(fig.subplots(2, n, sharex=True, squeeze=False))
        for k, (name, (epoch, entropy, weight, w_epoch)) in enumerate(nets.items()):
            static.draw_grafting(axes[0, k], epoch, entropy, layers, ylabel="layer entropy (nats)" if k == 0 else "",
                                 title=role(name).label)
            static.draw_grafting(axes[1, k], w_epoch, weight, layers,
                                 ylabel="w: share of own weights kept" if k == 0 else "", hline=0.5,
                                 markers=True)
            finite = np.asarray(weight, float)[np.isfinite(weight)]
            lo, hi = (finite.min(), finite.max()) if finite.size else (0.5, 0.5)
            axes[1, k].set_ylim(min(0.25, lo - 0.03), max(0.75, hi + 0.03))
            axes[0, k].set_xlabel("")
        nl = len(layers) if layers else np.asarray(next(iter(nets.values()))[1]).shape[-1]
        handles, labels = static.dedupe_legend([axes[0, 0]])
        fig.legend(handles, labels, loc="outside lower center", ncol=min(6, nl), frameon=False, title="layer")
        fig.suptitle("Filter grafting: entropy of each layer and its mixing weight "
                     "w = A/π·arctan(c·(H_own − H_donor)) + 0.5", fontsize=11)
    return fig


# ---------------------------------------------------------------------------------------------
# adapters: trajectory runs -> the plain arrays the figures take (the only code that knows the
# training methods' run and metric names)

LOOKAHEAD_PREFIXES = ("lookahead", "lookahead-adam")


def lookahead_arrays(traj, prefix: str = "lookahead"):
    """``(fast_step, fast_metrics, slow_step, slow_metrics)`` of ``<prefix>/fast`` and ``<prefix>/slow``
    (the slow rows limited to the fast window; metrics: name -> (T,) array)."""
    fast, slow = traj.run(f"{prefix}/fast"), traj.run(f"{prefix}/slow")
    if len(fast) == 0:
        raise FileFormatError(f"{traj.path}: {prefix}/fast holds no steps (trained with lookahead_fast_epochs 0?)")
    lo, hi = float(fast.step.min()), float(fast.step.max())
    keep = (slow.step >= lo) & (slow.step <= hi)

    def pick(run, rows):
        return {k: np.asarray(v)[rows] for k, v in run.metrics.items() if np.asarray(v).ndim == 1}
    return fast.step.astype(float), pick(fast, slice(None)), slow.step[keep].astype(float), pick(slow, keep)


def lookahead_figure_from(traj, prefix: str = "lookahead", metrics=("train_loss", "test_err")) -> Figure:
    """:func:`lookahead_figure` of the runs ``<prefix>/fast`` and ``<prefix>/slow`` of a trajectory."""
    fig = lookahead_figure(*lookahead_arrays(traj, prefix), metrics=metrics)
    attrs = traj.run(f"{prefix}/slow").attrs
    if "k" in attrs and "alpha" in attrs:
        name = role(prefix + "/slow").label.rsplit(" ", 1)[0]
        fig.suptitle(f"{name}: k = {attrs['k']}, alpha = {attrs['alpha']:g}, inner optimizer "
                     f"{attrs.get('inner_optimizer', '?')}", fontsize=11)
    return fig


def grafting_arrays(traj, prefix: str = "grafting/net"):
    """``({run: (epoch, entropy (T, L), weight (T', L), weight_epoch (T',))}, layers)``: the layer
    entropies at initialization and after each epoch's training, and the mixing weights of each graft."""
    runs = sorted((r for r in traj.runs if r.startswith(prefix) and r[len(prefix):].isdigit()),
                  key=lambda r: int(r[len(prefix):]))
    if not runs:
        raise FileFormatError(f"{traj.path} has no {prefix}<i> runs")
    nets, layers = {}, None
    for r in runs:
        d = traj.run(r)
        if "entropy" not in d.metrics:
            raise FileFormatError(f"{traj.path}: run {r} records no layer entropies")
        entropy = np.asarray(d.metrics["entropy"])
        grafted = np.asarray(d.metrics.get("grafted", np.zeros(len(d)))) == 1
        weight = np.asarray(d.metrics.get("graft_weight", np.full(entropy.shape, np.nan)))
        nets[r] = (d.epoch[~grafted], entropy[~grafted], weight[grafted], d.epoch[grafted])
        layers = layers or d.attrs.get("layers")
    return nets, layers


def grafting_figure_from(traj, prefix: str = "grafting/net") -> Figure:
    """:func:`grafting_figure` of the runs ``<prefix><i>`` of a trajectory."""
    return grafting_figure(*grafting_arrays(traj, prefix))


# ---------------------------------------------------------------------------------------------

def _ray_curves(rays) -> dict:
    """Rays surfaces (one or a list) or their curves (origin name -> list of ``(distance, train_loss)``)
    as the curves."""
    return rays if isinstance(rays, dict) else static.rays_of(rays if isinstance(rays, (list, tuple)) else [rays])


def rays_figure(rays, rise: float = 0.1) -> Figure:
    """Train loss along random rays from one or more checkpoints (``rays``: rays surfaces, or origin
    name -> list of ``(distance, train_loss)``), with the point where each has risen by ``rise`` marked."""
    rays = _ray_curves(rays)
    with style():
        fig = Figure(figsize=(7.2, 5.6), layout="constrained")
        ax = fig.subplots()
        static.draw_rays(ax, rays, rise=rise)
        ax.set_title(f"Random rays: distance until train loss rises by {rise:g}")
        _legend_below(fig, [ax], ncol=2)
    return fig


def save(fig: Figure, out_dir, name: str, formats=("png", "pdf")) -> list:
    """Write ``fig`` as ``out_dir/name.<fmt>`` for each format (each file written whole, then moved
    into place, on the disk before it gets its name; ``out_dir`` made if missing); return the paths."""
    from ..store.files import publish, write_failed
    out_dir = Path(out_dir)
    paths = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_failed(e, out_dir) from None
    for fmt in formats:
        p = out_dir / f"{name}.{fmt}"
        tmp = out_dir / f".{name}.{fmt}.partial"
        try:
            fig.savefig(tmp, format=fmt)
            publish(tmp, p)
        except OSError as e:  # a full disk, a folder taken away: one line, naming the figure
            raise write_failed(e, p) from None
        finally:
            tmp.unlink(missing_ok=True)
        paths.append(p)
    return paths


__all__ = ["plane_figure", "offset_figure", "edge_center_figure", "rays_figure", "lookahead_figure",
           "grafting_figure", "lookahead_figure_from", "grafting_figure_from", "lookahead_arrays",
           "grafting_arrays", "edge_center_text", "save"]
