"""Result types of the advantage functions (shared by the reference and the kernel) and their value-error flag.

``error`` is an int32 scalar tensor on the inputs' device: a bit set per value check that failed (0 when the
inputs are clean). The kernel computes it in the same launch; :func:`check_error` reads it (one device
synchronisation on CUDA) and raises the ``ValueError`` the bit stands for.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

REWARDS_INF = 1
WEIGHTS_NONFINITE = 2
OUTCOME_NONFINITE = 4
PROCESS_INF = 8
CORRECT_NAN = 16

MESSAGES = {
    REWARDS_INF: "`rewards` contains +-inf; mark an unscorable reward with NaN",
    WEIGHTS_NONFINITE: "`weights` must be finite",
    OUTCOME_NONFINITE: "`outcome` must be finite (NaN and +-inf are not allowed)",
    PROCESS_INF: "`process` contains +-inf; mark an unscored response with NaN",
    CORRECT_NAN: "`correct` contains NaN; it must say for every response whether it is correct",
}


def check_error(error: torch.Tensor | int | None) -> None:
    """Raise ``ValueError`` naming every failed value check in the flag `error` (reads it: a sync on CUDA)."""
    code = 0 if error is None else int(error)
    if code:
        raise ValueError("; ".join(msg for bit, msg in MESSAGES.items() if code & bit))


def _check(result):
    """Raise ``ValueError`` if the inputs failed a value check (a sync on CUDA); else return the result itself."""
    check_error(result.error)
    return result


class GroupAdvantages(NamedTuple):
    """What :func:`~papo_kernels.grpo_advantages` and :func:`~papo_kernels.gdpo_advantages` return: the advantages
    and the statistics they were normalised with.

    Args:
        advantages: ``[N]``, 0 for unscorable rows.
        mean: GRPO: ``[num_groups]``, the group mean of the combined reward; GDPO: ``[num_groups, K]``, one column
            per reward function.
        std: shaped as ``mean``; GRPO under ``scale="batch"``: the batch std, repeated.
        error: the value-error flag (see :func:`check_error`), checked by :meth:`check`.

    Examples:
        >>> import torch
        >>> from papo_kernels import grpo_advantages
        >>> out = grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), G=2)
        >>> out.std  # the second group is constant: A = 0
        tensor([0.7071, 0.0000])
        >>> out.check() is out  # raises on bad input values (a sync on CUDA)
        True
    """

    advantages: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    error: torch.Tensor | None = None

    check = _check


class PAPOAdvantages(NamedTuple):
    """What :func:`~papo_kernels.papo_advantages` returns: PAPO's advantages ``[N]`` and per-group statistics
    ``[num_groups]``.

    Args:
        total: ``A_out + lambda_process * A_proc``, what the loss uses.
        outcome: ``A_out``.
        process: ``A_proc``, 0 for incorrect responses.
        outcome_mean, outcome_std: the outcome reward's group statistics.
        process_mean, process_std: over the responses ``A_proc`` is normalised over (the correct, scored ones by
            default); NaN where there are none (mean) or fewer than two (std).
        num_correct: int32, the correct responses per group.
        process_active: bool, whether ``A_proc`` is non-zero for the group (the gates passed).
        error: the value-error flag (see :func:`check_error`), checked by :meth:`check`.

    Examples:
        >>> import torch
        >>> from papo_kernels import papo_advantages
        >>> outcome = torch.tensor([1, 1, 0, 0.0])  # two prompts, G = 2: all correct, all wrong
        >>> adv = papo_advantages(outcome, torch.tensor([1, 0.5, 0, 0.0]), outcome > 0, G=2)
        >>> adv.outcome, adv.process  # an all-correct group still learns from its process scores
        (tensor([0., 0., 0., 0.]), tensor([ 0.7071, -0.7071,  0.0000,  0.0000]))
        >>> adv.num_correct, adv.process_active
        (tensor([2, 0], dtype=torch.int32), tensor([ True, False]))
    """

    total: torch.Tensor
    outcome: torch.Tensor
    process: torch.Tensor
    outcome_mean: torch.Tensor
    outcome_std: torch.Tensor
    process_mean: torch.Tensor
    process_std: torch.Tensor
    num_correct: torch.Tensor
    process_active: torch.Tensor
    error: torch.Tensor | None = None

    check = _check
