"""Entry point: ``landscape COMMAND ...`` (also ``python -m landscape``). Library errors become one line on
stderr and exit 2. Installed as ``landscape.cli``."""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import signal
import sys
import threading

from . import commands

# argparse reads "-1e9" as an option (it knows only "-1" and "-1.5" as negative numbers), so
# `--xrange -1e9 1e9` would fail; this is the pattern newer Pythons use.
NEGATIVE_NUMBER = re.compile(r"^-(\d[\d_]*(\.[\d_]*)?|\.\d[\d_]*)([eE][+-]?\d[\d_]*)?$")

# order of the commands in --help; commands not listed come after, alphabetically
ORDER = ["demo", "train", "info", "plane", "line", "plot", "explore", "sharpness", "average", "export", "import"]


def _command_modules():
    names = [m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")]
    names.sort(key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    return [(n, importlib.import_module(f"{commands.__name__}.{n}")) for n in names]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (their examples stay one per line); "(default: X)" only where there is
    a default to show and the help does not already say what it is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or action.required or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from landscape import __version__
    parser = argparse.ArgumentParser(
        prog="landscape",
        description="Train with weight averaging, record trajectories, evaluate and draw loss landscapes.")
    parser.add_argument("--version", action="version", version=f"landscape {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in _command_modules():
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=HelpFormatter)
        module.add_arguments(p)
        p._negative_number_matcher = NEGATIVE_NUMBER
        p.add_argument("--debug", action="store_true", help="show tracebacks for landscape's own errors")
        p.set_defaults(_run=module.run)
    return parser


def entry() -> None:
    """The ``landscape`` command: :func:`main`, then exit with its status. An interrupted command
    leaves at once, its files already closed and its output flushed: torch threads that the
    interruption cut short (autograd on the sharpness workers) can make the normal exit abort in C++
    ("terminate called without an active exception": 3 in 21 interrupted ``sharpness`` runs, none in
    12 since), which turned exit code 130 into 134."""
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"landscape: warning: {message}\n"


def main(argv=None) -> int:
    import warnings

    from landscape.errors import LandscapeError
    warnings.formatwarning = _one_line_warning  # our warnings are for people, not stack locations
    try:
        args = build_parser().parse_args(argv)  # imports torch: seconds in which Ctrl-C is likely
    except KeyboardInterrupt:
        print("landscape: interrupted", file=sys.stderr)
        return 130
    previous, previous_hook = _terminate_as_interrupt(), sys.unraisablehook
    sys.unraisablehook = _interrupt_again(previous_hook)
    try:
        return args._run(args) or 0
    except LandscapeError as e:
        if args.debug:
            raise
        print(f"landscape: error: {e}{_notes(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # commands that keep resumable work say where in the message
        print(f"landscape: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `landscape info run.h5 | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except OSError as e:  # what the system or HDF5 refused where no reader named it (damaged bytes of a file)
        if args.debug:
            raise
        from landscape.store.files import reason
        print(f"landscape: error: {reason(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except Exception as e:  # raised by the user's own code (a model, a dataset factory, a task) mid-run
        if args.debug:
            raise
        print(f"landscape: error: {_unexpected(e)}", file=sys.stderr)
        return 1
    finally:
        sys.unraisablehook = previous_hook
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _unexpected(e: Exception) -> str:
    """One line for an error no command put in words: its type and first line, the innermost place
    outside torch and landscape that raised it (the user's code, when it was theirs), and what the
    command kept (its notes)."""
    import traceback
    import landscape
    import torch
    frames = traceback.extract_tb(e.__traceback__)
    ours = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (torch.__file__, landscape.__file__, __file__))
    theirs = [f for f in frames if not os.path.abspath(f.filename).startswith(ours)] or frames
    where = f" (in {theirs[-1].name}, {os.path.basename(theirs[-1].filename)}:{theirs[-1].lineno})" if theirs else ""
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}{': ' + text if text else ''}{where}{_notes(e)} (--debug shows the traceback)"


def _notes(e: BaseException) -> str:
    """What a command added to an error on its way out (the work it kept), as the line's end."""
    return "".join(f"; {n}" for n in getattr(e, "__notes__", ()))


def _interrupt_again(hook):
    """``sys.unraisablehook`` that delivers again a Ctrl-C or SIGTERM whose KeyboardInterrupt was raised
    while Python ran a finalizer or a weakref callback: Python prints such an exception as "ignored"
    and goes on, so the command would run to its end. Any other unraisable exception goes to ``hook``."""
    def unraisable(u):
        if not isinstance(u.exc_value, KeyboardInterrupt) or threading.current_thread() is not threading.main_thread():
            return hook(u)
        # sent again a moment later from another thread, so that the handler runs in the main code,
        # not in here (where its exception would be lost the same way)
        sig = signal.SIGTERM if callable(signal.getsignal(signal.SIGTERM)) else signal.SIGINT
        again = threading.Timer(0.05, os.kill, (os.getpid(), sig))
        again.daemon = True
        again.start()
    return unraisable


def _terminate_as_interrupt():
    """SIGTERM (kill, a job scheduler's stop) is handled like Ctrl-C: every command keeps its resumable
    work and says what it kept where. Returns the handler it replaced (None off the main thread)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, interrupt)


if __name__ == "__main__":
    sys.exit(main())
