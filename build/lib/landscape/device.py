"""Device resolution and seeding: the one place that decides where tensors live."""
import random

import numpy as np
import torch

from .errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cpu`` and ``cuda[:N]`` are taken as given."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {name!r}; use auto, cpu or cuda[:N]")
    return dev


def seed_everything(seed: int) -> torch.Generator:
    """Seed the global generators once at an entry point; return a CPU generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
