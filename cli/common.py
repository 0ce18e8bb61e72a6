"""Argument helpers shared by several commands."""
from __future__ import annotations

import json

from landscape.errors import ConfigError


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
