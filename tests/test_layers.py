"""Layers look down only: every import between the library's modules goes to the same or a lower layer
(errors and helpers, then the store of files, then data and models, then the evaluator and geometry,
then surfaces and training, then plots, then the demo, then the command line). Checked on the source."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [
    {"errors", "options", "trust", "device", "dist", "params", "bn"},
    {"store"},                                  # reads and writes files; builds no model or data
    {"data", "models", "tasks", "config", "rebuild"},
    {"evaluate", "geometry", "sharpness"},
    {"surface", "train", "recorder", "importer", "lightning", "average"},
    {"plot"},
    {"demo"},
    {"cli"},
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_of(path: Path) -> str:
    if path.is_relative_to(ROOT / "cli"):
        return "cli"
    return path.relative_to(ROOT / "landscape").parts[0].removesuffix(".py")


def _imports(path: Path, package: str):
    """Top-level landscape modules that ``path`` (the module ``package``, dotted, ``__init__``
    included) imports, absolutely or relatively, anywhere in it (imports inside functions too)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                parts = package.split(".")[:-node.level]
                target = ".".join(parts + ([node.module] if node.module else []))
                names = [target + "." + a.name for a in node.names] if not node.module else [target]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "landscape" and len(parts) > 1 and parts[1] != "__version__":
                yield "cli" if parts[1] == "cli" else parts[1]
            elif parts[0] == "cli":
                yield "cli"


def _package(path: Path) -> str:
    if path.is_relative_to(ROOT / "cli"):
        rel = path.relative_to(ROOT / "cli").with_suffix("")
        return ".".join(["landscape", "cli", *rel.parts])
    return ".".join(["landscape", *path.relative_to(ROOT / "landscape").with_suffix("").parts])


def test_every_module_has_a_layer():
    names = {_module_of(p) for p in (ROOT / "landscape").glob("*") if p.suffix == ".py" or p.is_dir()}
    names -= {"__init__", "__main__", "__pycache__"}
    assert names <= set(LEVEL), names - set(LEVEL)


def test_imports_look_down_only():
    wrong = []
    for path in list((ROOT / "landscape").rglob("*.py")) + list((ROOT / "cli").rglob("*.py")):
        me = _module_of(path)
        if me in ("__init__", "__main__"):
            continue
        for target in _imports(path, _package(path)):
            if target in LEVEL and LEVEL[target] > LEVEL[me]:
                wrong.append(f"{path.relative_to(ROOT)} ({me}) imports {target}")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_the_command_line_starts_without_the_drawing_libraries():
    """Every command's parser, and ``landscape.plot`` itself, import no matplotlib or plotly: only the
    commands that draw load them, when they run (matplotlib alone took 0.75 s of every start)."""
    import subprocess
    import sys
    probe = ("import sys; from landscape.cli.main import build_parser; import landscape.plot; "
             "from landscape.plot.analysis import FORMATS; build_parser().parse_args(['plot', 'x.h5']); "
             "print(sorted(m for m in ('matplotlib', 'plotly') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
