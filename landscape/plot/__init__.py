"""Figures of surfaces and trajectories: static (matplotlib, PNG/PDF) and interactive (plotly HTML).

Pure functions of what the store reads: nothing here evaluates a loss.

- :mod:`.static`: drawing functions that take an Axes and return it (``draw_plane``, ``draw_offset``,
  ``draw_line``, ``draw_rays``, ``draw_lookahead``, ``draw_grafting`` ...);
- :mod:`.figures`: the papers' figures, each a ``Figure`` (``plane_figure``, ``offset_figure``,
  ``edge_center_figure``, ``lookahead_figure``, ``grafting_figure``) and ``save`` (PNG + PDF);
- :mod:`.analysis`: the numbers behind them (minima, offset, distance to a loss rise), numpy only;
- :mod:`.report`: ``plot_files``, every figure a set of files allows, plus ``numbers.json``;
- :mod:`.interactive`: ``write_explorer``, the offline HTML explorer, and ``interactive_figure``, one
  surface as a plotly Figure (inline in Jupyter).

Example::

    from landscape.store import open_surface
    from landscape.plot import plane_figure, save
    save(plane_figure(open_surface("plane.h5")), "figures", "plane")   # figures/plane.png, .pdf
"""
import importlib

# what each name comes from: imported on first use, so that reading the options below (the command
# line builds its parser from them) or ``analysis`` needs no matplotlib, which takes most of a second
_SOURCES = {
    "figures": ("edge_center_figure", "grafting_figure", "grafting_figure_from", "lookahead_figure",
                "lookahead_figure_from", "offset_figure", "plane_figure", "rays_figure", "save"),
    "interactive": ("explorer_html", "interactive_figure", "write_explorer"),
    "report": ("PlotResult", "plot_files"),
    "static": ("draw_checkpoints", "draw_grafting", "draw_line", "draw_lookahead", "draw_offset", "draw_plane",
               "draw_rays", "edge_center_of", "offset_of"),
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}
_MODULE_OF["plot_plane"] = "figures"  # the name DESIGN.md's example uses for plane_figure
_SUBMODULES = ("analysis", "figures", "flatness", "interactive", "report", "static", "style")


def __getattr__(name: str):
    if name in _SUBMODULES:  # ``landscape.plot.static`` without importing it first, as before
        return importlib.import_module(f".{name}", __name__)
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{_MODULE_OF[name]}", __name__)
    value = getattr(module, "plane_figure" if name == "plot_plane" else name)
    globals()[name] = value
    return value


__all__ = ["plane_figure", "plot_plane", "offset_figure", "edge_center_figure", "rays_figure", "lookahead_figure",
           "grafting_figure", "lookahead_figure_from", "grafting_figure_from", "save", "plot_files", "PlotResult",
           "write_explorer", "explorer_html", "interactive_figure", "draw_plane", "draw_checkpoints", "draw_offset", "draw_line",
           "draw_rays", "draw_lookahead", "draw_grafting", "offset_of", "edge_center_of"]
