"""The benchmark scripts run (tiny sizes; the timings themselves live in benchmarks/, not in tests)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # the gpu tests on the CPU, then two tiny workloads, three contenders each: ~40 s
def test_gpu_session_runs_the_gpu_tests_and_the_benchmark_and_its_contenders_agree(tmp_path):
    """benchmarks/gpu_session.sh, as a GPU machine runs it, with the CPU standing in for the GPU."""
    env = dict(os.environ, OUT=str(tmp_path), LANDSCAPE_GPU_TESTS_DEVICE="cpu",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    r = subprocess.run([str(ROOT / "benchmarks" / "gpu_session.sh"), "--smoke", "--device", "cpu"],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in (tmp_path / "gpu-tests.log").read_text()
    assert "results agree" in (tmp_path / "gpu-benchmark.log").read_text()
    assert json.loads((tmp_path / "gpu-results.json").read_text())["results"]


def test_points_as_matrix_products_equal_the_evaluators_values(tmp_path):
    """conv_matmul.py checks its hand-written unfold + matmul forward against the evaluator, one point
    per call and K per call, before it times anything; a wrong unfold order or a missed BatchNorm
    term fails it."""
    out = tmp_path / "cm.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "conv_matmul.py"), "--points", "3",
                        "--repeats", "1", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert [row["K"] for row in json.loads(out.read_text())["rows"]] == [3]


def test_the_file_work_benchmark_times_every_model(tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rows.py"), "--epochs", "2", "--repeats", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"cnn1d", "resnet20"} and results["cnn1d"]["parameters"] == 5210
    assert all(v > 0 for model in results.values() for v in model.values())
