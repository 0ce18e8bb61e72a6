"""HDF5 files: the only package that imports h5py. Formats are documented in docs/FORMAT.md."""
from .trajectory import Checkpoint, RunData, Trajectory, TrajectoryWriter, open_trajectory, parse_checkpoint_name

__all__ = ["Checkpoint", "RunData", "Trajectory", "TrajectoryWriter", "open_trajectory", "parse_checkpoint_name"]
