"""TRL 1.16's batch-wide loss options through PAPOTrainer's kernel loss path (the fused linear-head loss, or TRL's
log-probs and the eager loss): VESPO, the entropy quantile, the off-policy mask and adaptive entropy control over
an accumulation window, against TRL's own ``_compute_loss`` on the same trainer state."""

import copy

import pytest
import torch
from trl import GRPOTrainer

from tests.trl.test_trainer import make_trainer

STATE = ("entropy_coef", "_last_world_entropy", "_entropy_window_stats")


def _state(trainer) -> dict:
    return {name: copy.deepcopy(getattr(trainer, name)) for name in STATE}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
def test_options_and_adaptive_entropy_match_trl(tmp_path, fused):
    trainer = make_trainer(
        tmp_path, process=(), advantage_estimator="grpo", loss_type="vespo", per_device_train_batch_size=4,
        gradient_accumulation_steps=2, num_iterations=2, top_entropy_quantile=0.5, off_policy_mask_threshold=0.0,
        use_adaptive_entropy=True, entropy_coef=0.05, entropy_target=1e3, entropy_coef_delta=0.01,
        use_fused_loss=fused,
    )  # fmt: skip
    assert trainer._fused_loss == fused and trainer._loss_config.loss_type == "vespo"
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    with torch.no_grad():  # move the policy away from the sampling one: ratios != 1, some sequences masked
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    trainer._last_world_entropy = 5.0  # at or below the target: the bonus applies from the first micro-batch
    metrics = trainer._metrics["train"]
    for sync in (False, True):  # one accumulation window of two micro-batches
        trainer.accelerator.gradient_state._set_sync_gradients(sync)
        before = _state(trainer)
        reference = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
        expected, expected_state = torch.autograd.grad(reference, params), _state(trainer)
        trl_coef_logs = list(metrics["entropy_coef"])
        for name, value in copy.deepcopy(before).items():
            setattr(trainer, name, value)
        loss = trainer._compute_policy_loss(trainer.model, inputs)
        grads = torch.autograd.grad(loss, params)
        assert loss.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-8)
        for g, e in zip(grads, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)
        ours = _state(trainer)
        assert ours["entropy_coef"] == pytest.approx(expected_state["entropy_coef"])
        assert ours["_last_world_entropy"] == pytest.approx(expected_state["_last_world_entropy"], rel=1e-5)
        if sync:
            assert ours["_entropy_window_stats"] is None and ours["entropy_coef"] == pytest.approx(0.06)
            assert metrics["entropy_coef"][-1] == trl_coef_logs[-1] == ours["entropy_coef"]
        else:
            torch.testing.assert_close(ours["_entropy_window_stats"], expected_state["_entropy_window_stats"])
    assert metrics["vespo/phi_seq_mean"][-1] == pytest.approx(metrics["vespo/phi_seq_mean"][0], rel=1e-5)
