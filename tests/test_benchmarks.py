"""Every benchmark script runs end to end in its ``--quick`` smoke mode (real numbers come from a GPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("bench_*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_smoke(script):
    env = {**os.environ, "PYTHONPATH": str(script.parents[1] / "src")}
    out = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, env=env,
                         timeout=600, cwd=script.parents[1])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "wrote" in out.stdout


def test_report_from_smoke_results():
    root = SCRIPTS[0].parents[1]
    subprocess.run([sys.executable, "benchmarks/bench_advantages.py", "--quick"], check=True, cwd=root,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(root / "src")})
    out = subprocess.run([sys.executable, "benchmarks/report.py", "--no-run"], capture_output=True, text=True,
                         cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = (root / "benchmarks" / "results" / "cpu" / "REPORT.md").read_text()
    assert "## advantages" in report and ".png" in report
