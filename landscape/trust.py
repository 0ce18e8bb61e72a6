"""Whether code named in a file may run: the library's one trust rule.

A trajectory file records how to rebuild its model and data. A built-in name (``cnn1d``, ``mnist1d``)
is data and is always rebuilt. An import path (``package.module:attribute``) is code: importing it runs
the module, calling it runs the factory. A file someone else made is no reason to run their code, so a
recorded import path runs only when the user allows it for this run:

- ``trust_code=True`` (the CLI's ``--trust-code``; ``LANDSCAPE_TRUST_CODE=1`` in the environment)
  allows every import path the file names;
- ``allow=[...]`` allows module prefixes (``mynets`` allows ``mynets:make`` and ``mynets.cifar:load``)
  or exact paths (``mynets:make``): what the user typed (``--model``/``--dataset``) or listed in
  ``LANDSCAPE_TRUSTED_MODULES=mynets,lab.models``.

What a user types in Python or on the command line (``build_model(ModelSpec("mynets:make"))``,
``landscape train --model mynets:make``) is theirs and needs no consent; only paths read from a file do.
Readers of arrays (``info``, ``plot``, ``explore``) never rebuild anything and so never ask.

Example::

    trust = Trust.of(allow=["mynets"])
    check_recorded_import("mynets:make_net", what="model", file="run.h5", trust=trust)    # allowed
    check_recorded_import("os:system", what="dataset", file="run.h5", trust=trust)        # TrustError
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import TrustError

TRUST_ENV = "LANDSCAPE_TRUST_CODE"
MODULES_ENV = "LANDSCAPE_TRUSTED_MODULES"

# Where a trajectory's configuration names code: what it is -> (config key, field). Every entry is
# checked before anything is rebuilt; a new kind of recorded import is added here, and the tests that
# craft files from this table then cover it too.
RECORDED_IMPORTS = {"model": ("model", "name"), "dataset": ("data", "name"), "task": ("task", None)}
# the command-line option that names each kind, quoted in refusals
OPTIONS = {"model": "--model", "dataset": "--dataset", "task": "--task"}


def is_import_path(name) -> bool:
    """``package.module:attribute`` (code) rather than a registered built-in name (data)."""
    return isinstance(name, str) and ":" in name


def _env_flag() -> bool:
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _env_modules() -> tuple:
    return tuple(p.strip() for p in os.environ.get(MODULES_ENV, "").split(",") if p.strip())


@dataclass(frozen=True)
class Trust:
    """The user's consent for one run: everything (``code``), or these module prefixes and paths."""
    code: bool = False
    allow: tuple = ()

    @classmethod
    def of(cls, trust_code: bool = False, allow=()) -> "Trust":
        """The consent given in code or on the command line, joined with the environment's."""
        return cls(bool(trust_code) or _env_flag(), tuple(a for a in allow if a) + _env_modules())

    def permits(self, path: str) -> bool:
        if self.code:
            return True
        module = path.partition(":")[0]
        for entry in self.allow:
            if entry == path or (":" not in entry and (module == entry or module.startswith(entry + "."))):
                return True
        return False


def recorded_imports(config: dict) -> list:
    """``[(kind, import path)]`` of every import path a trajectory's configuration names."""
    found = []
    for kind, (key, field) in RECORDED_IMPORTS.items():
        section = config.get(key)
        name = section if field is None else section.get(field) if isinstance(section, dict) else None
        if is_import_path(name):
            found.append((kind, name))
    return found


def check_recorded_import(path: str, *, what: str, file, trust: Trust) -> None:
    """The one decision: may the import path ``path`` that ``file`` records (as its ``what``) run?
    Returns when it may; raises :class:`TrustError`, saying how to allow it, when it may not."""
    if not is_import_path(path) or trust.permits(path):
        return
    module = path.partition(":")[0]
    option = OPTIONS.get(what, f"--{what}")
    raise TrustError(f"{file} names the {what} {path!r}, code that runs only if you allow it: pass "
                     f"--trust-code (or {option} {path}; LANDSCAPE_TRUST_CODE=1 or "
                     f"LANDSCAPE_TRUSTED_MODULES={module} in scripts; in Python, open_trajectory(path, "
                     f"allow=[{module!r}]) or trust_code=True, and pass that trajectory on)")


def check_recorded_config(config: dict, *, file, trust: Trust) -> None:
    """:func:`check_recorded_import` for every import path ``config`` names, before any is used."""
    for what, path in recorded_imports(config):
        check_recorded_import(path, what=what, file=file, trust=trust)
