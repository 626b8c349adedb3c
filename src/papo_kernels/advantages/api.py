"""Public advantage functions: check the arguments, then route to the fused kernel or the torch reference.

Inputs are per-response values laid out group-contiguously (``N = num_groups * G``), as TRL's
``RepeatSampler`` produces them after the cross-process gather.

Which check happens where:

* Argument checks (type, rank, dtype, shape, device, ``G``, ``N % G``, ``eps``, ``lambda_process``, ``scale``,
  ``process_norm``) read host metadata only: a ``ValueError`` at call time, on every device, free.
* Value checks (``+-inf`` rewards, non-finite weights, a non-finite ``outcome``, ``+-inf`` process scores, NaN in
  ``correct``) are computed in the same kernel launch into the result's ``error`` flag (the torch reference
  computes the same flag). On CPU it is read at once and raises at once, whatever ``validate`` says. On CUDA
  ``validate=False`` (the default) never synchronises: the result carries the flag and ``result.check()`` raises
  the same ``ValueError`` where the caller synchronises anyway (``PAPOTrainer`` does it when it logs);
  ``validate=True`` reads it at once, one device synchronisation. ``dynamic_sampling_mask`` and
  ``pass_rate_buckets`` return plain tensors: on CUDA their value check needs ``validate=True``.

On CUDA a call is one Triton launch, no host synchronisation (unless ``validate=True``), and CUDA-graph capturable.
"""

from __future__ import annotations

import torch

from .._runtime import check_same_device, check_tensor, kernels_available, require, require_finite
from . import fused, naive
from .types import GroupAdvantages, PAPOAdvantages, check_error

GRPO_EPS = 1e-4
"""Default ``eps`` of GRPO and GDPO, TRL's."""
PAPO_EPS = 1e-6
"""Default ``eps`` of PAPO, the official PAPO code's."""


def _check_G(G, N: int, name: str) -> None:
    require(isinstance(G, int) and not isinstance(G, bool) and G > 0, "`G` must be a positive integer, got {!r}", G)
    require(N % G == 0, "`{}` has N={} responses, which is not a multiple of the group size G={}", name, N, G)
    require(G <= fused.MAX_G, "`G` must be at most {}, got {}", fused.MAX_G, G)


def check_lambda_process(lambda_process) -> None:
    """PAPO's weight of ``A_proc`` in ``A_out + lambda_process * A_proc``: a finite number ``>= 0`` (the one rule,
    which ``PAPOConfig`` applies too)."""
    require_finite("lambda_process", lambda_process, 0)


def _check_rewards(rewards, G, weights) -> None:
    check_tensor("rewards", rewards, ndim=(1, 2), floating=True)
    _check_G(G, rewards.shape[0], "rewards")
    if weights is not None:
        check_tensor("weights", weights, ndim=1, floating=True)
        K = rewards.shape[1] if rewards.dim() == 2 else 1
        require(weights.shape[0] == K, "`weights` has {} entries but `rewards` has {} columns", weights.shape[0], K)
        check_same_device(rewards=rewards, weights=weights)


def _route(t: torch.Tensor) -> bool:
    return t.numel() > 0 and kernels_available(t)


def _raise_now(error: torch.Tensor, validate: bool) -> bool:
    """Whether to read the value-error flag now: always on CPU (free), on CUDA only if asked (a sync)."""
    return validate or not error.is_cuda


def _check_values(error: torch.Tensor, validate: bool) -> None:
    if _raise_now(error, validate):
        check_error(error)


def _finish(result, validate: bool):
    """`result`, its value-error flag checked now if :func:`_raise_now` says so (else it travels in the result)."""
    _check_values(result.error, validate)
    return result


def grpo_advantages(
    rewards: torch.Tensor,
    G: int,
    *,
    weights: torch.Tensor | None = None,
    scale: str = "group",
    eps: float = GRPO_EPS,
    validate: bool = False,
) -> GroupAdvantages:
    """GRPO advantages, TRL's ``sum_then_normalize``.

    ``r = nansum_k w_k r_k`` over the reward columns (a row whose columns are all NaN is unscorable), then per group
    ``A = (r - mean_g) / (std + eps)``. NaN rows are left out of the statistics and get ``A = 0``.

    Args:
        rewards: ``[N]`` or ``[N, K]`` floating rewards, one column per reward function, group-contiguous (rows
            ``g*G .. g*G+G-1`` answer prompt ``g``); NaN: the reward does not apply.
        G: responses per prompt; must divide ``N``.
        weights: ``[K]`` reward weights ``w_k``; ``None``: all 1.
        scale: ``std`` is the group's (``"group"``), the batch's (``"batch"``), or none: centring only
            (``"none"``, Dr. GRPO).
        eps: added to ``std``.
        validate: on CUDA, read the value-error flag now (one synchronisation); see the module docstring.

    Returns:
        ``GroupAdvantages(advantages[N], mean[N // G], std[N // G], error)``, fp64 for fp64 rewards, else fp32.

    Examples:
        >>> import torch
        >>> from papo_kernels import grpo_advantages
        >>> rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, float("nan"), 0.0, 1.0])  # two prompts, G = 4
        >>> out = grpo_advantages(rewards, G=4)
        >>> out.advantages
        tensor([ 1.2244, -1.2244,  0.0000,  0.0000,  0.9999,  0.0000, -0.9999,  0.0000])
        >>> out.mean, out.std
        (tensor([0.5000, 1.0000]), tensor([0.4082, 1.0000]))
    """
    _check_rewards(rewards, G, weights)
    require(scale in ("group", "batch", "none"), "`scale` must be 'group', 'batch' or 'none', got {!r}", scale)
    require_finite("eps", eps, 0)
    if _route(rewards):
        return _finish(fused.fused_grpo_advantages(rewards, G, weights, scale, eps), validate)
    return _finish(naive.naive_grpo_advantages(rewards, G, weights=weights, scale=scale, eps=eps), validate)


def gdpo_advantages(
    rewards: torch.Tensor,
    G: int,
    *,
    weights: torch.Tensor | None = None,
    eps: float = GRPO_EPS,
    validate: bool = False,
) -> GroupAdvantages:
    """GDPO advantages, TRL's ``normalize_then_sum``.

    Per reward column ``a_k = (r_k - mean_gk) / (std_gk + eps)`` within each group, ``a = nansum_k w_k a_k``, then
    over the whole batch ``A = (a - mean(a)) / (std(a) + eps)``. Unscorable rows (all NaN) get ``A = 0``.

    Args:
        rewards: ``[N, K]`` (or ``[N]``) floating rewards, group-contiguous, one column per reward function; NaN:
            not applicable.
        G: group size, a divisor of ``N``.
        weights: ``[K]`` weights of the normalised columns; ``None``: all 1.
        eps: added to every std, per column and over the batch.
        validate: on CUDA, check the inputs' values at once (a synchronisation) instead of carrying the flag.

    Returns:
        ``GroupAdvantages(advantages[N], mean[N // G, K], std[N // G, K], error)``: the per-column group statistics.

    Examples:
        >>> import torch
        >>> from papo_kernels import gdpo_advantages
        >>> rewards = torch.tensor([[1.0, 0.2], [0.0, 0.4], [1.0, 0.6], [0.0, 0.8]])  # accuracy, format; G = 2
        >>> gdpo_advantages(rewards, G=2, weights=torch.tensor([1.0, 0.5])).advantages
        tensor([ 0.8658, -0.8658,  0.8658, -0.8658])
    """
    _check_rewards(rewards, G, weights)
    require_finite("eps", eps, 0)
    if _route(rewards):
        return _finish(fused.fused_gdpo_advantages(rewards, G, weights, eps), validate)
    return _finish(naive.naive_gdpo_advantages(rewards, G, weights=weights, eps=eps), validate)


def papo_advantages(
    outcome: torch.Tensor,
    process: torch.Tensor,
    correct: torch.Tensor,
    G: int,
    *,
    lambda_process: float = 1.0,
    eps: float = PAPO_EPS,
    scale_by_std: bool = True,
    process_norm: str = "correct",
    validate: bool = False,
) -> PAPOAdvantages:
    """PAPO's decoupled advantages: ``A_total = A_out + lambda_process * A_proc``.

    ``A_out = (o - mean_g o) / (std_g o + eps)`` over all ``G`` responses if ``G > 1`` and ``std > eps``, else 0.
    ``A_proc = (p - mean_c p) / (std_c p + eps)`` over the *correct* responses that have a process score
    (NaN = not scored) if at least two exist and ``std_c > eps``, else 0; incorrect responses get 0, so a wrong
    answer cannot earn credit from the judge, and an all-correct group (``A_out = 0``) still has a signal.

    Args:
        outcome: ``[N]`` finite outcome rewards ``o`` (ORM), group-contiguous.
        process: ``[N]`` process scores ``p`` (PRM, e.g. a rubric judge), same dtype; NaN: not scored.
        correct: ``[N]`` correctness, non-zero (or ``True``) for a correct response; no NaN.
        G: responses per prompt, dividing ``N``.
        lambda_process: weight of ``A_proc``, a finite number ``>= 0``.
        eps: added to both stds, and the threshold of the ``std > eps`` gates.
        scale_by_std: ``False`` centres without scaling (the Dr. GRPO variant, same gates).
        process_norm: ``"correct"``, or ``"all"``: ``p`` normalised over all ``G`` responses (the
            full-normalisation ablation).
        validate: on CUDA, raise on bad values now, at the cost of a synchronisation (module docstring).

    Returns:
        ``PAPOAdvantages``: ``total``, ``outcome`` (``A_out``), ``process`` (``A_proc``), ``[N]`` each, and the
        per-group statistics and gates.

    Examples:
        >>> import torch
        >>> from papo_kernels import papo_advantages
        >>> outcome = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0.0])  # one prompt, G = 8
        >>> process = torch.tensor([1, 1, 0.5, 0, 0, 0, 0, 0.0])
        >>> adv = papo_advantages(outcome, process, correct=outcome > 0, G=8)
        >>> adv.total
        tensor([ 1.7850,  1.7850,  0.0529, -0.7246, -0.7246, -0.7246, -0.7246, -0.7246])
        >>> adv.process  # normalised over the three correct responses only
        tensor([ 0.5773,  0.5773, -1.1547,  0.0000,  0.0000,  0.0000,  0.0000,  0.0000])
    """
    check_tensor("outcome", outcome, ndim=1, floating=True)
    check_tensor("process", process, ndim=1, floating=True)
    check_tensor("correct", correct, ndim=1)
    _check_G(G, outcome.shape[0], "outcome")
    for name, t in (("process", process), ("correct", correct)):
        if t.shape != outcome.shape:
            raise ValueError(f"`{name}` has shape {tuple(t.shape)}, expected {tuple(outcome.shape)} like `outcome`")
    require(process.dtype == outcome.dtype, "`process` has dtype {} but `outcome` has {}", process.dtype, outcome.dtype)
    check_same_device(outcome=outcome, process=process, correct=correct)
    require(process_norm in ("correct", "all"), "`process_norm` must be 'correct' or 'all', got {!r}", process_norm)
    check_lambda_process(lambda_process)
    require_finite("eps", eps, 0)
    if _route(outcome):
        out = fused.fused_papo_advantages(
            outcome, process, correct, G, lambda_process, eps, bool(scale_by_std), process_norm
        )
    else:
        out = naive.naive_papo_advantages(
            outcome, process, correct, G,
            lambda_process=lambda_process, eps=eps, scale_by_std=scale_by_std, process_norm=process_norm,
        )  # fmt: skip
    return _finish(out, validate)


def dynamic_sampling_mask(outcome: torch.Tensor, G: int, *, validate: bool = False) -> torch.Tensor:
    """DAPO dynamic sampling: keep a group iff its outcome rewards are not all equal (an all-equal group has no
    GRPO signal).

    Args:
        outcome: ``[N]`` outcome rewards (floating: finite; or bool / integer), group-contiguous.
        G: responses per prompt; divides ``N``.
        validate: on CUDA, check that a floating ``outcome`` is finite (one synchronisation); CPU always checks.

    Returns:
        ``keep[N // G]``, bool.

    Examples:
        >>> import torch
        >>> from papo_kernels import dynamic_sampling_mask
        >>> dynamic_sampling_mask(torch.tensor([1.0, 1.0, 0.0, 1.0]), G=2)
        tensor([False,  True])
    """
    return _group_counts("outcome", outcome, G, validate)[0]


def pass_rate_buckets(correct: torch.Tensor, G: int, *, validate: bool = False) -> torch.Tensor:
    """DARO pass-rate buckets: the number ``k`` of correct responses in each group (pass rate ``k / G``).

    Args:
        correct: ``[N]`` correctness (bool, integer, or floating without NaN; non-zero is correct), group-contiguous.
        G: the group size (a divisor of ``N``).
        validate: on CUDA, check a floating ``correct`` for NaN now (one synchronisation); CPU always checks.

    Returns:
        ``k[N // G]``, int64 in ``0..G``.

    Examples:
        >>> import torch
        >>> from papo_kernels import pass_rate_buckets
        >>> pass_rate_buckets(torch.tensor([True, True, False, True, False, False]), G=3)
        tensor([2, 1])
    """
    return _group_counts("correct", correct, G, validate)[1]


def _group_counts(name: str, x: torch.Tensor, G: int, validate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of ``x`` (the argument ``name``): whether its values vary, and how many are non-zero; a floating
    ``x`` is value-checked as ``name`` (``outcome``: finite, ``correct``: no NaN)."""
    check_tensor(name, x, ndim=1)
    _check_G(G, x.shape[0], name)
    floating = x.is_floating_point()
    if _route(x):
        varies, count, error = fused.group_counts(x, G, name if floating else None)
    else:
        varies, count = naive.naive_dynamic_sampling_mask(x, G), naive.naive_pass_rate_buckets(x, G)
        error = naive.value_errors(**{name: x})
    _check_values(error, validate and floating)  # nothing to read for bool or integer values
    return varies, count
