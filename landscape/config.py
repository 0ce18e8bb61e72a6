"""Run configuration: one frozen dataclass whose defaults are the CLI's defaults.

The default is the measured MNIST-1D recipe (README, "The default recipe"): cnn1d, momentum SGD,
lr 0.1, batch 64, weight decay 5e-4, 150 epochs; SWA from epoch 100 at a constant lr 0.1. The
options of SWAP, Lookahead and Filter Grafting are documented with their sources in docs/METHODS.md.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from .data import DataSpec
from .errors import ConfigError
from .models import ModelSpec
from .tasks import TASKS
from .trust import is_import_path

METHODS = ("sgd", "swa", "ema", "swap", "lookahead", "lookahead-adam", "grafting")
LOOKAHEAD_INNER_STATE = ("none", "reset", "pullback")
GRAFTING_VARY = ("lr", "seed", "both")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    methods: tuple = ("sgd", "swa")   # trained from the same initialization and data order
    task: str = "classification"      # loss and metrics (landscape.tasks): a built-in name or package.module:obj
    epochs: int = 150                 # budget of every method
    batch_size: int = 64
    lr: float = 0.1                   # initial learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_ratio: float = 0.01            # sgd: final lr = lr_ratio * lr (SWA paper's schedule, t = epoch/epochs)
    swa_start: int | None = None      # swa: first averaged epoch (schedule t = epoch/swa_start); None: 2/3 of epochs
    swa_lr: float = 0.1               # swa: learning rate from 0.9 * swa_start on
    swa_c: int = 1                    # swa: average every c epochs
    ema_decay: float = 0.999          # ema: w_ema <- d w_ema + (1 - d) w after every step (sgd's schedule)
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 0         # also record a checkpoint every N steps (0: once per epoch)
    eval_batch_size: int = 1000       # batch size for metrics and BatchNorm recomputation
    # lookahead (SGD inner) and lookahead-adam (Adam inner), Zhang et al. 2019; budget: epochs
    lookahead_k: int = 5              # inner steps between synchronizations
    lookahead_alpha: float = 0.5      # slow step size: phi <- phi + alpha (theta - phi)
    lookahead_inner_state: str = "none"  # inner momentum at a synchronization: none | reset | pullback
    lookahead_fast_from: int = -1     # first epoch whose every inner step is recorded (-1: epochs // 2)
    lookahead_fast_epochs: int = 1    # epochs recorded step by step in <prefix>/fast (0: none)
    adam_lr: float = 0.02             # lookahead-adam: initial Adam learning rate (same schedule as sgd)
    # swap, Gupta et al. 2020; its own budget: at most phase-1 cap + W x phase-2 epochs of gradients
    # (50 + 4 x 25 = 150, sgd's), in at most 50 + 25 epochs of time when the workers run in parallel
    swap_workers: int = 4             # W; phase 1 uses batches of W x batch_size
    swap_phase1_lr: float = 0.3       # phase-1 (large-batch) learning rate, constant
    swap_threshold: float = 99.0      # phase 1 stops once training accuracy (%) reaches this
    swap_phase1_epochs: int = 50      # phase-1 cap (a warning when the threshold is not reached)
    swap_phase2_lr: float = 0.12      # phase-2 learning rate of every worker: epoch e of E at lr (1 - e/E), the last at lr/E
    swap_phase2_epochs: int = 25      # phase-2 epochs of every worker
    # grafting, Meng et al. 2020; budget: epochs
    grafting_nets: int = 2            # N networks in a ring; net i receives from net i-1
    grafting_vary: str = "lr"         # what differs between the nets: lr | seed | both
    grafting_a: float = 0.4           # A of w = A/pi arctan(c (H_own - H_other)) + 0.5
    grafting_c: float = 500.0         # c of the same rule
    grafting_baseline: bool = True    # also train the same nets without grafting (grafting/baseline<i>)

    def __post_init__(self):
        if self.swa_start is None:  # the library's default is the command line's: 2/3 of the budget (100 of 150)
            object.__setattr__(self, "swa_start", max(1, round(self.epochs * 2 / 3)))

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
        if self.task not in TASKS and not is_import_path(self.task):
            raise ConfigError(f"unknown task {self.task!r}; tasks: {', '.join(TASKS)} (or package.module:obj)")
        for name in ("epochs", "batch_size", "swa_c", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "swa_lr", "lr_ratio"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be between 0 and 1 (exclusive), got {self.ema_decay}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be non-negative, got {self.weight_decay}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be non-negative, got {self.checkpoint_every}")
        if "swa" in self.methods and not 1 <= self.swa_start <= self.epochs:
            raise ConfigError(f"swa_start must be between 1 and epochs ({self.epochs}), got {self.swa_start}")
        self._validate_lookahead()
        self._validate_swap()
        self._validate_grafting()
        return self

    def _validate_lookahead(self) -> None:
        if self.lookahead_k < 1:
            raise ConfigError(f"lookahead_k must be at least 1, got {self.lookahead_k}")
        if not 0 < self.lookahead_alpha <= 1:
            raise ConfigError(f"lookahead_alpha must be in (0, 1], got {self.lookahead_alpha}")
        if self.lookahead_inner_state not in LOOKAHEAD_INNER_STATE:
            raise ConfigError(f"lookahead_inner_state must be one of {', '.join(LOOKAHEAD_INNER_STATE)}, "
                              f"got {self.lookahead_inner_state!r}")
        if not self.adam_lr > 0:
            raise ConfigError(f"adam_lr must be positive, got {self.adam_lr}")
        if self.lookahead_fast_epochs < 0:
            raise ConfigError(f"lookahead_fast_epochs must be non-negative, got {self.lookahead_fast_epochs}")
        if self.lookahead_fast_from < -1:
            raise ConfigError(f"lookahead_fast_from must be an epoch or -1 (auto), got {self.lookahead_fast_from}")
        if ({"lookahead", "lookahead-adam"} & set(self.methods) and self.lookahead_fast_epochs
                and self.lookahead_fast_from >= self.epochs):
            raise ConfigError(f"lookahead_fast_from must be below epochs ({self.epochs}), got {self.lookahead_fast_from}")

    def _validate_swap(self) -> None:
        if self.swap_workers < 2:
            raise ConfigError(f"swap_workers must be at least 2 (SWAP averages several workers), got {self.swap_workers}")
        if not 0 < self.swap_threshold <= 100:
            raise ConfigError(f"swap_threshold is a training accuracy in percent, in (0, 100], got {self.swap_threshold}")
        for name in ("swap_phase1_epochs", "swap_phase2_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("swap_phase1_lr", "swap_phase2_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    def _validate_grafting(self) -> None:
        if self.grafting_nets < 2:
            raise ConfigError(f"grafting_nets must be at least 2 (a net receives from another), got {self.grafting_nets}")
        if self.grafting_vary not in GRAFTING_VARY:
            raise ConfigError(f"grafting_vary must be one of {', '.join(GRAFTING_VARY)}, got {self.grafting_vary!r}")
        if not 0 < self.grafting_a <= 1:
            raise ConfigError(f"grafting_a must be in (0, 1] so that the mixing weight stays in [0, 1], "
                              f"got {self.grafting_a}")
        if not self.grafting_c > 0:
            raise ConfigError(f"grafting_c must be positive, got {self.grafting_c}")
