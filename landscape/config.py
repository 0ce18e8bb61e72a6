"""Run configuration: one frozen dataclass whose defaults are the CLI's defaults.

The default is the measured MNIST-1D recipe (docs/RECIPES in the README): cnn1d, momentum SGD,
lr 0.1, batch 64, weight decay 5e-4, 150 epochs; SWA from epoch 100 at a constant lr 0.1.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from .data import DataSpec
from .errors import ConfigError
from .models import ModelSpec

METHODS = ("sgd", "swa")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    methods: tuple = ("sgd", "swa")   # trained from the same initialization and data order
    epochs: int = 150                 # budget of every method
    batch_size: int = 64
    lr: float = 0.1                   # initial learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_ratio: float = 0.01            # sgd: final lr = lr_ratio * lr (SWA paper's schedule, t = epoch/epochs)
    swa_start: int = 100              # swa: first epoch that is averaged (schedule t = epoch/swa_start)
    swa_lr: float = 0.1               # swa: learning rate from 0.9 * swa_start on
    swa_c: int = 1                    # swa: average every c epochs
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 0         # also record a checkpoint every N steps (0: once per epoch)
    eval_batch_size: int = 1000       # batch size for metrics and BatchNorm recomputation

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"], d["data"], d["methods"] = self.model.to_dict(), self.data.to_dict(), list(self.methods)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["model"] = ModelSpec.from_dict(d.get("model", {"name": "cnn1d"}))
        d["data"] = DataSpec.from_dict(d.get("data", {"name": "mnist1d"}))
        d["methods"] = tuple(d.get("methods", cls.methods))
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        return replace(self, **changes)

    def validate(self, known_methods=METHODS) -> "TrainConfig":
        if not self.methods:
            raise ConfigError("no training method given")
        for m in self.methods:
            if m not in known_methods:
                raise ConfigError(f"unknown method {m!r}; methods: {', '.join(known_methods)}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError("a method is listed twice")
        for name in ("epochs", "batch_size", "swa_c", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "swa_lr", "lr_ratio"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be non-negative, got {self.weight_decay}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be non-negative, got {self.checkpoint_every}")
        if "swa" in self.methods and not 1 <= self.swa_start <= self.epochs:
            raise ConfigError(f"swa_start must be between 1 and epochs ({self.epochs}), got {self.swa_start}")
        return self
