"""Run configuration: the options every method shares (:class:`TrainConfig`) and each method's own
options (a :class:`MethodOptions` dataclass defined beside the method in ``landscape/train/``).

The defaults are the CLI's defaults and the measured MNIST-1D recipe (README, "The default recipe"):
cnn1d, momentum SGD, lr 0.1, batch 64, weight decay 5e-4, 150 epochs; SWA from epoch 100 at a constant
lr 0.1. The methods' options are documented with their sources in docs/METHODS.md.

A method's option ``start`` of ``SWAOptions`` (prefix ``swa``) is the keyword ``swa_start`` of
:class:`TrainConfig`, the flag ``--swa-start`` of ``landscape train`` and the key ``swa_start`` of a
trajectory file's config. Example::

    from landscape import TrainConfig
    from landscape.train.methods import SWAOptions
    a = TrainConfig(epochs=20, swa_start=15)
    b = TrainConfig(epochs=20, options=[SWAOptions(start=15)])
    assert a == b and a.swa_start == a.options_of(SWAOptions).start == 15
"""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import ClassVar

from .data import DataSpec
from .errors import ConfigError
from .models import ModelSpec
from .tasks import TASKS
from .trust import is_import_path


def option(default, help: str, *, at_least=None, above=None, at_most=None, below=None, choices=None):
    """A dataclass field of a configuration: its default, its ``--help`` text and the range that
    :func:`check_option` enforces (``at_least``/``above`` a lower bound, closed/open; ``at_most``/
    ``below`` an upper one; ``choices`` the allowed values)."""
    limits = dict(at_least=at_least, above=above, at_most=at_most, below=below, choices=choices)
    return field(default=default, metadata=dict(help=help, **{k: v for k, v in limits.items() if v is not None}))


def check_option(name: str, value, limits) -> None:
    """Raise a one-line ConfigError naming ``name`` when ``value`` is outside ``limits`` (field metadata)."""
    if "choices" in limits:
        if value not in limits["choices"]:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, limits['choices']))}, got {value!r}")
        return
    low = ("[", limits["at_least"]) if "at_least" in limits else ("(", limits["above"]) if "above" in limits else None
    high = ("]", limits["at_most"]) if "at_most" in limits else (")", limits["below"]) if "below" in limits else None
    if value is None or (low is None and high is None):
        return
    ok = isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))
    ok = ok and (low is None or (value >= low[1] if low[0] == "[" else value > low[1]))
    ok = ok and (high is None or (value <= high[1] if high[0] == "]" else value < high[1]))
    if ok:
        return
    if high is not None and low is not None:
        what = f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    elif low is not None:
        what = ({"[0": "non-negative", "(0": "positive"}.get(f"{low[0]}{low[1]:g}")
                or ("at least " if low[0] == "[" else "above ") + f"{low[1]:g}")
    else:
        what = ("at most " if high[0] == "]" else "below ") + f"{high[1]:g}"
    raise ConfigError(f"{name} must be {what}, got {value}")


@dataclass(frozen=True)
class MethodOptions:
    """Base of a training method's own options: a frozen dataclass with a ``prefix``, declared with
    :func:`option` fields and registered by subclassing::

        @dataclass(frozen=True)
        class SWAOptions(MethodOptions, prefix="swa", title="swa (Izmailov et al. 2018)"):
            start: int | None = option(None, "first averaged epoch", at_least=1)

    Field ``start`` becomes ``TrainConfig(swa_start=...)`` and ``--swa-start``. Override
    :meth:`resolved` for defaults that depend on the common options and :meth:`check` for rules that
    involve them."""
    prefix: ClassVar[str] = ""
    title: ClassVar[str] = ""                 # heading of the options in ``landscape train --help``
    registered: ClassVar[dict] = {}           # prefix -> class, in the order of registration

    def __init_subclass__(cls, prefix: str = "", title: str = "", **kwargs):
        super().__init_subclass__(**kwargs)
        if prefix:
            if prefix in MethodOptions.registered and MethodOptions.registered[prefix].__qualname__ != cls.__qualname__:
                raise ValueError(f"method options with prefix {prefix!r} are registered twice")
            cls.prefix, cls.title = prefix, title or prefix
            MethodOptions.registered[prefix] = cls

    @classmethod
    def flat_names(cls) -> dict:
        """``{"swa_start": "start", ...}``: the configuration's names of this class's fields."""
        return {f"{cls.prefix}_{f.name}": f.name for f in fields(cls)}

    def flat(self) -> dict:
        return {flat: getattr(self, name) for flat, name in self.flat_names().items()}

    def resolved(self, config: "TrainConfig") -> "MethodOptions":
        """These options with the defaults that depend on the common options filled in."""
        return self

    def check(self, config: "TrainConfig") -> None:
        """Raise ConfigError when an option is out of its range (named as in the configuration)."""
        for f in fields(self):
            check_option(f"{self.prefix}_{f.name}", getattr(self, f.name), f.metadata)


@dataclass(frozen=True, init=False)
class TrainConfig:
    """The options every method shares, and ``options``: one :class:`MethodOptions` of every registered
    method (defaults for those not given). Keywords are fields or method options by their flat names
    (``TrainConfig(epochs=20, swa_start=15)``); reading ``config.swa_start`` works the same way."""
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    methods: tuple = ("sgd", "swa")   # trained from the same initialization and data order
    task: str = option("classification", "loss and metrics: classification, regression, language-model, "
                                         "model-loss, or package.module:obj")
    epochs: int = option(150, "epoch budget of every method", at_least=1)
    batch_size: int = option(64, "mini-batch size", at_least=1)
    lr: float = option(0.1, "initial learning rate", above=0)
    momentum: float = option(0.9, "SGD momentum", at_least=0, below=1)
    weight_decay: float = option(5e-4, "L2 weight decay", at_least=0)
    # sgd's schedule (the SWA paper's, t = epoch/epochs), also used by ema, lookahead and grafting
    lr_ratio: float = option(0.01, "sgd: final lr as a fraction of --lr", above=0)
    seed: int = 0
    device: str = "auto"
    # results depend on the thread count (the order of float reductions): fixed, the same seed gives
    # the same file on machines with any number of cores; more methods at once: train(processes=N)
    threads: int = option(1, "torch threads of each method on a CPU (the results depend on it)", at_least=1)
    checkpoint_every: int = option(0, "also record every N steps (0: once per epoch)", at_least=0)
    record_every: int = option(0, "keep every N-th epoch's checkpoints of each run (0: by model size, every epoch "
                                  "up to 50,000 parameters, else 1 in ceil(P / 50,000)); first and last rows, "
                                  "SWA's averaging window and SWAP's phase-1 end and average always", at_least=0)
    eval_batch_size: int = field(default=1000, metadata=dict(at_least=1))  # metrics and BatchNorm recomputation
    options: tuple = ()

    def __init__(self, options=(), **kwargs):
        for f in fields(self):
            if f.name != "options":
                value = kwargs.pop(f.name) if f.name in kwargs else (
                    f.default_factory() if f.default is MISSING else f.default)
                object.__setattr__(self, f.name, value)
        object.__setattr__(self, "options", _method_options(self, options, kwargs))

    def __getattr__(self, name):  # a method option by its flat name: config.swa_start
        for opts in self.__dict__.get("options", ()):
            if name in opts.flat_names():
                return getattr(opts, opts.flat_names()[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def options_of(self, cls: type) -> MethodOptions:
        """The options of class ``cls`` (e.g. ``SWAOptions``) this configuration holds."""
        for opts in self.options:
            if type(opts) is cls:
                return opts
        raise KeyError(f"{cls.__name__} is not a registered method's options")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        d["model"], d["data"], d["methods"] = self.model.to_dict(), self.data.to_dict(), list(self.methods)
        for opts in self.options:
            d.update(opts.flat())
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The configuration of a file's ``config`` (keys it does not know are left out)."""
        known = {f.name for f in fields(cls)} - {"options"}
        known |= {n for c in MethodOptions.registered.values() for n in c.flat_names()}
        d = {k: v for k, v in d.items() if k in known}
        d["model"] = ModelSpec.from_dict(d.get("model", {"name": "cnn1d"}))
        d["data"] = DataSpec.from_dict(d.get("data", {"name": "mnist1d"}))
        d["methods"] = tuple(d.get("methods", cls.methods))
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        """A copy with ``changes``, fields or method options by flat name."""
        return replace(self, **changes)

    def validate(self, known_methods=None) -> "TrainConfig":
        if not self.methods:
            raise ConfigError("no training method given")
        for m in self.methods:
            if known_methods is not None and m not in known_methods:
                raise ConfigError(f"unknown method {m!r}; methods: {', '.join(known_methods)}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError("a method is listed twice")
        if self.task not in TASKS and not is_import_path(self.task):
            raise ConfigError(f"unknown task {self.task!r}; tasks: {', '.join(TASKS)} (or package.module:obj)")
        for f in fields(self):
            check_option(f.name, getattr(self, f.name), f.metadata)
        for opts in self.options:
            opts.check(self)
        return self


def _method_options(config: TrainConfig, given, flat: dict) -> tuple:
    """One options object per registered class: ``given`` ones, the rest defaults, then the ``flat``
    keywords (``swa_start=15``) applied; defaults that depend on the common options resolved."""
    chosen = {prefix: cls() for prefix, cls in MethodOptions.registered.items()}
    for opts in given:
        if not isinstance(opts, MethodOptions) or opts.prefix not in chosen:
            raise TypeError(f"TrainConfig options must be registered MethodOptions, got {opts!r}")
        chosen[opts.prefix] = opts
    changes = {prefix: {} for prefix in chosen}
    for name, value in flat.items():
        prefix = next((p for p, c in MethodOptions.registered.items() if name in c.flat_names()), None)
        if prefix is None:
            raise TypeError(f"TrainConfig got an unexpected keyword argument {name!r}")
        changes[prefix][MethodOptions.registered[prefix].flat_names()[name]] = value
    return tuple(replace(opts, **changes[p]).resolved(config) for p, opts in chosen.items())
