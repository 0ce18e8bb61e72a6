"""HDF5 files: the only package that imports h5py. Formats are documented in docs/FORMAT.md."""
from .surface import PathData, PointData, Surface, SurfaceWriter, export_loss_landscape, open_surface
from .trajectory import Checkpoint, RunData, Trajectory, TrajectoryWriter, open_trajectory, parse_checkpoint_name

__all__ = ["Checkpoint", "RunData", "Trajectory", "TrajectoryWriter", "open_trajectory", "parse_checkpoint_name",
           "PathData", "PointData", "Surface", "SurfaceWriter", "open_surface", "export_loss_landscape"]
