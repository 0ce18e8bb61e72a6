"""landscape: train with SGD, SWA, SWAP, Lookahead and Filter Grafting, record trajectories to HDF5,
evaluate loss landscapes over planes and lines through checkpoints, and draw the papers' figures."""
import signal
import sys
from pathlib import Path

__version__ = "0.1.0"


def _run_as_the_command() -> bool:
    """Whether this process is the ``landscape`` command: its script, or ``python -m landscape`` (as
    torchrun starts it; while the package imports, its ``sys.argv[0]`` is still "-m")."""
    if sys.argv and Path(sys.argv[0]).name == "landscape":
        return True
    argv = getattr(sys, "orig_argv", [])
    return any(a == "-m" and b == "landscape" for a, b in zip(argv, argv[1:]))


# The command's Ctrl-C while torch is imported (a second or two) is held back until the imports are
# done, then one line: raised inside them, it printed their traceback, or aborted a C++ extension.
# (only where Ctrl-C would raise: a command started with SIGINT ignored keeps ignoring it)
_held = [] if _run_as_the_command() and signal.getsignal(signal.SIGINT) is signal.default_int_handler else None
_previous = signal.signal(signal.SIGINT, lambda *args: _held.append(args)) if _held is not None else None
try:
    from .config import TrainConfig  # noqa: E402
    from .data import DataSpec, load_data  # noqa: E402
    from .errors import LandscapeError  # noqa: E402
    from .models import ModelSpec, build_model  # noqa: E402
    from .params import Layout  # noqa: E402
    from .store import open_surface, open_trajectory  # noqa: E402
    from .store.sharpness import open_sharpness  # noqa: E402
    from .geometry import Grid, Line, Plane  # noqa: E402
    from .surface import compute_surface, evaluate_surface  # noqa: E402
    from .sharpness import SharpnessSpec, compute_sharpness, evaluate_sharpness  # noqa: E402
    from .recorder import Recorder  # noqa: E402
    from . import train as _train  # noqa: E402,F401  registers the training methods and their options
finally:
    if _held is not None:
        signal.signal(signal.SIGINT, _previous)
if _held:
    sys.stderr.write("landscape: interrupted\n")
    raise SystemExit(130)

__all__ = ["TrainConfig", "DataSpec", "ModelSpec", "Layout", "LandscapeError", "build_model",
           "load_data", "open_trajectory", "open_surface", "open_sharpness", "Plane", "Line", "Grid", "compute_surface", "evaluate_surface",
           "SharpnessSpec", "compute_sharpness", "evaluate_sharpness", "Recorder", "__version__"]
