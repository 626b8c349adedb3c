"""Public advantage functions: validate, then route to the fused kernel or the torch reference.

Inputs are per-response values laid out group-contiguously (``N = num_groups * G``), as TRL's
``RepeatSampler`` produces them after the cross-process gather. Value checks (``validate=True``) cost one
device synchronisation; pass ``validate=False`` on a hot path whose inputs are known to be clean.
"""

from __future__ import annotations

import math

import torch

from .._runtime import check_same_device, check_tensor, compute_dtype, require, use_triton
from . import naive
from . import triton as fused
from .types import GroupAdvantages, PAPOAdvantages


def _check_G(G, N: int, name: str) -> None:
    require(isinstance(G, int) and not isinstance(G, bool) and G > 0, f"`G` must be a positive integer, got {G!r}")
    require(N % G == 0, f"`{name}` has N={N} responses, which is not a multiple of the group size G={G}")
    require(G <= fused.MAX_G, f"`G` must be at most {fused.MAX_G}, got {G}")


def _check_eps(eps) -> None:
    require(
        isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0,
        f"`eps` must be a finite float >= 0, got {eps!r}",
    )


def _check_rewards(rewards, G, weights, validate: bool) -> None:
    check_tensor("rewards", rewards, ndim=(1, 2), floating=True)
    _check_G(G, rewards.shape[0], "rewards")
    if weights is not None:
        check_tensor("weights", weights, ndim=1, floating=True)
        K = rewards.shape[1] if rewards.dim() == 2 else 1
        require(weights.shape[0] == K, f"`weights` has {weights.shape[0]} entries but `rewards` has {K} columns")
        check_same_device(rewards=rewards, weights=weights)
    if validate:
        require(not torch.isinf(rewards).any().item(), "`rewards` contains +-inf; mark an unscorable reward with NaN")


def _route(*tensors: torch.Tensor) -> bool:
    return tensors[0].numel() > 0 and use_triton(tensors[0])


def grpo_advantages(
    rewards: torch.Tensor,
    G: int,
    *,
    weights: torch.Tensor | None = None,
    scale: str = "group",
    eps: float = 1e-4,
    validate: bool = True,
) -> GroupAdvantages:
    """GRPO advantages, TRL's ``sum_then_normalize``.

    ``r = nansum_k w_k r_k`` over the reward columns of ``rewards[N]`` or ``rewards[N, K]`` (a row whose columns
    are all NaN is unscorable), then per group ``A = (r - mean_g) / (std + eps)`` with ``std`` the group std
    (``scale="group"``), the batch std (``"batch"``) or no scaling (``"none"``). NaN rows get ``A = 0``.
    Returns ``GroupAdvantages(advantages[N], mean[num_groups], std[num_groups])``.
    """
    _check_rewards(rewards, G, weights, validate)
    require(scale in ("group", "batch", "none"), f"`scale` must be 'group', 'batch' or 'none', got {scale!r}")
    _check_eps(eps)
    if _route(rewards):
        return fused.grpo_advantages(rewards, G, weights, scale, float(eps), compute_dtype(rewards))
    return naive.grpo_advantages(rewards, G, weights=weights, scale=scale, eps=eps)


def gdpo_advantages(
    rewards: torch.Tensor,
    G: int,
    *,
    weights: torch.Tensor | None = None,
    eps: float = 1e-4,
    validate: bool = True,
) -> GroupAdvantages:
    """GDPO advantages, TRL's ``normalize_then_sum``.

    Per reward column ``a_k = (r_k - mean_gk) / (std_gk + eps)`` within each group, ``a = nansum_k w_k a_k``, then
    over the whole batch ``A = (a - mean(a)) / (std(a) + eps)``. Unscorable rows (all NaN) get ``A = 0``.
    Returns ``GroupAdvantages(advantages[N], mean[num_groups, K], std[num_groups, K])``.
    """
    _check_rewards(rewards, G, weights, validate)
    _check_eps(eps)
    if _route(rewards):
        return fused.gdpo_advantages(rewards, G, weights, float(eps), compute_dtype(rewards))
    return naive.gdpo_advantages(rewards, G, weights=weights, eps=eps)


def papo_advantages(
    outcome: torch.Tensor,
    process: torch.Tensor,
    correct: torch.Tensor,
    G: int,
    *,
    lambda_process: float = 1.0,
    eps: float = 1e-6,
    scale_by_std: bool = True,
    process_norm: str = "correct",
    validate: bool = True,
) -> PAPOAdvantages:
    """PAPO's decoupled advantages: ``A_total = A_out + lambda_process * A_proc``.

    ``A_out = (o - mean_g o) / (std_g o + eps)`` over all ``G`` responses if ``G > 1`` and ``std > eps``, else 0.
    ``A_proc = (p - mean_c p) / (std_c p + eps)`` over the *correct* responses that have a process score
    (NaN = not scored) if at least two exist and ``std_c > eps``, else 0; incorrect responses get 0, so a wrong
    answer cannot earn credit from the judge, and an all-correct group (``A_out = 0``) still has a signal.
    ``scale_by_std=False`` centres without scaling (Dr.GRPO). ``process_norm="all"`` normalises ``p`` over all
    ``G`` responses (the full-normalisation ablation). ``outcome`` must be finite; ``correct`` is non-zero for a
    correct response.
    """
    check_tensor("outcome", outcome, ndim=1, floating=True)
    check_tensor("process", process, ndim=1, floating=True)
    check_tensor("correct", correct, ndim=1)
    _check_G(G, outcome.shape[0], "outcome")
    for name, t in (("process", process), ("correct", correct)):
        require(
            t.shape == outcome.shape,
            f"`{name}` has shape {tuple(t.shape)}, expected {tuple(outcome.shape)} like `outcome`",
        )
    require(process.dtype == outcome.dtype, f"`process` has dtype {process.dtype} but `outcome` has {outcome.dtype}")
    check_same_device(outcome=outcome, process=process, correct=correct)
    require(process_norm in ("correct", "all"), f"`process_norm` must be 'correct' or 'all', got {process_norm!r}")
    require(
        isinstance(lambda_process, (int, float)) and math.isfinite(lambda_process),
        f"`lambda_process` must be a finite float, got {lambda_process!r}",
    )
    _check_eps(eps)
    if validate:
        bad = torch.stack(
            [
                ~torch.isfinite(outcome).all(),
                torch.isinf(process).any(),
                torch.isnan(correct).any()
                if correct.is_floating_point()
                else torch.zeros((), dtype=torch.bool, device=correct.device),
            ]
        ).tolist()
        require(not bad[0], "`outcome` must be finite (NaN and +-inf are not allowed)")
        require(not bad[1], "`process` contains +-inf; mark an unscored response with NaN")
        require(not bad[2], "`correct` contains NaN; it must say for every response whether it is correct")
    if _route(outcome):
        return fused.papo_advantages(
            outcome,
            process,
            correct,
            G,
            float(lambda_process),
            float(eps),
            bool(scale_by_std),
            process_norm,
            compute_dtype(outcome),
        )
    return naive.papo_advantages(
        outcome,
        process,
        correct,
        G,
        lambda_process=lambda_process,
        eps=eps,
        scale_by_std=scale_by_std,
        process_norm=process_norm,
    )


def dynamic_sampling_mask(outcome: torch.Tensor, G: int, *, validate: bool = True) -> torch.Tensor:
    """DAPO dynamic sampling: ``keep[num_groups]``, True iff the group's outcome rewards are not all equal."""
    check_tensor("outcome", outcome, ndim=1)
    _check_G(G, outcome.shape[0], "outcome")
    if validate and outcome.is_floating_point():
        require(torch.isfinite(outcome).all().item(), "`outcome` must be finite (NaN and +-inf are not allowed)")
    if _route(outcome):
        return fused.group_counts(outcome, G)[0]
    return naive.dynamic_sampling_mask(outcome, G)


def pass_rate_buckets(correct: torch.Tensor, G: int, *, validate: bool = True) -> torch.Tensor:
    """DARO pass-rate buckets: ``k[num_groups]`` = number of correct responses per group (pass rate ``k / G``)."""
    check_tensor("correct", correct, ndim=1)
    _check_G(G, correct.shape[0], "correct")
    if validate and correct.is_floating_point():
        require(
            not torch.isnan(correct).any().item(),
            "`correct` contains NaN; it must say for every response whether it is correct",
        )
    if _route(correct):
        return fused.group_counts(correct, G)[1]
    return naive.pass_rate_buckets(correct, G)
