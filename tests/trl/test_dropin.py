"""PAPOTrainer is a drop-in for TRL's GRPOTrainer: a GRPO script with only the class names changed trains the same.

Every option below runs twice on a tiny Qwen2 model saved locally (no download): once with ``GRPOTrainer`` /
``GRPOConfig``, once with ``PAPOTrainer`` / ``PAPOConfig`` and nothing else changed, with TRL's loss on padded
batches (``use_fused_loss=False, padding_free=False``: equal to the bit) and with the defaults (the fused loss, the
Triton kernels through the interpreter on CPU, on packed batches: equal to fp32 rounding). Both runs must log the
same metric names with equal values step for step, keep the same rewards and advantages for their completions and
end with the same weights.

A new TRL option is one more ``option(...)`` line in ``OPTIONS``: keyword arguments named after a ``GRPOConfig``
field go to both configs; ``model``, ``reward_funcs``, ``eval_dataset`` and ``peft_config`` go to both trainers as
factories ``build(model_dir)``, called once per run so that no state is shared.
"""

import asyncio
import logging

import pytest
import torch
from datasets import IterableDataset
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

from papo_kernels import kernels_available
from papo_trl import PAPOConfig, PAPOTrainer
from papo_trl.config import unsupported_loss_options
from tests.trl import tiny

TOKENIZER = tiny.tiny_tokenizer()
TRAINER_ARGS = ("model", "reward_funcs", "eval_dataset", "peft_config")
# 2 groups of 4 completions per generation, 2 optimiser steps on it: the second is off-policy (clipped ratios)
COMMON = dict(per_device_train_batch_size=4, steps_per_generation=2, learning_rate=3e-2, max_steps=2)
TIMINGS = ("step_time", "_runtime", "_per_second")  # wall-clock entries of the logs


def length_reward(completions, **kwargs) -> list[float]:
    return [len(text) / 8 for text in completions]


def sparse_digit_reward(completions, **kwargs) -> list[float | None]:
    """``None`` for completions shorter than 6 characters (with `sparse_length_reward`: unscorable rows)."""
    return [None if len(text) < 6 else float(any(c.isdigit() for c in text)) for text in completions]


def sparse_length_reward(completions, **kwargs) -> list[float | None]:
    """``None`` for short completions and for those without a digit."""
    return [None if len(text) < 6 or not any(c.isdigit() for c in text) else len(text) / 8 for text in completions]


async def async_digit_reward(completions, **kwargs) -> list[float]:
    await asyncio.sleep(0)
    return tiny.digit_outcome_reward(completions)


def lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def peft_model(model_dir):
    from peft import get_peft_model

    torch.manual_seed(0)  # the adapter's initialisation
    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora())


def iterable_eval(_):
    rows = list(tiny.tiny_dataset(2))
    return IterableDataset.from_generator(lambda: iter(rows))


def option(name, **overrides):
    return pytest.param(name, overrides, id=name)


TWO_REWARDS = lambda _: [tiny.digit_outcome_reward, length_reward]  # noqa: E731
EVAL = dict(eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=8)  # one evaluation, after step 2
KL = dict(beta=0.1)
TWICE = dict(num_iterations=2, max_steps=4)  # the second pass over a generation batch clips more
GSPO = dict(loss_type="grpo", epsilon=0.05)  # sequence-level ratios move less than token ones

OPTIONS = [
    option("defaults"),  # loss_type="dapo"
    *(option(f"loss_type-{t}", loss_type=t) for t in ("grpo", "bnpo", "dr_grpo", "cispo", "sapo", "luspo", "vespo")),
    *(option(f"scale_rewards-{s}", scale_rewards=s) for s in (True, False, "group", "batch", "none")),
    option("sum_then_normalize", reward_funcs=TWO_REWARDS, multi_objective_aggregation="sum_then_normalize"),
    option("normalize_then_sum", reward_funcs=TWO_REWARDS, multi_objective_aggregation="normalize_then_sum"),
    option("reward_weights", reward_funcs=TWO_REWARDS, reward_weights=[2.0, -0.5]),
    option("rewards-None", reward_funcs=lambda _: [sparse_digit_reward, sparse_length_reward]),
    option("rewards-async", reward_funcs=lambda _: [async_digit_reward, length_reward]),
    option("peft-model", model=peft_model),
    option("peft-config", peft_config=lambda _: lora()),
    option("eval-iterable", eval_dataset=iterable_eval, accelerator_config={"dispatch_batches": False}, **EVAL),
    option("eval-dict", eval_dataset=lambda _: {"a": tiny.tiny_dataset(2), "b": tiny.tiny_dataset(4)}, **EVAL),
    option("num_iterations-2", **TWICE),
    option("top_entropy_quantile", top_entropy_quantile=0.5),
    option("off_policy_mask_threshold", off_policy_mask_threshold=0.01),
    option("entropy_coef", entropy_coef=0.01),
    option("use_adaptive_entropy", use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=5.0),
    option("beta", **KL),
    option("use_bias_correction_kl", use_bias_correction_kl=True, **KL),
    option("delta", delta=1.2, epsilon_high=0.28),
    option("importance_sampling_level-sequence", importance_sampling_level="sequence", **GSPO, **TWICE),
    option("sync_ref_model", sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5, **KL),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: for a model this small, more threads only wait on each other (several times slower on
    a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model saved to disk, so that both trainers (and TRL's reference model) load the same weights."""
    path = tmp_path_factory.mktemp("tiny-qwen2")
    tiny.tiny_model(TOKENIZER, seed=0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def grpo_runs():
    """GRPOTrainer runs, one per option, shared by the fused and unfused comparisons."""
    return {}


def train(trainer_class, config_class, overrides, model_dir, output_dir, **extra):
    config = {k: v for k, v in overrides.items() if k not in TRAINER_ARGS}
    built = {k: v(model_dir) for k, v in overrides.items() if k in TRAINER_ARGS}
    trainer = trainer_class(
        model=built.pop("model", model_dir),
        reward_funcs=built.pop("reward_funcs", [tiny.digit_outcome_reward]),
        args=tiny.tiny_args(output_dir, config_class=config_class, **{**COMMON, **config, **extra}),
        train_dataset=tiny.tiny_dataset(),
        processing_class=TOKENIZER,
        **built,
    )
    trainer.initial_weights = weights(trainer)
    trainer.train()
    return trainer


def weights(trainer, initial=False) -> torch.Tensor:
    """All trainable parameters in one flat vector (as they were before training with `initial`)."""
    if initial:
        return trainer.initial_weights
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters() if p.requires_grad])


def assert_same(got, want, exact: bool, what: str):
    if exact or not isinstance(want, float):
        assert got == want, what
    else:
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), what


def assert_same_run(ours, reference, exact: bool) -> None:
    """Same logged metric names and values step for step, same rewards and advantages, same final weights."""
    assert len(ours.state.log_history) == len(reference.state.log_history)
    for step, (got, want) in enumerate(zip(ours.state.log_history, reference.state.log_history, strict=True)):
        assert set(got) == set(want), f"log {step}: extra {set(got) - set(want)}, missing {set(want) - set(got)}"
        for key in want:
            if not any(t in key for t in TIMINGS):
                assert_same(got[key], want[key], exact, f"log {step}: {key}")
    assert_same(list(ours._logs["advantages"]), list(reference._logs["advantages"]), True, "advantages")
    for name, rewards in reference._logs["rewards"].items():
        torch.testing.assert_close(torch.tensor(ours._logs["rewards"][name]), torch.tensor(rewards), equal_nan=True)
    got, want = weights(ours), weights(reference)
    if exact:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:  # Adam turns rounding-level gradient differences into visible ones where a gradient is ~0: compare updates
        update = want - weights(reference, initial=True)
        assert (got - want).norm() <= 1e-3 * update.norm()


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["trl_loss_padded", "fused_loss_packed"])
@pytest.mark.parametrize("name, overrides", OPTIONS)
def test_papo_trainer_trains_as_grpo_trainer(name, overrides, fused, model_dir, grpo_runs, tmp_path_factory):
    if fused and not kernels_available("cpu"):
        pytest.skip("these trainers run on CPU, where the fused loss needs TRITON_INTERPRET=1 (set without CUDA)")
    if name not in grpo_runs:
        grpo_runs[name] = train(GRPOTrainer, GRPOConfig, overrides, model_dir, tmp_path_factory.mktemp("grpo"))
    padded = {} if fused else {"padding_free": False}
    ours = train(PAPOTrainer, PAPOConfig, overrides, model_dir, tmp_path_factory.mktemp("papo"), use_fused_loss=fused,
                 **padded)  # fmt: skip
    assert ours.args.advantage_estimator == "grpo"
    assert ours._fused_loss == (fused and not unsupported_loss_options(ours.args))
    assert ours._padding_free == fused
    assert_same_run(ours, grpo_runs[name], exact=not fused)


def build(model_dir, args, process=()):
    return PAPOTrainer(
        model=model_dir,
        reward_funcs=tiny.digit_outcome_reward,
        process_reward_funcs=list(process),
        args=args,
        train_dataset=tiny.tiny_dataset(),
        processing_class=TOKENIZER,
    )


JUDGE = (tiny.digit_process_reward,)


@pytest.mark.parametrize("process, expected", [((), "grpo"), (JUDGE, "papo")])
def test_auto_estimator_is_resolved_logged_and_saved(model_dir, tmp_path, caplog, process, expected):
    args = tiny.tiny_args(tmp_path, use_fused_loss=False)
    assert args.advantage_estimator == "auto"
    with caplog.at_level(logging.INFO, logger="papo_trl.trainer"):
        trainer = build(model_dir, args, process)
    lines = [r.getMessage() for r in caplog.records if "advantage_estimator" in r.getMessage()]
    assert len(lines) == 1 and f"resolved to {expected!r}" in lines[0]
    assert trainer.args.advantage_estimator == expected and args.advantage_estimator == "auto"
    trainer.save_model(str(tmp_path / "saved"))
    saved = torch.load(tmp_path / "saved" / "training_args.bin", weights_only=False)
    assert saved.advantage_estimator == expected


def test_grpo_config_with_process_rewards_resolves_to_papo(model_dir, tmp_path):
    trainer = build(model_dir, tiny.tiny_args(tmp_path, config_class=GRPOConfig), JUDGE)
    assert isinstance(trainer.args, PAPOConfig) and trainer.args.advantage_estimator == "papo"


@pytest.mark.parametrize(
    "overrides, process, names",
    [
        ({"advantage_estimator": "papo"}, (), ("advantage_estimator='papo'", "process_reward_funcs")),
        ({"advantage_estimator": "papo_fullnorm"}, (), ("advantage_estimator='papo_fullnorm'", "process_reward_funcs")),
        ({"scale_rewards": "batch"}, JUDGE, ("advantage_estimator='auto'", "scale_rewards='group'", "'batch'")),
        ({"scale_rewards": False}, JUDGE, ("advantage_estimator='auto'", "scale_rewards='group'", "'none'")),
    ],
)
def test_papo_without_what_it_needs_raises_naming_both_options(model_dir, tmp_path, overrides, process, names):
    with pytest.raises(ValueError) as err:
        build(model_dir, tiny.tiny_args(tmp_path, **overrides), process)
    assert all(name in str(err.value) for name in names), str(err.value)
