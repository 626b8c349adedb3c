"""PAPOTrainer times its own steps as GRPOTrainer does, through TRL's profiling contexts (reported to W&B, MLflow
or Trackio as ``profiling/Time taken: <Trainer>.<name>``): the advantages, dynamic sampling and DARO's weight
update, besides what it inherits (``compute_loss``, the reward functions). A drop-in run (no PAPO option) times no
step that GRPOTrainer does not."""

import pytest
from trl import GRPOConfig, GRPOTrainer
from trl.extras.profiling import ProfilingContext

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


@pytest.fixture
def profiled(monkeypatch):
    """The names of the profiled blocks, in the order they end (what TRL would report, whatever ``report_to``)."""
    names = []
    monkeypatch.setattr(ProfilingContext, "_log_metrics", lambda self, duration: names.append(self.name))
    return names


def train(trainer_class, tmp_path, config_class=None, **kwargs):
    process = kwargs.pop("process_reward_funcs", None)
    extra = {} if process is None else {"process_reward_funcs": process}
    trainer = trainer_class(
        model=tiny_model(TOKENIZER),
        reward_funcs=[digit_outcome_reward],
        args=tiny_args(tmp_path, config_class=config_class, max_steps=1, **kwargs),
        train_dataset=tiny_dataset(),
        processing_class=TOKENIZER,
        **extra,
    )
    trainer.train()


def test_advantages_dynamic_sampling_and_daro_are_profiled(tmp_path, profiled):
    train(PAPOTrainer, tmp_path, advantage_estimator="daro", dynamic_sampling=True,
          process_reward_funcs=[digit_process_reward])  # fmt: skip
    expected = {"_set_advantages", "dynamic_sampling", "daro_step", "process_rewards", "compute_loss"}
    assert {f"PAPOTrainer.{name}" for name in expected} <= set(profiled)


def test_a_drop_in_run_profiles_only_what_grpo_trainer_profiles(tmp_path, profiled):
    train(GRPOTrainer, tmp_path / "grpo", config_class=GRPOConfig)
    grpo = {name.removeprefix("GRPOTrainer.") for name in profiled}
    profiled.clear()
    train(PAPOTrainer, tmp_path / "papo")
    papo = {name.removeprefix("PAPOTrainer.") for name in profiled}
    assert "compute_loss" in papo and papo <= grpo, papo - grpo
