"""Numbers behind the figures: geometry of *stored* values (no loss is evaluated here).

Pure numpy/scipy on plain arrays, so every function is testable on analytic fixtures:

- :func:`log_levels`: log-spaced contour levels in the style of the SWA authors' plane plots
  (a few bands that get wider away from the minimum, plus a top band "> x");
- :func:`grid_minimum`: where a plane's values are smallest (ties resolved by the centroid of the
  tied region, a unique minimum refined by a local quadratic fit);
- :func:`offset`: the vector from the train-loss minimum to the test-error minimum;
- :func:`rise_distance`: how far from a point along a line or ray the values first rise by a given
  amount (linear interpolation between samples);
- :func:`interp_line`, :func:`interp_plane`: stored values at arbitrary coordinates.

Plane values follow the surface-file convention: ``values[i, j]`` belongs to ``(x[i], y[j])``.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError

# options of the figures, here (numpy only) so that the command line reads them without matplotlib
FORMATS = ("png", "pdf")   # what plot_files writes unless told otherwise
MAX_LEVELS = 50            # contour bands: more cannot be told apart by colour, nor labelled on a colour bar
SMOOTH = 1.0  # grid cells: the Gaussian filter applied before locating the minima (see grid_minimum)


# ---------------------------------------------------------------------------------------------
# contour levels

def log_levels(values, n: int = 7, log_alpha: float | None = None, vmax: float | None = None):
    """Contour levels spaced logarithmically above the minimum.

    Level k (k = 0..n) is ``vmin + exp(log_alpha + k * gamma)`` with gamma chosen so that level n is
    ``top = min(max(values), vmax)``; level 0 is replaced by ``vmin`` itself. One more level far
    above (``inf`` is not accepted by matplotlib, so a huge finite number) closes the band of
    everything above ``top``, which a colour bar labels "> top". ``log_alpha`` sets how close to the
    minimum the first band ends (``exp(log_alpha)`` above it, in the values' units); by default
    :func:`default_log_alpha` of the values (the SWA authors fixed -5 for CIFAR losses and -1 for
    errors in %, which :func:`default_log_alpha` roughly reproduces for those ranges).

    Returns ``(levels, top)`` with ``len(levels) == n + 2``."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ConfigError("no finite values to draw")
    if n < 1:
        raise ConfigError(f"number of contour levels must be at least 1, got {n}")
    vmin, top = float(v.min()), float(v.max())
    if vmax is not None:
        top = min(top, float(vmax))
    span = top - vmin
    if not span > 0:  # constant surface: a single band just above it (a span of 1e-6 drew 1e-6 as up to 2e-6)
        span = abs(vmin) * 1e-3 if vmin else 1e-6
        top = vmin + span
    if log_alpha is None:
        log_alpha = default_log_alpha(v, top)
    if log_alpha >= math.log(span):  # the first band would end above the top: one e-fold per band
        log_alpha = math.log(span) - n
    gamma = (math.log(span) - log_alpha) / n
    levels = vmin + np.exp(log_alpha + gamma * np.arange(n + 1))
    levels[0], levels[-1] = vmin, top
    big = top + max(abs(top), 1.0) * 1e6
    return np.concatenate([levels, [big]]), top


def default_log_alpha(values, top: float | None = None) -> float:
    """Where the first contour band ends: a quarter of the minimum above it (so that solutions whose
    values differ by a factor of two fall in different bands), or 1/1000 of the drawn span when the
    minimum is zero (e.g. train error)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    vmin = float(v.min())
    top = float(v.max()) if top is None else float(top)
    if vmin > 0:
        return math.log(0.25 * vmin)
    return math.log(max(top - vmin, 1e-12) * 1e-3)


def default_vmax(values, quantile: float = 0.85) -> float:
    """A cap for the top contour band: the given quantile of the finite values, so that the band
    "> x" covers roughly the worst (1 - quantile) of the plane and the rest gets the detail."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(np.quantile(v, quantile)) if v.size else float("nan")


# ---------------------------------------------------------------------------------------------
# minima and offsets

def grid_minimum(x, y, values, refine: bool = True, smooth: float = 0.0):
    """Location ``(2,)`` and value of the minimum of a plane's values.

    ``smooth`` > 0 first applies a Gaussian filter of that many grid cells (standard deviation), so
    that the minimum of a noisy surface (test error moves in steps of one test sample) is that of its
    trend rather than of one lucky grid point; the value returned is then the smoothed one.

    Exact ties (a flat bottom, common for test error, which moves in steps of 100 / n_test %) are
    resolved by the centroid of the connected tied region that contains the first minimum (smoothed, a
    plateau of exactly equal values has its minimum where it is farthest from any rise, which may be
    at the grid's edge: ``smooth=0`` gives the plateau's centroid); a unique grid minimum
    away from the border is refined by a least-squares quadratic fit over its 3x3 neighbourhood when
    that fit has a proper minimum inside the neighbourhood, follows the values (its residual at most a
    tenth of their range) and the values do not rise by orders of magnitude more on one side than on
    most (the largest rise at most 1000 times the median one): next to a diverged region, one cell
    or a whole wall of them, a fitted vertex could lie anywhere below the values."""
    from scipy import ndimage

    x, y, v = np.asarray(x, float), np.asarray(y, float), np.asarray(values, float)
    if v.shape != (len(x), len(y)):
        raise ConfigError(f"values of shape {v.shape} do not match a grid of {len(x)} x {len(y)}")
    finite = np.isfinite(v)
    if not finite.any():
        raise ConfigError("no finite values: cannot locate a minimum")
    if smooth > 0:
        filled = np.where(finite, v, np.nanmax(np.where(finite, v, np.nan)))
        v = ndimage.gaussian_filter(filled, sigma=smooth, mode="nearest")
        finite = np.isfinite(v)
    vv = np.where(finite, v, np.inf)
    i, j = np.unravel_index(np.argmin(vv), v.shape)
    vmin = float(vv[i, j])
    tied = vv <= vmin
    if tied.sum() > 1:
        labels, _ = ndimage.label(tied)
        region = labels == labels[i, j]
        ii, jj = np.nonzero(region)
        return np.array([x[ii].mean(), y[jj].mean()]), vmin
    point = np.array([x[i], y[j]])
    if refine and 0 < i < len(x) - 1 and 0 < j < len(y) - 1:
        xs, ys = np.meshgrid(x[i - 1:i + 2] - x[i], y[j - 1:j + 2] - y[j], indexing="ij")
        zs = v[i - 1:i + 2, j - 1:j + 2]
        if np.isfinite(zs).all():
            xs, ys, zs = xs.ravel(), ys.ravel(), zs.ravel()
            A = np.stack([np.ones_like(xs), xs, ys, xs * xs, xs * ys, ys * ys], axis=1)
            c, *_ = np.linalg.lstsq(A, zs, rcond=None)
            H = np.array([[2 * c[3], c[4]], [c[4], 2 * c[5]]])
            follows = np.sqrt(np.mean((A @ c - zs) ** 2)) <= 0.1 * (zs.max() - zs.min())
            if follows and np.all(np.linalg.eigvalsh(H) > 0):
                d = np.linalg.solve(H, -c[1:3])
                if abs(d[0]) <= x[i + 1] - x[i] and abs(d[1]) <= y[j + 1] - y[j]:
                    val = c[0] + c[1] * d[0] + c[2] * d[1] + c[3] * d[0] ** 2 + c[4] * d[0] * d[1] + c[5] * d[1] ** 2
                    if zs.max() - vmin <= 1000 * (np.median(zs) - vmin):
                        return point + d, float(min(val, vmin))
    return point, vmin


def offset(x, y, train_values, test_values, refine: bool = True, smooth: float = 0.0,
           maximize=(False, False)) -> dict:
    """From the minimum of ``train_values`` (e.g. train loss) to that of ``test_values`` (e.g. test
    error): both locations and values, the vector and its length (weight-space units). With
    ``smooth`` > 0 the minima are those of the Gaussian-smoothed surfaces (see :func:`grid_minimum`)
    and ``unsmoothed`` holds the same numbers for the raw grid values. ``maximize`` (train, test):
    where larger is better (an accuracy), the maximum instead (``*_min`` keep their names; ``best``
    says which was taken)."""
    (a, va), (b, vb) = (_best(x, y, v, refine, smooth, m) for v, m in zip((train_values, test_values), maximize))
    vec = b - a
    out = {"train_min": a.tolist(), "train_min_value": va, "test_min": b.tolist(), "test_min_value": vb,
           "vector": vec.tolist(), "length": float(np.hypot(*vec)), "smooth": float(smooth),
           "best": ["maximum" if m else "minimum" for m in maximize]}
    if smooth > 0:
        raw = offset(x, y, train_values, test_values, refine, 0.0, maximize)
        raw.pop("smooth")
        out["unsmoothed"] = raw
    return out


def _best(x, y, values, refine: bool, smooth: float, maximize: bool):
    if not maximize:
        return grid_minimum(x, y, values, refine, smooth)
    where, value = grid_minimum(x, y, -np.asarray(values, float), refine, smooth)
    return where, -value


# ---------------------------------------------------------------------------------------------
# lines and rays

def ray_rise_distances(curves, rise: float) -> dict:
    """Distances along rays (``curves``: ``(t, train_loss)`` of each, t = 0 at their origin) to where
    the loss has risen by ``rise``: ``distances`` (None for a ray that never rose that much),
    ``mean``, ``min`` and ``max`` with such a ray counted at the distance it reached (lower bounds
    then: a flat basin's rays must not drop out of its width), ``not_reached`` and ``rays`` counts."""
    pairs = [rise_distance(t, v, 0.0, rise, +1) for t, v in curves]
    capped = [searched if d is None else d for d, searched in pairs]
    return {"distances": [d for d, _ in pairs], "mean": float(np.mean(capped)), "min": float(np.min(capped)),
            "max": float(np.max(capped)), "not_reached": sum(d is None for d, _ in pairs), "rays": len(pairs)}


def width_text(width: dict) -> str:
    """A :func:`ray_rise_distances` mean as tables and figures show it: ``>4.76`` when it is a lower
    bound (some ray did not rise that much within its length)."""
    return (">" if width["not_reached"] else "") + f"{width['mean']:.3g}"


def interp_line(t, values, t0):
    """Values of a line at coordinate(s) ``t0`` (linear interpolation; NaN outside the line)."""
    t, v = np.asarray(t, float), np.asarray(values, float)
    order = np.argsort(t)
    return np.interp(t0, t[order], v[order], left=np.nan, right=np.nan)


def interp_plane(x, y, values, coords):
    """Values of a plane at ``coords`` (n, 2) by bilinear interpolation; NaN outside the grid."""
    from scipy.interpolate import RegularGridInterpolator
    coords = np.atleast_2d(np.asarray(coords, float))
    f = RegularGridInterpolator((np.asarray(x, float), np.asarray(y, float)), np.asarray(values, float),
                                bounds_error=False, fill_value=np.nan)
    return f(coords)


def rise_distance(t, values, t0: float, rise: float, direction: int = +1):
    """Distance from ``t0`` in ``direction`` (+1 towards larger t, -1 towards smaller) to where the
    values first reach ``value(t0) + rise``, interpolating linearly between samples.

    Returns ``(distance, searched)``: ``distance`` is None when the values never rise that much
    within the sampled range, ``searched`` is how far the samples reach in that direction."""
    if direction not in (1, -1):
        raise ConfigError(f"direction must be +1 or -1, got {direction}")
    if not rise > 0:
        raise ConfigError(f"rise must be positive, got {rise}")
    t, v = np.asarray(t, float), np.asarray(values, float)
    order = np.argsort(t)
    t, v = t[order], v[order]
    if not t[0] <= t0 <= t[-1]:
        raise ConfigError(f"coordinate {t0:g} lies outside the line [{t[0]:g}, {t[-1]:g}]")
    base = float(interp_line(t, v, t0))
    if not np.isfinite(base):  # (NaN at the start: a rise from it means nothing)
        raise ConfigError(f"the value at coordinate {t0:g} of the line is not finite (NaN or infinite: a loss "
                          "that diverged, or data that held NaN)")
    d = (t - t0) * direction
    ahead = d > 0
    ds = np.concatenate([[0.0], d[ahead]])
    vs = np.concatenate([[base], v[ahead]])
    if direction < 0:  # nearest first
        ds, vs = np.concatenate([[0.0], ds[1:][::-1]]), np.concatenate([[base], vs[1:][::-1]])
    searched = float(ds[-1])
    target = base + rise
    above = np.flatnonzero(~(vs < target))  # NaN (diverged) counts as above
    above = above[above > 0]
    if above.size == 0:
        return None, searched
    k = int(above[0])
    v0, v1 = vs[k - 1], vs[k]
    if not np.isfinite(v1) or v1 == v0:
        return float(ds[k]), searched
    frac = (target - v0) / (v1 - v0)
    return float(ds[k - 1] + frac * (ds[k] - ds[k - 1])), searched


def edge_center(t, train_loss, solutions: dict, rays: dict | None = None, rises=(0.1,)) -> dict:
    """The numbers behind "SGD at the edge, SWA in the center".

    ``t``, ``train_loss``: the line through the solutions (distance along it, weight-space units);
    ``solutions``: name -> coordinate on the line (with two names, each is measured towards and away
    from the other); ``rays``: name -> list of ``(distance, train_loss)`` arrays of random rays
    starting at that solution (distance 0 = the solution); ``rises``: amounts of train-loss rise.

    Returns, per solution name::

        {"coordinate": t0, "train_loss": loss at t0,
         "rise": {"0.1": {"line": {"toward B": {"direction": +1|-1, "distance": d, "searched": s},
                                   "away from B": {...}},
                          "rays": {"distances": [...], "mean", "min", "max", "not_reached", "rays"}}}}

    Distances are in weight-space units; a distance is None when the loss never rose that much
    within the sampled range, whose extent ``searched`` gives."""
    names = list(solutions)
    rays = rays or {}
    out = {}
    for name in names:
        t0 = float(solutions[name])
        others = [n for n in names if n != name]
        entry = {"coordinate": t0, "train_loss": float(interp_line(t, train_loss, t0)), "rise": {}}
        if others:
            toward = 1 if solutions[others[0]] >= t0 else -1
            directions = ((f"toward {others[0]}", toward), (f"away from {others[0]}", -toward))
        else:
            directions = (("forward", 1), ("backward", -1))
        for rise in rises:
            line = {}
            for label, sign in directions:
                d, searched = rise_distance(t, train_loss, t0, rise, sign)
                line[label] = {"direction": sign, "distance": d, "searched": searched}
            r = {"line": line}
            curves = rays.get(name, [])
            if curves:
                r["rays"] = ray_rise_distances(curves, rise)
            entry["rise"][format_rise(rise)] = r
        out[name] = entry
    return out


def format_rise(rise: float) -> str:
    return f"{rise:g}"
