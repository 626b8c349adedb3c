"""The benchmark suite: the GPU check's --quick path end to end (CI's smoke run), its parts, and every --help.

Real numbers come from a GPU (``bash benchmarks/gpu_check.sh``); here the kernels run through Triton's interpreter.
"""

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import gpu_check, harness, report
from benchmarks.reference import LogitsReference, linear_reference, without_entropy_bonus
from papo_kernels import PolicyLossConfig
from papo_kernels.loss import naive_policy_loss

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))
CONFIG = PolicyLossConfig(loss_type="dapo", beta=0.04, entropy_coef=0.01, temperature=0.7)
BENCHMARKS = ("advantages", "policy_loss", "fused_linear", "trainer_step")


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "TRITON_INTERPRET": "1",
            "PAPO_BENCH_RESULTS": str(tmp_path / "results"), "PAPO_WHEELS": str(tmp_path / "no-wheels")}  # fmt: skip


SPREAD = {f"{m}{s}" for m in ("gpu_ms", "wall_ms") for s in ("", "_min", "_max")} | {"gpu_samples", "wall_samples"}
FIELDS = SPREAD | {"kernels", "syncs", "peak_mib", "floor_ms", "fraction_of_floor", "first_call_s"}


def test_gpu_check_quick_path(tmp_path):
    """Every stage of the one command on CPU: rows with samples and spreads, parity recorded (the term cases too),
    the training step's time split, a report with plots."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--quick", "--out", str(tmp_path / "out")],
                         cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    cpu = tmp_path / "results" / "cpu"
    summary = json.loads((cpu / "gpu_check.json").read_text())
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert status == {"install": "ok", "env": "ok", "floors": "ok", "tests": "skipped: no CUDA", "report": "ok",
                      "fused_linear_profile": "ok", **dict.fromkeys(BENCHMARKS, "ok")}  # fmt: skip
    assert summary["tests"] is None and summary["failed_tests"] is None
    for name in BENCHMARKS:
        rows = json.loads((cpu / f"{name}.json").read_text())["rows"]
        assert rows and all(r["status"] == "ok" for r in rows), rows
        for r in rows:
            assert FIELDS <= r.keys()
            assert r["gpu_samples"] >= harness.FEWEST_SAMPLES and r["gpu_ms_min"] <= r["gpu_ms"] <= r["gpu_ms_max"]
            assert r["gpu_ms_min"] > 0 and r["fraction_of_floor"] > 0
        ours = [r for r in rows if r["method"] in ("fused", "papo_packed")]
        assert ours and all(r.get("parity_ok", True) for r in ours), ours
    policy = json.loads((cpu / "policy_loss.json").read_text())["rows"]
    assert {r["method"] for r in policy} >= {"fused", "fused_inplace", "fused_inplace_no_entropy", "trl_kernel",
                                             "trl_eager"}  # fmt: skip
    assert all(r["live_tokens"] < r["tokens"] and r["rel_err_grad"] < 1e-2 for r in policy if "fused" in r["method"])
    for name in ("policy_loss_terms", "fused_linear_terms"):
        terms = json.loads((cpu / f"{name}.json").read_text())["rows"]
        assert {r["case"] for r in terms} == {"mixed", "policy_gradient_only", "kl_only", "entropy_bonus_only"}
        assert all(r["parity_ok"] for r in terms if r["method"] == "fused"), terms
    trainer = json.loads((cpu / "trainer_step.json").read_text())["rows"]
    assert {r["method"] for r in trainer} == {"trl_default", "papo_padded", "papo_packed"}
    assert all(r["rel_err_grad"] < 1e-4 and r["pad"] > 0 for r in trainer if r["method"] != "trl_default")
    for r in trainer:
        assert r["profile_samples"] == 5 and all(r[f"{c}_ms"] > 0 for c in ("attention", "mlp", "lm_head_loss",
                                                                             "optimizer")), r  # fmt: skip
    assert "Liger peer is skipped" in (cpu / "logs" / "policy_loss.log").read_text()
    text = (cpu / "REPORT.md").read_text()
    assert all(f"### {name}" in text for name in BENCHMARKS) and "plots/" in text
    assert len(list((cpu / "plots").glob("*.png"))) >= len(BENCHMARKS)
    assert (tmp_path / "out" / "gpu_check.tar.gz").stat().st_size > 0


HELP_DRIVER = """
import contextlib, io, json, runpy, sys
out = {}
for path in sys.argv[1:]:
    sys.argv, buf, code = [path, "--help"], io.StringIO(), None
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        code = e.code
    out[path] = [code, buf.getvalue()]
print(json.dumps(out))
"""


def test_every_script_takes_help_and_runs_nothing(tmp_path):
    """``--help`` of every script (one interpreter runs them all) prints usage and writes no result."""
    scripts = [str(s) for s in SCRIPTS if 'if __name__ == "__main__":' in s.read_text()]
    env = {**_env(tmp_path), "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), _env(tmp_path)["PYTHONPATH"]])}
    out = subprocess.run([sys.executable, "-c", HELP_DRIVER, *scripts], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(results) >= 9
    for path, (code, text) in results.items():
        assert code in (0, None) and text.startswith("usage:"), (path, code, text[:300])
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("pad", [0, 3])
def test_logits_reference_is_the_exact_loss_and_gradient(pad):
    g = torch.Generator().manual_seed(pad)
    B, T, V = 3, 5, 11
    x = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    ids, adv = torch.randint(0, V, (B, T), generator=g), torch.randn(B, generator=g, dtype=torch.float64)
    ref = -torch.rand(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.int64)
    mask[:, T - pad :] = 0
    leaf = x.clone().requires_grad_()
    for config in (CONFIG, without_entropy_bonus(CONFIG)):
        loss = naive_policy_loss(leaf, ids, mask, adv, ref_logps=ref, config=config).loss
        (grad,) = torch.autograd.grad(loss, leaf)
        exact = LogitsReference(x.float(), ids, mask, adv, ref_logps=ref, chunk_rows=4)
        parity = exact.parity(loss, grad, config)
        assert parity["rel_err_loss"] < 1e-6 and parity["rel_err_grad"] < 1e-6
        assert exact.grad_error(grad * 1.01, config) == pytest.approx(0.01, rel=1e-3)


def test_linear_reference_is_the_exact_loss_and_gradients():
    g = torch.Generator().manual_seed(0)
    B, T, D, V = 2, 6, 8, 13
    h, w = torch.randn(B, T, D, generator=g), torch.randn(V, D, generator=g) / 2
    ids, adv = torch.randint(0, V, (B, T), generator=g), torch.randn(B, generator=g)
    ref, mask = -torch.rand(B, T, generator=g), torch.ones(B, T, dtype=torch.int64)
    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    loss = naive_policy_loss(hd @ wd.t(), ids, mask, adv, ref_logps=ref, config=CONFIG).loss
    expected = (loss, *torch.autograd.grad(loss, (hd, wd)))
    got = linear_reference(h, w, ids, mask, adv, CONFIG, ref_logps=ref, chunk_rows=5)
    for a, b in zip(got, expected, strict=True):
        assert harness.rel_err(a, b) < 1e-5


@pytest.fixture
def results_root(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    yield tmp_path
    gc.unfreeze()  # Results freezes the objects alive when it starts


def test_rows_record_failures_and_resume(results_root):
    fl = {"copy_gbs": 1.0, "matmul_tflops": 1.0, "peak": {"hbm_tbs": 2e-3, "bf16_tflops": 1.0}}
    results = harness.Results("demo", floors=fl)
    ok = results.run({"method": "ok"}, lambda: lambda: torch.ones(3).sum(), work=dict(nbytes=1e6))
    assert ok["status"] == "ok" and ok["floor_ms"] == pytest.approx(1.0) and ok["peak_ms"] == pytest.approx(0.5)
    assert ok["fraction_of_floor"] == 1.0 / ok["gpu_ms"] and ok["fraction_of_peak"] == 0.5 / ok["gpu_ms"]
    assert ok["gpu_samples"] >= harness.MIN_SAMPLES and ok["gpu_ms_min"] <= ok["gpu_ms"] <= ok["gpu_ms_max"]

    def boom():
        raise RuntimeError("peer exploded\nsecond line")

    assert results.run({"method": "bad"}, lambda: boom)["status"] == "crashed: RuntimeError: peer exploded"
    slow = results.run({"method": "slow"}, lambda: lambda: time.sleep(5), limit_s=0.5)
    assert slow["status"].startswith("timeout")
    parity = results.run({"method": "parity"}, lambda: lambda: 1, check=lambda out: {"parity_ok": out == 1},
                         timed=False)  # fmt: skip
    assert parity["parity_ok"] and "gpu_ms" not in parity and parity["status"] == "ok"
    results.rows.append({"method": "hung", "status": "running"})  # a process that died in the middle of a row
    results.save()
    again = harness.Results("demo", resume=True)
    assert [r["status"].split(":")[0] for r in again.rows] == ["ok", "crashed", "timeout", "ok", "crashed"]
    assert again.run({"method": "ok"}, lambda: pytest.fail("measured twice")) is None
    assert harness.Results("demo").rows == []  # without --resume a run starts afresh


def test_sample_count_gives_ten_samples_or_a_second():
    """At least 10 samples, or at least 1 s of them where 10 would take longer (never fewer than 3); fast calls get
    more, up to the budget."""
    assert harness.sample_count(50.0) == 10 and harness.sample_count(100.0) == 10
    assert harness.sample_count(150.0) == 7 and harness.sample_count(2000.0) == 3
    assert harness.sample_count(1.0) == 100 and harness.sample_count(1e-4) == harness.MAX_SAMPLES
    for est in (0.01, 3.0, 99.0, 101.0, 333.0, 600.0):
        n = harness.sample_count(est)
        assert n >= 10 or (n * est >= harness.MIN_TIMING_MS and n >= 3), (est, n)
    assert harness.spread("gpu_ms", [3.0, 1.0, 2.0]) == {"gpu_ms": 2.0, "gpu_ms_min": 1.0, "gpu_ms_max": 3.0,
                                                          "gpu_samples": 3}  # fmt: skip


def test_split_calls_by_profiler_window():
    """Each profiled call's device activities are those that start inside its window."""
    windows = [(0.0, 10.0), (12.0, 20.0)]
    events = [("k1", 1.0, 3.0), ("k2", 4.0, 9.0), ("Memcpy DtoH", 13.0, 14.0), ("late", 30.0, 31.0)]
    assert harness.split_calls(windows, events) == [events[:2], events[2:3]]
    ranges = [harness.CALL, "Optimizer.step#AdamW.step"]
    event = lambda name, annotation=False: SimpleNamespace(name=name, is_user_annotation=annotation)  # noqa: E731
    assert [harness.device_annotation(event(n)) for n in ranges] == [True, True]
    assert not harness.device_annotation(event("void cutlass::Kernel<sm90_gemm>(Params)"))
    assert harness.device_annotation(event("anything", annotation=True))


def test_failed_test_ids_from_pytest_summary(tmp_path):
    log = tmp_path / "tests.log"
    log.write_text("...F.E\n=== short test summary info ===\nFAILED tests/kernels/test_a.py::test_x[3] - Assertion"
                   "Error: 1 != 2\nERROR tests/kernels/test_b.py::test_y - RuntimeError: CUDA\n"
                   "=== 1 failed, 4 passed, 1 error in 2.00s ===\n")  # fmt: skip
    assert gpu_check.failed_tests(log) == ["FAILED tests/kernels/test_a.py::test_x[3] - AssertionError: 1 != 2",
                                           "ERROR tests/kernels/test_b.py::test_y - RuntimeError: CUDA"]  # fmt: skip
    assert gpu_check.tests_summary(log) == "1 failed, 4 passed, 1 error in 2.00s"
    assert gpu_check.failed_tests(tmp_path / "none.log") is None


def test_device_slug():
    assert harness.device_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert harness.device_slug("NVIDIA H200") == "h200"


def test_stage_limits_and_resume(tmp_path):
    runner = gpu_check.Runner(60, dict(os.environ), tmp_path)
    t0 = time.monotonic()
    hang = runner.run(gpu_check.Stage("hang", 2, [sys.executable, "-c", "import time; time.sleep(60)"]), reserve=0)
    assert hang["status"] == "timeout" and hang["rc"] == 124 and time.monotonic() - t0 < 20
    flaky = tmp_path / "flaky.py"
    flaky.write_text(f"import sys; sys.exit(0 if '--resume' in sys.argv else {gpu_check.RESUME_EXIT})")
    entry = runner.run(gpu_check.Stage("flaky", 30, [sys.executable, str(flaky)], resumable=True), reserve=0)
    assert entry["status"] == "ok" and entry["attempts"] == 2
    late = gpu_check.Runner(30, dict(os.environ), tmp_path)
    optional = late.run(gpu_check.Stage("e2e", 30, [sys.executable, "-c", "pass"], optional=True), reserve=0)
    assert optional["status"] == "out of time" and optional["attempts"] == 0


def test_datasets_stand_in_where_datasets_does_not_import(tmp_path, monkeypatch):
    """A datasets that fails to import (say, too old a pyarrow) is replaced by the stand-in, and TRL's trainer
    utilities, which the TRL peers need, import with it."""
    broken = tmp_path / "broken" / "datasets"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('pyarrow is too old')\n")
    monkeypatch.setattr(gpu_check, "WHEELS", tmp_path / "no-wheels")
    env = gpu_check.child_env(cuda=False)
    env["PYTHONPATH"] = os.pathsep.join([str(broken.parent), env["PYTHONPATH"]])
    entry = gpu_check.install_wheels(env, tmp_path)
    assert "pyarrow is too old" in entry["import_errors"]["datasets"]
    assert entry["import_errors"]["trl.trainer.utils"] is None and env["PAPO_DATASETS_STAND_IN"] == "1"
    out = subprocess.run([sys.executable, "-c", "import datasets; print(datasets.__version__)"], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.stdout.strip() == "0.0.0+stand-in"


def _row(method, ms, spread=0.1, **kw):
    timing = {} if ms is None else {"gpu_ms": ms, "gpu_ms_min": ms - spread, "gpu_ms_max": ms + spread,
                                    "gpu_samples": 10, "wall_ms": ms, "wall_ms_min": ms, "wall_ms_max": ms,
                                    "wall_samples": 10}  # fmt: skip
    return {"method": method, "V": 151936, "tokens": 16384, "pad": 0.25, "status": "ok", **timing,
            "fraction_of_floor": 0.8, "fraction_of_peak": 0.7, "parity_ok": True, **kw}  # fmt: skip


def test_report_headline_and_readme(tmp_path, monkeypatch):
    """The headline pairs ours with each peer: times as median [min-max] (n), the ratio from the medians with the
    range the spreads allow, where a peer is faster, and the CUDA suite's result with the failed tests' ids."""
    folder = tmp_path / "h100-80gb-hbm3"
    folder.mkdir()
    rows = [_row("fused", 4.0), _row("fused_inplace_no_entropy", 3.0), _row("liger", 2.5, parity_ok=False),
            _row("trl_kernel", 6.0, spread=1.0),
            {**_row("trl_eager", None), "status": "crashed: IndexError: list index out of range"}]  # fmt: skip
    env = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "time": "2026-12-01T10:00:00", "commit": "abc1234"}
    (folder / "policy_loss.json").write_text(json.dumps({"benchmark": "policy_loss", "env": env, "rows": rows}))
    (folder / "env.json").write_text(json.dumps(env))
    check = {"total_s": 400, "budget_s": 480, "stages": [], "tests": "1 failed, 9 passed",
             "failed_tests": ["FAILED tests/kernels/test_a.py::test_x - AssertionError"]}  # fmt: skip
    (folder / "gpu_check.json").write_text(json.dumps(check))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- performance:start -->\nold table\n<!-- performance:end -->\nrest\n")
    monkeypatch.setattr(report, "README", readme)
    report.main(["--readme"])
    measure = "| loss from logits, V=151,936, 16k"
    lines = [ln.split(" | ") for ln in readme.read_text().splitlines() if ln.startswith(measure)]
    by_peer = {cells[2]: cells[3:] for cells in lines}
    liger = by_peer["Liger, both in place without the entropy bonus \u2020"]
    assert liger[:3] == ["3 ms [2.9 ms-3.1 ms] (n=10)", "2.5 ms [2.4 ms-2.6 ms] (n=10)", "0.83 [0.77-0.90]"]
    assert liger[-1] == "0.80, 0.70 |"
    assert by_peer["TRL's kernel path + eager loss"][2] == "1.50 [1.22-1.79]"
    assert by_peer["TRL's eager path"][1:3] == ["crashed", "-"]
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("rest\n") and "abc1234" in text
    assert "1 failed, 9 passed" in text and "test_a.py::test_x" in text
    assert "Liger, both in place without the entropy bonus is faster than `fused_inplace_no_entropy`" in text
    assert "every sample" in text and "TRL's kernel path + eager loss is faster" not in text
    assert "ratio_to_fused" in (tmp_path / "REPORT.md").read_text()


def test_report_of_a_run_without_spreads(tmp_path, monkeypatch):
    """An older run's rows (a median only, one square GEMM for the floors, no failed tests' ids) say so."""
    folder = tmp_path / "h200"
    folder.mkdir()
    rows = [{k: v for k, v in _row(m, ms).items() if not k.endswith(("_min", "_max", "_samples"))}
            for m, ms in (("fused", 4.0), ("trl_kernel", 5.0))]  # fmt: skip
    floors = {"copy_gbs": 4000.0, "matmul_tflops": 700.0, "matmul_n": 8192, "matmul_dtype": "bfloat16"}
    (folder / "policy_loss.json").write_text(json.dumps({"benchmark": "policy_loss", "env": {}, "floors": floors,
                                                         "rows": rows}))  # fmt: skip
    (folder / "gpu_check.json").write_text(json.dumps({"total_s": 258, "budget_s": 470, "stages": [],
                                                       "tests": "38 failed, 270 passed, 5 skipped"}))  # fmt: skip
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    report.main(["--out", str(tmp_path / "REPORT.md")])
    text = (folder / "HEADLINE.md").read_text()
    assert "4 ms (median only)" in text and "1.25 (medians only)" in text
    assert "38 failed" in text and "ids of the failed tests were not recorded" in text
    assert "from one square GEMM" in text and "too high" in text


def test_judge_benchmark_smoke(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/bench_judge.py", "--quick"], cwd=ROOT, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "results" / "cpu" / "judge.json").read_text())["rows"]
    assert [r["concurrency"] for r in rows] == [1, 16, 64] and all(r["requests_per_s"] > 0 for r in rows)


def _x(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": args}


def test_fused_linear_timeline_roles_and_gaps(monkeypatch):
    """The profile stage's reading of a chrome trace: each device event's role from the op that launched it (the
    GEMM from its shapes), the time in each role, and the gaps left by the busy intervals of every stream."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_fused_linear as bench

    C, D, V = 3, 4, 10
    trace = {"traceEvents": [
        _x("cpu_op", "aten::mm", 0, 10, **{"Input Dims": [[C, D], [D, V], [C, V]]}),
        _x("cuda_runtime", "cudaLaunchKernel", 2, 1, correlation=1),
        _x("kernel", "sm90_xmma_gemm", 100, 50, tid=7, correlation=1, stream=7),
        _x("cuda_driver", "cuLaunchKernelEx", 20, 1, correlation=2),
        _x("kernel", "_rows", 140, 20, tid=8, correlation=2, stream=8),  # overlaps the GEMM on another stream
        _x("cpu_op", "aten::mm", 30, 10, **{"Input Dims": [[C, V], [V, D], [], [C, D]]}),
        _x("cuda_runtime", "cudaLaunchKernel", 31, 1, correlation=3),
        _x("cuda_runtime", "cudaLaunchKernel", 33, 1, correlation=4),
        _x("kernel", "gemm_split_k", 180, 10, tid=7, correlation=3, stream=7),
        _x("kernel", "splitKreduce_kernel", 190, 5, tid=7, correlation=4, stream=7),
        _x("cpu_op", "aten::addmm", 40, 10, **{"Input Dims": [[V, D], [V, C], [C, D], [], [V, D]]}),
        _x("cuda_runtime", "cudaLaunchKernel", 41, 1, correlation=5),
        _x("kernel", "gemm_acc", 200, 30, tid=7, correlation=5, stream=7),
        _x("cpu_op", "aten::_local_scalar_dense", 50, 5),
        _x("cuda_runtime", "cudaMemcpyAsync", 51, 1, correlation=6),
        _x("gpu_memcpy", "Memcpy DtoH (Device -> Pageable)", 240, 2, tid=7, correlation=6, stream=7),
        _x("cpu_op", "aten::to", 60, 9),
        _x("cpu_op", "aten::copy_", 61, 5),
        _x("cuda_runtime", "cudaLaunchKernel", 62, 1, correlation=7),
        _x("kernel", "elementwise_kernel", 250, 5, tid=7, correlation=7, stream=7),
    ]}  # fmt: skip
    t = bench.timeline(trace, D, V)
    roles = {role: (v["launches"], v["us"]) for role, v in t["by_role"].items()}
    assert roles == {"G1 logits": (1, 50), "row kernel": (1, 20), "G2 grad_h": (2, 15), "G3 grad_W": (1, 30),
                     "check": (1, 2), "aten::copy_": (1, 5)}  # fmt: skip
    assert (t["launches"], t["window_us"], t["busy_us"], t["gap_us"], t["matmul_us"]) == (7, 155, 112, 43, 95)
    assert all(k["reason"] for k in t["kernels"]) and t["timeline"][0]["start"] == 0
    assert bench.matmul_role([[V, C], [C, D], [V, D]], D, V) == "G3 grad_W"
    assert bench.profile_markdown([{**t, "method": "fused", "head": "h", "tokens": C, "chunks": [C], "floor_ms": 0.1,
                                    "fraction_of_floor": 0.6}]).count("| G2 grad_h | 2 | 15 |") == 1  # fmt: skip
    model = bench.model_markdown().splitlines()
    assert len(model) == 2 + 3 * len(bench.HEADS) * len(bench.SWEEP)


def test_training_step_time_split(monkeypatch):
    """The trainer-step profile on a tiny Qwen2 on CPU: a backward op counts where its forward op ran (attention's
    backward in attention, the MLP's SiLU in mlp), AdamW in optimizer, the loss outside the decoder in
    lm_head_loss; every category has time and the busy time fits the step's window."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_trainer_step as bench
    from torch.profiler import ProfilerActivity, profile, record_function

    model = bench.build_model(bench.model_config(True), "cpu", torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.model = model
    step()
    with bench.annotated(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function(bench.TAG + "step"):
            step()
    events = prof.events()
    category = bench.categorizer(events)
    named = {}
    for e in events:
        named.setdefault(e.name, set()).add(category(e))
    assert named["SiluBackward0"] == {"mlp"} and named["aten::silu"] == {"mlp"}
    assert {c for name, cats in named.items() if "AttentionForCpuBackward" in name for c in cats} == {"attention"}
    assert named["aten::addcdiv_"] == {"optimizer"} and named["NllLossBackward0"] == {"lm_head_loss"}
    assert named["EmbeddingBackward0"] == {"other"}
    split = bench.profile_steps(step, steps=3)
    assert split["profile_samples"] == 3 and all(split[f"{c}_ms"] > 0 for c in bench.CATEGORIES), split
    assert 0 < split["busy_ms"] <= split["window_ms"] and split["gaps_ms"] >= 0
