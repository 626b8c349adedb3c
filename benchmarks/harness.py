"""Shared benchmark harness: what every row records, result files that survive a crash, the device floors.

Every measured row records, on CUDA:

* ``gpu_ms`` with ``gpu_ms_min``, ``gpu_ms_max`` and ``gpu_samples``: the median, min and max over timed samples,
  each one call between two CUDA events after flushing the L2 (``triton.testing.do_bench``'s method, with a
  fixed number of samples; see ``sample_count``: at least 10, or at least 1 s of timing for slow calls);
* ``wall_ms`` with ``wall_ms_min``, ``wall_ms_max``, ``wall_samples``: host wall time per call, each sample
  ``wall_calls`` back-to-back calls between two synchronisations (Python, launches and host syncs included);
* ``kernel_ms`` with ``kernel_ms_min``, ``kernel_ms_max``, ``kernel_samples``: the device time of one call's own
  kernels, memcpys and memsets (their durations in the profiler, summed: no launch gaps, no Python);
  ``outside_calls``: device activities the profiler placed outside every call's window (0 unless its clocks drift);
* ``kernels``, ``copies``, ``d2h``: GPU kernels, memcpy/memset operations and device-to-host copies that the
  profiler sees in one call; ``syncs``: host synchronisations in one call (``torch.cuda.set_sync_debug_mode``);
* ``peak_mib``: peak allocation during one call above what was live before it;
* ``first_call_s``: the first call (compilation included); ``compiles`` / ``recompiles``: ``torch.compile``
  graphs built by the first call / during the timed calls;
* ``floor_ms`` and ``fraction_of_floor = floor_ms / gpu_ms``: the floor counts only the bytes that must move or
  the flops that must be done, at the rates measured on this device (``floors.json``); ``peak_ms`` and
  ``fraction_of_peak``: the same work at the device's datasheet rates (``PEAKS``; None for other devices);
* ``status``: ``ok``, ``recompiles``, ``oom``, ``timeout``, ``crashed: <error>``; parity fields (``rel_err_*``,
  ``parity_ok``) compare with an exact reference and never stop the run.

On a CPU the same rule picks the number of samples of host time per call (``gpu_*`` and ``wall_*`` are then the
same samples) and the profiler fields are None. Rows are written after every measurement; a row left ``running``
by a process that died (hang, fatal CUDA error) is marked crashed by the next ``--resume`` run, which measures
only what is missing.

    python benchmarks/harness.py      # print the device, driver and library versions as JSON
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

RESULTS = Path(os.environ.get("PAPO_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
RESUME_EXIT = 75  # a method left the CUDA context unusable: rerun with --resume in a fresh process
POISONED = ("CUDA error", "illegal memory access", "device-side assert", "unspecified launch failure",
            "CUBLAS_STATUS_EXECUTION_FAILED", "misaligned address")  # fmt: skip
PACKAGES = ("torch", "triton", "transformers", "accelerate", "trl", "liger-kernel", "cut-cross-entropy", "datasets",
            "numpy")  # fmt: skip


def on_cuda() -> bool:
    return torch.cuda.is_available()


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def device_name() -> str:
    return torch.cuda.get_device_name(0) if on_cuda() else "cpu"


def device_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100-80gb-hbm3``: the results folder of a device."""
    name = re.sub(r"^nvidia\s+", "", name.strip(), flags=re.I).lower()
    return re.sub(r"[^a-z0-9.]+", "-", name).strip("-") or "unknown"


def results_dir() -> Path:
    folder = RESULTS / device_slug(device_name())
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit() -> str:
    """``PAPO_COMMIT`` when set (a copy of the tree may carry another repository's HEAD), else git's HEAD."""
    if os.environ.get("PAPO_COMMIT"):
        return os.environ["PAPO_COMMIT"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)  # fmt: skip
        if out.returncode == 0:
            return out.stdout.strip()
    return "unknown"


def device_info() -> dict:
    """Device, driver and library versions, recorded with every result file."""
    info = {"device": device_name(), "slug": device_slug(device_name()), "python": platform.python_version(),
            "commit": _commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "interpreter": interpreted()}  # fmt: skip
    info.update({name: _version(name) for name in PACKAGES})
    info["datasets_stand_in"] = bool(os.environ.get("PAPO_DATASETS_STAND_IN"))
    if on_cuda():
        props = torch.cuda.get_device_properties(0)
        capability = ".".join(map(str, torch.cuda.get_device_capability(0)))
        info.update(sm_count=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, capability=capability)  # fmt: skip
        with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)  # fmt: skip
            info["driver"] = out.stdout.strip().splitlines()[0]
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


# ------------------------------------------------------------------------------------------------- measurements
MIN_SAMPLES, MIN_TIMING_MS, FEWEST_SAMPLES, MAX_SAMPLES = 10, 1000.0, 3, 1000
BUDGET_MS = 100.0  # timing a fast call may take: more samples, up to MAX_SAMPLES
WALL_SAMPLE_MS = 1.0  # a wall sample spans at least this many milliseconds of back-to-back calls
L2_FLUSH_BYTES = 256 * 2**20  # what do_bench zeroes between samples (more than any GPU's L2)


def sync() -> None:
    if on_cuda():
        torch.cuda.synchronize()


def sample_count(est_ms: float, budget_ms: float = BUDGET_MS) -> int:
    """Timed samples for a call of about ``est_ms``: ``MIN_SAMPLES`` (more for fast calls, up to ``budget_ms`` of
    timing), or, where ``MIN_SAMPLES`` would take over ``MIN_TIMING_MS``, enough for ``MIN_TIMING_MS`` (never fewer
    than ``FEWEST_SAMPLES``): every row gets at least 10 samples or at least 1 s of timing."""
    est_ms = max(est_ms, 1e-6)
    if MIN_SAMPLES * est_ms > MIN_TIMING_MS:
        return max(FEWEST_SAMPLES, math.ceil(MIN_TIMING_MS / est_ms))
    return int(min(MAX_SAMPLES, max(MIN_SAMPLES, budget_ms // est_ms)))


def spread(name: str, samples: list[float]) -> dict:
    """``name`` (the median), ``name_min``, ``name_max`` and the number of samples."""
    if not samples:
        return {name: None, f"{name}_min": None, f"{name}_max": None, f"{name.removesuffix('_ms')}_samples": 0}
    return {name: statistics.median(samples), f"{name}_min": min(samples), f"{name}_max": max(samples),
            f"{name.removesuffix('_ms')}_samples": len(samples)}  # fmt: skip


def host_ms(fn: Callable[[], object], calls: int = 1) -> float:
    """Host wall milliseconds per call over ``calls`` back-to-back calls between two synchronisations."""
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) * 1e3 / calls


def gpu_samples(fn: Callable[[], object], n: int) -> list[float]:
    """``n`` device times of one call each, between two CUDA events, the L2 flushed before each (as ``do_bench``)."""
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    sync()
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    sync()
    return [start.elapsed_time(end) for start, end in events]


CALL = "papo_bench_call"  # the profiler range around each profiled call


def split_calls(windows: list[tuple[float, float]], events: list[tuple[str, float, float]]) -> list[list[tuple]]:
    """Device events ``(name, start, end)`` of each call window ``(start, end)`` (one clock, the profiler's): a call
    is synchronised before its window closes, so its events start inside it."""
    return [[e for e in events if start <= e[1] <= end] for start, end in windows]


def device_profile(fn: Callable[[], object], samples: int = 1) -> dict:
    """Kernels, memcpy/memset operations and device-to-host copies of one call (profiler), its host syncs, and the
    device time of its own activities in each of ``samples`` profiled calls (``kernel_ms``, see the module
    docstring)."""
    if not on_cuda():
        return dict(kernels=None, copies=None, d2h=None, syncs=None, **spread("kernel_ms", []), outside_calls=None)
    from torch.profiler import ProfilerActivity, profile, record_function

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(samples):
            with record_function(CALL), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn" if i == 0 else 0)
                try:
                    fn()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                sync()
            if i == 0:
                syncs = sum("synchronizing CUDA operation" in str(w.message) for w in caught)
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = prof.events()
    windows = [(e.time_range.start, e.time_range.end) for e in events if e.name == CALL and e.device_type == cpu]
    device = [(e.name, e.time_range.start, e.time_range.end) for e in events
              if e.device_type == cuda and not device_annotation(e)]  # fmt: skip
    calls = split_calls(sorted(windows), device)
    names = [e[0] for e in calls[0]] if calls else []
    copies = [n for n in names if n.startswith(("Memcpy", "Memset"))]
    device_ms = [sum(end - start for _, start, end in call) / 1e3 for call in calls]
    return dict(kernels=len(names) - len(copies), copies=len(copies), d2h=sum("DtoH" in n for n in copies),
                syncs=syncs, **spread("kernel_ms", device_ms),
                outside_calls=len(device) - sum(map(len, calls)))  # fmt: skip


def device_annotation(event) -> bool:
    """Whether a device-side profiler event is a range a ``record_function`` drew (ours, an optimizer's), not work."""
    return bool(getattr(event, "is_user_annotation", False)) or event.name == CALL or "#" in event.name


def peak_memory_mib(fn: Callable[[], object]) -> float | None:
    """Peak CUDA memory allocated during one call beyond what was live before it (None on a CPU)."""
    if not on_cuda():
        return None
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def compile_count() -> int:
    """Graphs ``torch.compile`` has built in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def time_samples(fn: Callable[[], object], budget_ms: float = BUDGET_MS) -> tuple[list[float], list[float], int]:
    """GPU and wall samples of a warmed-up ``fn`` and the calls in each wall sample (on a CPU: host time per call,
    the same samples for both)."""
    est = host_ms(fn)
    if not on_cuda():
        host = [host_ms(fn) for _ in range(sample_count(est, budget_ms))]
        return host, host, 1
    for _ in range(min(10, math.ceil(25 / max(est, 1e-3)))):  # do_bench's 25 ms of warm-up
        fn()
    gpu = gpu_samples(fn, sample_count(est, budget_ms))
    calls = min(500, max(1, math.ceil(WALL_SAMPLE_MS / max(statistics.median(gpu), 1e-4))))
    wall = [host_ms(fn, calls) for _ in range(sample_count(calls * est, budget_ms))]
    return gpu, wall, calls


def measure(fn: Callable[[], object], *, budget_ms: float = BUDGET_MS, kernel_samples: int = 1) -> dict:
    """Every per-call figure of a warmed-up ``fn`` (see the module docstring)."""
    before = compile_count()
    gpu, wall, calls = time_samples(fn, budget_ms)
    row = dict(**spread("gpu_ms", gpu), **spread("wall_ms", wall), wall_calls=calls,
               **device_profile(fn, kernel_samples), peak_mib=peak_memory_mib(fn))  # fmt: skip
    row["recompiles"] = compile_count() - before
    return row


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` in fp64 (NaN anywhere gives NaN)."""
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / ref.norm().clamp(min=1e-30))


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in ``obj`` (tensors, tuples, lists, dicts, named tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(x) for x in obj)
    return 0


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise ``TimeoutError`` in the main thread after ``seconds`` (a stuck kernel is left to the stage limit)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(*_):
        raise TimeoutError(f"over the {seconds:.0f} s limit of one method")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def free_memory() -> None:
    gc.collect()
    if on_cuda():
        torch.cuda.empty_cache()


def cuda_poisoned(error: BaseException) -> bool:
    """Whether ``error`` left this process's CUDA context unusable (later calls would fail too)."""
    if not on_cuda():
        return False
    if any(s in str(error) for s in POISONED):
        return True
    try:
        torch.ones(1, device="cuda").add_(1).item()
        return False
    except Exception:  # noqa: BLE001 (any failure here means the context is gone)
        return True


# ------------------------------------------------------------------------------------------------- device floors
# datasheet rates of the devices the GPU check has run on: HBM TB/s (read + write) and dense bf16 TFLOP/s
PEAKS = {"h100-80gb-hbm3": {"hbm_tbs": 3.35, "bf16_tflops": 989.0}, "h200": {"hbm_tbs": 4.8, "bf16_tflops": 989.0}}


def device_peak() -> dict | None:
    """This device's datasheet rates (``PEAKS``), None for a device not in the table."""
    return PEAKS.get(device_slug(device_name())) if on_cuda() else None


def median_ms(fn: Callable[[], object]) -> float:
    """Median device (on a CPU: host) milliseconds of ``fn``, with ``sample_count`` samples."""
    fn()
    n = sample_count(host_ms(fn))
    return statistics.median(gpu_samples(fn, n) if on_cuda() else [host_ms(fn) for _ in range(n)])


def measure_floors(quick: bool = False, gemms: Iterable[tuple[int, int, int]] = ()) -> dict:
    """Device-to-device copy rate (bytes read + written per second) and the best dense matmul rate (bf16 on CUDA)
    over a square GEMM and ``gemms`` (``(M, N, K)``: ``[M, K] @ [K, N]``, the benchmarks' own shapes), on random
    data; each shape's rate is recorded."""
    device = "cuda" if on_cuda() else "cpu"
    nbytes = 2**22 if quick else (2**31 if on_cuda() else 2**27)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = median_ms(functools.partial(dst.copy_, src))
    del src, dst
    n = 256 if quick else (8192 if on_cuda() else 1024)
    dtype = torch.bfloat16 if on_cuda() else torch.float32
    rates = []
    for M, N, K in [(n, n, n), *gemms]:
        a, b = torch.randn(M, K, device=device, dtype=dtype), torch.randn(K, N, device=device, dtype=dtype)
        rates.append({"M": M, "N": N, "K": K, "tflops": 2 * M * N * K / (median_ms(lambda a=a, b=b: a @ b) * 1e9)})
        del a, b
        free_memory()
    best = max(rates, key=lambda r: r["tflops"])
    return {"copy_gbs": 2 * nbytes / (copy_ms * 1e-3) / 1e9, "copy_bytes": nbytes, "matmul_tflops": best["tflops"],
            "matmul_best": [best["M"], best["N"], best["K"]], "matmuls": rates,
            "matmul_dtype": str(dtype)[len("torch."):], "peak": device_peak()}  # fmt: skip


def floors(quick: bool = False) -> dict:
    """This device's floors: ``floors.json`` from this run's floors stage (``floors.py``), else measured now."""
    path = results_dir() / "floors.json"
    if path.exists():
        return json.loads(path.read_text())["floors"]
    from floors import measure  # the benchmarks' GEMM shapes live with the floors stage

    return measure(quick)


def bytes_floor_ms(nbytes: float, fl: dict) -> float:
    return nbytes / (fl["copy_gbs"] * 1e9) * 1e3


def flops_floor_ms(flops: float, fl: dict) -> float:
    return flops / (fl["matmul_tflops"] * 1e12) * 1e3


def floor_fields(gpu_ms: float, fl: dict, *, nbytes: float = 0.0, flops: float = 0.0) -> dict:
    """The floor of ``nbytes`` moved plus ``flops`` done at the measured rates and at the datasheet's, and the
    fractions of them that the median ``gpu_ms`` reaches."""
    floor = bytes_floor_ms(nbytes, fl) + flops_floor_ms(flops, fl)
    peak = fl.get("peak")
    peak_ms = (nbytes / (peak["hbm_tbs"] * 1e12) + flops / (peak["bf16_tflops"] * 1e12)) * 1e3 if peak else None
    return dict(floor_ms=floor, fraction_of_floor=floor / gpu_ms, peak_ms=peak_ms,
                fraction_of_peak=peak_ms / gpu_ms if peak_ms else None)  # fmt: skip


# ------------------------------------------------------------------------------------------------- result files
class Results:
    """One benchmark's result file, rewritten after every row; ``resume`` keeps the rows a dead process wrote."""

    def __init__(self, name: str, *, resume: bool = False, **meta):
        gc.collect()
        gc.freeze()  # everything imported so far: later collections (one per row) skip it and take milliseconds
        self.path = results_dir() / f"{name}.json"
        self.data = {"benchmark": name, "env": device_info(), **meta, "rows": []}
        if resume and self.path.exists():
            self.data["rows"] = json.loads(self.path.read_text()).get("rows", [])
            for row in self.data["rows"]:
                if row.get("status") == "running":
                    row["status"] = "crashed: the process died during this measurement (hang or fatal error)"
        self.save()

    @property
    def rows(self) -> list[dict]:
        return self.data["rows"]

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.path)

    def done(self, key: dict) -> bool:
        return any(all(r.get(k) == v for k, v in key.items()) for r in self.rows)

    def run(self, key: dict, make: Callable[[], Callable[[], object]], *,
            check: Callable[[object], dict] | None = None, work: dict | None = None, limit_s: float | None = None,
            budget_ms: float = BUDGET_MS, kernel_samples: int = 1, timed: bool = True,
            extra: Callable[[Callable], dict] | None = None, note: str | None = None) -> dict | None:  # fmt: skip
        """Measure ``make()``'s callable as the row ``key`` unless already recorded. The first call builds and
        compiles, and ``check(output)`` gives the parity fields; ``timed=False`` stops there (a parity row).
        ``work`` (``nbytes=`` and/or ``flops=``) gives the floor fields, ``extra(callable)`` more fields after the
        timing. A failure is recorded in the row, never raised, except that a CUDA error that poisons the process
        saves the file and exits with ``RESUME_EXIT``."""
        if self.done(key):
            return None
        row = {**key, "status": "running", **({"note": note} if note else {})}
        self.rows.append(row)
        self.save()
        try:
            with time_limit(limit_s):
                fn = make()
                before, t0 = compile_count(), time.perf_counter()
                out = fn()
                sync()  # an asynchronous CUDA error surfaces here, in the method that caused it
                row["first_call_s"] = time.perf_counter() - t0
                row["compiles"] = compile_count() - before
                if check is not None:
                    row.update(check(out))
                del out
                free_memory()
                if timed:
                    row.update(measure(fn, budget_ms=budget_ms, kernel_samples=kernel_samples))
                if extra is not None:
                    row.update(extra(fn))
            row["status"] = "recompiles" if row.get("recompiles") else "ok"
            if timed and work:
                row.update(floor_fields(row["gpu_ms"], self.data["floors"], **work))
        except torch.OutOfMemoryError:
            row["status"] = "oom"
        except TimeoutError as e:
            row["status"] = f"timeout: {e}"
        except Exception as e:  # noqa: BLE001 (a peer's failure is a result)
            row["status"] = f"crashed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}"
            if cuda_poisoned(e):
                self.save()
                print(f"{key}: {row['status']}; CUDA context lost, exiting for a --resume run", flush=True)
                sys.exit(RESUME_EXIT)
        fn = None
        free_memory()
        self.save()
        print(format_row(row), flush=True)
        return row


def write_result(name: str, payload: dict) -> Path:
    """Write a benchmark's whole result at once (for benchmarks that are not a list of measured calls)."""
    path = results_dir() / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "env": device_info(), **payload}, indent=1, default=str) + "\n")
    return path


def format_row(row: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def arg_parser(doc: str, *, rows: bool = True) -> argparse.ArgumentParser:
    """``--quick`` (tiny shapes, any device); with ``rows``, ``--resume`` (keep this device's rows, measure the
    rest) and ``--only`` (some methods)."""
    first, _, rest = doc.partition("\n")
    p = argparse.ArgumentParser(description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes: the CPU smoke test")
    if rows:
        p.add_argument("--resume", action="store_true", help="keep the rows already written for this device")
        p.add_argument("--only", nargs="+", metavar="METHOD", help="measure only these methods")
    return p


def wanted(args: argparse.Namespace, method: str) -> bool:
    return not args.only or method in args.only


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.partition("\n")[0]).parse_args()
    print(json.dumps(device_info(), indent=1))
