"""The benchmark scripts run (tiny sizes; the timings themselves live in benchmarks/, not in tests)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # two tiny workloads, three contenders each: ~30 s on a CPU
def test_gpu_benchmark_runs_and_its_contenders_agree(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--device", "cpu",
                        "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "results agree" in r.stdout and out.exists()


def test_points_as_matrix_products_equal_the_evaluators_values(tmp_path):
    """conv_matmul.py checks its hand-written unfold + matmul forward against the evaluator, one point
    per call and K per call, before it times anything; a wrong unfold order or a missed BatchNorm
    term fails it."""
    out = tmp_path / "cm.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "conv_matmul.py"), "--points", "3",
                        "--repeats", "1", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert [row["K"] for row in json.loads(out.read_text())["rows"]] == [3]
