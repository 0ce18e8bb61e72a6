"""Figures of sharpness files (``landscape sharpness``): the Hessian spectral densities of several
checkpoints overlaid, and sharpness against test error for every checkpoint (one per method).

Drawing functions take an Axes, draw and return it; :func:`flatness_figure` puts them together.

Example::

    from landscape.store.sharpness import open_sharpness
    fig = flatness_figure(open_sharpness("sharpness.h5"))
    save(fig, "figures", "flatness")
"""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from .analysis import width_text
from .style import role, style

MEASURES = {
    "top_eigenvalue": "top Hessian eigenvalue",
    "trace": "Hessian trace",
    "epsilon_sharpness": "epsilon-sharpness (train-loss rise)",
}


def measure_of(result: dict, measure: str) -> float:
    if measure == "top_eigenvalue":
        return float(result["eigenvalues"][0])
    return float(result[measure])


def _label(name: str) -> str:
    r = role(name)
    return r.label if r.label != name.rsplit(":", 1)[0] else name


def _looks(names) -> dict:
    """name -> (colour, marker, hollow, line style, size): each method's own colour and marker; a second
    checkpoint drawn like an earlier one (two Lookahead runs, two averages) hollow; a later line of an
    earlier one's colour (SWA's average beside its iterates) dashed or dotted."""
    markers, colours, out = {}, {}, {}
    for n in names:
        r = role(n)
        marker = r.marker if r.marker not in (".", "X") else "o"
        k, c = markers.get((r.color, marker), 0), colours.get(r.color, 0)
        markers[(r.color, marker)], colours[r.color] = k + 1, c + 1
        out[n] = (r.color, marker, k % 2 == 1, ("-", "--", ":", "-.")[c % 4], r.size)
    return out


def density_grid(sharp, points: int = 600, pad: float = 0.05) -> tuple:
    """A common eigenvalue grid for every checkpoint's SLQ nodes and a Gaussian width: 1 % of the span."""
    nodes = np.concatenate([np.ravel(r["density_nodes"]) for r in sharp.results if "density_nodes" in r])
    nodes = nodes[np.isfinite(nodes)]
    lo, hi = float(nodes.min()), float(nodes.max())
    span = max(hi - lo, 1e-12)
    sigma = 0.01 * span
    return np.linspace(lo - pad * span, hi + pad * span, points), sigma


def draw_density(ax, sharp, checkpoints=None, *, sigma: float | None = None, floor: float = 1e-6):
    """The SLQ spectral densities of ``checkpoints`` (default: all with a density) overlaid, on a log
    density axis (the bulk near zero and the outliers both visible)."""
    from ..sharpness import density_curve
    rows = [r for r in sharp.results if "density_nodes" in r and (checkpoints is None or r["checkpoint"] in checkpoints)]
    if not rows:
        ax.text(0.5, 0.5, "no spectral density in this file\n(landscape sharpness --density)",
                ha="center", va="center", transform=ax.transAxes)
        return ax
    grid, auto = density_grid(sharp)
    sigma = sigma or auto
    looks = _looks([r["checkpoint"] for r in sharp.results])
    for r in rows:
        d = density_curve(np.asarray(r["density_nodes"]), np.asarray(r["density_weights"]), grid, sigma)
        color, _, _, ls, _ = looks[r["checkpoint"]]
        ax.plot(grid, np.maximum(d, floor), color=color, lw=1.3, label=_label(r["checkpoint"]), ls=ls)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor * 10)
    ax.set_xlabel("Hessian eigenvalue")
    ax.set_ylabel("spectral density")
    ax.set_title(f"Hessian spectral density (SLQ, Gaussian width {sigma:.2g})")
    return ax


def draw_sharpness_vs_error(ax, sharp, measure: str = "top_eigenvalue", *, error: str | None = None, log: bool = False):
    """One marker per checkpoint (its method's colour and marker; the legend names them): ``measure``
    against its test error (%) or ``error``, by default the task's primary test value; for the trace, two
    standard errors as a horizontal bar."""
    error = error or sharp.test_metric
    looks = _looks([r["checkpoint"] for r in sharp.results])
    for r in sharp.results:
        color, marker, hollow, _, size = looks[r["checkpoint"]]
        x = measure_of(r, measure)
        y = r["metrics"][error]
        xerr = 2 * r["trace_stderr"] if measure == "trace" else None
        ax.errorbar([x], [y], xerr=xerr, fmt=marker, color=color, mfc="white" if hollow else color,
                    ms=min(size, 11), mec=color if hollow else "black", mew=1.4 if hollow else 0.6, capsize=2,
                    zorder=3, label=_label(r["checkpoint"]))
    if log:
        ax.set_xscale("log")
    title = MEASURES[measure]
    if measure == "epsilon_sharpness":
        title += f", epsilon {sharp.epsilon:g}"
    if measure == "trace":
        title += " (+-2 s.e.)"
    ax.set_xlabel(title)
    what = "test error" if error == "test_err" else error.replace("_", " ")
    ax.set_ylabel("test error (%)" if error == "test_err" else what)
    ax.set_title(f"{MEASURES[measure].split(' (')[0]} vs {what}")
    ax.grid(alpha=0.3)
    return ax


def flatness_figure(sharp) -> Figure:
    """The spectral densities (when the file has them) and three sharpness-vs-test-error panels."""
    has_density = any("density_nodes" in r for r in sharp.results)
    n = 4 if has_density else 3
    with style():
        fig = Figure(figsize=(4.3 * n, 4.9), layout="constrained")
        axes = fig.subplots(1, n)
        k = 0
        if has_density:
            draw_density(axes[0], sharp)
            k = 1
        for ax, m in zip(axes[k:], MEASURES):
            draw_sharpness_vs_error(ax, sharp, m)
        handles, labels = axes[k].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5), fontsize=8.5,
                   frameon=False)
        policy = sharp.spec.get("bn", {}).get("policy", "?")
        fig.suptitle("Flatness of each checkpoint: Hessian and epsilon-sharpness of the train loss"
                     + ("" if policy == "none" else f" (BatchNorm statistics: {policy})"), fontsize=11)
    return fig


def draw_flatness_table(ax, table: list, epsilon: float, rises=(0.05, 0.1)):
    """The flatness table (rows of :func:`landscape.demo.flatness_table`) drawn as a table: one row per
    checkpoint, the flattest value of each column in bold."""
    cols = ["test error (%)", "top Hessian\neigenvalue", "Hessian trace\n(+- s.e.)",
            f"eps-sharpness\n(eps {epsilon:g})"] + [f"basin width\n(+{r:g} loss)" for r in rises]
    cells, raw = [], []
    for r in table:
        widths = [r["basin_width"].get(f"{rise:g}") for rise in rises]
        raw.append([r["test_err"], r["top_eigenvalue"], r["trace"], r["epsilon_sharpness"]] +
                   [w["mean"] if w else np.nan for w in widths])
        cells.append([f"{r['test_err']:.2f}", f"{r['top_eigenvalue']:.3g}", f"{r['trace']:.3g} +- {r['trace_stderr']:.2g}",
                      f"{r['epsilon_sharpness']:.3g}"] +
                     [("-" if w is None else width_text(w))
                      for w in widths])
    labels = [_label(r["checkpoint"]) for r in table]
    ax.axis("off")
    widths = [0.22] + [0.78 / len(cols)] * len(cols)
    t = ax.table(cellText=[[lab] + c for lab, c in zip(labels, cells)], colLabels=["method"] + cols,
                 colWidths=widths, loc="center", cellLoc="right")
    for i in range(len(table) + 1):
        t[i, 0].set_text_props(ha="left")
        t[i, 0]._loc = "left"
    t.auto_set_font_size(False)
    t.set_fontsize(8.5)
    t.scale(1.0, 1.35)
    for j in range(len(cols) + 1):
        t[0, j].set_height(2 * t[0, j].get_height())
    raw = np.asarray(raw, float)
    for j in range(raw.shape[1]):
        col = raw[:, j]
        if not np.isfinite(col).any():
            continue
        best = int(np.nanargmax(col)) if j >= 4 else int(np.nanargmin(col))
        t[best + 1, j + 1].set_text_props(fontweight="bold")
    return ax


def flatness_table_figure(table: list, epsilon: float, rises=(0.05, 0.1)) -> Figure:
    with style():
        fig = Figure(figsize=(11.5, 0.27 * len(table) + 0.9))
        ax = fig.add_axes((0.01, 0.02, 0.98, 0.8))
        draw_flatness_table(ax, table, epsilon, rises)
        fig.suptitle("Flatness of every method. Bold: the lowest error and sharpness, the widest basin; basin "
                     "width = mean distance (weight-space units)\nalong random rays to where the train loss has "
                     "risen by that much ('>' when some ray did not within its length: a lower bound)",
                     fontsize=9, y=0.99)
    return fig
