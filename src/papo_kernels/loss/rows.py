"""The row kernel over the logits: persistent programs, each streaming whole vocabulary rows in blocks.

One kernel, three modes (constexpr ``STATS`` / ``GRAD``):

* statistics and gradient (single phase): per row, one read for the statistics, the token's loss terms and its
  gradient coefficients, then a second read of the same row - from L2: the program has just streamed it, and it
  goes through the blocks in reverse, most recently read first - writing ``dL/dx`` (possibly over the logits);
* statistics only (the first phase of the two-phase path; also the forward without gradients);
* gradient only (the second phase, with the coefficients the batch-wide kernels wrote).

Statistics: with ``y`` the logits (or ``softcap * tanh(scale * x / softcap)``) and ``k2 = log2(e) * scale / T``
(``log2(e) / T`` with a softcap), the program keeps the running block maximum ``m`` of ``y`` and, per lane,
``s = sum 2^d`` and ``a = sum 2^d d`` with ``d = (y - m) k2``, rescaled when ``m`` grows (one block reduction per
block; the lane sums are reduced once per row). Then ``log2 Z = log2 s`` (relative to ``m``),
``logp = ln2 ((y_id - m) k2 - log2 s)`` and ``H = ln2 (log2 s - a / s)``. Differences ``y - m`` are taken before
scaling, so large logits (1e4) lose nothing. It saves ``m`` and ``log2 s`` (O(1) per token).

Gradient: ``dL/dz_j = c (1[j = id] - p_j) - h p_j (ln p_j + H)`` with ``c = gs W_b dL/dlogp`` and ``h = gs dL/dH``
(``gs``: the upstream gradient the caller announced, 1 by default), times ``dz/dx`` (``scale / T``, and
``1 - tanh^2`` under a softcap). Rows whose mask is 0 are never read: their outputs are 0 and their gradient rows
are written with zeros; rows whose ``c`` and ``h`` are 0 are read once and written with zeros. A target id outside
``[0, V)`` of an unmasked token sets ``ERR`` (no host synchronisation; the id is not read).

Vocabulary blocks are unmasked except the last, so loads vectorise; shapes and row strides are runtime arguments
(``ALIGNED`` tells the compiler the row offsets are multiples of 16 elements; ``V``'s divisibility by 16 is left to
Triton's specialisation, which never depends on ``B`` or ``T``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .terms import F_BONUS, F_HIGH, F_LOW, P_CAP, P_K2, P_KN, P_SCALE, _load_inputs, _policy_terms

LN2 = tl.constexpr(0.6931471805599453)
NEG = tl.constexpr(-1.0e30)  # running-max start: finite, so fully -inf blocks give no inf - inf
FLOOR = tl.constexpr(-1100.0)  # exp2 of anything below underflows to 0 in fp32 and fp64

_DNS = ["sxb", "sxt", "T_x", "row0", "n_rows", "T", "sab", "sat", "sib", "sit", "sdb", "sdt"]


@triton.jit
def _cap(x, P, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        cap = tl.load(P + P_CAP)
        x = cap * (2 * tl.sigmoid(2 * (x * tl.load(P + P_SCALE)) / cap) - 1)
    return x


@triton.jit
def _row(i, row0, ROWS, T_x, sxb, sxt, sdb, sdt, HAS_ROWS: tl.constexpr, ALIGNED: tl.constexpr):
    """Flat token position of local row ``i`` and the offsets of its logits and gradient rows."""
    local = tl.cast(i, tl.int64)
    if HAS_ROWS:
        p = tl.load(ROWS + row0 + local).to(tl.int64)
    else:
        p = row0 + local
    xb = local // T_x
    xt = local - xb * T_x
    off = xb * sxb + xt * sxt
    doff = xb * sdb + xt * sdt
    if ALIGNED:
        off = tl.multiple_of(off, 16)
        doff = tl.multiple_of(doff, 16)
    return p, off, doff


@triton.jit
def _fold(y, m, s, a, k2, LANES: tl.constexpr):
    """Fold one block into the running maximum ``m`` and the sums ``s = sum 2^d``, ``a = sum 2^d d``: per lane
    (``LANES``), else reduced over the block at once (scalars: fewer registers, one more reduction a block)."""
    new_m = tl.maximum(m, tl.max(y, axis=0))
    dm = (m - new_m) * k2
    c = tl.exp2(dm)
    d = tl.maximum((y - new_m) * k2, FLOOR)
    e = tl.exp2(d)
    ed = e * d
    if not LANES:
        e = tl.sum(e, axis=0)
        ed = tl.sum(ed, axis=0)
    a = tl.where(s > 0, c * (a + s * dm), 0.0) + ed
    s = c * s + e
    return new_m, s, a


@triton.jit
def _row_stats(xrow, x_id, V, P, k2, zero, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr, LANES: tl.constexpr):
    """One read of a row: its maximum ``m``, ``log2 s``, the entropy and the log-prob of the target, whose logit
    ``x_id`` the caller loaded up front (``LANES``: the sums kept per lane and reduced once per row, else reduced
    per block)."""
    cols = tl.arange(0, BLOCK)
    if LANES:
        lanes = tl.zeros([BLOCK], zero.dtype)
        m, s, a = zero + NEG, lanes, lanes
    else:
        m, s, a = zero + NEG, zero, zero
    n_full = (V // BLOCK) * BLOCK
    if n_full > 0:  # the next block is loaded before this one is folded: two blocks in flight
        nxt = tl.load(xrow + cols)
        for start in range(BLOCK, n_full, BLOCK):
            cur = nxt
            nxt = tl.load(xrow + start + cols)
            m, s, a = _fold(_cap(cur.to(zero.dtype), P, HAS_SOFTCAP), m, s, a, k2, LANES)
        m, s, a = _fold(_cap(nxt.to(zero.dtype), P, HAS_SOFTCAP), m, s, a, k2, LANES)
    if n_full < V:
        inb = n_full + cols < V
        y = _cap(tl.load(xrow + n_full + cols, mask=inb, other=float("-inf")).to(zero.dtype), P, HAS_SOFTCAP)
        m, s, a = _fold(tl.where(inb, y, float("-inf")), m, s, a, k2, LANES)
    if LANES:
        s = tl.sum(s, axis=0)
        a = tl.sum(a, axis=0)
    log2s = tl.log2(s)
    ent = LN2 * (log2s - a / s)
    y_id = _cap(x_id.to(zero.dtype), P, HAS_SOFTCAP)
    return m, log2s, ent, ((y_id - m) * k2 - log2s) * LN2


@triton.jit
def _token_terms(
    logp, w, p, P, adv, old, ref, isr, DLOGP, PTL, KL, FLAGS,
    LOSS: tl.constexpr, HAS_OLD: tl.constexpr, HAS_KL: tl.constexpr, BIAS_KL: tl.constexpr, HAS_DELTA: tl.constexpr,
):  # fmt: skip
    """Token-level loss terms of one token from its inputs (loaded before its row was streamed; absent ``old``
    and ``ref`` are the log-prob itself): stores them and returns ``dL/dlogp`` before the sequence weight."""
    on = w != 0
    if not HAS_OLD:
        old = logp
    if not HAS_KL:
        ref = logp
    r = tl.exp(logp - old)
    one = r * 0.0 + 1.0
    ptl, d_lp, d_r, kl, low, high = _policy_terms(logp, ref, adv, isr, r, one, one, P, LOSS, HAS_DELTA, HAS_KL, BIAS_KL)
    g = tl.where(on, w * (d_lp + d_r * r), 0.0)
    tl.store(DLOGP + p, g)
    tl.store(PTL + p, tl.where(on, ptl, 0.0))
    tl.store(KL + p, tl.where(on, kl, 0.0))
    tl.store(FLAGS + p, tl.where(on, low.to(tl.int32) * F_LOW + high.to(tl.int32) * F_HIGH, 0))
    return g


@triton.jit
def _grad_block(x, cols, tgt, m, log2s, c, a0, a1, P, k2, HAS_SOFTCAP: tl.constexpr, ENT_GRAD: tl.constexpr):
    y = _cap(x, P, HAS_SOFTCAP)
    u = tl.maximum((y - m) * k2 - log2s, FLOOR)  # log2 p (floored: -inf logits give p = 0, not 0 * inf)
    prob = tl.exp2(u)
    if ENT_GRAD:
        g = tl.where(cols == tgt, c, 0.0) - prob * (a0 + a1 * u)
    else:
        g = tl.where(cols == tgt, c, 0.0) - prob * c
    if HAS_SOFTCAP:
        th = y / tl.load(P + P_CAP)
        g = g * (1 - th * th)
    return g


@triton.jit
def _row_grad(
    xrow, drow, V, tgt, m, log2s, ent, c, h, P, k2,
    HAS_SOFTCAP: tl.constexpr, ENT_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Write ``dL/dx`` of a row: zeros without reading it when ``c = h = 0``, else a read in reverse block order."""
    cols = tl.arange(0, BLOCK)
    n_full = (V // BLOCK) * BLOCK
    out_t = drow.dtype.element_ty
    if (c == 0) & (h == 0):
        zeros = tl.zeros([BLOCK], out_t)
        for start in range(0, n_full, BLOCK):
            tl.store(drow + start + cols, zeros)
        if n_full < V:
            tl.store(drow + n_full + cols, zeros, mask=n_full + cols < V)
    else:
        a0 = c + h * ent
        a1 = h * LN2
        if n_full < V:  # the tail block was read last
            inb = n_full + cols < V
            x = tl.load(xrow + n_full + cols, mask=inb, other=0.0).to(m.dtype)
            g = _grad_block(x, n_full + cols, tgt, m, log2s, c, a0, a1, P, k2, HAS_SOFTCAP, ENT_GRAD)
            tl.store(drow + n_full + cols, g.to(out_t), mask=inb)
        if n_full > 0:  # as in the statistics: the next (lower) block is loaded before this one is written
            nxt = tl.load(xrow + n_full - BLOCK + cols)
            for j in range(1, n_full // BLOCK):
                start = n_full - j * BLOCK
                cur = nxt
                nxt = tl.load(xrow + start - BLOCK + cols)
                g = _grad_block(cur.to(m.dtype), start + cols, tgt, m, log2s, c, a0, a1, P, k2, HAS_SOFTCAP, ENT_GRAD)
                tl.store(drow + start + cols, g.to(out_t))
            g = _grad_block(nxt.to(m.dtype), cols, tgt, m, log2s, c, a0, a1, P, k2, HAS_SOFTCAP, ENT_GRAD)
            tl.store(drow + cols, g.to(out_t))


@triton.jit(do_not_specialize=_DNS)
def _rows(
    X, sxb, sxt, T_x, row0, n_rows, ROWS, DX, sdb, sdt, IDS, MASK, V, T, P, GS,
    LOGP, ENT, RMAX, LOG2S, DLOGP, PTL, KL, FLAGS, W, ENT_W, ERR,
    ADV, sab, sat, OLD, REF, ISR, sib, sit,
    STATS: tl.constexpr, GRAD: tl.constexpr, TERMS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ROWS: tl.constexpr, ALIGNED: tl.constexpr, ENT_GRAD: tl.constexpr, ENT_MASK: tl.constexpr,
    LOSS: tl.constexpr, HAS_OLD: tl.constexpr, HAS_KL: tl.constexpr, BIAS_KL: tl.constexpr,
    HAS_ISR: tl.constexpr, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, LANES: tl.constexpr,
):  # fmt: skip
    """Rows ``i`` of ``X`` (at ``(i // T_x) sxb + (i % T_x) sxt``) for the flat tokens ``row0 + i`` (or
    ``ROWS[row0 + i]``), ``i`` striding over the programs; gradients go to the same rows of ``DX``."""
    zero = tl.sum(tl.zeros([BLOCK], LOGP.dtype.element_ty), axis=0)
    k2 = tl.load(P + P_K2)
    scale = zero
    ent_w = zero
    if GRAD:
        scale = tl.load(GS).to(zero.dtype) * tl.load(P + P_KN)
        if ENT_GRAD:
            ent_w = tl.load(ENT_W)
    for i in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        # every scalar a row needs is loaded before its logits are streamed, so the loads' latencies overlap
        p, off, doff = _row(i, row0, ROWS, T_x, sxb, sxt, sdb, sdt, HAS_ROWS, ALIGNED)
        w = tl.load(MASK + p).to(zero.dtype)
        tgt = tl.load(IDS + p)
        ok = (tgt >= 0) & (tgt < V)  # ids of masked tokens may be anything; others are checked here
        tgt = tgt.to(tl.int32)  # compared with int32 columns
        b = p // T
        if STATS:
            if (w != 0) & (ok == 0):
                tl.store(ERR, 1)
            x_id = tl.load(X + off + tgt, mask=(w != 0) & ok, other=0.0)
            if TERMS:
                adv, old, ref, isr = _load_inputs(zero, b, p - b * T, p, zero == zero, ADV, sab, sat, OLD, REF, ISR,
                                                  sib, sit, HAS_OLD, HAS_KL, HAS_ISR)  # fmt: skip
        else:
            m, log2s, ent, g = tl.load(RMAX + p), tl.load(LOG2S + p), tl.load(ENT + p), tl.load(DLOGP + p)
        if GRAD:
            wb = tl.load(W + b)
            if ENT_MASK:
                bonus = (tl.load(FLAGS + p) & F_BONUS) != 0
        if STATS:
            m, log2s, ent, logp = zero + NEG, zero, zero, zero
            if w != 0:
                m, log2s, ent, logp = _row_stats(X + off, x_id, V, P, k2, zero, HAS_SOFTCAP, BLOCK, LANES)
            tl.store(LOGP + p, logp)
            tl.store(ENT + p, ent)
            tl.store(RMAX + p, m)
            tl.store(LOG2S + p, log2s)
            g = zero
            if TERMS:
                g = _token_terms(logp, w, p, P, adv, old, ref, isr, DLOGP, PTL, KL, FLAGS,
                                 LOSS, HAS_OLD, HAS_KL, BIAS_KL, HAS_DELTA)  # fmt: skip
        if GRAD:
            c = scale * wb * g
            h = zero
            if ENT_GRAD:
                h = scale * ent_w * w
                if ENT_MASK:  # only the tokens the high-entropy mask keeps
                    h = tl.where(bonus, h, 0.0)
            _row_grad(X + off, DX + doff, V, tgt, m, log2s, ent, c, h, P, k2, HAS_SOFTCAP, ENT_GRAD, BLOCK)


@triton.jit(do_not_specialize=["sdb", "sdt", "T_x", "n_rows"])
def _scale_rows(DX, sdb, sdt, T_x, n_rows, V, GO, GS, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """``DX *= grad_output / gs`` over ``n_rows`` rows, unless the upstream gradient is the announced one (the
    common case: each program reads two scalars and is done)."""
    go = tl.load(GO)
    gs = tl.load(GS).to(go.dtype)
    if go != gs:
        factor = go / gs
        cols = tl.arange(0, BLOCK)
        for i in range(tl.program_id(0), n_rows, tl.num_programs(0)):
            local = tl.cast(i, tl.int64)
            xb = local // T_x
            off = xb * sdb + (local - xb * T_x) * sdt
            if ALIGNED:
                off = tl.multiple_of(off, 16)
            for start in range(0, V, BLOCK):
                inb = start + cols < V
                x = tl.load(DX + off + start + cols, mask=inb, other=0.0)
                tl.store(DX + off + start + cols, (x.to(go.dtype) * factor).to(x.dtype), mask=inb)
