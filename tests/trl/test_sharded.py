"""Sharded training on CPU: two gloo processes under the shipped FSDP2 and DeepSpeed ZeRO-3 recipes (made to fit
here: 2 processes, ``use_cpu``, fp32) train the tiny Qwen2 as one process does on the same global batch.

For TRL's loss (``use_fused_loss=False``), the fused linear-head loss (tied head, which the backbone's FSDP unit
gathers) and the fused loss with an untied head that is sharded on its own (a DTensor under FSDP2, a partitioned
parameter under ZeRO-3), and DARO with gradient accumulation: the per-step loss, gradient norm and entropy, the
gathered advantages and the final weights equal the single-process run's within 1e-4; the head is gathered once
per step (ZeRO-3 may gather it once more, for the backward), never per token chunk. Every run packs its micro-batches
(``padding_free``); in fp64, packed and padded runs of the fused loss with the sharded head and DARO over an
accumulation window agree to 1e-10 under each backend, and with the single process. Under FSDP2, a DARO run
resumed from its step-2 checkpoint gets back its DARO weights and optimiser state and continues the uninterrupted
curve. Setups that cannot work fail at start-up on both processes, naming the option.
The worker is ``sharded_run.py``.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("sharded_run.py")
RECIPES = ROOT / "examples" / "accelerate"
RUNS = ("trl_loss", "fused_linear", "fused_linear_sharded_head", "daro")
TOL, FP64_TOL = 1e-4, 1e-10


def _env() -> dict:
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1"),
            "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}  # fmt: skip


def _run(cmd: list[str], timeout: int) -> None:
    run = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]


def cpu_config(recipe: str, path: Path) -> Path:
    """The shipped 8 x H100 recipe with only what a 2-core CPU run changes: 2 processes, CPU, fp32."""
    config = yaml.safe_load((RECIPES / recipe).read_text())
    config.update(num_processes=2, use_cpu=True, gpu_ids="all")
    if "mixed_precision" in config:
        config["mixed_precision"] = "no"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(recipe: str, out: Path) -> Path:
    config = cpu_config(recipe, out / "accelerate.yaml")
    # port 0: the launcher binds the rendezvous port itself, whichever ports are free or taken
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", "0", str(WORKER), str(out)]  # fmt: skip
    _run(cmd, timeout=420)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single_process")
    _run([sys.executable, str(WORKER), str(out)], timeout=420)
    return out


def load(out: Path, name: str) -> tuple[dict, dict]:
    return json.loads((out / f"{name}.json").read_text()), torch.load(out / f"{name}.pt", weights_only=True)


def assert_same_training(ref, got, keys=("loss", "grad_norm", "entropy"), tol: float = TOL):
    (ref_log, ref_weights), (log, weights) = ref, got
    assert [c["step"] for c in log["curve"]] == [c["step"] for c in ref_log["curve"]]
    for want, have in zip(ref_log["curve"], log["curve"], strict=True):
        for key in keys:
            assert have[key] == pytest.approx(want[key], abs=tol), (key, have["step"])
    assert len(log["advantages"]) == len(ref_log["advantages"])
    for want, have in zip(ref_log["advantages"], log["advantages"], strict=True):
        assert have == pytest.approx(want, abs=tol)
    assert set(weights) == set(ref_weights)
    for name, want in ref_weights.items():
        torch.testing.assert_close(weights[name], want, rtol=0, atol=tol, msg=name)


def check_runs(ref: Path, out: Path, backend: str) -> dict[str, dict]:
    logs = {}
    for name in RUNS:
        got = load(out, name)
        assert got[0]["backend"] == backend
        keys = ("loss", "grad_norm") if name == "daro" else ("loss", "grad_norm", "entropy")  # entropy: per micro-batch
        assert_same_training(load(ref, name), got, keys)
        logs[name] = got[0]
    keys = ("loss", "grad_norm", "daro/weight_k1", "daro/weight_k3")
    padded = load(out, "fp64_padded")
    assert padded[0]["backend"] == backend
    assert_same_training(padded, load(out, "fp64_packed"), keys, tol=FP64_TOL)
    assert_same_training(load(ref, "fp64_padded"), padded, keys)  # sums over the processes in another order
    return logs


def check_bad_setups(out: Path) -> None:
    errors = json.loads((out / "bad_setups.json").read_text())
    assert "`use_fused_loss=True`" in errors["tensor_parallel_head"]
    assert "tensor-parallel head" in errors["tensor_parallel_head"]
    assert "`generation_batch_size` (6)" in errors["stale_batch_geometry"]
    assert "`per_device_train_batch_size`" in errors["stale_batch_geometry"]


@pytest.mark.slow
def test_fsdp2_matches_single_process_and_resumes(reference, tmp_path):
    out = launch("fsdp2_vllm_server.yaml", tmp_path)
    logs = check_runs(reference, out, "FSDP")
    # the untied head is a DTensor shard in the forward: one all-gather, one reduce-scatter of it per step
    head = list(load(reference, "fused_linear_sharded_head")[1]["lm_head.weight"].shape)
    gathers = logs["fused_linear_sharded_head"]["gathers"]
    assert gathers == [[["all_gather_single", head], ["reduce_scatter_single", head]]] * len(logs["trl_loss"]["curve"])

    resumed, uninterrupted = load(out, "daro_resumed"), load(out, "daro")
    for rank in resumed[0]["ranks"]:
        assert rank["loaded_daro"] == rank["saved_daro"] and rank["loaded_daro_step"] == 2
        assert rank["optimizer_tensors"] > 0 and rank["optimizer_max_abs_diff"] == 0.0
    uninterrupted[0]["advantages"] = uninterrupted[0]["advantages"][2:]  # the resumed trainer generated steps 3-4
    assert_same_training(uninterrupted, resumed, keys=("loss", "grad_norm", "daro/weight_k1", "daro/weight_k3"))
    check_bad_setups(out)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_zero3_matches_single_process(reference, tmp_path):
    out = launch("zero3_vllm_server.yaml", tmp_path)
    logs = check_runs(reference, out, "DEEPSPEED")
    # the partitioned head: gathered in the forward; at most once more, for the backward (ZeRO-3 re-fetches the
    # parameters of the model it saw used in the forward unless they are still resident)
    head = list(load(reference, "fused_linear_sharded_head")[1]["lm_head.weight"].shape)
    for step in logs["fused_linear_sharded_head"]["gathers"]:
        assert step and len(step) <= 2 and all(g == ["zero3_all_gather", head] for g in step)
    check_bad_setups(out)
