"""Readable torch reference for the group advantages: this file is the specification.

Rewards are laid out group-contiguously: rows ``g*G .. g*G+G-1`` are the ``G`` responses to prompt ``g``.
Every std is the unbiased (Bessel, n-1) estimate over the non-NaN entries, NaN when fewer than two exist,
exactly as TRL's ``nanstd``. NaN marks an unscorable reward (a reward function returned ``None``).
Arithmetic is fp64 whatever the input dtype; results are fp64 for fp64 inputs, else fp32. Each result carries
the value-error flag of :mod:`.types` (:func:`value_errors`), which the caller checks.

Each ``naive_*`` function is the reference of the public function without the prefix (``api.py``), which checks the
arguments and holds the defaults: here every option is required.
"""

from __future__ import annotations

import torch

from .._runtime import compute_dtype
from . import types
from .types import GroupAdvantages, PAPOAdvantages


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Bessel-corrected std ignoring NaNs; NaN where fewer than two values are present (TRL's ``nanstd``)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = torch.where(count > 1, var * count / (count - 1).clamp(min=1), torch.full_like(var, float("nan")))
    std = var.sqrt()
    return std if keepdim else (std.squeeze(dim) if dim is not None else std.reshape(()))


def value_errors(
    *,
    rewards: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    outcome: torch.Tensor | None = None,
    process: torch.Tensor | None = None,
    correct: torch.Tensor | None = None,
) -> torch.Tensor:
    """The value-error flag (int32 scalar): the bit of each failed check of :mod:`.types`, 0 for clean inputs."""
    checks = []
    if rewards is not None:
        checks.append((types.REWARDS_INF, torch.isinf(rewards).any()))
    if weights is not None:
        checks.append((types.WEIGHTS_NONFINITE, ~torch.isfinite(weights).all()))
    if outcome is not None and outcome.is_floating_point():
        checks.append((types.OUTCOME_NONFINITE, ~torch.isfinite(outcome).all()))
    if process is not None:
        checks.append((types.PROCESS_INF, torch.isinf(process).any()))
    if correct is not None and correct.is_floating_point():
        checks.append((types.CORRECT_NAN, torch.isnan(correct).any()))
    device = next(t.device for t in (rewards, outcome, correct) if t is not None)
    flag = torch.zeros((), dtype=torch.int32, device=device)
    for bit, failed in checks:
        flag = flag | failed.to(torch.int32) * bit
    return flag


def weighted_nansum(rewards: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_k w_k r_k`` over the non-NaN reward columns: several reward functions made one reward, as TRL sums them.

    Args:
        rewards: ``[N, K]`` rewards, one column per reward function (or ``[N]``, one column); NaN marks a reward
            that does not apply.
        weights: ``[K]`` weights ``w_k`` (any device and dtype: moved to the rewards'); ``None``: all 1.

    Returns:
        ``[N]``, in the rewards' dtype: the weighted sum of each row's non-NaN rewards, NaN where every column is NaN
        (an unscorable row).

    Examples:
        >>> import torch
        >>> from papo_kernels.advantages import weighted_nansum
        >>> nan = float("nan")
        >>> weighted_nansum(torch.tensor([[1.0, 2.0], [nan, 2.0], [nan, nan]]), torch.tensor([1.0, 0.5]))
        tensor([2., 1., nan])
    """
    if rewards.dim() == 1:
        rewards = rewards[:, None]
    w = torch.ones(rewards.shape[1], dtype=rewards.dtype, device=rewards.device) if weights is None else weights
    total = (rewards * w.to(rewards)).nansum(dim=1)
    return total.masked_fill(torch.isnan(rewards).all(dim=1), float("nan"))


def naive_grpo_advantages(
    rewards: torch.Tensor, G: int, *, weights: torch.Tensor | None, scale: str, eps: float
) -> GroupAdvantages:
    """TRL ``sum_then_normalize``: ``r = nansum_k w_k r_k``, ``A = (r - mean_g(r)) / (std(r) + eps)``.

    ``std`` is the group std (``scale="group"``), the batch std (``"batch"``) or unused (``"none"``: centering
    only). NaN rewards are left out of mean and std and get ``A = 0``; so does a group with one scorable response.
    """
    x = weighted_nansum(rewards.double(), weights)
    grouped = x.view(-1, G)
    mean = torch.nanmean(grouped, dim=1)
    if scale == "batch":
        std = (nanstd(x) if x.numel() > 1 else x.new_zeros(())).expand(grouped.shape[0])
    else:
        std = nanstd(grouped, dim=1) if G > 1 else torch.zeros_like(mean)
    adv = grouped - mean[:, None]
    if scale != "none":
        adv = adv / (std[:, None] + eps)
    out = compute_dtype(rewards)
    error = value_errors(rewards=rewards, weights=weights)
    return GroupAdvantages(torch.nan_to_num(adv.reshape(-1), nan=0.0).to(out), mean.to(out), std.to(out), error)


def naive_gdpo_advantages(
    rewards: torch.Tensor, G: int, *, weights: torch.Tensor | None, eps: float
) -> GroupAdvantages:
    """TRL ``normalize_then_sum`` (GDPO): per column ``a_k = (r_k - mean_gk) / (std_gk + eps)``,
    ``a = nansum_k w_k a_k``, then over the batch ``A = (a - mean(a)) / (std(a) + eps)``.

    Unscorable rows (every column NaN) are left out of the batch statistics and get ``A = 0``.
    """
    r = (rewards if rewards.dim() == 2 else rewards[:, None]).double()
    K = r.shape[1]
    grouped = r.view(-1, G, K)
    mean = torch.nanmean(grouped, dim=1)
    std = nanstd(grouped, dim=1) if G > 1 else torch.zeros_like(mean)
    a = ((grouped - mean[:, None]) / (std[:, None] + eps)).reshape(-1, K)
    w = torch.ones(K, dtype=r.dtype) if weights is None else weights.double().cpu()
    a = (a * w.to(a.device)).nansum(dim=1).masked_fill(torch.isnan(r).all(dim=1), float("nan"))
    batch_std = nanstd(a) if a.numel() > 1 else a.new_zeros(())
    adv = torch.nan_to_num((a - torch.nanmean(a)) / (batch_std + eps), nan=0.0)
    out = compute_dtype(rewards)
    return GroupAdvantages(adv.to(out), mean.to(out), std.to(out), value_errors(rewards=rewards, weights=weights))


def _gated_normalize(x: torch.Tensor, valid: torch.Tensor, eps: float, scale_by_std: bool):
    """Per row of ``x[num_groups, G]``: ``(x - mean) / (std + eps)`` over ``valid`` entries if at least two are
    valid and ``std > eps``, else 0. Invalid entries get 0. Returns (values, mean, std, active)."""
    xv = torch.where(valid, x, torch.full_like(x, float("nan")))
    mean = torch.nanmean(xv, dim=1)
    std = nanstd(xv, dim=1)
    active = (valid.sum(dim=1) >= 2) & (std > eps)
    centered = x - mean[:, None]
    values = centered / (std[:, None] + eps) if scale_by_std else centered
    values = torch.where(active[:, None] & valid, values, torch.zeros_like(values))
    return values, mean, std, active


def naive_papo_advantages(
    outcome: torch.Tensor, process: torch.Tensor, correct: torch.Tensor, G: int,
    *, lambda_process: float, eps: float, scale_by_std: bool, process_norm: str,
) -> PAPOAdvantages:  # fmt: skip
    """PAPO's decoupled advantages, ``A_total = A_out + lambda_process * A_proc``.

    ``A_out = (o - mean_g o) / (std_g o + eps)`` over all G responses if ``G > 1`` and ``std > eps``, else 0.
    ``A_proc = (p - mean_c p) / (std_c p + eps)`` over the *correct* responses with a process score (NaN = no
    score) if at least two exist and ``std_c > eps``, else 0; incorrect responses get ``A_proc = 0``.
    ``scale_by_std=False`` centres only (Dr.GRPO). ``process_norm="all"`` normalises ``p`` over all G (ablation).
    """
    o = outcome.double().view(-1, G)
    p = process.double().view(-1, G)
    c = correct.view(-1, G) != 0
    a_out, o_mean, o_std, _ = _gated_normalize(o, torch.ones_like(c), eps, scale_by_std)
    scored = ~torch.isnan(p)
    pool = scored & c if process_norm == "correct" else scored
    a_proc, p_mean, p_std, active = _gated_normalize(torch.nan_to_num(p), pool, eps, scale_by_std)
    # nanmean over an empty pool is NaN; keep the stats of the scored pool only
    p_mean = torch.where(pool.any(dim=1), p_mean, torch.full_like(p_mean, float("nan")))
    out = compute_dtype(outcome)
    total = a_out + lambda_process * a_proc
    f = lambda t: t.reshape(-1).to(out)  # noqa: E731
    return PAPOAdvantages(
        total=f(total),
        outcome=f(a_out),
        process=f(a_proc),
        outcome_mean=o_mean.to(out),
        outcome_std=o_std.to(out),
        process_mean=p_mean.to(out),
        process_std=p_std.to(out),
        num_correct=c.sum(dim=1).to(torch.int32),
        process_active=active,
        error=value_errors(outcome=outcome, process=process, correct=correct),
    )


def naive_dynamic_sampling_mask(outcome: torch.Tensor, G: int) -> torch.Tensor:
    """DAPO dynamic sampling: per group, True iff its outcome rewards are not all equal."""
    o = outcome.view(-1, G)
    return (o != o[:, :1]).any(dim=1)


def naive_pass_rate_buckets(correct: torch.Tensor, G: int) -> torch.Tensor:
    """DARO pass-rate bucket per group: the number of correct responses, in ``0..G`` (pass rate ``k/G``)."""
    return (correct.view(-1, G) != 0).sum(dim=1).to(torch.int64)
