"""Result types of the advantage functions (shared by the reference and the kernel)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class GroupAdvantages(NamedTuple):
    """``advantages[N]`` and the statistics they were normalised with.

    GRPO: ``mean``/``std`` ``[num_groups]`` of the combined reward (``std`` is the batch std under
    ``scale="batch"``). GDPO: ``[num_groups, K]``, one column per reward function.
    """

    advantages: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


class PAPOAdvantages(NamedTuple):
    """PAPO's advantages ``[N]`` and per-group statistics ``[num_groups]``.

    ``process_mean``/``process_std`` are over the responses ``A_proc`` is normalised over (the correct,
    scored ones by default); ``process_active`` says whether ``A_proc`` is non-zero for that group.
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
