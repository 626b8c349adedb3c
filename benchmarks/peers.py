"""Peer implementations, transcribed line for line, that our kernels are compared with and tested against.

``trl_sum_then_normalize`` / ``trl_normalize_then_sum``: the advantage code of TRL 1.16's
``GRPOTrainer._generate_and_score_completions`` (uses TRL's own ``nanstd`` when TRL is installed).
"""

from __future__ import annotations

import torch

try:
    from trl.trainer.utils import nanstd
except ImportError:  # torch-only environments: the identical reference
    from papo_kernels.advantages.naive import nanstd


def trl_sum_then_normalize(
    rewards_per_func: torch.Tensor, G: int, weights: torch.Tensor | None = None, scale: str = "group"
) -> torch.Tensor:
    """TRL 1.16, ``multi_objective_aggregation="sum_then_normalize"``."""
    if weights is None:
        weights = torch.ones(rewards_per_func.shape[1], dtype=rewards_per_func.dtype, device=rewards_per_func.device)
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    if scale in ["group", "none"]:
        if G > 1:
            std_rewards = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
        else:
            std_rewards = torch.zeros_like(rewards)
    else:
        std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def trl_normalize_then_sum(
    rewards_per_func: torch.Tensor, G: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """TRL 1.16, ``multi_objective_aggregation="normalize_then_sum"`` (GDPO)."""
    K = rewards_per_func.shape[1]
    if weights is None:
        weights = torch.ones(K, dtype=rewards_per_func.dtype, device=rewards_per_func.device)
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    grouped = rewards_per_func.view(-1, G, K)
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = nanstd(grouped, dim=1, keepdim=True) if G > 1 else torch.zeros_like(mean_k)
    reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, K)
    rewards = (reward_k * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)
