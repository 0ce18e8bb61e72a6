"""Packaging: the cli/ folder installs as landscape.cli (no top-level "cli" module in site-packages),
`python -m landscape` is the command line, and every package folder is listed in pyproject.toml."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parent.parent


def _listed_packages() -> set:
    if tomllib is None:
        pytest.skip("needs Python 3.11's tomllib")
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def test_every_package_folder_is_listed():
    found = {".".join(p.parent.relative_to(ROOT / "landscape").parts) for p in (ROOT / "landscape").rglob("__init__.py")}
    found = {"landscape" + ("." + f if f else "") for f in found}
    found |= {"landscape." + ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "cli").rglob("__init__.py")}
    assert found == _listed_packages()


def test_python_dash_m_landscape_is_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "landscape", "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("landscape "), r.stderr


@pytest.mark.slow  # builds a wheel (no network: the build backend is this environment's setuptools)
def test_the_wheel_has_no_top_level_cli(tmp_path):
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ there
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                                 "landscape-demo", "figures"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(source)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("landscape-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "cli" not in tops and "landscape" in tops
    assert "landscape/cli/main.py" in names and "landscape/cli/commands/plane.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "landscape = landscape.cli.main:entry" in zipfile.ZipFile(wheel).read(entry).decode()
