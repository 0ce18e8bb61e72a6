"""landscape: train with SGD, SWA, SWAP, Lookahead and Filter Grafting, record trajectories to HDF5,
evaluate loss landscapes over planes and lines through checkpoints, and draw the papers' figures."""
__version__ = "0.1.0"

from .config import TrainConfig  # noqa: E402
from .data import DataSpec, load_data  # noqa: E402
from .errors import LandscapeError  # noqa: E402
from .models import ModelSpec, build_model  # noqa: E402
from .params import Layout  # noqa: E402
from .store import open_surface, open_trajectory  # noqa: E402
from .geometry import Grid, Line, Plane  # noqa: E402
from .surface import compute_surface, evaluate_surface  # noqa: E402
from .recorder import Recorder  # noqa: E402
from . import train as _train  # noqa: E402,F401  registers the training methods and their options

__all__ = ["TrainConfig", "DataSpec", "ModelSpec", "Layout", "LandscapeError", "build_model",
           "load_data", "open_trajectory", "open_surface", "Plane", "Line", "Grid", "compute_surface", "evaluate_surface",
           "Recorder", "__version__"]
