"""Shared benchmark harness: timing, peak memory, launch counts, device floors and result files.

On CUDA, times are medians from ``triton.testing.do_bench`` (L2 flushed between reps), memory is the peak
``torch.cuda`` allocation above what was live before the call, launches are CUDA kernels seen by the profiler.
On a CPU the same calls run a few wall-clock repetitions, so every script can be smoke-tested in CI; CPU
results go to ``benchmarks/results/cpu/`` (ignored by git), GPU results to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton

RESULTS = Path(__file__).resolve().parent / "results"


def on_cuda() -> bool:
    return torch.cuda.is_available()


def device_info() -> dict:
    """Device, driver and library versions recorded with every result."""
    info = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if on_cuda():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sm_count=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
                    cuda=torch.version.cuda)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            info["driver"] = out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = "unknown"
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return info


def time_ms(fn: Callable[[], object], *, warmup: int = 10, rep: int = 50, quick: bool = False) -> float:
    """Median milliseconds per call of ``fn``."""
    if on_cuda():
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()
    samples = []
    for _ in range(1 if quick else 5):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def peak_memory_mib(fn: Callable[[], object]) -> float | None:
    """Peak CUDA memory allocated during ``fn`` beyond what was live before it (None on CPU)."""
    if not on_cuda():
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def count_launches(fn: Callable[[], object]) -> int | None:
    """Number of CUDA kernels ``fn`` launches (None on CPU)."""
    if not on_cuda():
        return None
    fn()  # compile / autotune outside the profile
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def copy_bandwidth_gbs(nbytes: int = 2**30) -> float | None:
    """Measured device-to-device copy rate in GB/s (bytes read + bytes written per second)."""
    if not on_cuda():
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Measured dense matmul rate in TFLOP/s for ``n x n @ n x n``."""
    if not on_cuda():
        return None
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = time_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def write_result(name: str, payload: dict) -> Path:
    """Write ``payload`` with the device info to ``results/<name>-<device>.json`` (``results/cpu/`` on a CPU)."""
    info = device_info()
    slug = info["device"].split(" (")[0].replace(" ", "_").replace("/", "_")
    folder = RESULTS if on_cuda() else RESULTS / "cpu"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{slug}.json"
    path.write_text(json.dumps({"benchmark": name, "env": info, **payload}, indent=2, default=float) + "\n")
    return path


def assert_same_results(name: str, got, expected, tol: float = 3e-2) -> None:
    """Norm-relative check of a peer's outputs against ours (bf16 tolerance) before anything is timed."""
    for a, b in zip(got, expected, strict=True):
        err = (a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)
        assert err < tol, f"{name}: relative error {err:.3g} against the fused result"


def arg_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny shapes, one repetition: a smoke test")
    return p
