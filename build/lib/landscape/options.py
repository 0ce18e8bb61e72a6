"""Names, types and ranges of the options built-in models and datasets take.

Options may come from a file someone else made (a trajectory records them), so each is checked before
it sizes anything: a file asking for 10^9 channels gets a one-line error, not an out-of-memory kill.

Example::

    check_options({"channels": 8}, {"channels": Option("int", 1, 1024)}, "model 'cnn1d'", ModelError)
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    """One option: ``kind`` is int, float, bool, str or ints (a list of ints, e.g. a shape); numbers
    (and every entry of ints) lie in [low, high]; ints hold at most ``length`` entries."""
    kind: str
    low: float = -math.inf
    high: float = math.inf
    length: int = 8

    def problem(self, value) -> str | None:
        """What is wrong with ``value``, in words, or None."""
        if self.kind == "bool":
            return None if isinstance(value, bool) else "must be true or false"
        if self.kind == "str":
            return None if isinstance(value, str) and value else "must be a non-empty string"
        if self.kind == "ints":
            if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= self.length:
                return f"must be a list of 1 to {self.length} whole numbers"
            return next((p for p in map(Option("int", self.low, self.high).problem, value) if p), None)
        whole = isinstance(value, int) and not isinstance(value, bool)
        number = whole or (self.kind == "float" and isinstance(value, float) and math.isfinite(value))
        if not number:
            return "must be a whole number" if self.kind == "int" else "must be a finite number"
        if not self.low <= value <= self.high:
            return f"must be from {self.low:g} to {self.high:g}"
        return None


def check_options(given: dict, schema: dict, owner: str, error) -> None:
    """Raise ``error`` for the first option of ``given`` that ``schema`` ({name: Option}) does not
    know or whose value does not fit it."""
    for name, value in given.items():
        if name not in schema:
            raise error(f"{owner} has no option {name!r}; its options: {', '.join(schema) or 'none'}")
        problem = schema[name].problem(value)
        if problem:
            raise error(f"{owner}: option {name}={value!r} {problem}")
