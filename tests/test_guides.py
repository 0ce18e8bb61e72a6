"""Every guide in docs/guides runs as written: its `# file: NAME` Python blocks are written to an
empty folder; its other Python blocks are notebook cells, run in order in one process there (as one
kernel would); then its bash blocks run there, with this environment's `python` and `landscape`."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

GUIDES = Path(__file__).resolve().parent.parent / "docs" / "guides"
NEEDS = {"lightning.md": ("pytorch_lightning",)}  # modules a guide's example imports beyond ours
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(text: str):
    """(language, body) of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(text)]


@pytest.mark.slow  # each runs Python, landscape import/plane/plot as subprocesses: 7 to 20 s
@pytest.mark.parametrize("guide", sorted(p.name for p in GUIDES.glob("*.md")))
def test_guide_example_runs(guide, tmp_path):
    for module in NEEDS.get(guide, ()):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{guide} needs {module}")
    found = blocks((GUIDES / guide).read_text())
    files = [(body.split("\n", 1)) for lang, body in found if lang == "python" and body.startswith("# file: ")]
    cells = [body for lang, body in found if lang == "python" and not body.startswith("# file: ")]
    scripts = [body for lang, body in found if lang == "bash"]
    assert (files or cells) and scripts, f"{guide} has no complete example"
    for header, body in files:
        (tmp_path / header.removeprefix("# file: ").strip()).write_text(body)
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), MPLBACKEND="Agg")
    env.pop("PYTHONPATH", None)  # the user's module is found in the current folder, as documented
    if cells:
        r = subprocess.run([sys.executable, "-c", "\n".join(cells)], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, f"{guide} cells:\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    for script in scripts:
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{guide}:\n{script}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
        assert "landscape: error" not in r.stderr
    for name in re.findall(r"-o (\S+\.h5)", "\n".join(scripts)):  # every file the guide writes is complete
        assert (tmp_path / name).exists() and not (tmp_path / f"{name}.partial").exists(), name
