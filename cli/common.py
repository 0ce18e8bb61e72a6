"""Argument helpers shared by several commands."""
from __future__ import annotations

import argparse
import json

from landscape.errors import ConfigError

SEED_LIMIT = 2 ** 63  # torch.Generator.manual_seed takes a 64-bit integer; numpy and JSON readers stay exact


def seed_int(text: str) -> int:
    """argparse ``type=`` of a seed: a whole number from 0 to 2**63 - 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be a whole number, got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"seed must be from 0 to 2**63 - 1, got {text}")
    return value


class Given(argparse.Action):
    """Stores the option's value like ``store`` and notes that it was on the command line, so that
    :func:`given` can tell ``--seed 0`` from the default."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, "_given", getattr(namespace, "_given", frozenset()) | {self.dest})


def given(args, dest: str) -> bool:
    """Whether an option stored with ``action=Given`` (or a flag, by its value) was given."""
    value = getattr(args, dest, None)
    if isinstance(value, bool):
        return value
    return dest in getattr(args, "_given", ())


def refuse_inapplicable(args, options: dict, applies: bool, where: str) -> None:
    """One error for the first option of ``options`` ({dest: "--flag"}) that was given although it
    does not apply: "--seed applies only to --random and --hessian"."""
    if applies:
        return
    for dest, flag in options.items():
        if given(args, dest):
            raise ConfigError(f"{flag} applies only to {where}")


def parse_key_values(pairs, what: str) -> dict:
    """``["k=v", ...]`` -> dict; values are read as JSON when they parse (numbers, lists, true),
    else kept as strings."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what} {pair!r} is not of the form KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def add_output_flags(p, json_flag: bool = True) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))
