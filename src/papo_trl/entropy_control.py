"""TRL 1.16's entropy bonus bookkeeping, adaptive control (Skywork-OR1) included, for the ``papo_kernels`` loss path.

TRL keeps the controller's state on the trainer (``entropy_coef``, ``_last_world_entropy``, ``_entropy_window_stats``;
checkpointed in ``entropy_ctrl_state.json``) and updates it inside its ``_compute_loss``. The kernel loss path
computes the same loss with the coefficient of :func:`loss_config_for_step` and hands the micro-batch's window
statistics (``PolicyLossOutput.entropy_stats``: entropy sum and token count over the tokens the bonus acts on) to
:func:`update_entropy_control`, which moves the same state the same way.
"""

from __future__ import annotations

import dataclasses

import torch

from papo_kernels import PolicyLossConfig


def applied_entropy_coef(trainer) -> float:
    """The coefficient this micro-batch applies: the static ``entropy_coef``; under adaptive control the current
    one if the entropy measured at the previous optimizer step is at or below ``entropy_target``, else 0."""
    if not trainer.use_adaptive_entropy:
        return trainer.entropy_coef
    return trainer.entropy_coef if trainer._last_world_entropy <= trainer.args.entropy_target else 0.0


def loss_config_for_step(trainer, config: PolicyLossConfig) -> PolicyLossConfig:
    """``config`` with the entropy coefficient this micro-batch applies (unchanged without adaptive control)."""
    if not trainer.use_adaptive_entropy:
        return config
    return dataclasses.replace(config, entropy_coef=float(applied_entropy_coef(trainer)))


def update_entropy_control(trainer, entropy_stats: torch.Tensor, mode: str) -> None:
    """After a micro-batch's loss: accumulate its entropy statistics; at an optimizer-step boundary, reduce them over
    processes and move the coefficient by ``entropy_coef_delta`` (up when the entropy is at or below the target,
    down otherwise, within ``[entropy_coef_min, entropy_coef_max]``); log ``entropy_coef`` at each boundary."""
    if not trainer._entropy_bonus_enabled:
        return
    sync = trainer.accelerator.sync_gradients
    if trainer.use_adaptive_entropy and mode == "train":
        stats = entropy_stats.detach().clone()
        window = trainer._entropy_window_stats
        trainer._entropy_window_stats = stats if window is None else window + stats
        if sync:
            args = trainer.args
            totals = trainer.accelerator.reduce(trainer._entropy_window_stats, reduction="sum")
            world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
            if world_entropy <= args.entropy_target:
                trainer.entropy_coef = min(trainer.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
            else:
                trainer.entropy_coef = max(trainer.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
            trainer._last_world_entropy = world_entropy
            trainer._entropy_window_stats = None
    if mode == "train" and sync:
        trainer._metrics[mode]["entropy_coef"].append(trainer.entropy_coef)
