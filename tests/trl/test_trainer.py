"""PAPOTrainer end to end on a tiny Qwen2 model (CPU): every estimator, GRPO equivalence, PEFT, bad configurations."""

import math

import pytest
import torch
from datasets import IterableDataset
from trl import GRPOConfig, GRPOTrainer

from papo_kernels.advantages.naive import naive_papo_advantages
from papo_trl import PAPOTrainer
from tests.trl.tiny import (
    digit_outcome_reward,
    digit_process_reward,
    tiny_args,
    tiny_dataset,
    tiny_model,
    tiny_tokenizer,
)

TOKENIZER = tiny_tokenizer()


def make_trainer(tmp_path, process=(digit_process_reward,), reward_funcs=(digit_outcome_reward,), model=None,
                 trainer_class=PAPOTrainer, args=None, **overrides):  # fmt: skip
    args = args or tiny_args(tmp_path, **overrides)
    kwargs = {"process_reward_funcs": list(process)} if trainer_class is PAPOTrainer else {}
    return trainer_class(
        model=model or tiny_model(TOKENIZER),
        reward_funcs=list(reward_funcs),
        args=args,
        train_dataset=tiny_dataset(),
        processing_class=TOKENIZER,
        **kwargs,
    )


def train_logs(trainer):
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("estimator", ["papo", "papo_fullnorm", "grpo", "dr_grpo", "gdpo", "daro"])
def test_every_estimator_trains(tmp_path, estimator):
    trainer = make_trainer(tmp_path, advantage_estimator=estimator)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    logs = train_logs(trainer)
    assert len(logs) == 2
    for log in logs:
        assert math.isfinite(log["loss"]) and math.isfinite(log["papo/advantage/std"])
        assert 0.0 <= log["papo/zero_advantage_frac"] <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    keys = set().union(*logs)
    if estimator in ("papo", "papo_fullnorm", "dr_grpo"):
        assert {"papo/A_out/mean", "papo/A_proc/std", "papo/process_active_ratio"} <= keys
    if estimator == "daro":
        assert {"daro/weight_k1", "daro/weight_k2", "daro/weight_k3", "daro/objective"} <= keys
    assert {"process_rewards/digit_process_reward/mean", "papo/adv_correct/min", "papo/adv_incorrect/mean"} <= keys


def test_papo_advantages_and_process_calls(tmp_path):
    """Advantages are PAPO's on the gathered rewards; the judge only ever sees correct responses."""
    judged = []

    def judge(completions, **kwargs):
        judged.extend(completions)
        return [None if i == 0 else digit_process_reward([c])[0] for i, c in enumerate(completions)]

    trainer = make_trainer(tmp_path, process=(judge,), max_steps=1, lambda_process=0.5)
    captured = []
    set_advantages = trainer._set_advantages

    def spy(output, rewards_per_func, process, G, mode, *args):
        out = set_advantages(output, rewards_per_func, process, G, mode, *args)
        captured.append((rewards_per_func.clone(), process.clone(), out["advantages"].clone()))
        return out

    trainer._set_advantages = spy
    trainer.train()
    rewards, process, advantages = captured[0]
    correct = rewards[:, 0] >= 1.0
    assert judged and all(digit_outcome_reward([c])[0] == 1.0 for c in judged)
    assert torch.isnan(process[~correct]).all()
    assert torch.isnan(process[correct]).any()  # the judge's None is left out, not scored 0
    options = dict(lambda_process=0.5, eps=1e-6, scale_by_std=True, process_norm="correct")
    ref = naive_papo_advantages(rewards[:, 0], process[:, 0], correct, 4, **options)
    torch.testing.assert_close(advantages, ref.total, atol=1e-5, rtol=1e-5)
    assert list(trainer._logs["advantages"]) == advantages.tolist()  # the completions table shows ours, not TRL's


@pytest.mark.parametrize("config_class", [None, GRPOConfig])
def test_grpo_estimator_reproduces_grpo_trainer(tmp_path, config_class):
    """Seeded runs log the same rewards and (to float rounding) the same losses as TRL's GRPOTrainer."""
    common = dict(max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2, use_fused_loss=False)
    reference = make_trainer(tmp_path / "grpo", trainer_class=GRPOTrainer, model=tiny_model(TOKENIZER, seed=3),
                             args=tiny_args(tmp_path / "grpo", config_class=GRPOConfig,
                                            **{k: v for k, v in common.items() if k != "use_fused_loss"}))  # fmt: skip
    expected = train_logs(reference)  # trained before ours is built: both start from the seed set at construction
    if config_class is GRPOConfig:  # a plain GRPOConfig is taken as advantage_estimator="grpo"
        args = tiny_args(tmp_path / "papo", config_class=GRPOConfig,
                         **{k: v for k, v in common.items() if k != "use_fused_loss"})  # fmt: skip
    else:
        args = tiny_args(tmp_path / "papo", advantage_estimator="grpo", **common)
    ours = make_trainer(tmp_path / "papo", process=(), model=tiny_model(TOKENIZER, seed=3), args=args)
    got = train_logs(ours)
    assert len(expected) == len(got) == 3
    for e, g in zip(expected, got, strict=True):
        for key in ("reward", "reward_std", "rewards/digit_outcome_reward/mean", "num_tokens"):
            assert g[key] == e[key], key
        for key in ("loss", "grad_norm", "entropy"):
            assert g[key] == pytest.approx(e[key], rel=1e-4, abs=1e-7), key


def one_correct_per_group(completions, **kwargs):
    """The first response of every group of 4 is correct: every group is in pass-rate bucket k = 1."""
    return [float(i % 4 == 0) for i in range(len(completions))]


def test_daro_with_one_bucket_and_unit_weight_is_trl_dapo(tmp_path):
    """With every group in one bucket and w = 1, DARO's loss is the token mean over the batch: TRL's dapo loss,
    including its data-parallel and accumulation normalisation."""
    common = dict(max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2, loss_type="dapo")
    reference = make_trainer(tmp_path / "grpo", trainer_class=GRPOTrainer, reward_funcs=(one_correct_per_group,),
                             model=tiny_model(TOKENIZER, seed=5),
                             args=tiny_args(tmp_path / "grpo", config_class=GRPOConfig, **common))  # fmt: skip
    expected = train_logs(reference)
    daro = make_trainer(tmp_path / "daro", reward_funcs=(one_correct_per_group,), model=tiny_model(TOKENIZER, seed=5),
                        advantage_estimator="daro", daro_learning_rate=1e-12, **common)  # fmt: skip
    got = train_logs(daro)
    for e, g in zip(expected, got, strict=True):
        assert g["reward"] == e["reward"]
        for key in ("loss", "grad_norm", "entropy"):
            assert g[key] == pytest.approx(e[key], rel=1e-4, abs=1e-7), key
        assert g["daro/weight_k1"] == pytest.approx(1.0) and math.isnan(g.get("daro/loss_k2") or math.nan)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"])
def test_kernel_loss_path_matches_trl_loss(tmp_path, loss_type, fused):
    """The papo_kernels loss path (the fused linear-head loss, or TRL's log-probs and the eager loss) reproduces
    TRL's micro-batch loss and gradient, normalisation for data parallelism, accumulation and steps_per_generation
    included, off-policy."""
    trainer = make_trainer(
        tmp_path, process=(), advantage_estimator="grpo", loss_type=loss_type, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, num_iterations=2, entropy_coef=0.01, epsilon_high=0.28, use_fused_loss=fused,
    )  # fmt: skip
    assert trainer._fused_loss == fused
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert inputs["old_per_token_logps"] is not None
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    with torch.no_grad():  # move the policy away from the sampling one: ratios != 1, some clipped
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    reference = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    expected = torch.autograd.grad(reference, params)
    loss = trainer._compute_policy_loss(trainer.model, inputs)
    grads = torch.autograd.grad(loss, params)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-8)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)
    metrics = trainer._metrics["train"]
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        assert metrics["clip_ratio/region_mean"][-1] == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-6)
        assert metrics["clip_ratio/region_mean"][0] > 0
    assert metrics["entropy"][-1] == pytest.approx(metrics["entropy"][0], rel=1e-5)


def test_peft_lora(tmp_path):
    from peft import LoraConfig

    trainer = PAPOTrainer(
        model=tiny_model(TOKENIZER),
        reward_funcs=digit_outcome_reward,
        process_reward_funcs=digit_process_reward,
        args=tiny_args(tmp_path, learning_rate=1e-2),
        train_dataset=tiny_dataset(),
        processing_class=TOKENIZER,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    logs = train_logs(trainer)
    assert all(math.isfinite(log["loss"]) for log in logs)
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(p, after[n]) for n, p in trainable.items())


def test_async_process_reward_and_judge_counters(tmp_path):
    class Judge:
        def __init__(self):
            self.calls = 0

        async def __call__(self, prompts, completions, **kwargs):
            self.calls += len(completions)
            return digit_process_reward(completions)

        def stats(self, reset=False):
            out = {"judge/completions": float(self.calls), "judge/latency_p50": 0.01}
            self.calls = 0 if reset else self.calls
            return out

    judge = Judge()
    logs = train_logs(make_trainer(tmp_path, process=(judge,)))
    assert sum(log["judge/completions"] for log in logs) > 0
    assert all(log["judge/latency_p50"] == pytest.approx(0.01) for log in logs)


def test_rubric_judge_scores_correct_responses_and_logs_its_counters(tmp_path):
    """The real RubricJudge over a local OpenAI-compatible server: one request per correct response, no failure,
    its counters in the logs."""
    from papo_trl.rewards import RubricJudge
    from papo_trl.rewards.judge_server import LocalJudgeServer

    with LocalJudgeServer(default_score=1.0) as server:
        judge = RubricJudge(base_url=server.base_url, max_retries=0, request_timeout=30)
        trainer = make_trainer(tmp_path, process=(judge,))
        logs = train_logs(trainer)
    N = trainer.args.generation_batch_size
    correct = sum(round(log["papo/correct_frac"] * N) for log in logs)
    assert sum(log["judge/completions"] for log in logs) == correct > 0
    assert 0 < len(server.requests) <= correct  # identical requests are sent once
    assert all(log["judge/failures"] == 0 and log["process_rewards/rubric_judge/mean"] == 1.0 for log in logs)
    assert all(log["process_rewards/scored_frac_correct"] == 1.0 for log in logs)


def _iterable():
    rows = list(tiny_dataset())
    return IterableDataset.from_generator(lambda: iter(rows))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"process": (), "advantage_estimator": "papo"}, "advantage_estimator='papo'.*process_reward_funcs"),
        ({"correctness_reward_index": 1}, "correctness_reward_index"),
        ({"process_reward_weights": [1.0, 2.0]}, "process_reward_weights"),
        ({"process": ("judge-model-id",)}, "process_reward_funcs"),
        ({"dynamic_sampling": True, "train_dataset": "iterable"}, "dynamic_sampling"),
    ],
)
def test_bad_configuration_raises_at_construction(tmp_path, kwargs, match):
    kwargs = dict(kwargs)
    process = kwargs.pop("process", (digit_process_reward,))
    iterable = kwargs.pop("train_dataset", None) == "iterable"
    extra = {"max_steps": 2, "accelerator_config": {"dispatch_batches": False}} if iterable else {}
    with pytest.raises(ValueError, match=match):
        PAPOTrainer(
            model=tiny_model(TOKENIZER),
            reward_funcs=[digit_outcome_reward],
            process_reward_funcs=list(process),
            args=tiny_args(tmp_path, **kwargs, **extra),
            train_dataset=_iterable() if iterable else tiny_dataset(),
            processing_class=TOKENIZER,
        )


def test_fused_loss_announces_the_accumulation_scale(tmp_path, monkeypatch):
    """Under gradient accumulation the fused head is told the upstream gradient (1 / steps) in advance, so the
    backward finds it equal to the announced scale and rescales nothing."""
    from papo_kernels.loss import fused_linear

    seen = []
    scale_rows = fused_linear.scale_rows

    def spy(g, go, gs):
        seen.append((go.item(), gs.item()))
        scale_rows(g, go, gs)

    monkeypatch.setattr(fused_linear, "scale_rows", spy)
    trainer = make_trainer(
        tmp_path, process=(), advantage_estimator="grpo", per_device_train_batch_size=4, gradient_accumulation_steps=2,
    )  # fmt: skip
    assert trainer._fused_loss
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.accelerator.backward(trainer._compute_policy_loss(trainer.model, inputs))
    assert seen and all(go == gs == 0.5 for go, gs in seen)
