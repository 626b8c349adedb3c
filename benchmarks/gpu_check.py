"""The one command to run first on a GPU machine: versions, wheels, CUDA tests, floors, every benchmark, the report.

    bash benchmarks/gpu_check.sh             # the same as: python3 -m benchmarks.gpu_check
    python3 -m benchmarks.gpu_check --quick  # CPU smoke path (CI): tiny shapes through Triton's interpreter

Stages run one after another, each a subprocess in its own process group with its own time limit, so a hang or a
crash loses that stage only. A benchmark whose CUDA context a peer poisoned exits with code 75 and is resumed in a
fresh process (--resume): the crashed row is kept, the rest measured. A stage's limit is the smaller of its own
and what is left of --budget (480 s) after the report's; the optional end-to-end stage runs only with 60 s left.

  stage         limit  what
  install        60 s  pip install --no-index --no-deps .whl/*.whl into build/gpu-site (benchmarks/fetch_wheels.sh
                       fills .whl/); if datasets then fails to import, benchmarks/stub/ stands in for it
  env            30 s  device, driver and library versions (benchmarks/harness.py) -> results/<device>/env.json
  floors         45 s  device-to-device copy rate, best bf16 matmul rate on the benchmarks' GEMMs (floors.py)
  tests         150 s  pytest tests/kernels -n 8 on CUDA (skipped without CUDA: CI runs them in the interpreter);
                       the ids of failed tests go to gpu_check.json and the report
  advantages     75 s  bench_advantages.py
  policy_loss   120 s  bench_policy_loss.py (and its parity-only term cases)
  fused_linear  180 s  bench_fused_linear.py (and its parity-only term cases)
  fused_linear_profile
                 60 s  bench_fused_linear.py --profile: the kernel timeline of one fused-linear call per config
  trainer_step  150 s  bench_trainer_step.py (optional), with 5 profiled steps a row
  report         40 s  report.py -> results/REPORT.md and plots (results/cpu/REPORT.md on a CPU)

The limits add up to more than the budget on purpose: each is a stop for a hang, and the budget decides. What the
sampling costs, from the H200 run at e548a06: a row is timed until it has 10 samples, or 1 s of samples where 10
would take longer (3 at least; fast calls get more, up to 100 ms), once for GPU time and once for wall time, plus
about 4 more calls (estimate, warm-up, profile, peak memory): about 24 x its time up to 100 ms, 2-3 s above.
  policy loss   40 rows of 1-13 ms (0.3-0.6 s each), 8 of TRL's eager path at 22-127 ms (0.5-3 s): about 40 s,
                with the exact references and the term cases about 60 s
  fused linear  24 rows of 7-138 ms (0.3-3 s each): about 35 s; Liger's 4 shapes, each compiled afresh after
                the torch._dynamo reset (about 10-20 s a compilation) and timed at 100-400 ms (3 s): 50-90 s; the
                exact references and the term cases about 15 s: 100-140 s
  advantages    74 rows of 10 us-1.5 ms (20 ms of timing, 10 profiled calls: about 0.3 s each), the official
                loop's 2 rows of about 120 ms (3 s each): about 35 s
  trainer step  4 rows of 70-180 ms (2 s of timing, 5 profiled steps, a model built: about 12 s each): 50 s
With install, env, floors and tests as measured (80 s) and the report, about 360-420 s of the 480 s. The optional
end-to-end stage runs last and only with a minute to spare; a stage cut short keeps the rows it wrote.

On one H200 the whole run took 258 s at e548a06 (one timed sample for rows over 75 ms). Results go to
benchmarks/results/<device>/ (cleared at the start; logs/ holds each stage's output), the stage summary and the
failed tests' ids to results/<device>/gpu_check.json; with --out DIR (default $OUT when set) everything is also
packed into DIR/gpu_check.tar.gz.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = Path(os.environ.get("PAPO_BENCH_RESULTS") or HERE / "results")
SITE = ROOT / "build" / "gpu-site"
WHEELS = Path(os.environ.get("PAPO_WHEELS") or ROOT / ".whl")
RESUME_EXIT = 75  # harness.RESUME_EXIT
REPORT_RESERVE = 40
MIN_OPTIONAL_S = 60


@dataclass
class Stage:
    name: str
    limit: int
    cmd: list[str]
    resumable: bool = False
    optional: bool = False
    cuda_only: bool = False


def stages(quick: bool) -> list[Stage]:
    py, q = sys.executable, ["--quick"] if quick else []
    bench = lambda name, limit, **kw: Stage(name, limit, [py, str(HERE / f"bench_{name}.py"), *q], True, **kw)  # noqa: E731
    tests = [py, "-m", "pytest", "tests/kernels", "-q", "-p", "no:cacheprovider", "-rfE"]
    if importlib.util.find_spec("xdist"):
        tests += ["-n", "8"]
    if importlib.util.find_spec("pytest_timeout"):
        tests += ["--timeout", "120"]
    return [
        Stage("env", 30, [py, str(HERE / "harness.py")]),
        Stage("floors", 45, [py, str(HERE / "floors.py"), *q]),
        Stage("tests", 150, tests, cuda_only=True),
        bench("advantages", 75),
        bench("policy_loss", 120),
        bench("fused_linear", 180),
        Stage("fused_linear_profile", 60, [py, str(HERE / "bench_fused_linear.py"), "--profile", *q]),
        bench("trainer_step", 150, optional=True),
    ]


class Runner:
    """Runs stages against one deadline, logging each to ``logs/<stage>.log``."""

    def __init__(self, budget: float, env: dict, logs: Path):
        self.deadline = time.monotonic() + budget
        self.env, self.logs = env, logs
        self.summary: list[dict] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def _attempt(self, cmd: list[str], timeout: float, log: Path) -> int:
        with log.open("a") as out:
            out.write(f"$ {' '.join(cmd)}  (limit {timeout:.0f} s)\n")
            out.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the stage's own process group: its workers too
                proc.wait()
                out.write(f"\n[killed: over the {timeout:.0f} s limit]\n")
                return 124

    def run(self, stage: Stage, reserve: float = REPORT_RESERVE) -> dict:
        log = self.logs / f"{stage.name}.log"
        entry = {"stage": stage.name, "limit_s": stage.limit, "attempts": 0}
        t0, cpu0 = time.monotonic(), _children_cpu()
        print(f"== {stage.name} (limit {stage.limit} s, {self.left():.0f} s left)", flush=True)
        rc = None
        while True:
            allowed = min(stage.limit - (time.monotonic() - t0), self.left() - reserve)
            too_late = stage.optional and entry["attempts"] == 0 and allowed < MIN_OPTIONAL_S
            if allowed < min(5.0, stage.limit / 2) or too_late:
                entry["status"] = "out of time" if rc is None else entry["status"]
                break
            cmd = stage.cmd + (["--resume"] if entry["attempts"] and stage.resumable else [])
            rc = self._attempt(cmd, allowed, log)
            entry["attempts"] += 1
            entry["status"] = {0: "ok", 124: "timeout", RESUME_EXIT: "resumed"}.get(rc, f"failed (rc {rc})")
            if not (stage.resumable and rc in (RESUME_EXIT, 124)):
                break
        entry["rc"], entry["seconds"] = rc, round(time.monotonic() - t0, 1)
        entry["cpu_s"] = round(_children_cpu() - cpu0, 1)
        print(f"   {entry['status']} after {entry['seconds']} s ({entry['attempts']} attempt(s))", flush=True)
        if log.exists():
            print(_tail(log.read_text(), 6), flush=True)
        self.summary.append(entry)
        return entry


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tail(text: str, lines: int) -> str:
    keep = [ln for ln in text.splitlines() if ln.strip() and "Warning" not in ln and not ln.startswith("  ")]
    return "\n".join("   | " + ln[:160] for ln in keep[-lines:])


def install_wheels(env: dict, logs: Path) -> dict:
    """Install .whl/*.whl (no network, no dependency resolution) into SITE and check that TRL's trainer imports;
    if ``datasets`` does not import there, put the import stand-in (benchmarks/stub) first on the path."""
    wheels = sorted(WHEELS.glob("*.whl"))
    entry = {"stage": "install", "wheels": [w.name for w in wheels]}
    t0 = time.monotonic()
    if wheels:
        shutil.rmtree(SITE, ignore_errors=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--target", str(SITE), *map(str, wheels)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        (logs / "install.log").write_text(out.stdout + out.stderr)
        entry["rc"] = out.returncode
    else:
        print("note: .whl/ holds no wheels (benchmarks/fetch_wheels.sh fills it): using what is installed")
    errors = import_errors(env, "datasets", "trl.trainer.utils")
    if errors["datasets"]:
        env["PYTHONPATH"] = os.pathsep.join([str(HERE / "stub"), env["PYTHONPATH"]])
        env["PAPO_DATASETS_STAND_IN"] = "1"
        print(f"note: datasets does not import ({errors['datasets']}): benchmarks/stub/datasets stands in for it")
        errors = {**import_errors(env, "trl.trainer.utils"), "datasets": errors["datasets"]}
    if errors["trl.trainer.utils"]:
        print(f"note: trl.trainer does not import ({errors['trl.trainer.utils']}): the TRL peers will fail")
    entry["import_errors"] = errors
    entry["status"], entry["seconds"] = "ok" if entry.get("rc", 0) == 0 else "failed", round(time.monotonic() - t0, 1)
    print(f"== install: {len(wheels)} wheel(s) in {entry['seconds']} s", flush=True)
    return entry


PROBE = """
import importlib, json, sys
errors = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
        errors[name] = None
    except Exception as e:
        errors[name] = f"{type(e).__name__}: {e}"[:200]
print(json.dumps(errors))
"""


def import_errors(env: dict, *modules: str) -> dict[str, str | None]:
    """module -> the error importing it in one child process with ``env`` (None where it imports)."""
    out = subprocess.run([sys.executable, "-c", PROBE, *modules], env=env, capture_output=True, text=True, timeout=180)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return dict.fromkeys(modules, (out.stderr.strip().splitlines() or ["no output"])[-1][:200])


def child_env(cuda: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PAPO_BENCH_RESULTS=str(RESULTS))
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT / "src"), str(ROOT), str(SITE),
                                                    os.environ.get("PYTHONPATH", "")] if p)  # fmt: skip
    if not cuda:
        env.setdefault("TRITON_INTERPRET", "1")  # the kernels run on CPU tensors through Triton's interpreter
    return env


def has_cuda() -> bool:
    """Whether a CUDA device is usable, asked of a subprocess (this process keeps no CUDA context)."""
    probe = "import torch; print(int(torch.cuda.is_available()))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    return out.stdout.strip() == "1"


def pack(out_dir: Path, device_dir: Path, report: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_check.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(device_dir, arcname=f"results/{device_dir.name}")
        if report.exists() and report.parent != device_dir:
            tar.add(report, arcname=f"results/{report.relative_to(RESULTS)}")
    for name in ("gpu_check.json", "REPORT.md"):
        src = report if name == "REPORT.md" else device_dir / name
        if src.exists():
            shutil.copy(src, out_dir / name)
    return path


def main(argv: list[str] | None = None) -> int:
    first, _, rest = __doc__.partition("\n")
    p = argparse.ArgumentParser(description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, one repetition (the CPU smoke path of CI)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 480)")
    p.add_argument("--out", type=Path, default=os.environ.get("OUT") or None, help="also pack the results here")
    p.add_argument("--skip", nargs="+", default=[], metavar="STAGE", help="stages to leave out")
    args = p.parse_args(argv)
    start = time.monotonic()
    cuda = has_cuda()
    env = child_env(cuda)
    scratch = RESULTS / ".logs"
    scratch.mkdir(parents=True, exist_ok=True)
    entries = [install_wheels(env, scratch)] if "install" not in args.skip else []
    runner = Runner(args.budget - (time.monotonic() - start), env, scratch)
    plan = [s for s in stages(args.quick) if s.name not in args.skip]
    device_dir, info = None, {}
    for stage in plan:
        if stage.cuda_only and not cuda:
            print(f"== {stage.name}: skipped (no CUDA; the CPU suite runs these tests in the interpreter)")
            runner.summary.append({"stage": stage.name, "status": "skipped: no CUDA"})
            continue
        entry = runner.run(stage)
        if stage.name == "env":
            text = (scratch / "env.log").read_text()
            info = json.loads(text[text.index("\n{") :]) if entry["status"] == "ok" else {}
            device_dir = RESULTS / info.get("slug", "cpu" if not cuda else "unknown-gpu")
            shutil.rmtree(device_dir, ignore_errors=True)  # this run's results only (the last run is in git)
            device_dir.mkdir(parents=True)
            (device_dir / "env.json").write_text(json.dumps(info, indent=1) + "\n")
            stand_in = " (stand-in)" if info.get("datasets_stand_in") else ""
            print(f"   device {info.get('device')}, driver {info.get('driver', '-')}, torch {info.get('torch')}, "
                  f"Triton {info.get('triton')}, trl {info.get('trl')}, liger-kernel {info.get('liger-kernel')}, "
                  f"datasets {info.get('datasets')}{stand_in}")  # fmt: skip
    device_dir = device_dir or RESULTS / ("cpu" if not cuda else "unknown-gpu")
    report = device_dir / "REPORT.md" if not cuda else RESULTS / "REPORT.md"
    devices = [device_dir.name] if not cuda else []
    report_cmd = [sys.executable, str(HERE / "report.py"), "--out", str(report)]
    report_cmd += ["--device", *devices] if devices else []
    runner.run(Stage("report", REPORT_RESERVE, report_cmd), reserve=0)
    summary = {"env": info, "quick": args.quick, "budget_s": args.budget, "total_s": round(time.monotonic() - start, 1),
               "stages": entries + runner.summary, "tests": tests_summary(scratch / "tests.log"),
               "failed_tests": failed_tests(scratch / "tests.log")}  # fmt: skip
    shutil.rmtree(device_dir / "logs", ignore_errors=True)
    shutil.move(str(scratch), device_dir / "logs")
    (device_dir / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\n{'stage':14s} {'status':24s} {'seconds':>8s} {'cpu s':>8s}")
    for e in summary["stages"]:
        print(f"{e['stage']:14s} {str(e.get('status', 'ok'))[:24]:24s} {e.get('seconds', 0):8.1f} "
              f"{e.get('cpu_s', 0):8.1f}")  # fmt: skip
    print(f"total {summary['total_s']} s of a {args.budget:.0f} s budget; tests: {summary['tests']}")
    for line in summary["failed_tests"] or []:
        print(f"  {line[:200]}")
    if report.exists():
        print(f"report: {report}")
    if (device_dir / "HEADLINE.md").exists():
        print((device_dir / "HEADLINE.md").read_text())
    if args.out:
        print(f"packed {pack(Path(args.out), device_dir, report)}")
    failed = [e["stage"] for e in summary["stages"] if str(e.get("status", "ok")) not in ("ok", "resumed")
              and not str(e.get("status")).startswith("skipped")]  # fmt: skip
    return 1 if failed else 0


def tests_summary(log: Path) -> str | None:
    if not log.exists():
        return None
    lines = re.findall(r"^=*\s*(\d+ (?:passed|failed|error).*?)\s*=*$", log.read_text(), flags=re.M)
    return lines[-1] if lines else "no summary line (see logs/tests.log)"


def failed_tests(log: Path) -> list[str] | None:
    """The ids of the failed and erroring tests in pytest's short summary (``-rfE``), with the first line of each
    error: ``FAILED tests/...::test_x[case] - AssertionError: ...``."""
    if not log.exists():
        return None
    return re.findall(r"^((?:FAILED|ERROR) \S+.*)$", log.read_text(), flags=re.M)


if __name__ == "__main__":
    sys.exit(main())
