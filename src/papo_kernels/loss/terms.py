"""Per-token loss terms, per-sequence reduction and aggregation kernels (everything after the log-probs).

``_policy_terms`` is TRL's per-token loss with its partial derivatives, shared by the token-level row kernel and
the sequence kernel. For ratio ``r`` it returns ``ptl`` and ``d_lp = dptl/dlogp`` (``r`` held fixed) and
``d_r = dptl/dr``; autograd's conventions are kept exactly (``min`` splits a tie's gradient in halves, ``clamp``
passes the gradient on its closed interval). Token level: ``dL/dlogp_t = m_t (d_lp + d_r r)``. Sequence level
(GSPO, ``R = exp(sum_t m_t (logp_t - old_t) / n)``): ``dL/dlogp_t = m_t (d_lp_t + R / n * sum_s m_s d_r_s)``.

``_sequence_kernel`` (one program per sequence) writes the per-sequence partial sums ``PART[b]`` (loss, tokens,
entropy, KL, clip flags) and, at sequence level, the coefficients ``G``. ``_finalize_kernel`` (one program)
turns them into the aggregation weights ``W[b]``, the loss and the metrics.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOSS_IDS = {"grpo": 0, "bnpo": 1, "dr_grpo": 2, "dapo": 3, "cispo": 4, "sapo": 5, "luspo": 6}
_c = tl.constexpr
# Slots of the scalar-parameter vector (stored once per config as a small tensor of the arithmetic dtype)
P_EPS_LOW, P_EPS_HIGH, P_DELTA, P_BETA, P_TAU_POS, P_TAU_NEG = _c(0), _c(1), _c(2), _c(3), _c(4), _c(5)
P_ENT_COEF, P_K2, P_KN, P_SCALE, P_CAP, P_MAXLEN = _c(6), _c(7), _c(8), _c(9), _c(10), _c(11)
# Columns of the per-sequence partial sums
C_LOSS, C_TOKENS, C_ENT, C_KL, C_LOW, C_HIGH, C_REGION = _c(0), _c(1), _c(2), _c(3), _c(4), _c(5), _c(6)
N_PART = 8
# Slots of the output vector
O_LOSS, O_POLICY, O_ENT, O_KL, O_LOW, O_HIGH, O_REGION, O_ENT_W = (_c(i) for i in range(8))
N_OUT = 8


@triton.jit
def _policy_terms(
    logp, ref, adv, isr, r, P,
    LOSS: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_KL: tl.constexpr, BIAS_KL: tl.constexpr,
):  # fmt: skip
    """Per-token loss ``ptl`` (times the IS weight, plus ``beta * k3``), ``d_lp``, ``d_r``, the KL for the metric
    and the low/high clip flags (high is the CISPO flag for ``cispo``)."""
    zero = r * 0.0
    if LOSS == 4:  # cispo: -sg(min(r, eps_high)) * A * logp
        cr = tl.minimum(r, tl.load(P + P_EPS_HIGH))
        ptl = -cr * adv * logp
        d_lp = -cr * adv
        d_r = zero
        low = r < zero
        high = (r > tl.load(P + P_EPS_HIGH)) & (adv > 0)
    elif LOSS == 5:  # sapo: -4 sigmoid(tau (r - 1)) / tau * A
        tau = tl.where(adv > 0, tl.load(P + P_TAU_POS), tl.load(P + P_TAU_NEG))
        sg = tl.sigmoid(tau * (r - 1))
        ptl = -(sg * 4 / tau) * adv
        d_lp = zero
        d_r = -4 * adv * sg * (1 - sg)
        low = r < zero
        high = low
    else:  # clipped: -min(min(r, delta) A, clip(r, 1 - eps_low, 1 + eps_high) A)
        lo = 1 - tl.load(P + P_EPS_LOW)
        hi = 1 + tl.load(P + P_EPS_HIGH)
        r2 = tl.minimum(tl.maximum(r, lo), hi)
        g2 = ((r >= lo) & (r <= hi)).to(r.dtype)
        if HAS_DELTA:
            delta = tl.load(P + P_DELTA)
            r1 = tl.minimum(r, delta)
            g1 = (r <= delta).to(r.dtype)
        else:
            r1 = r
            g1 = zero + 1
        v1 = r1 * adv
        v2 = r2 * adv
        w1 = tl.where(v1 < v2, 1.0, tl.where(v1 == v2, 0.5, 0.0))
        ptl = -tl.minimum(v1, v2)
        d_lp = zero
        d_r = -adv * (w1 * g1 + (1 - w1) * g2)
        low = (r1 < lo) & (adv < 0)
        high = (r1 > hi) & (adv > 0)
    ptl = ptl * isr
    d_lp = d_lp * isr
    d_r = d_r * isr
    kl = zero
    if HAS_KL:  # k3 = exp(ref - logp) - (ref - logp) - 1
        beta = tl.load(P + P_BETA)
        dref = ref - logp
        e = tl.exp(dref)
        kl = e - dref - 1
        dkl = 1 - e
        if BIAS_KL:
            ptl += beta * kl * r
            d_lp += beta * dkl * r
            d_r += beta * kl
            kl = kl * r
        else:
            ptl += beta * kl
            d_lp += beta * dkl
    return ptl, d_lp, d_r, kl, low, high


@triton.jit
def _load_inputs(logp, b, t, p, inb, ADV, sab, sat, OLD, REF, ISR, sib, sit, HAS_OLD, HAS_KL, HAS_ISR):
    """Advantage, old/ref log-probs and IS weight at flat positions ``p = b * T + t`` (``inb`` marks real ones);
    absent inputs default to on-policy (``old = logp``), no KL and weight 1."""
    adv = tl.load(ADV + b * sab + t * sat, mask=inb, other=0.0).to(logp.dtype)
    old = logp
    if HAS_OLD:
        old = tl.load(OLD + p, mask=inb, other=0.0).to(logp.dtype)
    ref = logp
    if HAS_KL:
        ref = tl.load(REF + p, mask=inb, other=0.0).to(logp.dtype)
    isr = logp * 0.0 + 1.0
    if HAS_ISR:
        isr = tl.load(ISR + b * sib + t * sit, mask=inb, other=0.0).to(logp.dtype)
    return adv, old, ref, isr


@triton.jit(do_not_specialize=["T", "sab", "sat", "sib", "sit", "per_seq_flags"])
def _sequence_kernel(
    LOGP, ENT, G, PTL, KL, FLAGS, MASK, ADV, sab, sat, OLD, REF, ISR, sib, sit, PART, P, T, per_seq_flags,
    SEQ_LEVEL: tl.constexpr, LOSS: tl.constexpr, HAS_OLD: tl.constexpr, HAS_KL: tl.constexpr,
    BIAS_KL: tl.constexpr, HAS_ISR: tl.constexpr, HAS_DELTA: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    vz = tl.zeros([BLOCK_T], LOGP.dtype.element_ty)
    seql, cnt, ents, kls, lows, highs, regs = vz, vz, vz, vz, vz, vz, vz
    if SEQ_LEVEL:
        lr = vz
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs
            inb = t < T
            m = tl.load(MASK + b * T + t, mask=inb, other=0).to(vz.dtype)
            logp = tl.load(LOGP + b * T + t, mask=inb, other=0.0)
            adv, old, ref, isr = _load_inputs(
                logp, b, t, b * T + t, inb, ADV, sab, sat, OLD, REF, ISR, sib, sit, HAS_OLD, False, False
            )
            lr += tl.where(m != 0, m * (logp - old), 0.0)
            cnt += m
        n = tl.maximum(tl.sum(cnt, axis=0), 1.0)
        R = tl.exp(tl.sum(lr, axis=0) / n)
        s_r = vz
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs
            inb = t < T
            p = b * T + t
            m = tl.load(MASK + p, mask=inb, other=0).to(vz.dtype)
            logp = tl.load(LOGP + p, mask=inb, other=0.0)
            adv, old, ref, isr = _load_inputs(
                logp, b, t, p, inb, ADV, sab, sat, OLD, REF, ISR, sib, sit, HAS_OLD, HAS_KL, HAS_ISR
            )
            ptl, d_lp, d_r, kl, low, high = _policy_terms(
                logp, ref, adv, isr, vz + R, P, LOSS, HAS_DELTA, HAS_KL, BIAS_KL
            )
            on = m != 0
            seql += tl.where(on, m * ptl, 0.0)
            s_r += tl.where(on, m * d_r, 0.0)
            ents += m * tl.load(ENT + p, mask=inb, other=0.0)
            kls += tl.where(on, m * kl, 0.0)
            lows += m * low.to(vz.dtype)
            highs += m * high.to(vz.dtype)
            regs += m * (low | high).to(vz.dtype)
            tl.store(G + p, tl.where(on, m * d_lp, 0.0), mask=inb)
        coef = tl.sum(s_r, axis=0) * R / n
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs
            inb = t < T
            p = b * T + t
            m = tl.load(MASK + p, mask=inb, other=0).to(vz.dtype)
            tl.store(G + p, tl.load(G + p, mask=inb, other=0.0) + m * coef, mask=inb)
        if per_seq_flags != 0:  # one flag per sequence (TRL's [B, 1] ratio with [B] advantages): not token-weighted
            adv0 = tl.load(ADV + b * sab).to(vz.dtype)
            _, _, _, _, low0, high0 = _policy_terms(R, R, adv0, R, R, P, LOSS, HAS_DELTA, False, False)
            lows = tl.where(offs == 0, low0.to(vz.dtype), 0.0)
            highs = tl.where(offs == 0, high0.to(vz.dtype), 0.0)
            regs = tl.where(offs == 0, (low0 | high0).to(vz.dtype), 0.0)
    else:
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs
            inb = t < T
            p = b * T + t
            m = tl.load(MASK + p, mask=inb, other=0).to(vz.dtype)
            cnt += m
            seql += m * tl.load(PTL + p, mask=inb, other=0.0)
            ents += m * tl.load(ENT + p, mask=inb, other=0.0)
            kls += m * tl.load(KL + p, mask=inb, other=0.0)
            f = tl.load(FLAGS + p, mask=inb, other=0)
            lows += m * (f & 1).to(vz.dtype)
            highs += m * ((f >> 1) & 1).to(vz.dtype)
            regs += m * (f != 0).to(vz.dtype)
    out = PART + b * 8
    tl.store(out + C_LOSS, tl.sum(seql, axis=0))
    tl.store(out + C_TOKENS, tl.sum(cnt, axis=0))
    tl.store(out + C_ENT, tl.sum(ents, axis=0))
    tl.store(out + C_KL, tl.sum(kls, axis=0))
    tl.store(out + C_LOW, tl.sum(lows, axis=0))
    tl.store(out + C_HIGH, tl.sum(highs, axis=0))
    tl.store(out + C_REGION, tl.sum(regs, axis=0))


@triton.jit(do_not_specialize=["B", "num_items", "per_seq_denom"])
def _finalize_kernel(
    PART, W, OUT, LOSS_PTR, P, SEQ_SCALE, NUM_ITEMS, B, num_items, per_seq_denom,
    LOSS: tl.constexpr, HAS_SCALE: tl.constexpr, NI_MODE: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """Aggregation weights ``W[b]`` (loss = sum_b W[b] * PART[b, loss]), the loss and the metrics."""
    offs = tl.arange(0, BLOCK_B)
    vz = tl.zeros([BLOCK_B], PART.dtype.element_ty)
    cnt, ents, kls, lows, highs, regs = vz, vz, vz, vz, vz, vz
    for b0 in range(0, B, BLOCK_B):
        row = (b0 + offs).to(tl.int64) * 8
        inb = b0 + offs < B
        cnt += tl.load(PART + row + C_TOKENS, mask=inb, other=0.0)
        ents += tl.load(PART + row + C_ENT, mask=inb, other=0.0)
        kls += tl.load(PART + row + C_KL, mask=inb, other=0.0)
        lows += tl.load(PART + row + C_LOW, mask=inb, other=0.0)
        highs += tl.load(PART + row + C_HIGH, mask=inb, other=0.0)
        regs += tl.load(PART + row + C_REGION, mask=inb, other=0.0)
    count = tl.maximum(tl.sum(cnt, axis=0), 1.0)
    nb = tl.maximum(tl.sum(vz, axis=0) + B, 1.0)  # B in the arithmetic dtype
    if NI_MODE == 0:
        norm = count
    elif NI_MODE == 1:
        norm = count * 0.0 + num_items
    else:
        norm = count * 0.0 + tl.load(NUM_ITEMS).to(vz.dtype)
    pol = vz
    for b0 in range(0, B, BLOCK_B):
        row = (b0 + offs).to(tl.int64)
        inb = b0 + offs < B
        tokens = tl.load(PART + row * 8 + C_TOKENS, mask=inb, other=0.0)
        if HAS_SCALE:
            w = tl.load(SEQ_SCALE + row, mask=inb, other=0.0).to(vz.dtype)
        elif LOSS == 0 or LOSS == 5:  # grpo, sapo: mean over sequences of the token mean
            w = 1.0 / (nb * tl.maximum(tokens, 1.0))
        elif LOSS == 1:  # bnpo: token mean
            w = vz + 1.0 / count
        elif LOSS == 2:  # dr_grpo: sum / (B * max_completion_length)
            w = vz + 1.0 / (nb * tl.load(P + P_MAXLEN))
        elif LOSS == 3 or LOSS == 4:  # dapo, cispo: sum / num_items_in_batch
            w = vz + 1.0 / norm
        else:  # luspo: mean over sequences of the token sum
            w = vz + 1.0 / nb
        tl.store(W + row, w, mask=inb)
        pol += tl.where(inb, w * tl.load(PART + row * 8 + C_LOSS, mask=inb, other=0.0), 0.0)
    policy = tl.sum(pol, axis=0)
    ent_mean = tl.sum(ents, axis=0) / count
    coef = tl.load(P + P_ENT_COEF)
    flag_norm = count
    if per_seq_denom != 0:
        flag_norm = nb
    tl.store(OUT + O_LOSS, policy - coef * ent_mean)
    tl.store(LOSS_PTR, policy - coef * ent_mean)
    tl.store(OUT + O_POLICY, policy)
    tl.store(OUT + O_ENT, ent_mean)
    tl.store(OUT + O_KL, tl.sum(kls, axis=0) / count)
    tl.store(OUT + O_LOW, tl.sum(lows, axis=0) / flag_norm)
    tl.store(OUT + O_HIGH, tl.sum(highs, axis=0) / flag_norm)
    tl.store(OUT + O_REGION, tl.sum(regs, axis=0) / flag_norm)
    tl.store(OUT + O_ENT_W, -coef / count)


def block_for(n: int, cap: int = 1024) -> int:
    return min(cap, triton.next_power_of_2(max(int(n), 16)))
