"""Validation of the policy-loss inputs, shared by the torch reference and the kernels."""

from __future__ import annotations

import torch

from .._runtime import check_same_device, check_tensor, require


def check_loss_inputs(
    per_token_shape: torch.Size,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    importance_sampling_ratio: torch.Tensor | None,
    sequence_scale: torch.Tensor | None,
    beta: float,
    sampling_logps: torch.Tensor | None = None,
) -> None:
    """Shapes of everything beside the logits, given the ``[B, T]`` token shape; raises ``ValueError``."""
    B, T = per_token_shape
    check_tensor("completion_mask", completion_mask, ndim=2)
    require(
        tuple(completion_mask.shape) == (B, T),
        f"`completion_mask` must have shape {(B, T)}, got {tuple(completion_mask.shape)}",
    )
    check_tensor("advantages", advantages, ndim=(1, 2), floating=True)
    require(
        tuple(advantages.shape) in ((B,), (B, T)),
        f"`advantages` must have shape {(B,)} or {(B, T)}, got {tuple(advantages.shape)}",
    )
    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps), ("sampling_logps", sampling_logps)):
        if t is not None:
            check_tensor(name, t, ndim=2, floating=True)
            require(tuple(t.shape) == (B, T), f"`{name}` must have shape {(B, T)}, got {tuple(t.shape)}")
    if importance_sampling_ratio is not None:
        check_tensor("importance_sampling_ratio", importance_sampling_ratio, ndim=2, floating=True)
        require(
            tuple(importance_sampling_ratio.shape) in ((B, T), (B, 1)),
            f"`importance_sampling_ratio` must have shape {(B, T)} or {(B, 1)}, "
            f"got {tuple(importance_sampling_ratio.shape)}",
        )
    if sequence_scale is not None:
        check_tensor("sequence_scale", sequence_scale, ndim=1, floating=True)
        require(
            tuple(sequence_scale.shape) == (B,),
            f"`sequence_scale` must have shape {(B,)}, got {tuple(sequence_scale.shape)}",
        )
    require(beta == 0.0 or ref_logps is not None, "`ref_logps` is required when config.beta != 0")
    check_same_device(
        completion_mask=completion_mask,
        advantages=advantages,
        old_logps=old_logps,
        ref_logps=ref_logps,
        sampling_logps=sampling_logps,
        importance_sampling_ratio=importance_sampling_ratio,
        sequence_scale=sequence_scale,
    )


def check_logits_inputs(logits: torch.Tensor, completion_ids: torch.Tensor) -> None:
    """``logits[B, T, V]`` floating and ``completion_ids[B, T]`` integer in ``[0, V)`` (one cheap host check)."""
    check_tensor("logits", logits, ndim=3, floating=True)
    check_tensor("completion_ids", completion_ids, ndim=2)
    require(
        not completion_ids.is_floating_point() and not completion_ids.is_complex(),
        f"`completion_ids` must be an integer tensor, got {completion_ids.dtype}",
    )
    require(
        tuple(completion_ids.shape) == tuple(logits.shape[:2]),
        f"`completion_ids` must have shape {tuple(logits.shape[:2])}, got {tuple(completion_ids.shape)}",
    )
    check_same_device(logits=logits, completion_ids=completion_ids)
    check_ids(completion_ids, logits.shape[-1])


def check_ids(completion_ids: torch.Tensor, vocab_size: int) -> None:
    """Target ids must lie in ``[0, V)``: one fused min/max reduction and a single host sync."""
    if completion_ids.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(completion_ids)).tolist()
    require(
        0 <= lo and hi < vocab_size,
        f"`completion_ids` must lie in [0, {vocab_size}), got values in [{lo}, {hi}]",
    )
