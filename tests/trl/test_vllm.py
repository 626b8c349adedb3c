"""Real vLLM on the CPU (vLLM's CPU build): ``PAPOTrainer`` generating with vLLM colocated, the weights checked after
every sync; generating through a vLLM server started here; the rubric judge against that server; and
``papo-train demo --use_vllm``.

Marked ``vllm``: skipped where vLLM is not installed; CI runs them in its own vLLM environment
(``.venv-vllm/bin/pytest -m vllm``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from transformers import Qwen2ForCausalLM

from papo_trl import PAPOConfig, PAPOTrainer
from papo_trl.demo.model import VLLM_MODEL, build_model, build_tokenizer
from papo_trl.demo.run import _no_checkpointing
from papo_trl.demo.task import make_splits
from papo_trl.rewards import RubricJudge
from papo_trl.vllm_cpu import CPU_SETTINGS

pytestmark = pytest.mark.vllm

TOKENIZER = build_tokenizer()
# a problem and its worked solution: the sequence whose log-probs vLLM and the trainer must agree on
SEQUENCE = TOKENIZER("12+3-4\n12+3=15\n15-4=11\n\\boxed{11}")["input_ids"]
SERVED_NAME = "papo-tiny"
# vLLM runs a float32 policy in bfloat16 when TRL colocates it (TRL passes no dtype): its log-probs then differ from
# the trainer's by the rounding of weights and activations to 8 bits of mantissa (at most 0.007 measured here); the
# server runs float32 (5e-7 measured). Every step moves them by more than 0.5.
BF16_TOLERANCE = 0.05
FP32_TOLERANCE = 1e-4


def training_args(output_dir, **overrides) -> PAPOConfig:
    """Two steps of 2 prompts x 4 samples of up to 8 tokens, on the CPU in float32; a learning rate high enough
    that every step moves the log-probs far more than the tolerances above."""
    kwargs = dict(
        output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=8, num_generations=4,
        max_completion_length=8, learning_rate=3e-2, logging_steps=1, report_to=[], use_cpu=True, bf16=False,
        save_strategy="no", dataloader_num_workers=0, seed=0, disable_tqdm=True, **_no_checkpointing(PAPOConfig),
    )  # fmt: skip
    return PAPOConfig(**{**kwargs, **overrides})


def rl_data():
    return make_splits(10, 32, 10, seed=0)["rl"]


def odd_digit_count(completions, **kwargs) -> list[float]:
    """Outcome reward: correct with an odd number of digits, about half of a random model's responses, so nearly
    every group has an advantage and every step moves the weights."""
    return [float(sum(c.isdigit() for c in text) % 2) for text in completions]


def digit_share(completions, **kwargs) -> list[float]:
    """Process reward: the share of digits, varying among the correct responses of a group."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def save_policy(directory: Path, tied: bool = True, max_positions: int = 128) -> Path:
    """The demo's model (seed 0) and tokenizer in ``directory``; untied: the same shapes with a separate output
    layer. A plain chat template lets the judge's chat requests through."""
    config = build_model(TOKENIZER, replace(VLLM_MODEL, max_position_embeddings=max_positions)).config
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(directory)
    return directory


@torch.no_grad()
def model_logprobs(model, ids=SEQUENCE) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 under the trainer's model, in float32."""
    logits = model(torch.tensor([ids], device=model.device)).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:], device=model.device)[:, None])[:, 0].cpu()


def prompt_logprobs(rows, ids=SEQUENCE) -> torch.Tensor:
    """The same log-probs from vLLM's ``prompt_logprobs`` (one ``{token id: logprob}`` per position, the first
    ``None``), as the offline engine or the server return them."""
    values = []
    for token, row in zip(ids[1:], rows[1:], strict=True):
        entry = row[token] if token in row else row[str(token)]
        values.append(entry.logprob if hasattr(entry, "logprob") else entry["logprob"])
    return torch.tensor(values)


def assert_synced_every_step(checks: list[tuple[torch.Tensor, torch.Tensor]], steps: int, tolerance: float):
    """One check per sync (before each step and after the last), vLLM's log-probs within ``tolerance`` of the
    trainer's, and every step moving them by far more than that: each check saw new weights."""
    assert len(checks) == steps + 1
    for served, trained in checks:
        assert (served - trained).abs().max() < tolerance, (served, trained)
    for (_, before), (_, after) in zip(checks, checks[1:], strict=False):
        assert (after - before).abs().max() > 10 * tolerance


def assert_trained(trainer, steps: int = 2):
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert trainer.state.global_step == steps and len(losses) == steps and all(map(math.isfinite, losses))


# ------------------------------------------------------------------------------------------------ colocated
@pytest.mark.parametrize("process", [True, False], ids=["papo_process_reward", "default"])
def test_colocate_generates_with_the_trainers_weights(tmp_path, process):
    from vllm import SamplingParams

    policy = save_policy(tmp_path / "policy")
    trainer = PAPOTrainer(
        model=str(policy), reward_funcs=odd_digit_count, args=training_args(tmp_path, use_vllm=True),
        process_reward_funcs=digit_share if process else None, train_dataset=rl_data(),
        processing_class=TOKENIZER,
    )  # fmt: skip
    assert trainer.args.advantage_estimator == ("papo" if process else "grpo")
    generation, checks = trainer.vllm_generation, []
    sync = generation.sync_weights

    def checked_sync():
        sync()
        params = SamplingParams(max_tokens=1, prompt_logprobs=0)
        (out,) = generation.llm.generate([{"prompt_token_ids": SEQUENCE}], params, use_tqdm=False)
        checks.append((prompt_logprobs(out.prompt_logprobs), model_logprobs(trainer.model)))

    generation.sync_weights = checked_sync
    trainer.train()
    checked_sync()  # the weights of the last step
    assert_synced_every_step(checks, steps=2, tolerance=BF16_TOLERANCE)
    assert_trained(trainer)
    assert any(key.startswith("sampling/importance_sampling_ratio") for key in trainer.state.log_history[0])


def test_demo_with_vllm(tmp_path, monkeypatch):
    from papo_trl.cli import main
    from papo_trl.demo import run

    micro = replace(run.QUICK, n_sft=200, n_eval=20, sft_steps=4, rl_steps=2, eval_every=1, n_eval_curve=8)
    monkeypatch.setattr(run, "QUICK", micro)
    assert main(["demo", "--quick", "--use_vllm", "--output_dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["generation"] == "vllm" and summary["non_finite"] == []
    train = summary["curves"]["papo"]["train"]
    assert len(train) == 2 and all("sampling/importance_sampling_ratio/mean" in row for row in train)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "summary.json"]


# ------------------------------------------------------------------------------------------------ a vLLM server
@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    model_dir: Path


def _listening_port(pid: int) -> int | None:
    import psutil

    ports = [c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    return ports[0] if ports else None


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """vLLM's OpenAI server (with its development endpoints) on a port the system picks, serving the untied demo
    model in float32, with a context long enough for the judge's prompts."""
    root = tmp_path_factory.mktemp("vllm_server")
    model_dir = save_policy(root / "model", tied=False, max_positions=2048)
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", "0", "--dtype", "float32",
        "--max-model-len", "2048", "--logprobs-mode", "processed_logprobs", "--seed", "0",
    ]  # fmt: skip
    env = {**os.environ, **CPU_SETTINGS, "VLLM_SERVER_DEV_MODE": "1"}
    log = root / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 900
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the vLLM server did not start:\n{log.read_text()[-4000:]}")
            port = _listening_port(process.pid)
            if port is not None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                        break
                except OSError:
                    pass
            time.sleep(1)
        yield Server(f"http://127.0.0.1:{port}", model_dir)
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        body = response.read()
    return json.loads(body) if body else {}


def test_server_mode_generates_through_a_vllm_server(vllm_server, tmp_path, monkeypatch):
    """TRL pushes weights to a vLLM server over NCCL, which needs CUDA: on the CPU this test alone replaces that
    push by a file and the server's ``reload_weights``, then reads the log-probs back from the server."""
    from trl.generation.vllm_client import VLLMClient
    from trl.generation.vllm_generation import VLLMGeneration

    checks = []

    def push_by_file(generation):
        directory = tmp_path / f"weights-{len(checks)}"
        generation.model.save_pretrained(directory)
        reload = {"method": "reload_weights", "kwargs": {"weights_path": str(directory)}}
        _post(f"{vllm_server.url}/collective_rpc", reload)
        generation.vllm_client.reset_prefix_cache()
        reply = _post(f"{vllm_server.url}/v1/completions", {
            "model": SERVED_NAME, "prompt": SEQUENCE, "max_tokens": 1, "prompt_logprobs": 0,
        })  # fmt: skip
        checks.append((prompt_logprobs(reply["choices"][0]["prompt_logprobs"]), model_logprobs(generation.model)))

    monkeypatch.setattr(VLLMClient, "init_communicator", lambda self, device=0: None)
    monkeypatch.setattr(VLLMGeneration, "sync_weights", push_by_file)
    args = training_args(tmp_path, use_vllm=True, vllm_mode="server", vllm_server_base_url=vllm_server.url)
    trainer = PAPOTrainer(
        model=str(vllm_server.model_dir), reward_funcs=odd_digit_count, process_reward_funcs=digit_share,
        args=args, train_dataset=rl_data(), processing_class=TOKENIZER,
    )  # fmt: skip
    trainer.train()
    push_by_file(trainer.vllm_generation)  # the weights of the last step
    assert_synced_every_step(checks, steps=2, tolerance=FP32_TOLERANCE)
    assert_trained(trainer)
    assert any(key.startswith("sampling/importance_sampling_ratio") for key in trainer.state.log_history[0])


def test_rubric_judge_against_a_vllm_server(vllm_server, tmp_path):
    """A tiny model with random weights answers the rubric with noise: every verdict is unparseable (or empty), so
    every score is ``None``, counted by kind, and training goes on with the outcome advantages."""
    judge = RubricJudge(f"{vllm_server.url}/v1", SERVED_NAME, max_tokens=8, temperature=0.0, max_retries=0)
    trainer = PAPOTrainer(
        model=build_model(TOKENIZER, VLLM_MODEL), reward_funcs=odd_digit_count,
        process_reward_funcs=judge, args=training_args(tmp_path), train_dataset=rl_data(),
        processing_class=TOKENIZER,
    )  # fmt: skip
    trainer.train()
    assert_trained(trainer)
    steps = [row for row in trainer.state.log_history if "loss" in row]
    for row in steps:  # the judge grades the correct responses, one request each
        verdicts = row["judge/failures/unparseable"] + row["judge/failures/empty"]
        assert row["judge/failures"] == verdicts == row["judge/completions"] == row["judge/requests"] > 0
        assert row["judge/scored"] == 0 and row["process_rewards/scored_frac"] == 0
    assert any(row["grad_norm"] > 0 for row in steps)  # the outcome advantages train
