"""Fused linear policy loss: the loss and its gradients from hidden states and the LM head, one token chunk of
logits at a time.

For a chunk of (unmasked) tokens: ``logits = h @ W^T (+ b)`` (one GEMM, fp32 accumulation), one launch of the row
kernel reads them once for log-probs, entropy and loss terms and again (from L2) to turn them into ``dL/dlogits``
in place, then ``grad_h = dlogits @ W`` and ``grad_W += dlogits^T @ h`` (fp32 accumulator): three GEMMs per chunk,
gradients computed during the forward and scaled by the incoming gradient in the backward. Sequence-level importance
sampling, VESPO, the off-policy mask and the entropy quantile need every log-prob (or entropy) before any
coefficient, so they run two phases (log-probs over all chunks, then the coefficients, then the chunks again: four
GEMMs per chunk). The logits are ``softcap(logit_scale * (h W^T + b)) / T``
as transformers computes them. A frozen head (``weight.requires_grad=False``, e.g. PEFT) gets no ``grad_W`` and no
fp32 accumulator. Masked tokens are skipped (never projected).

Logit bytes per chunk of C tokens (e bytes each): single phase ``5 C V e`` (the GEMM writes them, the row kernel reads
them and overwrites them with the gradient, the two gradient GEMMs read it); two phases ``7 C V e`` (projected twice),
``6 C V e`` when one chunk holds every token.
"""

from __future__ import annotations

import torch

from .._runtime import check_same_device, check_tensor, require, use_triton
from .config import PolicyLossConfig, PolicyLossOutput
from .inputs import check_ids, check_loss_inputs
from .launch import fused_rows, grad_rows, prepare_weights, sequence_and_finalize, stats_rows
from .naive import policy_loss_reference
from .plan import Plan, make_plan, output_from

_OUT_DTYPE_MM = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 8)
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 256 << 20, 1 << 30


def default_chunk_size(n_tokens: int, vocab: int, hidden: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per chunk, a multiple of 128 (128 to 16384): the ``[chunk, V]`` logits take a quarter of the fp32
    ``grad_W`` accumulator's size, clamped to 256 MiB - 1 GiB and to 1/8 of the free device memory, so the chunk
    never sets the peak (the backward's casts of the accumulated gradients do)."""
    budget = min(max(vocab * hidden, MIN_CHUNK_BYTES), MAX_CHUNK_BYTES)
    if device.type == "cuda":
        budget = min(budget, torch.cuda.mem_get_info(device)[0] // 8)
    rows = budget // (vocab * torch.empty((), dtype=dtype).element_size())
    return min(max(rows // 128 * 128, 128), 16384, max(n_tokens, 1))


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` into an fp32 (fp64) accumulator without rounding the product to the inputs' dtype."""
    if _OUT_DTYPE_MM and acc.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _chunked(plan: Plan, flat_h, weight, bias, rows, n_valid: int, chunk: int, cd, needs) -> tuple:
    """All chunks: log-probs and loss terms, ``dL/dlogits`` in place (one row-kernel launch per chunk in a single
    phase) and the gradient GEMMs (unit upstream gradient). ``rows`` lists the unmasked flat tokens (None when every
    token counts). Returns fp32 grads."""
    device, acc = flat_h.device, plan.acc
    V, D = weight.shape
    need_h, need_w, need_b = needs
    grad = need_h or need_w or need_b
    w = weight.to(cd)
    b = None if bias is None else bias.to(cd)
    grad_h = torch.zeros(n_valid, D, dtype=acc, device=device) if need_h else None
    grad_w = torch.zeros(V, D, dtype=acc, device=device) if need_w else None
    grad_b = torch.zeros(V, dtype=acc, device=device) if need_b else None
    buf = torch.empty(min(chunk, max(n_valid, 1)), V, dtype=cd, device=device)
    one = torch.ones(1, dtype=acc, device=device)
    spans = [(c0, min(c0 + chunk, n_valid)) for c0 in range(0, n_valid, chunk)]

    def project(c0: int, c1: int):
        h = (flat_h[c0:c1] if rows is None else flat_h.index_select(0, rows[c0:c1])).to(cd)
        logits = buf[: c1 - c0]
        torch.mm(h, w.t(), out=logits)
        if b is not None:
            logits.add_(b)
        return h, logits

    def stats(c0: int, c1: int, logits) -> None:
        stats_rows(plan, logits, 0, V, c1 - c0, c0, c1 - c0, rows=rows)

    def dlogits(kernel, c0: int, c1: int, logits) -> None:  # in place, statistics too with fused_rows
        kernel(plan, logits, 0, V, c1 - c0, c0, c1 - c0, logits, 0, V, one, rows=rows)

    def gradients(c0: int, c1: int, h, logits) -> None:
        if grad_h is not None:
            _addmm_fp32(grad_h[c0:c1], logits, w)
        if grad_w is not None:
            _addmm_fp32(grad_w, logits.t(), h)
        if grad_b is not None:
            grad_b.add_(logits.sum(0, dtype=acc))

    if plan.two_phase:  # every log-prob and entropy first, then the coefficients, then the chunks again
        last = None
        for span in spans:
            last = project(*span)
            stats(*span, last[1])
        sequence_and_finalize(plan)
        for span in spans if grad else ():
            h, logits = last if len(spans) == 1 else project(*span)
            dlogits(grad_rows, *span, logits)
            gradients(*span, h, logits)
        return grad_h, grad_w, grad_b
    if grad:  # the weights depend on the mask only: each chunk's gradient in the launch that reads its log-probs
        prepare_weights(plan)
    for span in spans:
        h, logits = project(*span)
        if grad:
            dlogits(fused_rows, *span, logits)
            gradients(*span, h, logits)
        else:
            stats(*span, logits)
    sequence_and_finalize(plan)
    return grad_h, grad_w, grad_b


class FusedLinearPolicyLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, completion_ids, completion_mask, advantages, old_logps, ref_logps,
                importance_sampling_ratio, sampling_logps, sequence_scale, num_items_in_batch, config, logit_scale,
                softcap, chunk_size, grad_enabled):  # fmt: skip
        device = hidden.device
        cd = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        B, T = completion_ids.shape
        D, V = hidden.shape[-1], weight.shape[0]
        plan = make_plan(
            completion_ids, completion_mask, advantages, old_logps, ref_logps, importance_sampling_ratio,
            sequence_scale, num_items_in_batch, config, torch.float64 if cd == torch.float64 else torch.float32,
            device, logit_scale, softcap, zeroed=True, sampling_logps=sampling_logps,
        )  # fmt: skip
        rows = (plan.mask.reshape(-1) != 0).nonzero().squeeze(1)
        n_valid = rows.numel()
        if n_valid == B * T:
            rows = None  # every token counts: chunks are plain slices
        chunk = chunk_size or default_chunk_size(n_valid, V, D, cd, device)
        needs = tuple(bool(grad_enabled and n) for n in ctx.needs_input_grad[:3])
        needs = (needs[0], needs[1], needs[2] and bias is not None)
        with torch.autocast(device.type, enabled=False):
            grads = _chunked(plan, hidden.reshape(B * T, D), weight, bias, rows, n_valid, chunk, cd, needs)
        ctx.rows = rows
        ctx.grads = grads
        ctx.shapes = hidden.shape, hidden.dtype, weight.dtype, None if bias is None else bias.dtype
        logps, entropy, seq = plan.logp.view(B, T), plan.ent.view(B, T), plan.sequence_loss()
        ctx.mark_non_differentiable(logps, entropy, seq, plan.out)
        return plan.loss, logps, entropy, seq, plan.out

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad_h, grad_w, grad_b = ctx.grads
        h_shape, h_dtype, w_dtype, b_dtype = ctx.shapes
        go = grad_loss.reshape(())
        dh = dw = db = None
        if grad_h is not None:
            scaled = grad_h.mul_(go).to(h_dtype)
            if ctx.rows is None:
                dh = scaled.view(h_shape)
            else:
                dh = scaled.new_zeros(h_shape[:-1].numel(), h_shape[-1]).index_copy_(0, ctx.rows, scaled)
                dh = dh.view(h_shape)
        if grad_w is not None:
            dw = grad_w.mul_(go).to(w_dtype)
        if grad_b is not None:
            db = grad_b.mul_(go).to(b_dtype)
        ctx.grads = ctx.rows = None
        return (dh, dw, db) + (None,) * 14


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
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    chunk_size: int | None = None,
    config: PolicyLossConfig = PolicyLossConfig(),  # noqa: B008 (frozen, immutable default)
) -> PolicyLossOutput:
    """``policy_loss`` on ``logits = softcap(logit_scale * (hidden @ weight^T + bias)) / temperature`` without
    materialising them: ``hidden[B, T, D]`` (position ``t`` predicts ``completion_ids[b, t]``), ``weight[V, D]``.
    ``chunk_size`` (tokens per chunk) defaults to what fits in a fraction of the free memory."""
    check_tensor("hidden", hidden, ndim=3, floating=True)
    check_tensor("weight", weight, ndim=2, floating=True)
    require(weight.shape[1] == hidden.shape[-1], f"`weight` must be [V, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, floating=True)
        require(
            bias.shape[0] == weight.shape[0], f"`bias` must have shape ({weight.shape[0]},), got {tuple(bias.shape)}"
        )
    require(
        tuple(completion_ids.shape) == tuple(hidden.shape[:2]),
        f"`completion_ids` must have shape {tuple(hidden.shape[:2])}, got {tuple(completion_ids.shape)}",
    )
    require(
        not completion_ids.is_floating_point(),
        f"`completion_ids` must be an integer tensor, got {completion_ids.dtype}",
    )
    require(float(logit_scale) > 0, f"`logit_scale` must be > 0, got {logit_scale}")
    require(
        final_logit_softcapping is None or final_logit_softcapping > 0,
        f"`final_logit_softcapping` must be None or > 0, got {final_logit_softcapping}",
    )
    require(chunk_size is None or int(chunk_size) >= 1, f"`chunk_size` must be a positive int, got {chunk_size}")
    check_same_device(hidden=hidden, weight=weight, bias=bias, completion_ids=completion_ids)
    check_loss_inputs(
        completion_ids.shape, completion_mask, advantages, old_logps, ref_logps, importance_sampling_ratio,
        sequence_scale, config.beta, sampling_logps,
    )  # fmt: skip
    check_ids(completion_ids, weight.shape[0])
    kwargs = dict(
        old_logps=old_logps, ref_logps=ref_logps, importance_sampling_ratio=importance_sampling_ratio,
        sampling_logps=sampling_logps, num_items_in_batch=num_items_in_batch, sequence_scale=sequence_scale,
    )  # fmt: skip
    if not use_triton(hidden):
        logits = linear_logits(hidden, weight, bias, logit_scale, final_logit_softcapping)
        return policy_loss_reference(logits, completion_ids, completion_mask, advantages, config=config, **kwargs)
    loss, logps, entropy, seq, out = FusedLinearPolicyLossFunction.apply(
        hidden, weight, bias, completion_ids, completion_mask, advantages, old_logps, ref_logps,
        importance_sampling_ratio, sampling_logps, sequence_scale, num_items_in_batch, config, float(logit_scale),
        None if final_logit_softcapping is None else float(final_logit_softcapping), chunk_size,
        torch.is_grad_enabled(),
    )  # fmt: skip
    return output_from(loss, logps, entropy, seq, out, config)


def linear_logits(hidden, weight, bias=None, logit_scale: float = 1.0, softcap: float | None = None):
    """The materialised logits (before temperature) that ``fused_linear_policy_loss`` never builds, as the
    transformers heads compute them: ``softcap * tanh(logit_scale * (h W^T + b) / softcap)``."""
    z = torch.nn.functional.linear(hidden, weight, bias) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z
