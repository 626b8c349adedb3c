"""Shared benchmark harness: what every row records, result files that survive a crash, the device floors.

Every measured row records, on CUDA:

* ``gpu_ms``: median of ``triton.testing.do_bench`` (L2 flushed between repetitions);
* ``wall_ms``: host wall time per call over many back-to-back calls between two synchronisations (Python,
  launches and host syncs included);
* ``kernels``, ``copies``, ``d2h``: GPU kernels, memcpy/memset operations and device-to-host copies that the
  profiler sees in one call; ``syncs``: host synchronisations in one call (``torch.cuda.set_sync_debug_mode``);
* ``peak_mib``: peak allocation during one call above what was live before it;
* ``compiles`` / ``recompiles``: ``torch.compile`` graphs built by the first call / during the timed calls;
* ``floor_ms`` and ``fraction_of_floor = floor_ms / gpu_ms``: the floor counts only the bytes that must move or
  the flops that must be done, at the rates measured on this device (``floors.json``);
* ``status``: ``ok``, ``recompiles``, ``oom``, ``timeout``, ``crashed: <error>``; parity fields (``rel_err_*``,
  ``parity_ok``) compare with an exact reference and never stop the run.

On a CPU the same calls run a few wall-clock repetitions (a smoke test) and the CUDA-only fields are None. Rows
are written after every measurement; a row left ``running`` by a process that died (hang, fatal CUDA error) is
marked crashed by the next ``--resume`` run, which measures only what is missing.

    python benchmarks/harness.py      # print the device, driver and library versions as JSON
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import triton

RESULTS = Path(os.environ.get("PAPO_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
RESUME_EXIT = 75  # a method left the CUDA context unusable: rerun with --resume in a fresh process
POISONED = ("CUDA error", "illegal memory access", "device-side assert", "unspecified launch failure",
            "CUBLAS_STATUS_EXECUTION_FAILED", "misaligned address")  # fmt: skip
PACKAGES = ("torch", "triton", "transformers", "accelerate", "trl", "liger-kernel", "datasets", "numpy")


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
def sync() -> None:
    if on_cuda():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], *, rep: int = 150, quick: bool = False) -> float:
    """Median milliseconds per call: ``do_bench`` on CUDA, a few wall-clock repetitions on a CPU."""
    if on_cuda():
        return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))
    samples = []
    for _ in range(1 if quick else 3):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def wall_ms(fn: Callable[[], object], calls: int) -> float:
    """Host wall milliseconds per call over ``calls`` back-to-back calls between two synchronisations."""
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) * 1e3 / calls


def launch_counts(fn: Callable[[], object]) -> dict:
    """Kernels, memcpy/memset operations and device-to-host copies of one call (profiler), and its host syncs."""
    if not on_cuda():
        return dict(kernels=None, copies=None, d2h=None, syncs=None)
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        sync()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = [n for n in names if n.startswith(("Memcpy", "Memset"))]
    syncs = sum("synchronizing CUDA operation" in str(w.message) for w in caught)
    return dict(kernels=len(names) - len(copies), copies=len(copies), d2h=sum("DtoH" in n for n in copies),
                syncs=syncs)  # fmt: skip


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


def measure(fn: Callable[[], object], *, quick: bool, rep: int = 150, wall_target_ms: float = 150.0) -> dict:
    """Every per-call figure of a warmed-up ``fn`` (see the module docstring)."""
    before = compile_count()
    gpu = time_ms(fn, rep=rep, quick=quick)
    calls = 0 if quick else int(min(500, max(5, wall_target_ms / max(gpu, 1e-3))))
    row = dict(gpu_ms=gpu, wall_ms=wall_ms(fn, calls) if calls else gpu, wall_calls=calls, **launch_counts(fn),
               peak_mib=peak_memory_mib(fn))  # fmt: skip
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
def measure_floors(quick: bool = False) -> dict:
    """Device-to-device copy rate (bytes read + written per second) and dense bf16 matmul rate, on random data."""
    device = "cuda" if on_cuda() else "cpu"
    nbytes = 2**22 if quick else (2**31 if on_cuda() else 2**27)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_ms = time_ms(lambda: dst.copy_(src), quick=quick)
    n = 256 if quick else (8192 if on_cuda() else 1024)
    dtype = torch.bfloat16 if on_cuda() else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    mm_ms = time_ms(lambda: a @ b, quick=quick)
    return {"copy_gbs": 2 * nbytes / (copy_ms * 1e-3) / 1e9, "copy_bytes": nbytes, "matmul_n": n,
            "matmul_tflops": 2 * n**3 / (mm_ms * 1e-3) / 1e12, "matmul_dtype": str(dtype)[len("torch."):]}  # fmt: skip


def floors(quick: bool = False) -> dict:
    """This device's floors: ``floors.json`` from this run's floors stage (``floors.py``), else measured now."""
    path = results_dir() / "floors.json"
    if path.exists():
        return json.loads(path.read_text())["floors"]
    return measure_floors(quick)


def bytes_floor_ms(nbytes: float, fl: dict) -> float:
    return nbytes / (fl["copy_gbs"] * 1e9) * 1e3


def flops_floor_ms(flops: float, fl: dict) -> float:
    return flops / (fl["matmul_tflops"] * 1e12) * 1e3


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

    def run(self, key: dict, make: Callable[[], Callable[[], object]], *, quick: bool,
            check: Callable[[object], dict] | None = None, floor_ms: float | None = None, limit_s: float | None = None,
            rep: int = 150, note: str | None = None) -> dict | None:  # fmt: skip
        """Measure ``make()``'s callable as the row ``key`` unless already recorded. The first call builds and
        compiles, and ``check(output)`` gives the parity fields; a failure is recorded in the row, never raised,
        except that a CUDA error that poisons the process saves the file and exits with ``RESUME_EXIT``."""
        if self.done(key):
            return None
        row = {**key, "status": "running", **({"note": note} if note else {})}
        self.rows.append(row)
        self.save()
        try:
            with time_limit(limit_s):
                fn = make()
                before = compile_count()
                out = fn()
                sync()  # an asynchronous CUDA error surfaces here, in the method that caused it
                row["compiles"] = compile_count() - before
                if check is not None:
                    row.update(check(out))
                del out
                free_memory()
                row.update(measure(fn, quick=quick, rep=rep))
            row["status"] = "recompiles" if row["recompiles"] else "ok"
            if floor_ms is not None:
                row["floor_ms"] = floor_ms
                row["fraction_of_floor"] = floor_ms / row["gpu_ms"]
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
    p.add_argument("--quick", action="store_true", help="tiny shapes, one repetition: the CPU smoke test")
    if rows:
        p.add_argument("--resume", action="store_true", help="keep the rows already written for this device")
        p.add_argument("--only", nargs="+", metavar="METHOD", help="measure only these methods")
    return p


def wanted(args: argparse.Namespace, method: str) -> bool:
    return not args.only or method in args.only


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.partition("\n")[0]).parse_args()
    print(json.dumps(device_info(), indent=1))
