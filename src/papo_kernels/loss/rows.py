"""Row kernels over the logits: one program per token, streaming its vocabulary row in blocks.

Forward (``_forward_rows``): one read of the row. With ``y`` the logits (or ``softcap * tanh(scale * x / softcap)``)
and ``k2 = log2(e) * scale / T`` (``log2(e) / T`` with a softcap), it keeps in fp32 registers the running max ``m``
of ``y``, ``s = sum_j 2^d_j`` and ``a = sum_j 2^d_j d_j`` with ``d_j = (y_j - m) k2``, rescaled whenever ``m``
grows. Then ``log2 Z = log2 s`` (relative to ``m``), ``logp = ln2 ((y_id - m) k2 - log2 s)`` and the entropy
``H = ln2 (log2 s - a / s)``. Differences ``y - m`` are taken before scaling, so large logits (1e4) lose nothing.
It saves ``m`` and ``log2 s`` (O(1) per token) and, at token level, evaluates the loss terms of its token.

Backward (``_backward_rows``): a second read of the row, one write of ``dL/dx``, possibly into the logits:
``dL/dz_j = c (1[j = id] - p_j) - h p_j (ln p_j + H)`` with ``c = dL/dlogp`` and ``h = dL/dH``, times
``dz/dx`` (``scale / T``, and ``1 - tanh^2`` under a softcap). Rows whose ``c`` and ``h`` are zero (masked
tokens, zero advantages) are written with zeros without being read.

Vocabulary blocks are unmasked except the last, so loads vectorise; shapes and strides are runtime arguments
(``ALIGNED`` tells the compiler the row offsets are multiples of 16 elements).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .terms import F_BONUS, P_CAP, P_K2, P_KN, P_SCALE, _load_inputs, _policy_terms

LN2 = tl.constexpr(0.6931471805599453)
NEG = tl.constexpr(-1.0e30)  # running-max start: finite, so fully -inf blocks give no inf - inf
FLOOR = tl.constexpr(-1100.0)  # exp2 of anything below underflows to 0 in fp32 and fp64

_DNS = ["sxb", "sxt", "T_x", "row0", "V", "T", "sab", "sat", "sib", "sit", "sdb", "sdt"]


@triton.jit
def _cap(x, P, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        cap = tl.load(P + P_CAP)
        x = cap * (2 * tl.sigmoid(2 * (x * tl.load(P + P_SCALE)) / cap) - 1)
    return x


@triton.jit
def _row(pid, row0, ROWS, T_x, sb, st, HAS_ROWS: tl.constexpr, ALIGNED: tl.constexpr):
    """Flat token position of this program and the offset of its logits row."""
    local = pid.to(tl.int64)
    if HAS_ROWS:
        p = tl.load(ROWS + row0 + local).to(tl.int64)
    else:
        p = row0 + local
    xb = local // T_x
    off = xb * sb + (local - xb * T_x) * st
    if ALIGNED:
        off = tl.multiple_of(off, 16)
    return p, off


@triton.jit
def _fold(y, m, s, a, k2):
    """Fold one block into the running (max, sum 2^d, sum 2^d d)."""
    new_m = tl.maximum(m, tl.max(y, axis=0))
    dm = (m - new_m) * k2
    c = tl.exp2(dm)
    d = tl.maximum((y - new_m) * k2, FLOOR)
    e = tl.exp2(d)
    a = tl.where(s > 0, c * (a + s * dm), 0.0) + tl.sum(e * d, axis=0)
    s = c * s + tl.sum(e, axis=0)
    return new_m, s, a


@triton.jit(do_not_specialize=_DNS)
def _forward_rows(
    X, sxb, sxt, T_x, row0, ROWS, IDS, MASK, V, P,
    LOGP, ENT, RMAX, LOG2S,
    ADV, sab, sat, OLD, REF, ISR, sib, sit, T, G, PTL, KL, FLAGS,
    HAS_SOFTCAP: tl.constexpr, HAS_ROWS: tl.constexpr, ALIGNED: tl.constexpr, TERMS: tl.constexpr,
    LOSS: tl.constexpr, HAS_OLD: tl.constexpr, HAS_KL: tl.constexpr, BIAS_KL: tl.constexpr,
    HAS_ISR: tl.constexpr, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    p, off = _row(tl.program_id(0), row0, ROWS, T_x, sxb, sxt, HAS_ROWS, ALIGNED)
    acc = LOGP.dtype.element_ty
    w = tl.load(MASK + p).to(acc)
    zero = tl.sum(tl.zeros([BLOCK], acc), axis=0)
    logp, ent, m, log2s = zero, zero, zero + NEG, zero
    if w != 0:
        k2 = tl.load(P + P_K2)
        xrow = X + off
        cols = tl.arange(0, BLOCK)
        s, a = zero, zero
        n_full = (V // BLOCK) * BLOCK
        for start in range(0, n_full, BLOCK):
            y = _cap(tl.load(xrow + start + cols).to(acc), P, HAS_SOFTCAP)
            m, s, a = _fold(y, m, s, a, k2)
        if n_full < V:
            inb = n_full + cols < V
            y = _cap(tl.load(xrow + n_full + cols, mask=inb, other=float("-inf")).to(acc), P, HAS_SOFTCAP)
            m, s, a = _fold(tl.where(inb, y, float("-inf")), m, s, a, k2)
        log2s = tl.log2(s)
        ent = LN2 * (log2s - a / s)
        y_id = _cap(tl.load(xrow + tl.load(IDS + p)).to(acc), P, HAS_SOFTCAP)
        logp = ((y_id - m) * k2 - log2s) * LN2
    tl.store(LOGP + p, logp)
    tl.store(ENT + p, ent)
    tl.store(RMAX + p, m)
    tl.store(LOG2S + p, log2s)
    if TERMS:
        b = p // T
        adv, old, ref, isr = _load_inputs(
            logp, b, p - b * T, p, w != 0, ADV, sab, sat, OLD, REF, ISR, sib, sit, HAS_OLD, HAS_KL, HAS_ISR
        )
        r = tl.exp(logp - old)
        one = r * 0.0 + 1.0
        ptl, d_lp, d_r, kl, low, high = _policy_terms(
            logp, ref, adv, isr, r, one, one, P, LOSS, HAS_DELTA, HAS_KL, BIAS_KL
        )
        on = w != 0
        tl.store(G + p, tl.where(on, w * (d_lp + d_r * r), 0.0))
        tl.store(PTL + p, tl.where(on, ptl, 0.0))
        tl.store(KL + p, tl.where(on, kl, 0.0))
        tl.store(FLAGS + p, tl.where(on, low.to(tl.int32) + 2 * high.to(tl.int32), 0))


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


@triton.jit(do_not_specialize=_DNS)
def _backward_rows(
    X, sxb, sxt, T_x, row0, ROWS, DX, sdb, sdt, IDS, MASK, V, T, P,
    RMAX, LOG2S, ENT, G, W, FLAGS, GO, ENT_W,
    HAS_SOFTCAP: tl.constexpr, HAS_ROWS: tl.constexpr, ALIGNED: tl.constexpr, ENT_GRAD: tl.constexpr,
    ENT_MASK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    p, off = _row(pid, row0, ROWS, T_x, sxb, sxt, HAS_ROWS, ALIGNED)
    _, doff = _row(pid, row0, ROWS, T_x, sdb, sdt, HAS_ROWS, ALIGNED)
    acc = RMAX.dtype.element_ty
    kn = tl.load(P + P_KN)
    go = tl.load(GO).to(acc)
    c = go * tl.load(W + p // T) * tl.load(G + p) * kn
    h = c * 0.0
    if ENT_GRAD:
        h = go * tl.load(ENT_W) * tl.load(MASK + p).to(acc) * kn
        if ENT_MASK:  # only the tokens the high-entropy mask keeps
            h = tl.where((tl.load(FLAGS + p) & F_BONUS) != 0, h, 0.0)
    drow = DX + doff
    cols = tl.arange(0, BLOCK)
    n_full = (V // BLOCK) * BLOCK
    out_t = DX.dtype.element_ty
    if (c == 0) & (h == 0):
        zeros = tl.zeros([BLOCK], out_t)
        for start in range(0, n_full, BLOCK):
            tl.store(drow + start + cols, zeros)
        if n_full < V:
            tl.store(drow + n_full + cols, zeros, mask=n_full + cols < V)
    else:
        xrow = X + off
        k2 = tl.load(P + P_K2)
        m = tl.load(RMAX + p)
        log2s = tl.load(LOG2S + p)
        tgt = tl.load(IDS + p)
        a0 = c + h * tl.load(ENT + p)
        a1 = h * LN2
        for start in range(0, n_full, BLOCK):
            x = tl.load(xrow + start + cols).to(acc)
            g = _grad_block(x, start + cols, tgt, m, log2s, c, a0, a1, P, k2, HAS_SOFTCAP, ENT_GRAD)
            tl.store(drow + start + cols, g.to(out_t))
        if n_full < V:
            inb = n_full + cols < V
            x = tl.load(xrow + n_full + cols, mask=inb, other=0.0).to(acc)
            g = _grad_block(x, n_full + cols, tgt, m, log2s, c, a0, a1, P, k2, HAS_SOFTCAP, ENT_GRAD)
            tl.store(drow + n_full + cols, g.to(out_t), mask=inb)
