"""The advantage kernels compile for an H100 (sm_90) on a machine without a GPU, and their machine code is fp64
where it must be: the interpreter computes exactly whatever the kernel's types, the GPU does not.

For fp64 inputs no ``.f32`` appears anywhere in the PTX (a Python float scalar would be an fp32 parameter); for
fp32 and bf16 inputs there is no f32 arithmetic (every sum, mean, M2, division and root is f64). No kernel spills
registers, and the last program's batch rescale uses vector loads and stores.
"""

import contextlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from papo_kernels import dynamic_sampling_mask, gdpo_advantages, grpo_advantages, papo_advantages, pass_rate_buckets
from papo_kernels.advantages import fused
from tests.kernels import _aot_compile

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA runs compile the kernels for real")

NAMES = ("_grpo_kernel", "_gdpo_kernel", "_papo_kernel", "_group_count_kernel")
KERNELS = {f"papo_kernels.advantages.fused:{n}": getattr(fused, n) for n in NAMES}


def _run_cases():
    """Every kernel variant in fp64; the accumulating ones in fp32 and bf16; the largest tiles (spills) for G=1024."""
    for dtype, G, every_variant in ((torch.float64, 8, True), (torch.float32, 8, False), (torch.bfloat16, 8, False),
                                    (torch.float64, 1024, False)):  # fmt: skip
        r = torch.randn(2 * G, 3, dtype=dtype)
        w = torch.tensor([1.0, 0.5, 2.0], dtype=dtype)
        o = (r[:, 0] > 0).to(dtype)
        grpo_advantages(r, G, weights=w, scale="batch")
        gdpo_advantages(r, G, weights=w)
        papo_advantages(o, r[:, 1], o > 0, G, lambda_process=0.7)
        if every_variant:
            grpo_advantages(r, G, weights=w, scale="group")
            grpo_advantages(r[:, 0], G, scale="none")
            papo_advantages(o, r[:, 1], o, G, scale_by_std=False, process_norm="all")
            dynamic_sampling_mask(o, G)
            pass_rate_buckets(o, G)


def _compile(tmp_path) -> list[dict]:
    with contextlib.ExitStack() as hooks:
        hooks.callback(lambda: [k.pre_run_hooks.clear() for k in KERNELS.values()])
        calls = _aot_compile.record(KERNELS)
        _run_cases()
    (tmp_path / "calls.pkl").write_bytes(pickle.dumps(calls))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "tests.kernels._aot_ptx", str(tmp_path / "calls.pkl")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=root)
    if "No module named 'triton.backends.nvidia'" in proc.stderr:
        pytest.skip("this Triton build has no CUDA backend")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_kernels_compile_for_sm90_in_fp64(tmp_path):
    rows = _compile(tmp_path)
    usage = [r for r in rows if "kernel" in r]
    ptx = [r for r in rows if "ptx_of" in r]
    assert {r["kernel"] for r in usage} == set(NAMES) and len(ptx) == len(usage)
    assert all(r["local_bytes"] == 0 for r in usage), [r for r in usage if r["local_bytes"]]  # no spills
    batch = [r for r in usage if r["kernel"] == "_gdpo_kernel" or r["constexprs"].get("SCALE") == 1]
    assert batch and all(r["vector_loads"] and r["vector_stores"] for r in batch)  # the batch rescale is vectorised
    for r in ptx:
        floats = {t for t in r["pointers"].values() if t[1:] in ("fp64", "fp32", "bf16")}
        if floats == {"*fp64"}:
            assert r["f32_any"] == 0, r
        assert r["f32_arith"] == 0, r
    assert {r["pointers"].get("R") for r in ptx} == {"*fp64", "*fp32", "*bf16", None}  # every dtype was compiled
