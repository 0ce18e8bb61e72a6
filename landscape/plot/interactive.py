"""The interactive explorer: one self-contained HTML page (plotly.js embedded, works offline).

Per plane: a 3D surface and a filled contour map side by side, buttons to switch the metric (train/test
loss/error) and the colour scale (log/linear), every run's projected trajectory and the checkpoints of
interest overlaid (hover: run, checkpoint, epoch, coordinates, value, distance from the plane), and a
slider over epochs that shows the trajectories up to that epoch. Per line: the metrics along it with
the checkpoints marked; per rays file: the metric along every ray. Several files make one section each.

The buttons and the slider drive a small script (``_PLANE_JS``) that restyles the traces from data
embedded in the page, so one set of traces serves every combination of metric, scale and epoch.

Example::

    write_explorer(["plane.h5", "line.h5"], "explore.html")
"""
from __future__ import annotations

import html
import os
from pathlib import Path

import numpy as np

from ..errors import ConfigError, FileFormatError
from . import analysis, static
from .style import DISTANCE, WORDS, metric_label, metric_name, role

COLORSCALE = "Viridis"
METRIC_ORDER = ("train_loss", "test_loss", "train_err", "test_err", "train_loss_l2")
MAX_SLIDER_STEPS = 60


def _clean(a):
    """Nested lists with NaN/inf replaced by None (JSON null: a gap for plotly)."""
    a = np.asarray(a, dtype=np.float64)
    out = a.astype(object)
    out[~np.isfinite(a)] = None
    return out.tolist()


def _metrics(surface) -> list:
    ms = [m for m in METRIC_ORDER if m in surface.values] + \
        [m for m in surface.values if m not in METRIC_ORDER]
    if not ms:
        raise FileFormatError(f"{surface.path} holds no values")
    return ms


def _floor(v) -> float:
    """Smallest value shown on a log scale (errors can be exactly 0)."""
    v = np.asarray(v, float)
    pos = v[np.isfinite(v) & (v > 0)]
    return float(pos.min()) / 2 if pos.size else 1e-12


# ---------------------------------------------------------------------------------------------
# planes

def slider_epochs(epochs, n: int = 30) -> list:
    """Up to ``n + 1`` evenly spaced epochs from the first to the last recorded one, snapped to whole
    epochs when the span is wide enough; the last is the final epoch (the slider's "everything")."""
    e = np.asarray(sorted({float(v) for v in epochs if v is not None and np.isfinite(v)}))
    if e.size == 0:
        return []
    if e.size <= n + 1:
        return e.tolist()
    grid = np.linspace(e[0], e[-1], n + 1)
    if e[-1] - e[0] >= n:
        grid = np.round(grid)
    return sorted(set(grid[:-1].tolist()) | {float(e[-1])})


def plane_figure(surface, *, metric: str = "train_loss", scale: str = "log", title: str | None = None,
                 flatness: dict | None = None):
    """A plotly Figure of one plane with everything the explorer's script needs in ``layout.meta``.
    ``flatness``: checkpoint name -> a line of its sharpness numbers, shown in its hover text."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    static.require_kind(surface, "plane")
    static.require_area(surface)
    metrics = _metrics(surface)
    if metric not in metrics:
        metric = metrics[0]
    x, y = np.asarray(surface.x, float), np.asarray(surface.y, float)
    fig = make_subplots(rows=1, cols=2, specs=[[{"type": "scene"}, {"type": "xy"}]], column_widths=[0.54, 0.46],
                        horizontal_spacing=0.06, subplot_titles=("3D surface", "contour map"))
    z0 = np.asarray(surface.values[metric], float).T  # plotly: z[j][i] belongs to (x[i], y[j])
    reverse = surface.maximized(metric) and scale != "log"  # as the page's script sets it (see mdata below)
    fig.add_trace(go.Surface(x=x, y=y, z=_clean(z0), colorscale=COLORSCALE, name="surface", showscale=True,
                             reversescale=reverse,
                             colorbar=dict(x=1.02, len=0.85, thickness=14), hovertemplate="%{text}<extra></extra>",
                             contours=dict(z=dict(show=False))), row=1, col=1)
    fig.add_trace(go.Contour(x=x, y=y, z=_clean(z0), colorscale=COLORSCALE, showscale=False, name="contour",
                             reversescale=reverse,
                             contours=dict(coloring="heatmap", showlines=True), line=dict(width=0.5, color="white"),
                             ncontours=18, hovertemplate="%{text}<extra></extra>"), row=1, col=2)
    paths, points = [], []
    for run, p in surface.paths.items():
        if len(p.coords) == 0:
            continue
        r = role(run)
        c = np.asarray(p.coords, float)
        vals = {m: _clean(analysis.interp_plane(x, y, surface.values[m], c)) for m in metrics}
        common = dict(name=r.label if r.label != run else run, legendgroup=run, mode="lines+markers",
                      hovertemplate="%{text}<extra></extra>")
        fig.add_trace(go.Scatter3d(x=c[:, 0], y=c[:, 1], z=vals[metric], line=dict(color=r.color, width=4),
                                   marker=dict(size=2.5, color=r.color), showlegend=False, **common), row=1, col=1)
        fig.add_trace(go.Scatter(x=c[:, 0], y=c[:, 1], line=dict(color=r.color, width=1.5),
                                 marker=dict(size=4, color=r.color), showlegend=True, **common), row=1, col=2)
        paths.append({"run": run, "label": common["name"], "x": _clean(c[:, 0]), "y": _clean(c[:, 1]),
                      "epoch": _clean(p.epoch), "dist": _clean(p.distance), "vals": vals,
                      "t3": len(fig.data) - 2, "t2": len(fig.data) - 1})
    far = static.off_plane_threshold(surface, 0.05)
    for name, (coords, dist) in static.checkpoints_of_interest(surface).items():
        r = role(name)
        run, _, idx = name.rpartition(":")
        ep = None
        if run in surface.paths and idx.isdigit() and int(idx) < len(surface.paths[run].epoch):
            ep = float(surface.paths[run].epoch[int(idx)])
        vals = {m: _clean(analysis.interp_plane(x, y, surface.values[m], coords[None]))[0] for m in metrics}
        sym3 = {"o": "circle", "*": "diamond", "D": "diamond", "s": "square", "v": "cross", "^": "cross",
                "P": "cross", "X": "x", "x": "x"}.get(r.marker, "circle")
        sym2 = {"o": "circle", "*": "star", "D": "diamond", "s": "square", "v": "triangle-down",
                "^": "triangle-up", "P": "cross", "X": "x", "x": "x"}.get(r.marker, "circle")
        hollow = dist > far
        common = dict(name=name, legendgroup=f"pt:{name}", mode="markers+text", text=[name],
                      textposition="top center", hovertemplate="%{hovertext}<extra></extra>")
        fig.add_trace(go.Scatter3d(x=[coords[0]], y=[coords[1]], z=[vals[metric]], showlegend=False,
                                   marker=dict(size=6, color=r.color,
                                               symbol=sym3 + ("-open" if hollow and sym3 in ("circle", "diamond", "square") else ""),
                                               line=dict(color="black", width=1)),
                                   textfont=dict(size=10), **common), row=1, col=1)
        fig.add_trace(go.Scatter(x=[coords[0]], y=[coords[1]], showlegend=True,
                                 marker=dict(size=13 if sym2 == "star" else 10, color=r.color,
                                             symbol=sym2 + ("-open" if hollow else ""),
                                             line=dict(color="black" if not hollow else r.color, width=1 if not hollow else 2)),
                                 textfont=dict(size=10, color="white"), **common), row=1, col=2)
        points.append({"name": name, "label": r.label, "x": float(coords[0]), "y": float(coords[1]),
                       "flat": (flatness or {}).get(name),
                       "epoch": ep, "dist": float(dist), "vals": vals, "t3": len(fig.data) - 2, "t2": len(fig.data) - 1})

    mdata = {}
    for m in metrics:
        v = np.asarray(surface.values[m], float)
        # a maximized metric (an accuracy): its log scale is of the distance below its best value, and its
        # linear scale reverses the colours, so that the best values are dark, as a loss's minimum is
        best = float(v[np.isfinite(v)].max()) if surface.maximized(m) and np.isfinite(v).any() else None
        mdata[m] = {"label": metric_label(m), "name": metric_name(m), "z": _clean(v.T), "err": m.endswith("_err"),
                    "best": best, "floor": _floor(v if best is None else best - v)}
    epochs = slider_epochs([e for p in paths for e in p["epoch"] if e is not None])
    meta = {"landscape": "plane", "metrics": mdata, "paths": paths, "points": points, "surface": 0, "contour": 1,
            "metric": metric, "scale": scale, "units": DISTANCE}

    buttons_m = [dict(label=metric_name(m), method="skip", args=[None], name=f"metric:{m}") for m in metrics]
    buttons_s = [dict(label=s, method="skip", args=[None], name=f"scale:{s}") for s in ("log", "linear")]
    menus = [dict(type="buttons", direction="right", x=0.0, xanchor="left", y=1.17, yanchor="bottom",
                  buttons=buttons_m, active=metrics.index(metric), showactive=True, pad=dict(r=4, t=2)),
             # left, next to the metric buttons: plotly's toolbar takes the top right corner
             dict(type="buttons", direction="right", x=_after(buttons_m), xanchor="left", y=1.17, yanchor="bottom",
                  buttons=buttons_s, active=0 if scale == "log" else 1, showactive=True, pad=dict(r=4, t=2))]
    sliders = []
    if epochs:
        steps = [dict(label=f"{e:.4g}", method="skip", args=[None], value=repr(e)) for e in epochs]
        sliders = [dict(active=len(steps) - 1, steps=steps, x=0.05, len=0.9, y=-0.06, yanchor="top",
                        currentvalue=dict(prefix="trajectories up to epoch ", font=dict(size=12)),
                        font=dict(size=10), pad=dict(t=10, b=10))]
    xr, yr = float(x[-1] - x[0]) or 1.0, float(y[-1] - y[0]) or 1.0
    big = max(xr, yr)
    fig.update_layout(
        title=dict(text=title or "", x=0.01, y=0.98), height=900, margin=dict(l=20, r=90, t=150, b=230),
        updatemenus=menus, sliders=sliders, meta=meta, template="plotly_white",
        legend=dict(orientation="h", x=0.5, xanchor="center", y=-0.3, yanchor="top", font=dict(size=11)),
        scene=dict(xaxis_title=f"u ({DISTANCE})", yaxis_title=f"v ({DISTANCE})", zaxis_title=metric_label(metric),
                   aspectmode="manual", aspectratio=dict(x=xr / big * 1.2, y=yr / big * 1.2, z=0.7),
                   camera=dict(eye=dict(x=1.3, y=-1.5, z=1.0))),
        annotations=list(fig.layout.annotations) + [
            dict(text=label, x=left, y=1.232, xref="paper", yref="paper", showarrow=False, xanchor="left",
                 yanchor="bottom", font=dict(size=11, color="#555"))
            for label, left in (("metric", 0.0), ("colour scale", _after(buttons_m)))])
    fig.update_xaxes(title_text=f"u ({DISTANCE})", range=[float(x[0]), float(x[-1])], row=1, col=2,
                     constrain="domain")
    fig.update_yaxes(title_text=f"v ({DISTANCE})", range=[float(y[0]), float(y[-1])], row=1, col=2,
                     scaleanchor="x", scaleratio=1, constrain="domain")
    return fig


# the script every plane section runs: state {metric, scale, epoch} -> restyle of all traces
_PLANE_JS = r"""
(function () {
  var gd = document.getElementById('{plot_id}');
  if (!gd || !gd.layout || !gd.layout.meta) { return; }
  var D = gd.layout.meta;
  var st = {metric: D.metric, scale: D.scale, epoch: Infinity};
  function fmt(v) { return (v === null || v === undefined || !isFinite(v)) ? 'n/a' : Number(v).toPrecision(4); }
  function unit(m) { return D.metrics[m].err ? ' %' : ''; }
  function tr(v, m) {  // log scale: of the value, or of its distance below the best of a maximized metric
    if (v === null || v === undefined || !isFinite(v)) { return null; }
    var M = D.metrics[m];
    if (st.scale !== 'log') { return v; }
    return Math.log10(Math.max(M.best === null ? v : M.best - v, M.floor));
  }
  function label(t, m, digits) {  // the value at log-scale position t
    var d = Math.pow(10, t), best = D.metrics[m].best;
    if (best === null) {  // (JavaScript writes numbers below 1e21 in full: 1e10 read as 10000000000)
      return d >= 1e5 ? d.toExponential(digits - 1).replace(/\.?0+e/, 'e') : Number(d.toPrecision(digits)).toString();
    }
    return Number((best - d).toFixed(Math.max(1, digits - 1 - Math.floor(Math.log10(d))))).toString();
  }
  function grid(z, m) { return z.map(function (row) { return row.map(function (v) { return tr(v, m); }); }); }
  function ticks(z, m) {
    if (st.scale !== 'log') { return {tickmode: 'auto', tickvals: null, ticktext: null}; }
    var lo = Infinity, hi = -Infinity;
    z.forEach(function (row) { row.forEach(function (v) { if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); } }); });
    if (!isFinite(lo)) { return {tickmode: 'auto', tickvals: null, ticktext: null}; }
    if (hi <= lo) { return {tickmode: 'array', tickvals: [lo], ticktext: [label(lo, m, 3)]}; }  // one value
    if (hi - lo > 3) {  // many decades: powers of ten, at most about eight (1-2-5 ticks piled up)
      var step = Math.ceil((hi - lo) / 8), ks = [], kt = [];
      for (var p = Math.ceil(lo / step - 1e-9) * step; p <= hi + 1e-9; p += step) { ks.push(p); kt.push(label(p, m, 2)); }
      if (ks.length >= 2) { return {tickmode: 'array', tickvals: ks, ticktext: kt}; }
    }
    // ticks at round values (1-2-5, finer when the range spans less than a decade), labelled with the
    // values themselves rather than their logarithms
    var sets = [[1, 2, 5], [1, 1.5, 2, 3, 5, 7], [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9]];
    for (var s = 0; s < sets.length; s++) {
      var vals = [], text = [];
      for (var k = Math.floor(lo) - 1; k <= Math.ceil(hi) + 1; k++) {
        sets[s].forEach(function (f) {
          var t = k + Math.log10(f);
          if (t >= lo - 1e-9 && t <= hi + 1e-9) { vals.push(t); text.push(label(t, m, 2)); }
        });
      }
      if (vals.length >= 3) { return {tickmode: 'array', tickvals: vals, ticktext: text}; }
    }
    vals = []; text = [];
    for (var i = 0; i <= 4; i++) {
      var t = lo + (hi - lo) * i / 4;
      vals.push(t); text.push(label(t, m, 3));
    }
    return {tickmode: 'array', tickvals: vals, ticktext: text};
  }
  function render() {
    var m = st.metric, M = D.metrics[m];
    var z = grid(M.z, m);
    var xs = gd.data[D.surface].x, ys = gd.data[D.surface].y;
    var hover = M.z.map(function (row, j) { return row.map(function (v, i) {
      return 'u ' + fmt(xs[i]) + ', v ' + fmt(ys[j]) + '<br>' + M.name + ' ' + fmt(v) + unit(m); }); });
    var tk = ticks(z, m);
    var cb = M.label + (st.scale !== 'log' ? '' : M.best === null ? ' (log scale)' : ' (log scale below its best)');
    var reversed = M.best !== null && st.scale !== 'log';
    Plotly.restyle(gd, {z: [z, z], text: [hover, hover], 'colorbar.title.text': [cb, cb],
                        reversescale: [reversed, reversed],
                        'colorbar.tickmode': [tk.tickmode, tk.tickmode], 'colorbar.tickvals': [tk.tickvals, tk.tickvals],
                        'colorbar.ticktext': [tk.ticktext, tk.ticktext]}, [D.surface, D.contour]);
    if (D.paths.length) {
      var P = {x: [], y: [], z: [], text: [], s3: [], s2: []};
      D.paths.forEach(function (p) {
        var n = 0;
        p.epoch.forEach(function (e, i) { if (e === null || e <= st.epoch) { n = i + 1; } });
        var txt = [];
        for (var i = 0; i < n; i++) {
          txt.push(p.label + ' (' + p.run + ':' + i + ')<br>epoch ' + fmt(p.epoch[i]) + '<br>u ' + fmt(p.x[i]) +
                   ', v ' + fmt(p.y[i]) + '<br>' + M.name + ' on the plane ' + fmt(p.vals[m][i]) + unit(m) +
                   '<br>distance from the plane ' + fmt(p.dist[i]));
        }
        P.x.push(p.x.slice(0, n)); P.y.push(p.y.slice(0, n)); P.text.push(txt);
        P.z.push(p.vals[m].slice(0, n).map(function (v) { return tr(v, m); }));
        P.s3.push(txt.map(function (_, i) { return i === n - 1 ? 6 : 2.5; }));
        P.s2.push(txt.map(function (_, i) { return i === n - 1 ? 9 : 4; }));
      });
      Plotly.restyle(gd, {x: P.x, y: P.y, z: P.z, text: P.text, 'marker.size': P.s3},
                     D.paths.map(function (p) { return p.t3; }));
      Plotly.restyle(gd, {x: P.x, y: P.y, text: P.text, 'marker.size': P.s2},
                     D.paths.map(function (p) { return p.t2; }));
    }
    if (D.points.length) {
      var Q = {z: [], h: [], vis: []};
      D.points.forEach(function (p) {
        Q.z.push([tr(p.vals[m], m)]);
        Q.h.push([p.label + ' (' + p.name + ')<br>epoch ' + fmt(p.epoch) + '<br>u ' + fmt(p.x) + ', v ' + fmt(p.y) +
                  '<br>' + M.name + ' on the plane ' + fmt(p.vals[m]) + unit(m) + '<br>distance from the plane ' +
                  fmt(p.dist) + (p.flat ? '<br>' + p.flat : '')]);
        Q.vis.push(p.epoch === null || p.epoch <= st.epoch);
      });
      Plotly.restyle(gd, {z: Q.z, hovertext: Q.h, visible: Q.vis}, D.points.map(function (p) { return p.t3; }));
      Plotly.restyle(gd, {hovertext: Q.h, visible: Q.vis}, D.points.map(function (p) { return p.t2; }));
    }
    Plotly.relayout(gd, {'scene.zaxis.title.text': cb, 'scene.zaxis.tickmode': tk.tickmode,
                         'scene.zaxis.tickvals': tk.tickvals, 'scene.zaxis.ticktext': tk.ticktext});
  }
  gd.on('plotly_buttonclicked', function (e) {
    var name = (e && e.button && e.button.name) || '';
    var kv = name.split(':');
    if (kv[0] === 'metric' && D.metrics[kv[1]]) { st.metric = kv[1]; render(); }
    if (kv[0] === 'scale') { st.scale = kv[1]; render(); }
  });
  gd.on('plotly_sliderchange', function (e) {
    var v = parseFloat(e && e.step ? e.step.value : NaN);
    var last = e && e.slider && e.step === e.slider.steps[e.slider.steps.length - 1];
    st.epoch = (isNaN(v) || last) ? Infinity : v;
    render();
  });
  render();
  gd.setAttribute('data-landscape-ready', '1');
})();
"""


# ---------------------------------------------------------------------------------------------
# lines and rays

def line_figure(surface, *, title: str | None = None):
    """A plotly Figure of one line (or of a rays file): every metric along it, one shown at a time
    (buttons), log/linear y, the checkpoints on the line marked."""
    import plotly.graph_objects as go

    metrics = _metrics(surface)
    rays = static.is_rays(surface)
    x = np.asarray(surface.x, float)
    fig = go.Figure()
    traces_of = {}
    for m in metrics:
        v = np.asarray(surface.values[m], float)
        rows = v if rays else v[None]
        ids = []
        for k, row in enumerate(rows):
            name = f"ray {k}" if rays else metric_name(m)
            hover = [f"{name}<br>distance {xi:.4g}<br>{metric_name(m)} {vi:.4g}{' %' if m.endswith('_err') else ''}"
                     for xi, vi in zip(x, row)]
            fig.add_trace(go.Scatter(x=x, y=_clean(row), mode="lines+markers", name=name, visible=m == metrics[0],
                                     marker=dict(size=4), hovertext=hover, hovertemplate="%{hovertext}<extra></extra>",
                                     showlegend=rays))
            ids.append(len(fig.data) - 1)
        traces_of[m] = ids
    pts = {} if rays else {n: float(np.asarray(p.coords).reshape(-1)[0]) for n, p in surface.points.items()}
    far = static.off_plane_threshold(surface, 0.05)
    shapes, annotations = [], []
    for n, t0 in pts.items():
        if not x[0] <= t0 <= x[-1]:
            continue
        r = role(n)
        dist = float(surface.points[n].distance)
        shapes.append(dict(type="line", x0=t0, x1=t0, yref="paper", y0=0, y1=1,
                           line=dict(color=r.color, width=1.5, dash="dot" if dist > far else "solid")))
        if dist <= far:  # far-off checkpoints' projections pile up unreadably: a dotted line says enough
            annotations.append(dict(x=t0, y=1.0, yref="paper", text=n, showarrow=False, textangle=-60,
                                    xanchor="left", yanchor="bottom", font=dict(size=10, color=r.color)))
    n_tr = len(fig.data)
    buttons = []
    for m in metrics:
        vis = [False] * n_tr
        for i in traces_of[m]:
            vis[i] = True
        buttons.append(dict(label=metric_name(m), method="update",
                            args=[{"visible": vis}, {"yaxis.title.text": metric_label(m)}]))
    scale_buttons = [dict(label="log", method="relayout", args=[{"yaxis.type": "log"}]),
                     dict(label="linear", method="relayout", args=[{"yaxis.type": "linear"}])]
    xlabel = f"distance from {surface.spec.get('origin', 'the origin')} ({DISTANCE})" if rays else \
        f"distance along the line from {surface.spec.get('origin', 'its origin')} ({DISTANCE})"
    fig.update_layout(
        title=dict(text=title or "", x=0.01), height=520, template="plotly_white", shapes=shapes,
        annotations=annotations + [dict(text=label, x=left, y=1.32, xref="paper", yref="paper", showarrow=False,
                                        xanchor="left", yanchor="bottom", font=dict(size=11, color="#555"))
                                   for label, left in (("metric", 0.0), ("scale", _after(buttons)))],
        margin=dict(l=60, r=20, t=150, b=60),
        updatemenus=[dict(type="buttons", direction="right", x=0.0, xanchor="left", y=1.2, yanchor="bottom",
                          buttons=buttons, active=0),
                     dict(type="buttons", direction="right", x=_after(buttons), xanchor="left", y=1.2, yanchor="bottom",
                          buttons=scale_buttons, active=0 if metrics[0].endswith("loss") else 1)],
        xaxis=dict(title=xlabel), yaxis=dict(title=metric_label(metrics[0]),
                                             type="log" if metrics[0].endswith("loss") else "linear"))
    return fig


# ---------------------------------------------------------------------------------------------
# the page

def interactive_figure(surface, **options):
    """The plotly Figure of a plane or line surface (from a file or from ``landscape.evaluate_surface``); in
    Jupyter it displays inline. ``options`` go to :func:`plane_figure` or :func:`line_figure`."""
    return (plane_figure if surface.kind == "plane" else line_figure)(surface, **options)


def explorer_html(surfaces, title: str = "landscape explorer", sharpness=None) -> str:
    """The whole page as a string: plotly.js embedded once, one section per surface; with a sharpness
    file (or its :class:`~landscape.store.sharpness.SharpnessFile`), a table of its numbers first and
    each checkpoint's numbers in its hover text."""
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    from ..store import Surface, open_surface
    surfs = [s if isinstance(s, Surface) else open_surface(s) for s in surfaces]
    if not surfs:
        raise ConfigError("give at least one surface file to explore")
    sharp = None
    if sharpness is not None:
        from ..store.sharpness import SharpnessFile, open_sharpness
        sharp = sharpness if isinstance(sharpness, SharpnessFile) else open_sharpness(sharpness)
    flat = flatness_lines(sharp) if sharp is not None else None
    sections = [flatness_table_html(sharp)] if sharp is not None else []
    config = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "png", "scale": 2}}
    for k, s in enumerate(surfs):
        name = str(s.path.name) if s.path is not None else f"surface {k}"
        heading = _describe(s)
        if s.kind == "plane":
            fig = plane_figure(s, flatness=flat if _joins(sharp, s) else None)
            div = pio.to_html(fig, include_plotlyjs=False, full_html=False, config=config, div_id=f"plane-{k}",
                              post_script=_PLANE_JS)
        else:
            fig = line_figure(s)
            div = pio.to_html(fig, include_plotlyjs=False, full_html=False, config=config, div_id=f"line-{k}")
        sections.append(f'<section><h2>{html.escape(name)}</h2><p class="what">{html.escape(heading)}</p>'
                        f"{div}</section>")
    nav = "".join(f'<li><a href="#s{k}">{html.escape(str(s.path.name) if s.path else k)}</a></li>'
                  for k, s in enumerate(surfs)) if len(surfs) > 1 else ""
    sections = [sec.replace("<section>", f'<section id="s{k}">', 1) for k, sec in enumerate(sections)]
    if sharp is not None:
        nav = ('<li><a href="#s0">flatness numbers</a></li>' + "".join(
            f'<li><a href="#s{k + 1}">{html.escape(str(s.path.name) if s.path else f"surface {k}")}</a></li>'
            for k, s in enumerate(surfs)))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1400px; padding: 0 16px; color: #222; }}
h1 {{ font-size: 1.4em; margin: 0.8em 0 0.2em; }} h2 {{ font-size: 1.15em; margin: 1.2em 0 0.1em; }}
p.what {{ color: #555; margin: 0 0 0.4em; font-size: 0.95em; }}
section {{ border-top: 1px solid #ddd; }} nav ul {{ padding-left: 1.2em; }}
table.flat {{ border-collapse: collapse; font-size: 0.9em; margin: 0.4em 0 1em; }}
table.flat td, table.flat th {{ padding: 2px 10px; text-align: right; border-bottom: 1px solid #eee; }}
table.flat td:first-child, table.flat th:first-child {{ text-align: left; }}
</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<h1>{html.escape(title)}</h1>
<p class="what">Coordinates are distances in weight space ({DISTANCE}){_percent_note(surfs)}. Buttons switch the
metric and the colour scale; the slider shows the trajectories up to an epoch; hover for values;
click legend entries to hide or show runs.</p>
{"<nav><ul>" + nav + "</ul></nav>" if nav else ""}
{"".join(sections)}
</body></html>
"""


def _percent_note(surfaces) -> str:
    """"; errors in %" for the metrics the surfaces' tasks give in percent (none for regression)."""
    names = sorted({WORDS.get(m, m).replace(" (%)", "") + "s" for s in surfaces for m in s.task.get("percent", ())})
    return f"; {' and '.join(names)} in %" if names else ""


def _joins(sharp, surface) -> bool:
    """Whether the sharpness file's numbers belong beside the surface's checkpoints (the same
    trajectory: another run's checkpoint names name other checkpoints); warns when they do not."""
    if sharp is None or static.same_trajectory(sharp, surface):
        return True
    import warnings
    other = (f"a model of {sharp.num_params:,} parameters, the plane's of {surface.num_params:,}"
             if sharp.num_params not in (None, surface.num_params) else
             f"another trajectory ({sharp.trajectory}) than the plane's ({surface.trajectory})")
    warnings.warn(f"{sharp.path or 'the sharpness numbers'} are of {other}; they are not shown beside "
                  f"{surface.path or 'that plane'}'s checkpoints", stacklevel=3)
    return False


def flatness_lines(sharp) -> dict:
    """Checkpoint name -> one line of its sharpness numbers (for hover texts)."""
    out = {}
    for r in sharp.results:
        out[r["checkpoint"]] = (f"top Hessian eigenvalue {r['eigenvalues'][0]:.4g}, trace {r['trace']:.4g} "
                                f"+- {r['trace_stderr']:.2g}<br>epsilon-sharpness {r['epsilon_sharpness']:.4g} "
                                f"(epsilon {sharp.epsilon:g})")
    return out


def flatness_table_html(sharp) -> str:
    """A section with the numbers of every checkpoint of a sharpness file."""
    k = max(len(r["eigenvalues"]) for r in sharp.results)
    shown = sharp.test_metric  # the task's primary test value: test_err for classification
    head = ("<tr><th>checkpoint</th><th>epoch</th><th>train loss</th>"
            f"<th>{'test error (%)' if shown == 'test_err' else html.escape(shown.replace('_', ' '))}</th>"
            f"<th>top {k} Hessian eigenvalues</th><th>trace (+- s.e.)</th>"
            f"<th>epsilon-sharpness (epsilon {sharp.epsilon:g})</th></tr>")
    rows = []
    for r in sharp.results:
        eig = ", ".join(f"{v:.4g}" for v in r["eigenvalues"])
        rows.append(f"<tr><td>{html.escape(r['checkpoint'])} ({html.escape(role(r['checkpoint']).label)})</td>"
                    f"<td>{r['epoch']:g}</td><td>{r['metrics']['train_loss']:.4f}</td>"
                    f"<td>{sharp.format_test_metric(r['metrics'][shown]).removesuffix(' %')}</td><td>{eig}</td>"
                    f"<td>{r['trace']:.4g} +- {r['trace_stderr']:.2g}</td><td>{r['epsilon_sharpness']:.4g}</td></tr>")
    name = html.escape(sharp.path.name) if sharp.path is not None else "sharpness"
    policy = str(sharp.spec.get("bn", {}).get("policy", "?"))
    bn = "" if policy == "none" else f" (BatchNorm statistics: {html.escape(policy)})"
    return (f'<section><h2>Flatness numbers ({name})</h2><p class="what">Of the train loss at each checkpoint'
            f"{bn}: Hessian eigenvalues by "
            "Lanczos, trace by Hutchinson, epsilon-sharpness = the largest train-loss rise within the "
            "filter-normalized epsilon-ball. Hover a checkpoint in a plane for its numbers.</p>"
            f'<table class="flat">{head}{"".join(rows)}</table></section>')


def _describe(s) -> str:
    spec = s.spec or {}
    method = spec.get("method", "")
    made = static.spec_checkpoints(s)
    if s.kind == "plane":
        if method == "through":
            return f"Plane through {', '.join(made)} ({len(s.x)} x {len(s.y)} points)."
        return f"Plane: {method or 'custom'} directions at {spec.get('origin', '?')} ({len(s.x)} x {len(s.y)} points)."
    if static.is_rays(s):
        return f"{np.shape(s.done)[0]} random rays from {spec.get('origin', '?')} ({len(s.x)} points each)."
    return f"Line through {' and '.join(made) or 'two checkpoints'} ({len(s.x)} points)."


def write_explorer(surfaces, out, title: str = "landscape explorer", overwrite: bool = True, sharpness=None) -> Path:
    """Write the explorer page to ``out`` (whole, then moved into place; a second writer of ``out`` is
    refused while this one holds ``OUT.lock``); return its path."""
    from ..store.files import claim_output, partial_path, prepare_output, publish, reason
    inputs = [s if isinstance(s, (str, os.PathLike)) else getattr(s, "path", None) for s in surfaces]
    out = prepare_output(out, overwrite, inputs=inputs)
    with claim_output(out, overwrite):
        page = explorer_html(surfaces, title, sharpness)
        tmp = partial_path(out)
        try:
            tmp.write_text(page, encoding="utf-8")
            publish(tmp, out)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise FileFormatError(f"cannot write {out}: {reason(e)}") from None
    return out


__all__ = ["plane_figure", "line_figure", "explorer_html", "write_explorer", "slider_epochs"]


def _after(buttons: list, width_px: float = 1200.0) -> float:
    """Where (paper x) the next row of buttons may start to the right of ``buttons``: their labels'
    estimated width (about 7 px a character and 22 px of padding each, on a page about ``width_px``
    wide), at least 0.3. Long metric names (a task's "test mean absolute error") would otherwise hide
    under the next buttons."""
    return max(0.3, sum(7 * len(b["label"]) + 22 for b in buttons) / width_px)
