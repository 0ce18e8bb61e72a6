"""The interactive explorer: a self-contained page (plotly.js embedded, nothing fetched), one section per
surface; in headless Chromium it loads from disk, draws, reacts to its buttons and slider, logs no errors."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from landscape.cli.main import main
from landscape.errors import ConfigError, FileFormatError
from landscape.plot.interactive import explorer_html, plane_figure, slider_epochs, write_explorer
from test_plot import make_line, make_plane


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("explore")
    return make_plane(d / "plane.h5"), make_line(d / "line.h5")


def test_page_is_self_contained_with_one_section_per_surface(files):
    page = explorer_html(files)
    assert not re.search(r"<script[^>]+src=", page)  # plotly.js inline, nothing loaded from elsewhere
    assert "Plotly.newPlot" in page and len(page) > 3_000_000  # the library itself is in the page
    assert page.count("<section") == 2 and 'id="plane-0"' in page and 'id="line-1"' in page
    assert "plotly_buttonclicked" in page and "plotly_sliderchange" in page


def test_plane_figure_has_views_buttons_paths_and_slider(files):
    plane = files[0]
    fig = plane_figure(plane)
    types = [t.type for t in fig.data]
    assert types[:2] == ["surface", "contour"]
    meta = fig.layout.meta
    assert set(meta["metrics"]) == {"train_loss", "train_err", "test_loss", "test_err"}
    assert {p["run"] for p in meta["paths"]} == set(plane.paths)
    assert [b.name for b in fig.layout.updatemenus[1].buttons] == ["scale:log", "scale:linear"]
    assert len(fig.layout.updatemenus[0].buttons) == 4
    steps = fig.layout.sliders[0].steps
    assert float(steps[-1].value) == max(float(e) for p in plane.paths.values() for e in p.epoch)
    # a path's values are the plane's values at its projected coordinates (bilinear)
    la = next(p for p in meta["paths"] if p["run"] == "lookahead/slow")
    x, y = la["x"][1], la["y"][1]
    assert la["vals"]["train_loss"][1] == pytest.approx(0.01 + (x - 1) ** 2 + (y + 0.5) ** 2, rel=0.05)


def test_slider_epochs_are_few_and_end_at_the_last():
    e = slider_epochs(np.linspace(0, 150, 1000).tolist() + [10.5])
    assert len(e) <= 31 and e[0] == 0 and e[-1] == 150 and all(float(v).is_integer() for v in e)
    assert slider_epochs([0.0, 0.5, 1.0]) == [0.0, 0.5, 1.0]
    assert slider_epochs([]) == []


def test_explore_command(files, tmp_path, capsys):
    out = tmp_path / "e.html"
    assert main(["explore", str(files[0].path), str(files[1].path), "-o", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>") and str(out) in capsys.readouterr().out
    assert main(["explore", str(files[0].path), "-o", str(out)]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        explorer_html([])
    with pytest.raises(FileFormatError, match="does not exist"):
        write_explorer([tmp_path / "missing.h5"], tmp_path / "x.html")


# ---------------------------------------------------------------------------------------------
# headless Chromium (CI installs it: .ci/run)

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if shutil.which(n)), None)

# appended to a copy of the page: waits until every plane's script has run, runs BODY (which fills `res`
# from the first plane `gd`) and writes what it saw into <pre id="landscape-test">
_HARNESS = r"""<script>
(function () {
  var errors = [];
  window.addEventListener('error', function (e) { errors.push(String(e.message || e)); });
  var origError = console.error;
  console.error = function () { errors.push(Array.prototype.join.call(arguments, ' ')); origError.apply(console, arguments); };
  function click(gd, text) {
    var bs = gd.querySelectorAll('.updatemenu-button');
    for (var i = 0; i < bs.length; i++) {
      if (bs[i].textContent === text) { bs[i].dispatchEvent(new MouseEvent('click', {bubbles: true})); return true; }
    }
    return false;
  }
  function run() {
    var res = {};
    try {
      var planes = document.querySelectorAll('div.plotly-graph-div[id^="plane-"]');
      res.planes = planes.length;
      res.ready = Array.prototype.filter.call(planes, function (d) { return d.getAttribute('data-landscape-ready') === '1'; }).length;
      res.svg = document.querySelectorAll('.main-svg').length;
      res.canvas = document.querySelectorAll('canvas').length;
{body}    } catch (e) { errors.push('harness: ' + e); }
    res.errors = errors;
    var pre = document.createElement('pre');
    pre.id = 'landscape-test';
    pre.textContent = JSON.stringify(res);
    document.body.appendChild(pre);
  }
  function wait(n) {
    var planes = document.querySelectorAll('div.plotly-graph-div[id^="plane-"]');
    var ok = planes.length && Array.prototype.every.call(planes, function (d) { return d.getAttribute('data-landscape-ready') === '1'; });
    if (ok || n > 200) { run(); } else { setTimeout(function () { wait(n + 1); }, 100); }
  }
  window.addEventListener('load', function () { wait(0); });
})();
</script>"""

# clicks "test error" and "linear", moves the slider to its second step
HARNESS = _HARNESS.replace("{body}", r"""      var gd = planes[0], M = gd.layout.meta;
      res.z_log = gd.data[0].z[3][4];
      res.clicked_test = click(gd, 'test error');
      res.colorbar = gd.data[0].colorbar.title.text;
      res.clicked_linear = click(gd, 'linear');
      res.z_linear = gd.data[0].z[3][4];
      res.raw = M.metrics.test_err.z[3][4];
      var p = M.paths.filter(function (q) { return q.run === 'sgd'; })[0];
      res.path_full = gd.data[p.t2].x.length;
      var sl = gd._fullLayout.sliders[0];
      gd.emit('plotly_sliderchange', {slider: sl, step: sl.steps[1]});
      res.slider_epoch = parseFloat(sl.steps[1].value);
      res.path_cut = gd.data[p.t2].x.length;
      res.hover = gd.data[p.t2].text[0];
""")

# an accuracy (maximized): its log scale is of the distance below its best, its linear scale reversed
HARNESS_MAXIMIZED = _HARNESS.replace("{body}", r"""      var gd = planes[0], M = gd.layout.meta;
      res.clicked_acc = click(gd, 'test acc');
      res.best = M.metrics.test_acc.best;
      res.raw = M.metrics.test_acc.z[3][4];
      res.z_log = gd.data[0].z[3][4];
      res.reversed_log = gd.data[0].reversescale;
      res.ticks = gd.data[0].colorbar.ticktext;
      res.tickvals = gd.data[0].colorbar.tickvals;
      res.colorbar = gd.data[0].colorbar.title.text;
      res.clicked_linear = click(gd, 'linear');
      res.z_linear = gd.data[0].z[3][4];
      res.reversed_linear = gd.data[0].reversescale;
""")


def _chromium(url, tmp_path, *extra):
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
            "--virtual-time-budget=30000", "--window-size=1400,1000", *extra, url]
    return subprocess.run(args, capture_output=True, text=True, timeout=240)


@pytest.mark.browser
def test_explorer_loads_draws_and_reacts_in_headless_chromium(files, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no chromium binary found (CI installs it with apt-get install chromium)")
    page = tmp_path / "explore.html"
    write_explorer(files, page)
    res, r = _in_chromium(page, HARNESS, tmp_path)
    assert res["planes"] == 1 and res["ready"] == 1
    assert res["svg"] >= 2 and res["canvas"] >= 1  # 2D plots drawn (svg), 3D scene drawn (WebGL canvas)
    assert res["clicked_test"] and res["clicked_linear"]
    assert res["colorbar"].startswith("test error")
    assert res["z_linear"] == pytest.approx(res["raw"]) and res["z_log"] != pytest.approx(res["z_linear"])
    assert 0 < res["path_cut"] < res["path_full"]  # the slider cut the SGD path at an earlier epoch
    assert "epoch" in res["hover"] and "SGD" in res["hover"]
    # the page as shipped (no harness) also loads from disk on its own and draws both sections
    shot = tmp_path / "shot.png"
    r = _chromium(page.as_uri(), tmp_path, f"--screenshot={shot}")
    assert shot.exists() and shot.stat().st_size > 20_000
    assert not [ln for ln in r.stderr.splitlines() if "Uncaught" in ln]


def _in_chromium(page, harness, tmp_path) -> tuple:
    """What ``harness`` saw in a copy of ``page`` loaded in headless Chromium, and Chromium's run;
    fails on any error the page logged."""
    html = page.read_text()
    i = html.rindex("</body>")
    test_page = page.with_name("test-" + page.name)
    test_page.write_text(html[:i] + harness + html[i:])
    r = _chromium(test_page.as_uri(), tmp_path, "--dump-dom")
    m = re.search(r'<pre id="landscape-test">(.*?)</pre>', r.stdout, re.S)
    assert m, f"the page did not finish: {r.stderr[-2000:]}"
    res = json.loads(m.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    assert res["errors"] == []
    uncaught = [ln for ln in r.stderr.splitlines() if "Uncaught" in ln or ("CONSOLE" in ln and "rror" in ln)]
    assert not uncaught, uncaught
    return res, r


@pytest.mark.browser
def test_a_maximized_metric_is_drawn_with_its_best_values_dark_in_headless_chromium(tmp_path):
    """An accuracy's log scale is of the distance below its best value (a valley at the best, finest
    where it matters), labelled with the accuracies themselves; its linear scale reverses the colours:
    either way the best values are dark, as a loss's minimum is."""
    if CHROMIUM is None:
        pytest.skip("no chromium binary found (CI installs it with apt-get install chromium)")
    plane = make_plane(tmp_path / "acc.h5", maximized=True)
    acc = plane.values["test_acc"]
    page = tmp_path / "explore.html"
    write_explorer([plane], page)
    res, _ = _in_chromium(page, HARNESS_MAXIMIZED, tmp_path)
    best = acc.max()
    assert res["clicked_acc"] and res["clicked_linear"] and res["best"] == pytest.approx(best)
    assert res["raw"] == pytest.approx(acc[4, 3]) and res["raw"] < best
    assert res["z_log"] == pytest.approx(np.log10(best - acc[4, 3]))
    assert not res["reversed_log"] and res["reversed_linear"] and res["z_linear"] == pytest.approx(res["raw"])
    assert res["colorbar"] == "test acc (log scale below its best)"
    labels = [float(t) for t in res["ticks"]]  # accuracies, falling as the distance below the best grows
    assert len(labels) >= 3 and np.all(np.diff(labels) < 0) and labels[0] <= best
    np.testing.assert_allclose(labels, best - 10.0 ** np.array(res["tickvals"]), atol=0.051)


# the colour bar's ticks of the metric shown first (train loss, log scale)
HARNESS_TICKS = _HARNESS.replace("{body}", r"""      var gd = planes[0];
      res.tickvals = gd.data[0].colorbar.tickvals;
      res.ticks = gd.data[0].colorbar.ticktext;
""")


@pytest.mark.browser
@pytest.mark.parametrize("low, high", [(-4.0, 30.0), (-6.0, -6.0)])
def test_log_ticks_stay_few_over_many_decades_and_name_a_constant_value(tmp_path, low, high):
    """Over 34 decades the 1-2-5 ticks were 100 labels piled on each other: powers of ten now, at most
    about eight; a constant surface's one tick is its value (it showed log10 exponents)."""
    if CHROMIUM is None:
        pytest.skip("no chromium binary found (CI installs it with apt-get install chromium)")
    from landscape.store import Surface
    plane = make_plane(tmp_path / "p.h5")
    loss = 10.0 ** np.linspace(low, high, plane.values["train_loss"].size).reshape(plane.values["train_loss"].shape)
    wide = Surface(plane.path, plane.spec, plane.x, plane.y, dict(plane.values, train_loss=loss), plane.done,
                   plane.points, plane.paths)
    page = tmp_path / "explore.html"
    write_explorer([wide], page)
    res, _ = _in_chromium(page, HARNESS_TICKS, tmp_path)
    if low == high:
        assert [float(t) for t in res["ticks"]] == [1e-6]
        return
    assert 2 <= len(res["tickvals"]) <= 9 and all(float(t).is_integer() for t in res["tickvals"])
    assert [float(t) for t in res["ticks"]] == [10.0 ** t for t in res["tickvals"]]
    assert all(len(t) <= 6 for t in res["ticks"])  # 1e+10, not 10000000000
