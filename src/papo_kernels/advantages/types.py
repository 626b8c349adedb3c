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


class GroupAdvantages(NamedTuple):
    """``advantages[N]`` and the statistics they were normalised with.

    GRPO: ``mean``/``std`` ``[num_groups]`` of the combined reward (``std`` is the batch std under
    ``scale="batch"``). GDPO: ``[num_groups, K]``, one column per reward function. ``error``: the value-error
    flag (see :func:`check_error`); :meth:`check` raises on it.
    """

    advantages: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    error: torch.Tensor | None = None

    def check(self) -> GroupAdvantages:
        """Raise ``ValueError`` if the inputs failed a value check (a sync on CUDA); else return ``self``."""
        check_error(self.error)
        return self


class PAPOAdvantages(NamedTuple):
    """PAPO's advantages ``[N]`` and per-group statistics ``[num_groups]``.

    ``process_mean``/``process_std`` are over the responses ``A_proc`` is normalised over (the correct,
    scored ones by default); ``process_active`` says whether ``A_proc`` is non-zero for that group. ``error``:
    the value-error flag (see :func:`check_error`); :meth:`check` raises on it.
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

    def check(self) -> PAPOAdvantages:
        """Raise ``ValueError`` if the inputs failed a value check (a sync on CUDA); else return ``self``."""
        check_error(self.error)
        return self
