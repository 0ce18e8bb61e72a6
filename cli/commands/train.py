"""Train one or more methods from the same initialization and data order and record every
checkpoint to an HDF5 trajectory file. Defaults are the measured MNIST-1D recipe. The methods and
their options are described with their sources in docs/METHODS.md. SWAP runs its workers as real
processes when launched with torchrun, e.g. `torchrun --nproc_per_node 4 -m landscape train
--methods swap` (gloo on CPU, NCCL on GPU; rank 0 writes the file)."""
from __future__ import annotations

import argparse
import math
import re
import sys
import typing
import warnings
from dataclasses import MISSING, fields

from landscape.config import MethodOptions, TrainConfig
from landscape.data import DATASETS, DataSpec
from landscape.errors import ConfigError
from landscape.models import MODELS, ModelSpec
from landscape.train import METHODS, SwapThresholdWarning, train

from ..common import add_output_flags, parse_key_values, print_json, seed_int

HELP = "train SGD/SWA/SWAP/Lookahead/Filter Grafting and record the trajectory file"


def add_arguments(p) -> None:
    d = TrainConfig()
    p.add_argument("-o", "--out", default="run.h5", help="trajectory file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--methods", default=",".join(d.methods),
                   help=f"comma-separated methods, trained from one initialization ({', '.join(METHODS)})")
    p.add_argument("--model", default=d.model.name,
                   help=f"{', '.join(MODELS)}, or package.module:factory")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="keyword argument of the model factory")
    p.add_argument("--dataset", default=d.data.name, help=f"{', '.join(DATASETS)}, or package.module:factory")
    p.add_argument("--data-option", action="append", metavar="KEY=VALUE",
                   help="dataset option, e.g. root=DIR and augment=true (cifar10), path=FILE (npz)")
    for name, f, kind in _common_options():
        _add_option(p, name, f, kind)
    p.add_argument("--seed", type=seed_int, default=d.seed, help="seed of initialization and data order")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda[:N]")
    p.add_argument("--processes", type=int, default=1,
                   help="methods trained at once, each in its own process (CPU; the file is the same for any number)")
    for cls in MethodOptions.registered.values():  # each method's options, from its dataclass
        group = p.add_argument_group(cls.title)
        for name, f, kind in _method_options(cls):
            _add_option(group, name, f, kind)
    add_output_flags(p)


def _common_options():
    """(name, field, type) of TrainConfig's options that have a flag (a help text)."""
    hints = typing.get_type_hints(TrainConfig)
    return [(f.name, f, hints[f.name]) for f in fields(TrainConfig) if "help" in f.metadata]


def _method_options(cls):
    hints = typing.get_type_hints(cls)
    return [(f"{cls.prefix}_{f.name}", f, hints[f.name]) for f in fields(cls)]


def _add_option(p, name: str, f, kind) -> None:
    """The flag --NAME of the dataclass field ``f``: type, default, choices and help from the field."""
    kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # int | None -> int
    default = None if f.default is MISSING else f.default
    flag, help = "--" + name.replace("_", "-"), f.metadata["help"].replace("%", "%%")
    if kind is bool:
        p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)
    else:
        p.add_argument(flag, type=kind, default=default, choices=f.metadata.get("choices"), help=help)


def config_from_args(args) -> TrainConfig:
    names = [name for name, _, _ in _common_options()]
    names += [name for cls in MethodOptions.registered.values() for name, _, _ in _method_options(cls)]
    return TrainConfig(
        model=ModelSpec(args.model, parse_key_values(args.model_arg, "--model-arg")),
        data=DataSpec(args.dataset, parse_key_values(args.data_option, "--data-option")),
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        seed=args.seed, device=args.device, **{name: getattr(args, name) for name in names})


def _as_flags(message: str) -> str:
    """The configuration's field names in a message as this command's flags (swa_start -> --swa-start)."""
    names = [f.name for f in fields(TrainConfig) if f.name not in ("model", "data", "methods", "options")]
    names = "|".join(names + [n for cls in MethodOptions.registered.values() for n in cls.flat_names()])
    return re.sub(rf"\b({names})\b", lambda m: "--" + m.group(1).replace("_", "-"), message)


def run(args) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SwapThresholdWarning)
        try:
            summary = train(config_from_args(args), args.out, overwrite=args.overwrite, quiet=args.quiet,
                            processes=args.processes)
        except ConfigError as e:
            raise ConfigError(_as_flags(str(e))) from None
    for w in caught:  # our warnings as one line each; anything else as Python shows it
        if issubclass(w.category, SwapThresholdWarning):
            print(f"landscape: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if "rank" in summary:  # torchrun: rank 0 reports
        return 0
    if args.json:
        print_json(summary)
        return 0
    diverged = [r for r, m in summary["final"].items() if not math.isfinite(m["train_loss"])]
    if diverged:
        print(f"landscape: warning: training diverged (final train loss not finite) in {', '.join(diverged)}; "
              "try a smaller --lr", file=sys.stderr)
    print(f"wrote {summary['path']} in {summary['seconds']:.1f} s")
    for run_name, m in summary["final"].items():
        print(f"  {run_name:<16} epoch {m['epoch']:>6g}  train loss {m['train_loss']:.4f}  "
              + (f"test err {m['test_err']:.2f}%" if "test_err" in m else f"test loss {m['test_loss']:.4f}"))
    return 0
