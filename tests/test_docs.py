"""The README's Python examples run as written (the guides' examples run in test_guides.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_guides import blocks

README = Path(__file__).resolve().parent.parent / "README.md"
DOCS = README.parent / "docs"


@pytest.mark.slow  # trains a small model and evaluates a plane: ~20 s
def test_readme_python_examples_run(tmp_path):
    examples = [body for lang, body in blocks(README.read_text()) if lang == "python"]
    assert examples, "the README has no Python example"
    env = dict(os.environ, MPLBACKEND="Agg")
    for code in examples:
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"{code}\nstderr:\n{r.stderr[-3000:]}"
    assert (tmp_path / "plane.h5").exists() and (tmp_path / "plane.png").exists()


def test_docs_python_examples_run(tmp_path, tiny_run):
    """Every Python block of docs/*.md (the guides' run in test_guides.py), each as a fresh process, in a
    folder holding the files they read: run.h5 (sgd and swa) and plane.h5 through it."""
    import shutil

    from landscape.cli.main import main
    shutil.copy(tiny_run, tmp_path / "run.h5")
    assert main(["plane", str(tmp_path / "run.h5"), "sgd", "swa/average", "swa/iterates:0", "--grid", "3", "3",
                 "-o", str(tmp_path / "plane.h5"), "--quiet"]) == 0
    ran = 0
    for page in sorted(DOCS.glob("*.md")):
        for code in [body for lang, body in blocks(page.read_text()) if lang == "python"]:
            r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                               timeout=600)
            assert r.returncode == 0, f"{page.name}:\n{code}\nstderr:\n{r.stderr[-3000:]}"
            ran += 1
    assert ran, "no Python example in docs/"
