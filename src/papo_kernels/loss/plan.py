"""Launch plan shared by the logits and fused-linear paths: prepared inputs, O(B*T) buffers, kernel launchers.

A forward is three launches: the row kernel (log-probs, entropy and, single phase, the loss terms), the sequence
kernel (per-sequence sums; two phases, also the coefficients) and the finalize kernel (weights, loss, metrics);
with ``top_entropy_quantile < 1`` a sort of the O(B*T) entropies and the quantile kernel come before the sequence
kernel. The backward is one launch of the row-gradient kernel. Nothing here syncs with the host.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .batch import _finalize_kernel, _quantile_kernel, _sequence_kernel
from .config import PolicyLossConfig, PolicyLossOutput
from .rows import _backward_rows, _forward_rows
from .terms import (
    C_LOSS,
    LOSS_IDS,
    N_OUT,
    N_PARAMS,
    N_PART,
    O_BONUS,
    O_ENT,
    O_ENT_W,
    O_HIGH,
    O_KL,
    O_LOW,
    O_PHI,
    O_POLICY,
    O_REGION,
)

MAX_BLOCK_V = 4096  # vocabulary block of the row kernels (H100: 8 warps, 16 fp32 lanes per thread)
BLOCK_T = 512  # tokens per step of the sequence kernel (fixed: no variant per completion length)
BLOCK_B = 512  # sequences per step of the finalize kernel
BLOCK_N = 1024  # tokens per step of the quantile kernel's count
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_PARAMS: OrderedDict = OrderedDict()


def params_tensor(cfg: PolicyLossConfig, dtype, device, logit_scale: float = 1.0, softcap: float | None = None):
    """The scalar parameters as a small tensor of the arithmetic dtype (cached: no copy per call)."""
    key = (cfg, dtype, str(device), float(logit_scale), softcap)
    hit = _PARAMS.get(key)
    if hit is not None:
        _PARAMS.move_to_end(key)
        return hit
    inv_t = 1.0 / cfg.temperature
    k2 = math.log2(math.e) * inv_t * (logit_scale if softcap is None else 1.0)
    # TRL builds the SAPO temperatures and VESPO's k and lambda with torch.where over Python floats (fp32 values),
    # and torch.quantile takes its q as a tensor of the (fp32) entropies' dtype
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
    vespo = [f32(cfg.vespo_k_pos), max(f32(cfg.vespo_lambda_pos), f32(1e-4))]
    vespo += [f32(cfg.vespo_k_neg), max(f32(cfg.vespo_lambda_neg), f32(1e-4))]
    opm = cfg.off_policy_mask_threshold
    values = [
        cfg.epsilon_low, cfg.eps_high, cfg.delta or 0.0, cfg.beta, f32(cfg.sapo_temperature_pos),
        f32(cfg.sapo_temperature_neg), cfg.entropy_coef, k2, logit_scale * inv_t, logit_scale, softcap or 1.0,
        float(cfg.max_completion_length or 1), *vespo, math.log(1e-8), 0.0 if opm is None else opm,
        f32(1.0 - cfg.top_entropy_quantile), torch.finfo(dtype).max,
    ]  # fmt: skip
    assert len(values) == N_PARAMS
    t = torch.tensor(values, dtype=dtype, device=device)
    _PARAMS[key] = t
    if len(_PARAMS) > 64:
        _PARAMS.popitem(last=False)
    return t


@dataclass
class Plan:
    """Everything the kernels need besides the logits, for one ``[B, T]`` batch."""

    cfg: PolicyLossConfig
    B: int
    T: int
    acc: torch.dtype
    ids: torch.Tensor
    mask: torch.Tensor
    adv: torch.Tensor
    adv_strides: tuple[int, int]
    old: torch.Tensor | None
    ref: torch.Tensor | None
    isr: torch.Tensor | None
    isr_strides: tuple[int, int]
    samp: torch.Tensor | None
    seq_scale: torch.Tensor | None
    num_items: torch.Tensor | float | None
    params: torch.Tensor
    softcap: bool
    # O(B*T) buffers
    logp: torch.Tensor
    ent: torch.Tensor
    rmax: torch.Tensor
    log2s: torch.Tensor
    g: torch.Tensor
    ptl: torch.Tensor
    kl: torch.Tensor
    flags: torch.Tensor
    part: torch.Tensor
    w: torch.Tensor
    out: torch.Tensor
    loss: torch.Tensor

    @property
    def seq_level(self) -> bool:
        return self.cfg.importance_sampling_level == "sequence"

    @property
    def two_phase(self) -> bool:
        return self.cfg.two_phase

    @property
    def ent_mask(self) -> bool:
        return self.cfg.top_entropy_quantile < 1.0

    def flags_kw(self) -> dict:
        c = self.cfg
        return dict(
            LOSS=LOSS_IDS[c.loss_type], HAS_OLD=self.old is not None, HAS_KL=c.beta != 0.0,
            BIAS_KL=c.use_bias_correction_kl, HAS_ISR=self.isr is not None and c.loss_type != "vespo",
            HAS_DELTA=c.delta is not None,
        )  # fmt: skip

    def sequence_loss(self) -> torch.Tensor:
        return self.part[:, C_LOSS.value]


def metrics_from_out(out: torch.Tensor, cfg: PolicyLossConfig) -> dict[str, torch.Tensor]:
    """The metric dict (0-dim views of the finalize kernel's output vector), keyed as TRL logs them."""
    at = lambda slot: out[slot.value]  # noqa: E731
    metrics = {"entropy": at(O_ENT)}
    if cfg.beta != 0.0:
        metrics["kl"] = at(O_KL)
    if cfg.loss_type in CLIPPED:
        metrics["clip_ratio/low_mean"] = at(O_LOW)
        metrics["clip_ratio/high_mean"] = at(O_HIGH)
        metrics["clip_ratio/region_mean"] = at(O_REGION)
    elif cfg.loss_type == "cispo":
        metrics["cispo_clip_ratio"] = at(O_HIGH)
    elif cfg.loss_type == "vespo":
        metrics["vespo/phi_seq_mean"] = at(O_PHI)
    metrics["policy_loss"] = at(O_POLICY)
    return metrics


def output_from(loss, logps, entropy, seq, out, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """The public output from the autograd function's outputs (metrics and entropy stats are views of ``out``)."""
    stats = out[O_BONUS.value : O_BONUS.value + 2]
    return PolicyLossOutput(loss, logps, entropy, metrics_from_out(out, cfg), seq, stats)


def make_plan(
    completion_ids, completion_mask, advantages, old_logps, ref_logps, importance_sampling_ratio,
    sequence_scale, num_items_in_batch, cfg: PolicyLossConfig, acc: torch.dtype, device,
    logit_scale: float = 1.0, softcap: float | None = None, zeroed: bool = False, sampling_logps=None,
) -> Plan:  # fmt: skip
    """Prepared inputs and buffers; ``zeroed`` when the row kernel will not visit every token (compacted rows)."""
    B, T = completion_ids.shape
    N = B * T
    mask = completion_mask.to(device).contiguous()
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    adv = advantages.to(device)
    isr = importance_sampling_ratio
    if isr is not None:
        isr = isr.to(device)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(device=device, dtype=acc).reshape(1)
    # one allocation, every segment 16-element aligned (pointer alignment is part of Triton's specialization key)
    sizes = [N] * 7 + [N_PART.value * B, B, N_OUT]
    padded = [-(-n // 16) * 16 for n in sizes]
    alloc = torch.zeros if zeroed else torch.empty
    flat = alloc(sum(padded), dtype=acc, device=device)
    views = [v[:n] for v, n in zip(flat.split(padded), sizes, strict=True)]
    return Plan(
        cfg=cfg, B=B, T=T, acc=acc, ids=completion_ids.to(device).contiguous(), mask=mask, adv=adv,
        adv_strides=(adv.stride(0), adv.stride(1) if adv.dim() == 2 else 0),
        old=None if old_logps is None else old_logps.to(device).contiguous(),
        ref=None if ref_logps is None else ref_logps.to(device).contiguous(),
        isr=isr, isr_strides=(0, 0) if isr is None else (isr.stride(0), isr.stride(1) if isr.shape[1] > 1 else 0),
        samp=None if sampling_logps is None else sampling_logps.to(device).contiguous(),
        seq_scale=None if sequence_scale is None else sequence_scale.to(device).contiguous(),
        num_items=num_items_in_batch, params=params_tensor(cfg, acc, device, logit_scale, softcap),
        softcap=softcap is not None, logp=views[0], ent=views[1], rmax=views[2], log2s=views[3], g=views[4],
        ptl=views[5], kl=views[6], flags=alloc(N, dtype=torch.int32, device=device),
        part=views[7].view(B, N_PART.value), w=views[8], out=views[9],
        loss=alloc((), dtype=acc, device=device),  # not a view: callers may scale the loss in place
    )  # fmt: skip


def _block_v(V: int, backward: bool = False) -> tuple[int, int]:
    """Vocabulary block and warps: 4096-wide blocks (8 warps forward; 16 backward, which holds more per element)."""
    block = min(MAX_BLOCK_V, max(16, 1 << (int(V) - 1).bit_length()))
    if block < 2048:
        return block, 4
    return block, 16 if backward else 8


def _aligned(*strides: int) -> bool:
    return all(s % 16 == 0 for s in strides)


def forward_rows(plan: Plan, x, sxb: int, sxt: int, T_x: int, row0: int, n_rows: int, rows=None) -> None:
    """Row kernel over ``n_rows`` logits rows (row ``i`` at ``x + (i // T_x) sxb + (i % T_x) sxt``) for the
    flat tokens ``row0 + i`` (or ``rows[row0 + i]``)."""
    if n_rows == 0:
        return
    block, warps = _block_v(x.shape[-1])
    a0, a1 = plan.adv_strides
    i0, i1 = plan.isr_strides
    dummy = plan.logp
    _forward_rows[(n_rows,)](
        x, sxb, sxt, T_x, row0, dummy if rows is None else rows, plan.ids, plan.mask, x.shape[-1], plan.params,
        plan.logp, plan.ent, plan.rmax, plan.log2s,
        plan.adv, a0, a1, plan.old if plan.old is not None else dummy, plan.ref if plan.ref is not None else dummy,
        plan.isr if plan.isr is not None else dummy, i0, i1, plan.T, plan.g, plan.ptl, plan.kl, plan.flags,
        HAS_SOFTCAP=plan.softcap, HAS_ROWS=rows is not None, ALIGNED=_aligned(sxb, sxt), TERMS=not plan.two_phase,
        BLOCK=block, num_warps=warps, **plan.flags_kw(),
    )  # fmt: skip


def sequence_and_finalize(plan: Plan) -> None:
    """(High-entropy threshold,) per-sequence sums and two-phase coefficients, then weights, loss and metrics."""
    a0, a1 = plan.adv_strides
    i0, i1 = plan.isr_strides
    dummy = plan.logp
    if plan.ent_mask:
        keys = torch.where(plan.mask.view(-1) != 0, plan.ent.float(), float("inf")).sort().values
        _quantile_kernel[(1,)](keys, plan.mask, plan.out, plan.params, plan.B * plan.T, BLOCK=BLOCK_N)
    one_per_seq = plan.seq_level and plan.adv.dim() == 1
    c = plan.cfg
    _sequence_kernel[(plan.B,)](
        plan.logp, plan.ent, plan.g, plan.ptl, plan.kl, plan.flags, plan.mask, plan.adv, a0, a1,
        _or(plan.old, dummy), _or(plan.ref, dummy), _or(plan.isr, dummy), i0, i1,
        1 if plan.isr is None else plan.isr.shape[1], _or(plan.samp, dummy), plan.part, plan.out, plan.params,
        plan.T, int(one_per_seq and plan.T > 1), int(plan.adv.dim() == 1 or plan.T == 1),
        TWO_PHASE=plan.two_phase, SEQ_LEVEL=plan.seq_level, VESPO_ISR=plan.isr is not None and c.loss_type == "vespo",
        OFF_POLICY=c.off_policy_mask_threshold is not None, HAS_SAMP=plan.samp is not None, ENT_MASK=plan.ent_mask,
        BLOCK_T=BLOCK_T, **plan.flags_kw(),
    )  # fmt: skip
    finalize(plan, per_seq_denom=one_per_seq or plan.T == 1)


def _or(t, default):
    return default if t is None else t


def finalize(plan: Plan, per_seq_denom: bool = False) -> None:
    ni = plan.num_items
    ni_mode = 0 if ni is None else (2 if isinstance(ni, torch.Tensor) else 1)
    _finalize_kernel[(1,)](
        plan.part, plan.w, plan.out, plan.loss, plan.params,
        plan.seq_scale if plan.seq_scale is not None else plan.w, ni if ni_mode == 2 else plan.w,
        plan.B, float(ni) if ni_mode == 1 else 0.0, int(per_seq_denom), int(plan.adv.dim() == 1 or plan.T == 1),
        LOSS=LOSS_IDS[plan.cfg.loss_type], HAS_SCALE=plan.seq_scale is not None, NI_MODE=ni_mode, BLOCK_B=BLOCK_B,
    )  # fmt: skip


def backward_rows(
    plan: Plan, x, sxb: int, sxt: int, T_x: int, row0: int, n_rows: int, dx, sdb: int, sdt: int, grad_out, rows=None
) -> None:
    """Row-gradient kernel: ``dx`` rows (same layout rules as ``forward_rows``) get ``grad_out * dL/dx``."""
    if n_rows == 0:
        return
    block, warps = _block_v(x.shape[-1], backward=True)
    _backward_rows[(n_rows,)](
        x, sxb, sxt, T_x, row0, plan.logp if rows is None else rows, dx, sdb, sdt, plan.ids, plan.mask,
        x.shape[-1], plan.T, plan.params, plan.rmax, plan.log2s, plan.ent, plan.g, plan.w, plan.flags, grad_out,
        plan.out[O_ENT_W.value :], HAS_SOFTCAP=plan.softcap, HAS_ROWS=rows is not None,
        ALIGNED=_aligned(sxb, sxt, sdb, sdt), ENT_GRAD=plan.cfg.entropy_coef != 0.0, ENT_MASK=plan.ent_mask,
        BLOCK=block, num_warps=warps,
    )  # fmt: skip
