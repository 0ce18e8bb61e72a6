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
from .figures import (edge_center_figure, grafting_figure, grafting_figure_from, lookahead_figure,
                      lookahead_figure_from, offset_figure, plane_figure, rays_figure, save)
from .interactive import explorer_html, interactive_figure, write_explorer
from .report import PlotResult, plot_files
from .static import (draw_checkpoints, draw_grafting, draw_line, draw_lookahead, draw_offset, draw_plane, draw_rays,
                     edge_center_of, offset_of)

plot_plane = plane_figure  # the name DESIGN.md's example uses

__all__ = ["plane_figure", "plot_plane", "offset_figure", "edge_center_figure", "rays_figure", "lookahead_figure",
           "grafting_figure", "lookahead_figure_from", "grafting_figure_from", "save", "plot_files", "PlotResult",
           "write_explorer", "explorer_html", "interactive_figure", "draw_plane", "draw_checkpoints", "draw_offset", "draw_line",
           "draw_rays", "draw_lookahead", "draw_grafting", "offset_of", "edge_center_of"]
