"""The benchmark scripts run (tiny sizes; the timings themselves live in benchmarks/, not in tests)."""
from __future__ import annotations

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


@pytest.mark.slow  # resnet20, every part at tiny sizes: ~1 min on a CPU
def test_scale_benchmark_runs_and_files_hold_only_their_checkpoints(tmp_path):
    import json
    out = tmp_path / "scale.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--smoke", "--models", "resnet20",
                        "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    results = json.loads(out.read_text())
    resnet = results["files"][0]
    assert resnet["recorded_every"] == 6 and resnet["leftovers"] == ["run.h5"]
    runs = sum(run["bytes"] for run in resnet["runs"].values())
    assert runs / resnet["file_bytes"] > 0.97  # no resume state or other dead bytes left in the file
    assert all(p["finite"] for p in results["plane"]) and len(results["recipe"]) == 1
