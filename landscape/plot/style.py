"""One look for every figure: colour-blind-safe colours, readable fonts, labels with units.

Checkpoint colours come from the Okabe-Ito palette (distinguishable under the common forms of colour
blindness); surfaces use viridis (perceptually uniform, readable in grey scale). :func:`role` maps a
checkpoint or run name (``sgd``, ``swa/average:50``, ``swap/worker1``, ``lookahead/fast`` ...) to
its label, colour and marker, so that the same method looks the same in every figure.
"""
from __future__ import annotations

import contextlib
import re
import textwrap
import zlib
from dataclasses import dataclass

import matplotlib

OKABE_ITO = {
    "black": "#000000", "orange": "#E69F00", "sky": "#56B4E9", "green": "#009E73",
    "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7",
}

CMAP = "viridis"            # filled planes (low = dark)
TRAIN_COLOR = OKABE_ITO["blue"]         # train-loss curves and contour lines
TEST_COLOR = "#882255"                  # test-error curves and contour lines (Paul Tol's wine; not a method's colour)

METRIC_LABELS = {
    "train_loss": "train loss",
    "test_loss": "test loss",
    "train_err": "train error (%)",
    "test_err": "test error (%)",
    "train_loss_l2": "train loss + L2 term",
}
WORDS = {"err": "error (%)", "mae": "mean absolute error", "ppl": "perplexity", "loss": "loss"}
METRIC_TITLES = {"train_loss": "Train loss", "test_loss": "Test loss", "train_err": "Train error",
                 "test_err": "Test error", "train_loss_l2": "Train loss + L2"}
DISTANCE = "weight-space units"

RC = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 8.5,
    "legend.framealpha": 0.9,
    "figure.dpi": 100,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "pdf.fonttype": 42,  # editable text in PDFs
    "font.family": "DejaVu Sans",
}


@contextlib.contextmanager
def style():
    """Context in which figures get the landscape look (leaves global rcParams alone)."""
    with matplotlib.rc_context(RC):
        yield


@dataclass(frozen=True)
class Role:
    label: str
    color: str
    marker: str
    size: float = 9.0
    order: int = 50  # legend order


def role(name: str) -> Role:
    """How a checkpoint or run is drawn. ``name`` may carry a ``:INDEX`` suffix."""
    run = name.rsplit(":", 1)[0] if re.search(r":-?\d+$", name) else name
    if run == "sgd":
        return Role("SGD", OKABE_ITO["vermillion"], "o", 9, 0)
    if run == "swa/average":
        return Role("SWA average", OKABE_ITO["sky"], "*", 15, 1)
    if run == "swa/iterates":
        return Role("SWA iterates", OKABE_ITO["sky"], ".", 6, 2)
    if run == "swap/average":
        return Role("SWAP average", OKABE_ITO["green"], "D", 8, 4)
    if run == "swap/phase1":
        return Role("SWAP phase 1", OKABE_ITO["green"], "^", 7, 5)
    m = re.fullmatch(r"swap/worker(\d+)", run)
    if m:
        return Role(f"SWAP worker {m.group(1)}", OKABE_ITO["green"], "v", 7, 6)
    m = re.fullmatch(r"lookahead(-adam)?/(slow|fast)", run)
    if m:
        name = "Lookahead" + (" (Adam)" if m.group(1) else "")
        if m.group(2) == "slow":
            return Role(f"{name} slow", OKABE_ITO["purple"], "s", 7, 7)
        return Role(f"{name} fast", OKABE_ITO["purple"], ".", 4, 8)
    m = re.fullmatch(r"grafting/(net|baseline)(\d+)", run)
    if m:
        shades = [OKABE_ITO["orange"], OKABE_ITO["yellow"], OKABE_ITO["blue"], OKABE_ITO["black"]]
        i = int(m.group(2))
        if m.group(1) == "net":
            return Role(f"Grafting net {i}", shades[i % len(shades)], "P", 8, 9 + i)
        return Role(f"Grafting baseline {i}", shades[i % len(shades)], "x", 7, 30 + i)
    if run == "ema/average":
        return Role("EMA", OKABE_ITO["blue"], "h", 9, 3)
    if run == "ema/iterates":
        return Role("EMA iterates", OKABE_ITO["blue"], ".", 5, 3)
    m = re.fullmatch(r"avg/(.+)/(uniform|ema_[^_]+)_(-?\d+)_(-?\d+)", run)
    if m:  # landscape average: avg/RUN/uniform_A_B or avg/RUN/ema_D_A_B
        what = "average" if m.group(2) == "uniform" else f"EMA {m.group(2)[4:]}"
        return Role(f"{role(m.group(1)).label} {what} of rows {m.group(3)}-{int(m.group(4)) - 1}",
                    OKABE_ITO["black"], "p", 8, 20)
    # any other name (a user's run, a checkpoint named in a notebook): a marker and a shade of its own,
    # the same for the same name in every figure
    h = zlib.crc32(run.encode())
    return Role(run, OTHER_SHADES[h % len(OTHER_SHADES)], OTHER_MARKERS[(h // 7) % len(OTHER_MARKERS)], 8, 99)


OTHER_SHADES = ("#777777", "#332288", "#117733", "#AA4499", "#44AA99", "#999933")  # Paul Tol's muted
OTHER_MARKERS = ("X", "h", "d", "p", "<", ">")


def metric_label(metric: str) -> str:
    """Axis label with unit, e.g. ``test error (%)``."""
    if metric in METRIC_LABELS:
        return METRIC_LABELS[metric]
    base, se = (metric[:-3], " (standard error)") if metric.endswith("_se") else (metric, "")
    split, _, name = base.partition("_")
    return f"{split} {WORDS.get(name, name.replace('_', ' '))}{se}" if name else metric.replace("_", " ")


def metric_name(metric: str) -> str:
    """Plain name without unit, e.g. ``test error``."""
    return metric_label(metric).replace(" (%)", "")


def metric_value(metric: str, v: float) -> str:
    """A value with its unit: ``2.9 %`` for errors, ``0.0041`` for losses."""
    if v is None or not v == v:
        return "n/a"
    return f"{v:.3g} %" if metric.endswith("_err") else f"{v:.3g}"


def metric_title(metric: str) -> str:
    return METRIC_TITLES.get(metric, metric_name(metric).capitalize())


def axis_label(axis: str, spec: dict | None = None) -> str:
    """Plane axis label with its unit, e.g. ``u: sgd:150 → swa/average:50 (weight-space units)`` for
    a plane through checkpoints (u points from a to b, v toward c after Gram-Schmidt)."""
    hint = ""
    spec = spec or {}
    ck = spec.get("checkpoints")
    if spec.get("method") == "through" and isinstance(ck, dict):
        if axis == "u" and "a" in ck and "b" in ck:
            hint = f"{ck['a']} → {ck['b']}"
        elif axis == "v" and "c" in ck:
            hint = f"toward {ck['c']}"
    # (a long run name is wrapped: a panel's label runs into the next panel otherwise)
    return f"{textwrap.fill(f'{axis}: {hint}', 44)}\n({DISTANCE})" if hint else f"{axis} ({DISTANCE})"
