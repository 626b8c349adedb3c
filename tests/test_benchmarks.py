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
