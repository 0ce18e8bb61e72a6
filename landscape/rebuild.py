"""A trajectory file's model and data, rebuilt from what it records: built-in names always, import
paths only with the user's consent (the trust given to :func:`~landscape.store.open_trajectory`, see
:mod:`landscape.trust`). The store reads files; building models and data lives here, above it.

Example::

    traj = open_trajectory("run.h5")
    data = rebuild_data(traj)
    model = rebuild_model(traj, data)      # its layout checked against the file's
"""
from __future__ import annotations

from torch import nn

from .data import Data, DataSpec, import_object, load_data, located
from .errors import ConfigError, FileFormatError
from .tasks import get_task
from .models import ModelSpec, build_model


def model_spec(traj) -> ModelSpec:
    if "model" not in traj.config:
        raise FileFormatError(f"{traj.path} does not record its model; cannot rebuild it")
    return ModelSpec.from_dict(traj.config["model"])


def data_spec(traj) -> DataSpec:
    if "data" not in traj.config:
        raise FileFormatError(f"{traj.path} does not record its dataset; cannot rebuild it")
    return located(DataSpec.from_dict(traj.config["data"]), traj.path)


def rebuild_task(traj):
    """The file's task (``task`` in its configuration; classification when it records none), an
    import path resolved only when allowed (checked by ``traj.check_trusted``)."""
    traj.check_trusted()
    return get_task(traj.config.get("task"), lambda path: import_object(path, ConfigError, "task"))


def rebuild_data(traj, device="cpu") -> Data:
    """The file's dataset on ``device``, scored by its task (refused first if it names code the user
    has not allowed)."""
    traj.check_trusted()
    return load_data(data_spec(traj), device, rebuild_task(traj))


def rebuild_model(traj, data: Data | None = None, device="cpu") -> nn.Module:
    """The file's model on ``device``, its layout checked against the file's (refused first if the
    file names code the user has not allowed)."""
    traj.check_trusted()
    data = data if data is not None else rebuild_data(traj)
    # the class count the model was built with, as the file records it (the data's own count may be
    # worked out otherwise by a later version)
    model = build_model(model_spec(traj), data.input_shape, traj.config.get("num_classes", data.num_classes)).to(device)
    traj.layout.check_module(model)
    return model
