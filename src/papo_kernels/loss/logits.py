"""Fused policy loss over materialised logits: ``policy_loss`` and its ``torch.autograd.Function``.

The gradient is written during the forward (``launch.py``): single phase, one launch reads each unmasked row of
``logits[B, T, V]`` once for its statistics and once more to write ``dlogits`` (from L2 only if few rows are in
flight; the split-row kernel, ``split.py``, reads it once); two phases (batch-wide statistics), a statistics pass,
O(B*T) kernels, then a gradient pass. With ``inplace_grad=True`` the gradient
overwrites the logits during the forward. The backward returns that gradient, rescaled on the device only if the
upstream gradient differs from the announced ``grad_scale``. Arithmetic is fp32 in registers (fp64 for fp64
logits), I/O in the logits' dtype. CPU tensors without the Triton interpreter use the torch reference.

HBM traffic, for N = B*T tokens of which L are unmasked and e bytes per logit (masked rows are never read):

============================  ========================  =====================  ==================
path                          reads                     writes                 backward
============================  ========================  =====================  ==================
single phase                  L*V*e (+ L*V*e from L2)   N*V*e                  none (*)
two phases                    2*L*V*e                   N*V*e                  none (*)
no gradient needed            L*V*e                     none                   -
============================  ========================  =====================  ==================

(*) ``N*V*e`` read and written when the upstream gradient is not ``grad_scale``. The writes are the live rows'
gradients and the masked rows' zeros (the gradient buffer must hold them, in place or not). For V = 151,936,
16,384 tokens in bf16 (4.98 GB of logits): 9.96 GB single phase, 3.3 ms at 3.0 TB/s; 8.71 GB at 25% padding; the
previous three-pass design moved ``2*L*V*e + N*V*e`` (14.9 GB without padding, 12.4 GB at 25%). Extra memory:
32 bytes a token of O(B*T) state (10^-4 of the bf16 logits at V = 151,936; the entropy quantile adds a sort of N
fp32 keys); out of place the gradient buffer is the one autograd would hold anyway, in place there is none.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._runtime import is_number, kernels_available, require
from .config import PolicyLossConfig, PolicyLossOutput
from .inputs import LossInputs, check_logits_inputs
from .launch import fused_rows, grad_rows, prepare_weights, scale_rows, sequence_and_finalize, stats_rows
from .naive import naive_logits_loss
from .plan import Plan, make_plan, output_from, scalar_tensor


def run_forward(plan: Plan, logits: torch.Tensor, dx: torch.Tensor | None, gs: torch.Tensor | None) -> None:
    """Every forward launch over ``logits[B, T, V]`` (last dim contiguous); with ``dx``, ``gs * dL/dlogits`` too."""
    sxb, sxt = logits.stride(0), logits.stride(1)
    n, T = plan.B * plan.T, plan.T
    if dx is not None and not plan.two_phase:
        prepare_weights(plan)
        fused_rows(plan, logits, sxb, sxt, T, 0, n, dx, dx.stride(0), dx.stride(1), gs)
        sequence_and_finalize(plan)
        return
    stats_rows(plan, logits, sxb, sxt, T, 0, n)
    sequence_and_finalize(plan)
    if dx is not None:
        grad_rows(plan, logits, sxb, sxt, T, 0, n, dx, dx.stride(0), dx.stride(1), gs)


class PolicyLossFunction(torch.autograd.Function):
    """``loss = policy_loss(logits, ...)``; the gradient is computed in the forward, the backward only scales it."""

    @staticmethod
    def forward(ctx, logits, completion_ids, inputs: LossInputs, config, inplace_grad, grad_scale):
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        plan = make_plan(completion_ids, inputs, config, acc, logits.device)
        dx = gs = None
        if ctx.needs_input_grad[0]:
            dx = logits if inplace_grad else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            gs = grad_scale_tensor(grad_scale, acc, logits.device)
        run_forward(plan, logits, dx, gs)
        ctx.grad = (dx, gs)
        logps = plan.logp.view(plan.B, plan.T)
        entropy = plan.ent.view(plan.B, plan.T)
        ctx.mark_non_differentiable(logps, entropy, plan.part, plan.out, plan.err)
        return plan.loss, logps, entropy, plan.part, plan.out, plan.err

    @staticmethod
    def backward(ctx, grad_loss, *_):
        dx, gs = ctx.grad
        require(dx is not None, "policy_loss: the gradient was handed out once; it has no second backward")
        ctx.grad = (None, None)
        scale_rows(dx, grad_loss.detach().to(gs.dtype).reshape(1), gs)
        return dx, None, None, None, None, None


def policy_loss(
    logits: Tensor, completion_ids: Tensor, completion_mask: Tensor, advantages: Tensor, *,
    old_logps: Tensor | None = None, ref_logps: Tensor | None = None, importance_sampling_ratio: Tensor | None = None,
    sampling_logps: Tensor | None = None, num_items_in_batch: Tensor | float | None = None,
    sequence_scale: Tensor | None = None, cu_seqlens: Tensor | None = None, inplace_grad: bool = False,
    grad_scale: float | Tensor = 1.0,
    config: PolicyLossConfig = PolicyLossConfig(),  # noqa: B008 (frozen, immutable default)
) -> PolicyLossOutput:  # fmt: skip
    """TRL 1.16's GRPO-family loss of one micro-batch from ``logits[B, T, V]`` (``[1, N, V]`` packed): the Triton
    kernels where :func:`~papo_kernels.kernels_available`, else the torch reference
    (:func:`~papo_kernels.loss.naive_policy_loss`).
    See :class:`~papo_kernels.PolicyLossConfig` for the semantics; :func:`logits_loss` is the same on
    :class:`~papo_kernels.loss.LossInputs`.

    The gradient w.r.t. ``logits`` is computed in the forward when ``logits`` requires it, for the upstream
    gradient ``grad_scale``: the backward then costs nothing; another upstream gradient costs one more pass over the
    gradient. One backward per call.

    Args:
        logits: ``[B, T, V]``, any floating dtype; ``logits[b, t]`` predicts ``completion_ids[b, t]`` (the caller
            shifts).
        completion_ids: ``[B, T]`` integer targets in ``[0, V)``.
        completion_mask, advantages, old_logps, ref_logps, importance_sampling_ratio, sampling_logps,
            num_items_in_batch, sequence_scale, cu_seqlens: the fields of :class:`~papo_kernels.loss.LossInputs`
            (``completion_mask``: masked rows are never read; ``old_logps=None``: on-policy; ``cu_seqlens``: the
            sequences packed into one row).
        inplace_grad: the forward overwrites ``logits`` with the gradient (masked rows with zeros): no gradient
            buffer, but do not read the logits after the call.
        grad_scale: the upstream gradient the gradient is computed for (a number or a one-element tensor on the
            logits' device), e.g. ``1 / gradient_accumulation_steps`` when the caller divides the loss by that
            before ``backward``.
        config: the hyper-parameters.

    Returns:
        :class:`~papo_kernels.PolicyLossOutput`; ``loss`` is differentiable w.r.t. ``logits``.

    Examples:
        >>> import torch
        >>> from papo_kernels import PolicyLossConfig, policy_loss
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> logits = torch.randn(2, 3, 5, requires_grad=True)
        >>> ids, mask = torch.tensor([[1, 2, 3], [0, 4, 4]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
        >>> out = policy_loss(logits, ids, mask, torch.tensor([1.0, -0.5]), config=PolicyLossConfig("grpo"))
        >>> out.loss.detach()  # on-policy: mean over sequences of -A
        tensor(-0.2500)
        >>> out.loss.backward()
        >>> logits.grad[1, 2]  # a masked token
        tensor([0., 0., 0., 0., 0.])
    """
    inputs = LossInputs(
        completion_mask, advantages, old_logps, ref_logps, importance_sampling_ratio, sampling_logps,
        num_items_in_batch, sequence_scale, cu_seqlens,
    )  # fmt: skip
    return logits_loss(logits, completion_ids, inputs, config, inplace_grad=inplace_grad, grad_scale=grad_scale)


def logits_loss(
    logits: Tensor, completion_ids: Tensor, inputs: LossInputs, config: PolicyLossConfig, *,
    inplace_grad: bool = False, grad_scale: float | Tensor = 1.0,
) -> PolicyLossOutput:  # fmt: skip
    """:func:`policy_loss` on :class:`~papo_kernels.loss.LossInputs`."""
    check_logits_inputs(logits, completion_ids)
    inputs.check_tokens("logits", logits.shape[:2])
    inputs.check_config(config.beta)
    check_grad_scale(grad_scale, logits)
    if not kernels_available(logits):
        return naive_logits_loss(logits, completion_ids, inputs, config)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if inputs.packed:  # the row kernel's view of the one packed row: a row per token
        logits = logits[0].unsqueeze(1)
    loss, logps, entropy, part, out, err = PolicyLossFunction.apply(
        logits, completion_ids, inputs, config, inplace_grad, grad_scale
    )
    return output_from(loss, logps.view(inputs.shape), entropy.view(inputs.shape), part, out, err, config)


def check_grad_scale(grad_scale, where: torch.Tensor) -> None:
    """``grad_scale``: a finite non-zero number, or a one-element floating tensor on ``where``'s device."""
    if isinstance(grad_scale, torch.Tensor):
        require(
            grad_scale.numel() == 1 and grad_scale.is_floating_point() and grad_scale.device == where.device,
            f"`grad_scale` must be a one-element floating tensor on {where.device}, got {grad_scale.dtype} "
            f"{tuple(grad_scale.shape)} on {grad_scale.device}",
        )
        return
    require(
        is_number(grad_scale) and grad_scale != 0,
        "`grad_scale` must be a finite non-zero number (the upstream gradient of the loss), got {!r}", grad_scale,
    )  # fmt: skip


def grad_scale_tensor(grad_scale: float | torch.Tensor, acc: torch.dtype, device) -> torch.Tensor:
    """``grad_scale`` as the one-element tensor of the arithmetic dtype that the kernels and the backward read."""
    if isinstance(grad_scale, torch.Tensor):
        return grad_scale.detach().to(acc).reshape(1)
    return scalar_tensor(grad_scale, acc, device)
