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
    from landscape.store.files import finite_json
    print(json.dumps(finite_json(obj), indent=2, sort_keys=True, default=str))  # (NaN as null: strict JSON)


def add_trust_arguments(p) -> None:
    """The consent flags of every command that rebuilds a file's model and data (landscape.trust)."""
    g = p.add_argument_group("code named by the file (see README: Sharing files safely)")
    g.add_argument("--trust-code", action="store_true",
                   help="run the import paths (package.module:factory) the file records for its model, "
                        "dataset and task; without it only built-in ones are rebuilt (environment: "
                        "LANDSCAPE_TRUST_CODE=1)")
    g.add_argument("--model", metavar="PATH", default=None,
                   help="allow the file's model import path, typed out (must be the one the file records)")
    g.add_argument("--dataset", metavar="PATH", default=None,
                   help="allow the file's dataset import path, typed out (must be the one the file records)")
    g.add_argument("--task", metavar="PATH", default=None,
                   help="allow the file's task import path, typed out (must be the one the file records)")


def open_trusted_trajectory(args):
    """The trajectory file ``args.file`` with the user's consent from :func:`add_trust_arguments`,
    checked at once: a refused or mistyped import path stops the command before any work."""
    from landscape.errors import TrustError
    from landscape.store import open_trajectory
    from landscape.trust import RECORDED_IMPORTS

    traj = open_trajectory(args.file, trust_code=args.trust_code, allow=[args.model, args.dataset, args.task])
    for what, typed in (("model", args.model), ("dataset", args.dataset), ("task", args.task)):
        key, field = RECORDED_IMPORTS[what]
        recorded = traj.config.get(key) if field is None else (traj.config.get(key) or {}).get(field)
        if typed is not None and typed != recorded:
            raise TrustError(f"--{what} {typed} does not match {traj.path}, which records the {what} {recorded!r}")
    traj.check_trusted()
    return traj
