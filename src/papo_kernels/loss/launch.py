"""Kernel launches of the policy loss over a ``Plan``. Nothing here syncs with the host.

Single phase (token-level ratio and no batch-wide statistic of the log-probs or entropies): the count pre-pass and
the finalize kernel give every aggregation weight from the mask (and ``num_items_in_batch``), then one launch of
the row kernel reads each unmasked row once for its statistics and once more, from L2, to write its gradient; the
sequence and finalize kernels then sum the loss and the metrics over the O(B*T) state. Two phases (sequence-level
ratio, VESPO, the off-policy mask, the entropy quantile): the row kernel's statistics pass, the (quantile,)
sequence and finalize kernels, then the row kernel's gradient pass. Either way the gradient is written in the
forward, for the upstream gradient the caller announces (``gs``, 1 by default); the backward is one launch that
returns at once when the upstream gradient is that one, and rescales the rows otherwise.

Two tiles (:func:`tile`). Up to ``SMALL_V`` logits a row, one warp a program and a program per row, blocks of
``SMALL_BLOCK`` logits: many small programs per SM keep loads in flight (measured faster, see :func:`tile`, although
a row's second read may then miss L2). Wider rows: persistent programs, one row each at a time, that keep the rows
in flight (twice a row when the gradient goes to another buffer) within ``L2_SHARE`` of the L2, so the second read
of a row hits L2; blocks of up to ``MAX_BLOCK_V`` logits, 16 per thread at 16 warps, the exponential sums kept per lane.
"""

from __future__ import annotations

import functools
import os

import torch

from .batch import _count_kernel, _finalize_kernel, _quantile_kernel, _sequence_kernel
from .plan import Plan
from .rows import _rows, _scale_rows
from .split import split_rows
from .terms import LOSS_IDS, O_ENT_W

ROW_KERNEL = os.environ.get("PAPO_ROW_KERNEL", "rows")
"""The single-phase pass's kernel: ``rows`` (a program per row, the measured default), ``split`` (``split.py``: a row
split over programs that meet at a barrier, one read) or ``split-reread`` (the same, the slice read again from L2)."""
MAX_BLOCK_V = 8192  # vocabulary block of the row kernel
SMALL_V, SMALL_BLOCK = 1 << 18, 1024  # rows up to SMALL_V logits: one warp, blocks of SMALL_BLOCK, a program per row
L2_SHARE = 0.6  # of the L2 the rows in flight of a fused pass may take
PROGRAMS_PER_SM = 4  # programs per SM (at most) of the passes that do not re-read a row
INTERPRETED_PROGRAMS = 3  # under the interpreter: a few, so every program strides over several rows
BLOCK_T = 512  # tokens per step of the sequence and count kernels (fixed: no variant per completion length)
BLOCK_B = 512  # sequences per step of the finalize kernel
BLOCK_N = 1024  # tokens per step of the quantile kernel's count


def tile(V: int) -> tuple[int, int]:
    """Vocabulary block and warps: up to ``SMALL_V`` logits a row (262,144), one warp of ``SMALL_BLOCK`` (a program per
    row, many per SM: on an H200 at 16k tokens, 17% faster than the wide tile at V = 32,000 and 5-9% faster at
    V = 151,936); above (not measured), up to ``MAX_BLOCK_V`` logits a block, 16 per thread (4 to 16 warps),
    persistent programs (see :func:`occupancy`)."""
    if V <= SMALL_V:
        return SMALL_BLOCK, 1
    block = min(MAX_BLOCK_V, max(16, 1 << (int(V) - 1).bit_length()))
    return block, max(4, min(16, block // 512))


@functools.cache
def _device(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, getattr(props, "L2_cache_size", 50 << 20)


def programs(x: torch.Tensor, n_rows: int, warps: int, reuse_bytes: int = 0) -> int:
    """Programs of a row pass over ``n_rows`` rows of ``x`` (a few under the interpreter); see :func:`occupancy`."""
    if not x.is_cuda:
        return max(1, min(n_rows, INTERPRETED_PROGRAMS))
    if warps == 1:  # the narrow tile: a program per row
        return max(1, n_rows)
    sms, l2 = _device(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return occupancy(n_rows, warps, reuse_bytes, sms, l2)


def occupancy(n_rows: int, warps: int, reuse_bytes: int, sms: int, l2_bytes: int) -> int:
    """As many programs per SM as fit at up to 128 registers a thread (the widest variants use 104-127 on sm_90,
    checked by the compile test) and, with ``reuse_bytes`` (what a row in flight keeps in L2), as leave the rows in
    flight within ``L2_SHARE`` of the L2; at least one per SM, at most one per row."""
    per_sm = min(PROGRAMS_PER_SM, max(1, 16 // warps))
    if reuse_bytes:
        per_sm = min(per_sm, int(L2_SHARE * l2_bytes // (sms * reuse_bytes)))
    return max(1, min(n_rows, sms * max(1, per_sm)))


def _aligned(*strides: int) -> bool:
    return all(s % 16 == 0 for s in strides)


def _or(t, default):
    return default if t is None else t


def _launch_rows(plan: Plan, x, sxb, sxt, T_x, row0, n_rows, rows, dx, sdb, sdt, gs, stats: bool, grad: bool):
    if n_rows == 0:
        return
    V = x.shape[-1]
    block, warps = tile(V)
    reuse = 0
    if stats and grad:
        same = dx.data_ptr() == x.data_ptr() and (sdb, sdt) == (sxb, sxt)
        reuse = V * x.element_size() * (1 if same else 2)
    a0, a1 = plan.adv_strides
    i0, i1 = plan.isr_strides
    dummy = plan.logp
    _rows[(programs(x, n_rows, warps, reuse),)](
        x, sxb, sxt, T_x, row0, n_rows, _or(rows, dummy), _or(dx, x), sdb, sdt, plan.ids, plan.mask, V, plan.T,
        plan.params, _or(gs, dummy), plan.logp, plan.ent, plan.rmax, plan.log2s, plan.dlogp, plan.ptl, plan.kl,
        plan.flags, plan.w, plan.out[O_ENT_W.value :], plan.err, plan.adv, a0, a1, _or(plan.old, dummy),
        _or(plan.ref, dummy), _or(plan.isr, dummy), i0, i1,
        STATS=stats, GRAD=grad, TERMS=not plan.two_phase, HAS_SOFTCAP=plan.softcap, HAS_ROWS=rows is not None,
        ALIGNED=_aligned(sxb, sxt, sdb, sdt), ENT_GRAD=plan.cfg.entropy_coef != 0.0, ENT_MASK=plan.ent_mask,
        BLOCK=block, LANES=warps > 1, num_warps=warps, **plan.flags_kw(),
    )  # fmt: skip


def stats_rows(plan: Plan, x, sxb: int, sxt: int, T_x: int, row0: int, n_rows: int, rows=None) -> None:
    """Statistics of ``n_rows`` logits rows (row ``i`` at ``x + (i // T_x) sxb + (i % T_x) sxt``) for the flat
    tokens ``row0 + i`` (or ``rows[row0 + i]``), and single phase their loss terms."""
    _launch_rows(plan, x, sxb, sxt, T_x, row0, n_rows, rows, None, 0, 0, None, True, False)


def grad_rows(plan: Plan, x, sxb, sxt, T_x, row0, n_rows, dx, sdb: int, sdt: int, gs, rows=None) -> None:
    """``gs * dL/dx`` of the same rows into ``dx`` (may be ``x``), from the coefficients already computed."""
    _launch_rows(plan, x, sxb, sxt, T_x, row0, n_rows, rows, dx, sdb, sdt, gs, False, True)


def fused_rows(plan: Plan, x, sxb, sxt, T_x, row0, n_rows, dx, sdb: int, sdt: int, gs, rows=None) -> None:
    """Single phase, one launch: the rows' statistics and loss terms, and ``gs * dL/dx`` into ``dx`` (may be
    ``x``); needs the aggregation weights first (:func:`prepare_weights`). The split-row kernel where
    :data:`ROW_KERNEL` asks for it and the grid can be made co-resident, else the row kernel."""
    assert not plan.two_phase
    if ROW_KERNEL != "rows" and split_rows(
        plan, x, sxb, sxt, T_x, row0, n_rows, dx, sdb, sdt, gs, rows, reread=ROW_KERNEL == "split-reread"
    ):
        return
    _launch_rows(plan, x, sxb, sxt, T_x, row0, n_rows, rows, dx, sdb, sdt, gs, True, True)


def prepare_weights(plan: Plan) -> None:
    """The single-phase pre-pass: per-sequence token counts, then the aggregation and entropy-bonus weights."""
    _count_kernel[(plan.seqs.n,)](plan.mask, plan.part, plan.seqs.cu, BLOCK_T=BLOCK_T)
    finalize(plan)


def sequence_and_finalize(plan: Plan) -> None:
    """(High-entropy threshold,) per-sequence sums and two-phase coefficients, then weights, loss and metrics."""
    seqs = plan.seqs
    dummy = plan.logp
    if plan.ent_mask:
        keys = torch.where(plan.mask.view(-1) != 0, plan.ent.float(), float("inf")).sort().values
        _quantile_kernel[(1,)](keys, plan.mask, plan.out, plan.params, plan.B * plan.T, BLOCK=BLOCK_N)
    one_per_seq = plan.seq_level and seqs.adv.dim() == 1
    c = plan.cfg
    _sequence_kernel[(seqs.n,)](
        plan.logp, plan.ent, plan.dlogp, plan.ptl, plan.kl, plan.flags, plan.mask, seqs.adv, *seqs.adv_strides,
        _or(plan.old, dummy), _or(plan.ref, dummy), _or(seqs.isr, dummy), *seqs.isr_strides, int(seqs.isr_per_seq),
        _or(plan.samp, dummy), plan.part, plan.out, plan.params, seqs.cu, int(one_per_seq and seqs.width > 1),
        int(seqs.adv.dim() == 1 and seqs.width > 1),
        TWO_PHASE=plan.two_phase, SEQ_LEVEL=plan.seq_level, VESPO_ISR=seqs.isr is not None and c.loss_type == "vespo",
        OFF_POLICY=c.off_policy_mask_threshold is not None, HAS_SAMP=plan.samp is not None, ENT_MASK=plan.ent_mask,
        BLOCK_T=BLOCK_T, **plan.flags_kw(),
    )  # fmt: skip
    finalize(plan, per_seq_denom=one_per_seq or seqs.width == 1)


def finalize(plan: Plan, per_seq_denom: bool = False) -> None:
    """Aggregation weights (spread over the tokens of a packed batch), loss and metrics from the per-sequence sums."""
    seqs = plan.seqs
    ni = plan.num_items
    ni_mode = 0 if ni is None else (2 if isinstance(ni, torch.Tensor) else 1)
    _finalize_kernel[(1,)](
        plan.part, seqs.w, plan.out, plan.loss, plan.params,
        plan.seq_scale if plan.seq_scale is not None else seqs.w, ni if ni_mode == 2 else seqs.w,
        seqs.n, float(ni) if ni_mode == 1 else 0.0, int(per_seq_denom), int(seqs.adv.dim() == 1 or seqs.width == 1),
        LOSS=LOSS_IDS[plan.cfg.loss_type], HAS_SCALE=plan.seq_scale is not None, NI_MODE=ni_mode, BLOCK_B=BLOCK_B,
    )  # fmt: skip
    if seqs.token_seq is not None:
        torch.index_select(seqs.w, 0, seqs.token_seq, out=plan.w)


def scale_rows(dx: torch.Tensor, grad_output: torch.Tensor, gs: torch.Tensor) -> None:
    """``dx[B, T, V] *= grad_output / gs`` on the device, a no-op (two scalar loads a program) when they are equal."""
    B, T, V = dx.shape
    block, warps = tile(V)
    sdb, sdt = dx.stride(0), dx.stride(1)
    _scale_rows[(programs(dx, B * T, warps),)](
        dx, sdb, sdt, T, B * T, V, grad_output, gs, ALIGNED=_aligned(sdb, sdt), BLOCK=block, num_warps=warps
    )
