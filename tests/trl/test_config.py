"""PAPOConfig: defaults, derived settings, validation at construction and command-line parsing."""

import pytest
from transformers import HfArgumentParser
from trl import GRPOConfig

from papo_trl import PAPOConfig
from papo_trl.config import as_papo_config
from tests.trl.tiny import tiny_args


def test_defaults_and_grpo_fields_kept(tmp_path):
    args = tiny_args(tmp_path)
    assert args.advantage_estimator == "auto"  # resolved by the trainer: papo with process rewards, else grpo
    assert args.lambda_process == 1.0 and args.advantage_epsilon is None
    assert args.correct_threshold == 1.0 and args.correctness_reward_index == 0
    assert args.process_reward_on_correct_only and args.use_fused_loss and not args.dynamic_sampling
    assert args.max_generation_batches == 4
    # GRPOConfig's own derived fields still work
    assert args.generation_batch_size == 8 and args.steps_per_generation == 1
    assert isinstance(args, GRPOConfig)


def test_every_added_field_is_documented():
    doc = PAPOConfig.__doc__
    added = set(PAPOConfig.__dataclass_fields__) - set(GRPOConfig.__dataclass_fields__)
    assert added, "PAPOConfig adds fields"
    for name in added:
        assert f"{name} (`" in doc, f"{name} has no docstring entry"
        assert PAPOConfig.__dataclass_fields__[name].metadata.get("help"), f"{name} has no help text"


@pytest.mark.parametrize(
    "estimator, field, expected",
    [
        ("dr_grpo", "scale_rewards", "none"),
        ("gdpo", "multi_objective_aggregation", "normalize_then_sum"),
        ("papo_fullnorm", "process_reward_on_correct_only", False),
    ],
)
def test_estimator_sets_its_trl_options(tmp_path, estimator, field, expected):
    assert getattr(tiny_args(tmp_path, advantage_estimator=estimator), field) == expected


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"advantage_estimator": "ppo"}, "advantage_estimator"),
        ({"lambda_process": float("nan")}, "lambda_process"),
        ({"advantage_epsilon": -1e-3}, "advantage_epsilon"),
        ({"correct_threshold": float("inf")}, "correct_threshold"),
        ({"correctness_reward_index": -1}, "correctness_reward_index"),
        ({"correctness_reward_index": 1.5}, "correctness_reward_index"),
        ({"process_reward_weights": [1.0, float("nan")]}, "process_reward_weights"),
        ({"max_generation_batches": 0}, "max_generation_batches"),
        ({"daro_learning_rate": 0.0}, "daro_learning_rate"),
        ({"daro_max_weight": 0.5}, "daro_max_weight"),
        ({"daro_init_weight": 1000.0}, "daro_init_weight"),
        ({"advantage_estimator": "papo", "scale_rewards": "batch"}, "advantage_estimator='papo'.*scale_rewards"),
        ({"advantage_estimator": "papo_fullnorm", "scale_rewards": False}, "advantage_estimator.*scale_rewards"),
        ({"advantage_estimator": "daro", "loss_type": "ppo"}, "loss_type"),
    ],
)
def test_bad_values_raise(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_args(tmp_path, **overrides)


@pytest.mark.parametrize("scale_rewards", [True, False, "group", "batch", "none"])
def test_default_keeps_every_trl_option(tmp_path, scale_rewards):
    """`PAPOConfig()` takes every `GRPOConfig` value as TRL does: nothing is checked against PAPO before the trainer
    knows whether there are process rewards."""
    args = tiny_args(tmp_path, scale_rewards=scale_rewards, multi_objective_aggregation="normalize_then_sum")
    grpo = tiny_args(tmp_path, config_class=GRPOConfig, scale_rewards=scale_rewards)
    assert args.advantage_estimator == "auto" and args.scale_rewards == grpo.scale_rewards
    assert args.multi_objective_aggregation == "normalize_then_sum"


@pytest.mark.parametrize("has_process, expected", [(False, "grpo"), (True, "papo")])
def test_auto_resolves_in_a_copy(tmp_path, has_process, expected):
    args = tiny_args(tmp_path)
    resolved = as_papo_config(args, model=None, has_process=has_process)
    assert resolved.advantage_estimator == expected and args.advantage_estimator == "auto"
    assert resolved is not args and resolved.to_dict() == {**args.to_dict(), "advantage_estimator": expected}
    assert as_papo_config(resolved, model=None, has_process=not has_process) is resolved  # explicit: kept


def test_auto_with_process_rewards_and_other_scaling_raises(tmp_path):
    with pytest.raises(ValueError, match="advantage_estimator='auto'.*scale_rewards='group'.*'batch'"):
        as_papo_config(tiny_args(tmp_path, scale_rewards="batch"), model=None, has_process=True)
    assert as_papo_config(tiny_args(tmp_path, scale_rewards="batch"), None, has_process=False).scale_rewards == "batch"


def test_grpo_config_becomes_grpo_estimator(tmp_path):
    grpo = tiny_args(tmp_path, config_class=GRPOConfig, scale_rewards="batch", epsilon_high=0.28)
    args = as_papo_config(grpo, model=None, has_process=False)
    assert isinstance(args, PAPOConfig) and args.advantage_estimator == "grpo"
    assert args.scale_rewards == "batch" and args.epsilon_high == 0.28
    assert args.generation_batch_size == grpo.generation_batch_size
    assert args.lambda_process == 1.0 and args.max_generation_batches == 4


def test_command_line_parsing(tmp_path):
    (args,) = HfArgumentParser(PAPOConfig).parse_args_into_dataclasses(
        [
            "--output_dir", str(tmp_path), "--advantage_estimator", "daro", "--process_reward_weights", "1.0", "0.5",
            "--correctness_reward_index", "1", "--dynamic_sampling", "--use_cpu", "--bf16", "false",
            "--per_device_train_batch_size", "4", "--num_generations", "4",
        ]
    )  # fmt: skip
    assert args.advantage_estimator == "daro"
    assert args.process_reward_weights == [1.0, 0.5]
    assert args.correctness_reward_index == 1 and args.dynamic_sampling
