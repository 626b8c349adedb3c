"""Fused policy loss over materialised logits: ``policy_loss`` and its ``torch.autograd.Function``.

The forward reads each row of ``logits[B, T, V]`` once and keeps O(B*T) state; the backward reads it once more
and writes ``dlogits`` (into the logits buffer with ``inplace_grad=True``). Arithmetic is fp32 in registers
(fp64 for fp64 logits), I/O in the logits' dtype. CPU tensors without the Triton interpreter use the torch
reference.
"""

from __future__ import annotations

import torch

from .._runtime import use_triton
from .config import PolicyLossConfig, PolicyLossOutput
from .inputs import check_logits_inputs, check_loss_inputs
from .naive import policy_loss_reference
from .plan import Plan, backward_rows, forward_rows, make_plan, output_from, sequence_and_finalize


def _row_strides(x: torch.Tensor) -> tuple[int, int]:
    return x.stride(0), x.stride(1)


def run_forward(logits: torch.Tensor, plan: Plan) -> None:
    """All three forward launches over ``logits[B, T, V]`` (last dim contiguous)."""
    sxb, sxt = _row_strides(logits)
    forward_rows(plan, logits, sxb, sxt, plan.T, 0, plan.B * plan.T)
    sequence_and_finalize(plan)


class PolicyLossFunction(torch.autograd.Function):
    """``loss = policy_loss(logits, ...)`` with a hand-written backward (one more pass over the logits)."""

    @staticmethod
    def forward(ctx, logits, completion_ids, completion_mask, advantages, old_logps, ref_logps,
                importance_sampling_ratio, sampling_logps, sequence_scale, num_items_in_batch, config,
                inplace_grad):  # fmt: skip
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        plan = make_plan(
            completion_ids, completion_mask, advantages, old_logps, ref_logps, importance_sampling_ratio,
            sequence_scale, num_items_in_batch, config, acc, logits.device, sampling_logps=sampling_logps,
        )  # fmt: skip
        run_forward(logits, plan)
        ctx.save_for_backward(logits)
        ctx.plan = plan
        ctx.inplace_grad = inplace_grad
        logps = plan.logp.view(plan.B, plan.T)
        entropy = plan.ent.view(plan.B, plan.T)
        seq = plan.sequence_loss()
        ctx.mark_non_differentiable(logps, entropy, seq, plan.out)
        return plan.loss, logps, entropy, seq, plan.out

    @staticmethod
    def backward(ctx, grad_loss, *_):
        (logits,) = ctx.saved_tensors
        plan: Plan = ctx.plan
        if ctx.inplace_grad:
            dx = logits
        else:
            dx = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        go = grad_loss.to(plan.acc).contiguous().view(1)
        sxb, sxt = _row_strides(logits)
        sdb, sdt = _row_strides(dx)
        backward_rows(plan, logits, sxb, sxt, plan.T, 0, plan.B * plan.T, dx, sdb, sdt, go)
        return (dx,) + (None,) * 11


def policy_loss(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    sampling_logps: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | float | None = None,
    sequence_scale: torch.Tensor | None = None,
    inplace_grad: bool = False,
    config: PolicyLossConfig = PolicyLossConfig(),  # noqa: B008 (frozen, immutable default)
) -> PolicyLossOutput:
    """TRL 1.16's GRPO-family loss of one micro-batch from ``logits[B, T, V]`` (``logits[b, t]`` predicts
    ``completion_ids[b, t]``; the caller shifts). ``old_logps=None`` is on-policy. With ``inplace_grad=True``
    the backward overwrites ``logits`` with its gradient. See ``PolicyLossConfig`` for the semantics."""
    check_logits_inputs(logits, completion_ids)
    check_loss_inputs(
        completion_ids.shape, completion_mask, advantages, old_logps, ref_logps, importance_sampling_ratio,
        sequence_scale, config.beta, sampling_logps,
    )  # fmt: skip
    kwargs = dict(
        old_logps=old_logps, ref_logps=ref_logps, importance_sampling_ratio=importance_sampling_ratio,
        sampling_logps=sampling_logps, num_items_in_batch=num_items_in_batch, sequence_scale=sequence_scale,
    )  # fmt: skip
    if not use_triton(logits):
        return policy_loss_reference(logits, completion_ids, completion_mask, advantages, config=config, **kwargs)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    loss, logps, entropy, seq, out = PolicyLossFunction.apply(
        logits, completion_ids, completion_mask, advantages, old_logps, ref_logps, importance_sampling_ratio,
        sampling_logps, sequence_scale, num_items_in_batch, config, inplace_grad,
    )  # fmt: skip
    return output_from(loss, logps, entropy, seq, out, config)
