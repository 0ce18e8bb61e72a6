"""The README's Python examples run as written (the guides' examples run in test_guides.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_guides import blocks

README = Path(__file__).resolve().parent.parent / "README.md"


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
