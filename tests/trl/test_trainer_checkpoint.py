"""Checkpoints keep PAPO's own state: DARO's weights and optimiser, the dynamic-sampling prompt stream, and the
adaptive entropy controller in TRL's own file."""

import json
import math

import pytest
import torch

from papo_trl import PAPOTrainer
from papo_trl.trainer import PAPO_STATE_NAME
from tests.trl.tiny import (
    digit_outcome_reward,
    digit_process_reward,
    tiny_args,
    tiny_dataset,
    tiny_model,
    tiny_tokenizer,
)

TOKENIZER = tiny_tokenizer()


def _trainer(output_dir, max_steps):
    args = tiny_args(
        output_dir, advantage_estimator="daro", dynamic_sampling=True, max_steps=max_steps, save_strategy="steps",
        save_steps=2, daro_learning_rate=0.2,
    )  # fmt: skip
    return PAPOTrainer(
        model=tiny_model(TOKENIZER),
        reward_funcs=digit_outcome_reward,
        process_reward_funcs=digit_process_reward,
        args=args,
        train_dataset=tiny_dataset(),
        processing_class=TOKENIZER,
    )


def test_daro_weights_and_prompt_stream_survive_resume(tmp_path):
    first = _trainer(tmp_path, max_steps=2)
    first.train()
    checkpoint = tmp_path / "checkpoint-2"
    state = torch.load(checkpoint / PAPO_STATE_NAME, weights_only=True)
    weights = first._daro.weights.weights.detach().clone()
    assert not torch.allclose(weights, torch.ones_like(weights)), "DARO weights moved during training"
    torch.testing.assert_close(state["daro"]["weights"]["log_weights"].exp(), weights)
    assert state["prompt_stream"] == first._prompt_stream.state_dict()

    resumed = _trainer(tmp_path, max_steps=3)
    loaded = {}
    load = resumed._load_optimizer_and_scheduler

    def spy(checkpoint):  # the state right after the checkpoint is read, before any further step
        load(checkpoint)
        loaded.update(weights=resumed._daro.weights.weights.detach().clone(), drawn=resumed._prompt_stream.drawn,
                      step=resumed._daro.optimizer.state_dict()["state"][0]["step"].item())  # fmt: skip

    resumed._load_optimizer_and_scheduler = spy
    resumed.train(resume_from_checkpoint=str(checkpoint))
    torch.testing.assert_close(loaded["weights"], weights)
    assert loaded["drawn"] == first._prompt_stream.drawn and loaded["step"] == 2
    logs = [h for h in resumed.state.log_history if "loss" in h]
    assert logs[-1]["step"] == 3 and math.isfinite(logs[-1]["loss"]) and "daro/weight_k1" in logs[-1]
    assert resumed._daro.optimizer.state_dict()["state"][0]["step"] == 3


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "trl"])
def test_entropy_control_survives_resume(tmp_path, fused):
    """TRL's ``entropy_ctrl_state.json`` holds the controller's state, whichever loss moved it (the kernel path or
    TRL's own), and a resumed run starts from it."""

    def trainer(max_steps):
        args = tiny_args(
            tmp_path, advantage_estimator="grpo", max_steps=max_steps, save_strategy="steps", save_steps=2,
            use_adaptive_entropy=True, entropy_coef=0.05, entropy_target=1e3, entropy_coef_delta=0.01,
            use_fused_loss=fused,
        )  # fmt: skip
        return PAPOTrainer(model=tiny_model(TOKENIZER), reward_funcs=digit_outcome_reward, args=args,
                           train_dataset=tiny_dataset(), processing_class=TOKENIZER)  # fmt: skip

    first = trainer(max_steps=2)
    assert first._fused_loss == fused
    first.train()
    control = first._entropy_control
    assert control.coef == pytest.approx(0.07) and math.isfinite(control.last_world_entropy)  # up by delta per step
    assert (first.entropy_coef, first._last_world_entropy) == (control.coef, control.last_world_entropy)
    saved = json.loads((tmp_path / "checkpoint-2" / "entropy_ctrl_state.json").read_text())
    assert saved == {"entropy_coef": control.coef, "last_world_entropy": control.last_world_entropy}

    resumed = trainer(max_steps=3)
    loaded = {}
    load = resumed._load_optimizer_and_scheduler

    def spy(checkpoint):  # the state right after the checkpoint is read, before any further step
        load(checkpoint)
        loaded.update(coef=resumed._entropy_control.coef, entropy=resumed._entropy_control.last_world_entropy)

    resumed._load_optimizer_and_scheduler = spy
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert loaded == {"coef": saved["entropy_coef"], "entropy": saved["last_world_entropy"]}
    assert resumed._entropy_control.coef == pytest.approx(0.08)
    assert [h["entropy_coef"] for h in resumed.state.log_history if "loss" in h][-1] == pytest.approx(0.08)
