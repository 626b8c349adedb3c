"""The policy loss's inputs besides the log-probs (or the logits or hidden states that give them): one definition,
checked once, taken by the torch reference, the plan of the kernels and every entry point."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._runtime import check_same_device, check_tensor, require


@dataclass(frozen=True)
class LossInputs:
    """The per-token inputs of the loss of one micro-batch of ``B`` sequences of ``T`` completion tokens; bad shapes,
    dtypes or devices raise ``ValueError`` naming the field when it is built.

    Args:
        completion_mask: ``[B, T]`` 1 for the tokens in the loss (any dtype; bool too).
        advantages: ``[B]`` (one per sequence) or ``[B, T]``.
        old_logps: ``[B, T]`` log-probs of the policy that sampled (the ratio's denominator); ``None``: on-policy,
            ``old = logps.detach()`` (ratio 1, with its gradient).
        ref_logps: ``[B, T]`` log-probs of the reference model, for the KL term (required when ``config.beta != 0``).
        importance_sampling_ratio: ``[B, T]`` or ``[B, 1]`` vLLM's importance-sampling weight (VESPO: folded into
            its sequence ratio).
        sampling_logps: ``[B, T]`` the sampler's log-probs, for the off-policy mask only; ``None``: ``old_logps``.
        num_items_in_batch: the ``dapo``/``cispo``/``vespo`` normaliser; ``None``: the mask's token count.
        sequence_scale: ``[B]`` per-sequence weights replacing the ``loss_type`` aggregation
            (``loss = sum_b scale_b * sum_t m_bt loss_bt``; DARO's ``w_k / T_k``), detached.

    Examples:
        >>> import torch
        >>> from papo_kernels.loss import LossInputs
        >>> LossInputs(torch.ones(2, 3), torch.zeros(2)).shape
        (2, 3)
        >>> LossInputs(torch.ones(2, 3), torch.zeros(3))
        Traceback (most recent call last):
        ...
        ValueError: `advantages` must have shape (2,) or (2, 3), got (3,)
    """

    completion_mask: Tensor
    advantages: Tensor
    old_logps: Tensor | None = None
    ref_logps: Tensor | None = None
    importance_sampling_ratio: Tensor | None = None
    sampling_logps: Tensor | None = None
    num_items_in_batch: Tensor | float | None = None
    sequence_scale: Tensor | None = None

    def __post_init__(self) -> None:
        check_tensor("completion_mask", self.completion_mask, ndim=2)
        B, T = self.shape
        check_tensor("advantages", self.advantages, ndim=(1, 2), floating=True)
        _require_shape("advantages", self.advantages, (B,), (B, T))
        for name in ("old_logps", "ref_logps", "sampling_logps"):
            if (t := getattr(self, name)) is not None:
                check_tensor(name, t, ndim=2, floating=True)
                _require_shape(name, t, (B, T))
        if (isr := self.importance_sampling_ratio) is not None:
            check_tensor("importance_sampling_ratio", isr, ndim=2, floating=True)
            _require_shape("importance_sampling_ratio", isr, (B, T), (B, 1))
        if self.sequence_scale is not None:
            check_tensor("sequence_scale", self.sequence_scale, ndim=1, floating=True)
            _require_shape("sequence_scale", self.sequence_scale, (B,))
        check_same_device(
            completion_mask=self.completion_mask, advantages=self.advantages, old_logps=self.old_logps,
            ref_logps=self.ref_logps, sampling_logps=self.sampling_logps, importance_sampling_ratio=isr,
            sequence_scale=self.sequence_scale,
        )  # fmt: skip

    @property
    def shape(self) -> tuple[int, int]:
        """``(B, T)``: sequences and completion tokens."""
        return tuple(self.completion_mask.shape)

    def check_tokens(self, name: str, shape: torch.Size) -> None:
        """The mask covers the ``[B, T]`` tokens of ``name`` (the log-probs, logits or hidden states)."""
        require(
            tuple(shape) == self.shape,
            "`completion_mask` must have shape {} (the tokens of `{}`), got {}", tuple(shape), name, self.shape,
        )  # fmt: skip

    def check_config(self, beta: float) -> None:
        """What the loss's configuration requires of the inputs: ``ref_logps`` when ``beta != 0``."""
        require(beta == 0.0 or self.ref_logps is not None, "`ref_logps` is required when config.beta != 0")


def _require_shape(name: str, t: Tensor, *shapes: tuple[int, ...]) -> None:
    allowed = " or ".join(map(str, shapes))
    require(tuple(t.shape) in shapes, "`{}` must have shape {}, got {}", name, allowed, tuple(t.shape))


def check_logits_inputs(logits: torch.Tensor, completion_ids: torch.Tensor) -> None:
    """``logits[B, T, V]`` floating and ``completion_ids[B, T]`` integer on its device (no host sync: the range of the
    ids is checked by the kernels, or by :func:`check_ids` on the torch path)."""
    check_tensor("logits", logits, ndim=3, floating=True)
    check_completion_ids(completion_ids, logits.shape[:2])
    check_same_device(logits=logits, completion_ids=completion_ids)


def check_completion_ids(completion_ids: torch.Tensor, shape: torch.Size) -> None:
    """``completion_ids`` an integer tensor of the ``[B, T]`` shape of the tokens."""
    check_tensor("completion_ids", completion_ids, ndim=2)
    require(
        not completion_ids.is_floating_point() and not completion_ids.is_complex(),
        "`completion_ids` must be an integer tensor, got {}", completion_ids.dtype,
    )  # fmt: skip
    require(
        tuple(completion_ids.shape) == tuple(shape),
        "`completion_ids` must have shape {}, got {}", tuple(shape), tuple(completion_ids.shape),
    )  # fmt: skip


def check_ids(completion_ids: torch.Tensor, vocab_size: int) -> None:
    """Target ids (of the unmasked tokens) must lie in ``[0, V)`` (the torch path: one min/max reduction and a host
    sync)."""
    if completion_ids.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(completion_ids)).tolist()
    require(
        0 <= lo and hi < vocab_size,
        f"`completion_ids` must lie in [0, {vocab_size}), got values in [{lo}, {hi}]",
    )
