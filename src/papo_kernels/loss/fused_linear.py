"""Fused linear policy loss: the loss and its gradients from hidden states and the LM head, one token chunk of
logits at a time, never the ``[B, T, V]`` logits.

Per chunk of unmasked tokens (``chunked.py``): ``logits = h W^T (+ b)`` (cuBLAS, fp32 accumulation) into one
preallocated buffer, one launch of the row kernel for the log-probs, entropy, loss terms and ``dL/dlogits`` in place,
then ``grad_h = dlogits W`` and ``grad_W += dlogits^T h`` (fp32 accumulation): three GEMMs a chunk, the gradients
computed during the forward for the upstream gradient the caller announces (``grad_scale``, 1 by default) and cast to
the parameters' dtypes there. The backward is one launch per gradient that returns at once when the upstream
gradient is the announced one (compared on the device: no host sync) and rescales otherwise. Sequence-level
importance sampling, VESPO, the off-policy mask and the entropy quantile need every log-prob (or entropy) before any
coefficient, so they run two phases (the chunks are projected twice: four GEMMs a chunk, three with one chunk).

The logits are ``softcap(logit_scale * (h W^T + b)) / T`` as transformers computes them. A frozen head
(``weight.requires_grad=False``, e.g. PEFT) gets no ``grad_W`` and no accumulator; tied embeddings need nothing
special (autograd adds the two gradients). Masked tokens are never projected. One host sync a call: the count of
unmasked tokens, which sizes the chunks (the target ids' range is checked in the row kernel, see
``PolicyLossOutput.check``).

Logit bytes per chunk of C tokens (e bytes each): single phase ``5 C V e`` (G1 writes them, the row kernel reads
them - twice, the second from L2 - and overwrites them with the gradient, G2 and G3 read it); two phases ``7 C V e``.
Peak memory: at most TRL 1.16's chunked path (formula in ``chunked.py``).
"""

from __future__ import annotations

import torch

from .._runtime import check_same_device, check_tensor, is_number, kernels_available, require
from .chunked import linear_gradients, token_rows
from .config import PolicyLossConfig, PolicyLossOutput
from .inputs import LossInputs, check_completion_ids
from .launch import scale_rows
from .logits import check_grad_scale, grad_scale_tensor
from .naive import naive_logits_loss
from .plan import make_plan, output_from


def live_tokens(completion_mask: torch.Tensor) -> int:
    """The number of unmasked tokens, which sizes the chunks (the call's one read-back; the target ids' range is
    checked in the row kernel)."""
    return int((completion_mask != 0).sum()) if completion_mask.numel() else 0


class FusedLinearPolicyLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, completion_ids, inputs: LossInputs, config, head: tuple[float, float | None],
                chunk_size, grad_scale, n_valid, grad_enabled):  # fmt: skip
        device = hidden.device
        cd = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        acc = torch.float64 if cd == torch.float64 else torch.float32
        B, T = inputs.shape
        D = hidden.shape[-1]
        rows = None if n_valid == B * T else token_rows(inputs.completion_mask, n_valid)  # None: plain slices
        plan = make_plan(completion_ids, inputs, config, acc, device, *head, zeroed=rows is not None)
        needs = tuple(bool(grad_enabled and n) for n in ctx.needs_input_grad[:3])
        needs = (needs[0], needs[1], needs[2] and bias is not None)
        gs = grad_scale_tensor(grad_scale, acc, device)
        with torch.autocast(device.type, enabled=False):
            dh, dw, db = linear_gradients(
                plan, hidden.reshape(B * T, D), weight, bias, rows, n_valid, cd, needs, gs, chunk_size
            )
        ctx.grads = (None if dh is None else dh.view(hidden.shape), dw, db, gs)
        logps, entropy = plan.logp.view(B, T), plan.ent.view(B, T)
        ctx.mark_non_differentiable(logps, entropy, plan.part, plan.out, plan.err)
        return plan.loss, logps, entropy, plan.part, plan.out, plan.err

    @staticmethod
    def backward(ctx, grad_loss, *_):
        require(
            ctx.grads is not None, "fused_linear_policy_loss: the gradients were handed out once; no second backward"
        )
        *grads, gs = ctx.grads
        ctx.grads = None
        go = grad_loss.detach().to(gs.dtype).reshape(1)
        for g in grads:
            if g is not None:
                scale_rows(g.view(1, -1, g.shape[-1]), go, gs)
        return (*grads,) + (None,) * 8


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    sampling_logps: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | float | None = None,
    sequence_scale: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    chunk_size: int | None = None,
    grad_scale: float | torch.Tensor = 1.0,
    config: PolicyLossConfig = PolicyLossConfig(),  # noqa: B008 (frozen, immutable default)
) -> PolicyLossOutput:
    """``policy_loss`` on ``logits = softcap(logit_scale * (hidden @ weight^T + bias)) / temperature`` without
    materialising them: ``hidden[B, T, D]`` (position ``t`` predicts ``completion_ids[b, t]``), ``weight[V, D]``;
    :func:`linear_loss` is the same on :class:`~papo_kernels.loss.LossInputs`.

    ``chunk_size`` caps the tokens per chunk; by default a chunk is as large as keeps the peak memory at or below
    TRL's chunked path (``chunked.chunk_limit``). The gradients are computed in the forward for the upstream gradient
    ``grad_scale`` (e.g. ``1 / gradient_accumulation_steps`` when the caller divides the loss by that before
    ``backward``): the backward then costs nothing; another upstream gradient costs one pass over the gradients.
    One backward per call.

    Args:
        hidden: ``[B, T, D]`` final hidden states; ``hidden[b, t]`` predicts ``completion_ids[b, t]``.
        weight: ``[V, D]`` the LM head (tied or not; a frozen head gets no gradient).
        completion_ids: ``[B, T]`` integer targets in ``[0, V)``.
        completion_mask, advantages, old_logps, ref_logps, importance_sampling_ratio, sampling_logps,
            num_items_in_batch, sequence_scale, cu_seqlens: the fields of :class:`~papo_kernels.loss.LossInputs`
            (``completion_mask``: masked tokens cost no matmul; ``old_logps=None``: on-policy; ``cu_seqlens``: the
            sequences packed into one row, ``hidden[1, N, D]``).
        bias: ``[V]`` or ``None``.
        logit_scale: multiplies the head's output (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``).
        final_logit_softcapping: ``c * tanh(z / c)`` after the scale (Gemma 2), or ``None``.
        chunk_size: the most tokens per chunk; ``None`` chooses it from the memory budget.
        grad_scale: the upstream gradient the gradients are computed for (a number or a one-element tensor on the
            hidden states' device).
        config: the hyper-parameters (``config.temperature`` divides the logits).

    Returns:
        :class:`~papo_kernels.PolicyLossOutput`; ``loss`` is differentiable w.r.t. ``hidden``, ``weight`` and
        ``bias``.

    Examples:
        >>> import torch
        >>> from papo_kernels import PolicyLossConfig, fused_linear_policy_loss, policy_loss
        >>> g = torch.Generator().manual_seed(0)
        >>> hidden = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
        >>> weight = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
        >>> ids, mask = torch.tensor([[1, 2, 3], [0, 5, 5]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
        >>> adv, cfg = torch.tensor([1.0, -0.5], dtype=torch.float64), PolicyLossConfig("dapo")
        >>> out = fused_linear_policy_loss(hidden, weight, ids, mask, adv, config=cfg)
        >>> ref = policy_loss(hidden @ weight.T, ids, mask, adv, config=cfg)  # the same loss from the logits
        >>> torch.allclose(out.loss, ref.loss)
        True
        >>> out.loss.backward()
        >>> hidden.grad[1, 2]  # a masked token
        tensor([0., 0., 0., 0.], dtype=torch.float64)
    """
    inputs = LossInputs(
        completion_mask, advantages, old_logps, ref_logps, importance_sampling_ratio, sampling_logps,
        num_items_in_batch, sequence_scale, cu_seqlens,
    )  # fmt: skip
    return linear_loss(
        hidden, weight, completion_ids, inputs, config, bias=bias, logit_scale=logit_scale,
        final_logit_softcapping=final_logit_softcapping, chunk_size=chunk_size, grad_scale=grad_scale,
    )  # fmt: skip


def linear_loss(
    hidden: torch.Tensor, weight: torch.Tensor, completion_ids: torch.Tensor, inputs: LossInputs,
    config: PolicyLossConfig, *, bias: torch.Tensor | None = None, logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None, chunk_size: int | None = None, grad_scale: float | torch.Tensor = 1.0,
) -> PolicyLossOutput:  # fmt: skip
    """:func:`fused_linear_policy_loss` on :class:`~papo_kernels.loss.LossInputs`."""
    check_tensor("hidden", hidden, ndim=3, floating=True)
    check_tensor("weight", weight, ndim=2, floating=True)
    require(weight.shape[1] == hidden.shape[-1], f"`weight` must be [V, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, floating=True)
        require(
            bias.shape[0] == weight.shape[0], f"`bias` must have shape ({weight.shape[0]},), got {tuple(bias.shape)}"
        )
    check_completion_ids(completion_ids, hidden.shape[:2])
    require(is_number(logit_scale) and logit_scale > 0, "`logit_scale` must be > 0, got {}", logit_scale)
    require(
        final_logit_softcapping is None or final_logit_softcapping > 0,
        f"`final_logit_softcapping` must be None or > 0, got {final_logit_softcapping}",
    )
    require(chunk_size is None or int(chunk_size) >= 1, f"`chunk_size` must be a positive int, got {chunk_size}")
    check_same_device(hidden=hidden, weight=weight, bias=bias, completion_ids=completion_ids)
    inputs.check_tokens("hidden", hidden.shape[:2])
    inputs.check_config(config.beta)
    check_grad_scale(grad_scale, hidden)
    if not kernels_available(hidden):
        logits = linear_logits(hidden, weight, bias, logit_scale, final_logit_softcapping)
        return naive_logits_loss(logits, completion_ids, inputs, config)
    n_valid = live_tokens(inputs.completion_mask)
    softcap = None if final_logit_softcapping is None else float(final_logit_softcapping)
    loss, logps, entropy, part, out, err = FusedLinearPolicyLossFunction.apply(
        hidden, weight, bias, completion_ids, inputs, config, (float(logit_scale), softcap), chunk_size, grad_scale,
        n_valid, torch.is_grad_enabled(),
    )  # fmt: skip
    return output_from(loss, logps, entropy, part, out, err, config)


def linear_logits(hidden, weight, bias=None, logit_scale: float = 1.0, softcap: float | None = None):
    """The materialised logits (before temperature) that ``fused_linear_policy_loss`` never builds, as the
    transformers heads compute them: ``softcap * tanh(logit_scale * (h W^T + b) / softcap)``."""
    z = torch.nn.functional.linear(hidden, weight, bias) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z
