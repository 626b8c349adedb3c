"""Advantages of every estimator from the rewards gathered across processes (group-contiguous rows).

All the group statistics run in one call of a ``papo_kernels`` advantage function (the fused kernel on CUDA),
which does not synchronise: its value checks come back as ``Advantages.error``, for the caller to check where
it synchronises anyway (``papo_kernels.advantages.check_error``; on CPU they raise at once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from papo_kernels import gdpo_advantages, grpo_advantages, papo_advantages
from papo_kernels.advantages import GRPO_EPS, PAPO_EPS, weighted_nansum

from .config import PROCESS_ESTIMATORS


@dataclass
class Advantages:
    """``total[N]`` is what the loss uses; ``outcome``/``process`` are PAPO's ``A_out``/``A_proc`` (``None`` for the
    single-signal estimators) and ``process_active[num_groups]`` says where ``A_proc`` is non-zero. ``error`` is
    the kernel's value-error flag (``papo_kernels.advantages.check_error`` raises on it)."""

    total: torch.Tensor
    outcome: torch.Tensor | None = None
    process: torch.Tensor | None = None
    process_active: torch.Tensor | None = None
    error: torch.Tensor | None = None


def fill_unscorable(outcome: torch.Tensor, G: int) -> torch.Tensor:
    """NaN outcomes (no outcome reward) replaced by their group's mean (0 if the whole group is NaN)."""
    grouped = outcome.view(-1, G)
    mean = torch.nan_to_num(torch.nanmean(grouped, dim=1, keepdim=True), nan=0.0)
    return torch.where(torch.isnan(grouped), mean.expand_as(grouped), grouped).reshape(-1)


def correctness(
    rewards_per_func: torch.Tensor, weights: torch.Tensor, index: int | None, threshold: float
) -> torch.Tensor:
    """``correct[N]`` (bool): the chosen outcome reward (or the weighted sum) is ``>= threshold``; NaN is incorrect."""
    score = weighted_nansum(rewards_per_func, weights) if index is None else rewards_per_func[:, index]
    return torch.nan_to_num(score, nan=float("-inf")) >= threshold


def uses_process(estimator: str, has_process: bool) -> bool:
    """Whether the process reward enters the advantage (PAPO, and Dr. GRPO's PAPO variant)."""
    return estimator in PROCESS_ESTIMATORS or (estimator == "dr_grpo" and has_process)


def compute_advantages(
    estimator: str,
    rewards_per_func: torch.Tensor,
    process: torch.Tensor | None,
    correct: torch.Tensor,
    G: int,
    *,
    reward_weights: torch.Tensor,
    scale_rewards: str = "group",
    multi_objective_aggregation: str = "sum_then_normalize",
    lambda_process: float = 1.0,
    eps: float | None = None,
    valid: torch.Tensor | None = None,
) -> Advantages:
    """Advantages ``[N]`` of `estimator` (see ``PAPOConfig.advantage_estimator``).

    ``rewards_per_func[N, K]`` are the outcome rewards (NaN: not applicable), ``process[N]`` the combined process
    score (NaN: not scored), ``correct[N]`` the correctness flags, ``valid[N]`` (optional) marks the rows that take
    part (rows outside get advantage 0 and stay out of every statistic). Unscorable rows (every outcome reward NaN)
    get advantage 0, as in TRL.
    """
    weights = reward_weights.to(rewards_per_func)
    if valid is not None:
        rewards_per_func = rewards_per_func.masked_fill(~valid[:, None], float("nan"))
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    if uses_process(estimator, process is not None):
        outcome = fill_unscorable(weighted_nansum(rewards_per_func, weights), G)
        if process is None:
            process = torch.full_like(outcome, float("nan"))
        out = papo_advantages(
            outcome,
            process.to(outcome),
            correct,
            G,
            lambda_process=lambda_process,
            eps=PAPO_EPS if eps is None else eps,
            scale_by_std=estimator != "dr_grpo",
            process_norm="all" if estimator == "papo_fullnorm" else "correct",
            validate=False,
        )
        zero = unscorable.to(out.total.device)
        return Advantages(
            total=out.total.masked_fill(zero, 0.0),
            outcome=out.outcome.masked_fill(zero, 0.0),
            process=out.process.masked_fill(zero, 0.0),
            process_active=out.process_active,
            error=out.error,
        )
    eps = GRPO_EPS if eps is None else eps
    if estimator == "gdpo" or multi_objective_aggregation == "normalize_then_sum":
        out = gdpo_advantages(rewards_per_func, G, weights=weights, eps=eps, validate=False)
    else:
        scale = "none" if estimator == "dr_grpo" else scale_rewards
        out = grpo_advantages(rewards_per_func, G, weights=weights, scale=scale, eps=eps, validate=False)
    return Advantages(total=out.advantages, error=out.error)
