"""Batch-wide kernels over the O(B*T) state the row kernels leave: no pass over the logits.

Sequence ``b`` is the flat tokens ``CU[b]`` to ``CU[b + 1]``: a padded ``[B, T]`` batch has ``CU[b] = b T``, a
packed one its ``cu_seqlens``. Per-token inputs are flat (token ``p`` at ``p``); the advantage and the IS ratio of
token ``p`` of sequence ``b`` are at ``b * s_seq + p * s_tok`` (one per sequence: ``s_tok = 0``; one per token, flat:
``s_seq = 0, s_tok = 1``).

``_sequence_kernel`` (one program per sequence) writes the per-sequence partial sums ``PART[b]`` (loss, tokens,
entropy, KL, clip flags, VESPO weight, entropy over the bonus tokens). Single phase, the row kernel has already
evaluated every token's terms and this sums them. Two phases, it first gathers the sequence's statistics of the
current log-probs (GSPO's mean log-ratio; VESPO's ``ln w``: the masked sum of the log-ratios clamped to [-20, 20]
plus the IS-ratio log sum; the off-policy mask's mean of ``sampling_logps - logp``), then evaluates each token's
terms under the off-policy and high-entropy masks and writes each token's ``DLOGP`` (``dL/dlogp``, before the
aggregation weight) and bonus flag.

``_count_kernel`` (one program per sequence) is the single-phase path's pre-pass: the mask sums the aggregation
weights need. ``_quantile_kernel`` (one program) reads the batch's fp32 entropies, sorted with the masked ones at
+inf, and writes the high-entropy threshold as ``torch.quantile`` computes it: fp32 rank ``q (n - 1)``, linear
interpolation (``a + f (b - a)`` below ``f = 1/2``, ``b - (b - a)(1 - f)`` above); NaN if an entropy is NaN.

``_finalize_kernel`` (one program) turns the partial sums into the aggregation weights ``W[b]``, the loss, the
metrics and the entropy-bonus weight ``-entropy_coef / bonus tokens``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .terms import (
    BNPO,
    C_BONUS,
    C_BONUS_N,
    C_ENT,
    C_HIGH,
    C_HIGH_RATIO,
    C_KL,
    C_LOSS,
    C_LOW,
    C_LOW_RATIO,
    C_PHI,
    C_REGION,
    C_TOKENS,
    CISPO,
    DAPO,
    DR_GRPO,
    F_BONUS,
    F_CLIPPED,
    F_HIGH,
    F_LOW,
    GRPO,
    LN_W_MAX,
    N_PART,
    O_BONUS,
    O_BONUS_N,
    O_ENT,
    O_ENT_W,
    O_HIGH,
    O_KL,
    O_LOSS,
    O_LOW,
    O_PHI,
    O_POLICY,
    O_REGION,
    O_THRESHOLD,
    P_ENT_COEF,
    P_FMAX,
    P_LN_LOW,
    P_MAXLEN,
    P_OPM,
    P_QUANTILE,
    SAPO,
    VESPO,
    _gamma,
    _load_inputs,
    _policy_terms,
)


@triton.jit
def _clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo), hi)


@triton.jit
def _span(CU, b):
    """First and end flat token of sequence ``b``."""
    return tl.load(CU + b).to(tl.int64), tl.load(CU + b + 1).to(tl.int64)


@triton.jit
def _token_block(LOGP, MASK, start, end, t0, vz, BLOCK_T: tl.constexpr):
    """Flat positions, bounds, mask values (and where non-zero) and log-probs of one block of a sequence's tokens."""
    p = start + t0 + tl.arange(0, BLOCK_T)
    inb = p < end
    m = tl.load(MASK + p, mask=inb, other=0).to(vz.dtype)
    return p, inb, m, m != 0, tl.load(LOGP + p, mask=inb, other=0.0)


@triton.jit
def _sequence_stats(
    LOGP, MASK, OLD, ISR, si_seq, si_tok, isr_per_seq, SAMP, P, b, start, end, vz,
    SEQ_LEVEL: tl.constexpr, VESPO: tl.constexpr, HAS_OLD: tl.constexpr, VESPO_ISR: tl.constexpr,
    OFF_POLICY: tl.constexpr, HAS_SAMP: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """GSPO's ratio ``R``, VESPO's ``ln w`` and the off-policy mask's mean KL of sequence ``b``."""
    cnt, lr, vl, vi, okl = vz, vz, vz, vz, vz
    ln_low = tl.load(P + P_LN_LOW)
    for t0 in range(0, end - start, BLOCK_T):
        p, inb, m, on, logp = _token_block(LOGP, MASK, start, end, t0, vz, BLOCK_T)
        old = logp
        if HAS_OLD:
            old = tl.load(OLD + p, mask=inb, other=0.0).to(vz.dtype)
        cnt += m
        if SEQ_LEVEL:
            lr += tl.where(on, m * (logp - old), 0.0)
        if VESPO:
            vl += tl.where(on, m * _clamp(logp - old, -LN_W_MAX, LN_W_MAX), 0.0)
            if VESPO_ISR:  # every entry of a per-token IS ratio counts, masked or not (TRL)
                isr_in = inb & ((p * 0 + isr_per_seq) == 0)
                isr = tl.load(ISR + b * si_seq + p * si_tok, mask=isr_in, other=1.0).to(vz.dtype)
                vi += tl.where(isr_in, _clamp(tl.log(isr), ln_low, LN_W_MAX), 0.0)
        if OFF_POLICY:
            samp = old
            if HAS_SAMP:
                samp = tl.load(SAMP + p, mask=inb, other=0.0).to(vz.dtype)
            fmax = tl.load(P + P_FMAX)
            d = samp - logp
            d = tl.where(d != d, 0.0, _clamp(d, -fmax, fmax))  # torch.nan_to_num
            okl += tl.where(on, m * d, 0.0)
    n = tl.maximum(tl.sum(cnt, axis=0), 1.0)
    R = tl.exp(tl.sum(lr, axis=0) / n)
    ln_w = tl.sum(vl, axis=0) + tl.sum(vi, axis=0)
    if VESPO_ISR:  # a per-sequence IS ratio: its one entry
        isr0 = tl.load(ISR + b * si_seq, mask=(b * 0 + isr_per_seq) != 0, other=1.0).to(vz.dtype)
        ln_w += tl.where(isr_per_seq != 0, _clamp(tl.log(isr0), ln_low, LN_W_MAX), 0.0)
    return R, _clamp(ln_w, ln_low, LN_W_MAX), tl.sum(okl, axis=0) / n


@triton.jit(do_not_specialize=["sa_seq", "sa_tok", "si_seq", "si_tok", "isr_per_seq", "per_seq_flags", "phi_per_seq"])
def _sequence_kernel(
    LOGP, ENT, DLOGP, PTL, KL, FLAGS, MASK, ADV, sa_seq, sa_tok, OLD, REF, ISR, si_seq, si_tok, isr_per_seq, SAMP,
    PART, OUT, P, CU, per_seq_flags, phi_per_seq,
    TWO_PHASE: tl.constexpr, SEQ_LEVEL: tl.constexpr, LOSS: tl.constexpr, HAS_OLD: tl.constexpr,
    HAS_KL: tl.constexpr, BIAS_KL: tl.constexpr, HAS_ISR: tl.constexpr, HAS_DELTA: tl.constexpr,
    VESPO_ISR: tl.constexpr, OFF_POLICY: tl.constexpr, HAS_SAMP: tl.constexpr, ENT_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    start, end = _span(CU, b)
    offs = tl.arange(0, BLOCK_T)
    vz = tl.zeros([BLOCK_T], LOGP.dtype.element_ty)
    seql, cnt, ents, kls, lows, highs, regs, phis, bon, bon_n = vz, vz, vz, vz, vz, vz, vz, vz, vz, vz
    if TWO_PHASE:
        R, ln_w, mean_kl = _sequence_stats(
            LOGP, MASK, OLD, ISR, si_seq, si_tok, isr_per_seq, SAMP, P, b, start, end, vz,
            SEQ_LEVEL, LOSS == VESPO, HAS_OLD, VESPO_ISR, OFF_POLICY, HAS_SAMP, BLOCK_T,
        )  # fmt: skip
        near = (vz + mean_kl) <= tl.load(P + P_OPM)
        threshold = tl.load(OUT + O_THRESHOLD)
        s_r = vz
        for t0 in range(0, end - start, BLOCK_T):
            p, inb, m, on, logp = _token_block(LOGP, MASK, start, end, t0, vz, BLOCK_T)
            ent = tl.load(ENT + p, mask=inb, other=0.0)
            adv, old, ref, isr = _load_inputs(
                logp, b, p, p, inb, ADV, sa_seq, sa_tok, OLD, REF, ISR, si_seq, si_tok, HAS_OLD, HAS_KL, HAS_ISR
            )
            keep = vz + 1.0
            if OFF_POLICY:
                keep = tl.where((adv >= 0) | near, keep, 0.0)
            bonus = on
            if ENT_MASK:
                bonus = (ent * m >= threshold) & on
                keep = tl.where(bonus, keep, 0.0)
                tl.store(FLAGS + p, tl.where(bonus, F_BONUS, 0), mask=inb)
            phi = vz + 1.0
            if LOSS == VESPO:
                phi = _gamma(ln_w, adv, P)
                phis += tl.where(on, m * phi, 0.0)
            if SEQ_LEVEL:
                r = vz + R
            else:
                r = tl.exp(logp - old)
            ptl, d_lp, d_r, kl, low, high = _policy_terms(
                logp, ref, adv, isr, r, keep, phi, P, LOSS, HAS_DELTA, HAS_KL, BIAS_KL
            )
            cnt += m
            seql += tl.where(on, m * ptl, 0.0)
            ents += tl.where(on, m * ent, 0.0)
            bon += tl.where(bonus, m * ent, 0.0)
            bon_n += tl.where(bonus, m, 0.0)
            kls += tl.where(on, m * kl, 0.0)
            lows += m * low.to(vz.dtype)
            highs += m * high.to(vz.dtype)
            regs += m * (low | high).to(vz.dtype)
            if SEQ_LEVEL:
                s_r += tl.where(on, m * d_r, 0.0)
                g = d_lp
            else:
                g = d_lp + d_r * r
            tl.store(DLOGP + p, tl.where(on, m * g, 0.0), mask=inb)
        if SEQ_LEVEL:  # every token's share of the sequence ratio's gradient
            coef = tl.sum(s_r, axis=0) * R / tl.maximum(tl.sum(cnt, axis=0), 1.0)
            for t0 in range(0, end - start, BLOCK_T):
                p = start + t0 + offs
                inb = p < end
                m = tl.load(MASK + p, mask=inb, other=0).to(vz.dtype)
                tl.store(DLOGP + p, tl.load(DLOGP + p, mask=inb, other=0.0) + m * coef, mask=inb)
        # the sequence's advantage (of its first token, 0 without one, as padding gives it)
        has_adv = (start < end) | (start * 0 + sa_tok == 0)
        adv0 = tl.load(ADV + b * sa_seq + start * sa_tok, mask=has_adv, other=0.0).to(vz.dtype)
        if per_seq_flags != 0:  # one flag per sequence (TRL's [B, 1] ratio with [B] advantages): not token-weighted
            one = vz + 1.0
            _, _, _, _, low0, high0 = _policy_terms(R, R, adv0, R, R, one, one, P, LOSS, HAS_DELTA, False, False)
            lows = tl.where(offs == 0, low0.to(vz.dtype), 0.0)
            highs = tl.where(offs == 0, high0.to(vz.dtype), 0.0)
            regs = tl.where(offs == 0, (low0 | high0).to(vz.dtype), 0.0)
        if LOSS == VESPO and phi_per_seq != 0:  # TRL's [B, 1] weight of T > 1 tokens: one per sequence, masked or not
            phis = tl.where(offs == 0, _gamma(ln_w, adv0, P), 0.0)
    else:
        for t0 in range(0, end - start, BLOCK_T):
            p = start + t0 + offs
            inb = p < end
            m = tl.load(MASK + p, mask=inb, other=0).to(vz.dtype)
            cnt += m
            seql += m * tl.load(PTL + p, mask=inb, other=0.0)
            ents += m * tl.load(ENT + p, mask=inb, other=0.0)
            kls += m * tl.load(KL + p, mask=inb, other=0.0)
            f = tl.load(FLAGS + p, mask=inb, other=0)
            lows += m * ((f & F_LOW) != 0).to(vz.dtype)
            highs += m * ((f & F_HIGH) != 0).to(vz.dtype)
            regs += m * ((f & F_CLIPPED) != 0).to(vz.dtype)
        bon, bon_n = ents, cnt
    out = PART + b * N_PART
    tl.store(out + C_LOSS, tl.sum(seql, axis=0))
    tl.store(out + C_TOKENS, tl.sum(cnt, axis=0))
    tl.store(out + C_ENT, tl.sum(ents, axis=0))
    tl.store(out + C_KL, tl.sum(kls, axis=0))
    tl.store(out + C_LOW, tl.sum(lows, axis=0))
    tl.store(out + C_HIGH, tl.sum(highs, axis=0))
    tl.store(out + C_REGION, tl.sum(regs, axis=0))
    tl.store(out + C_PHI, tl.sum(phis, axis=0))
    tl.store(out + C_BONUS, tl.sum(bon, axis=0))
    tl.store(out + C_BONUS_N, tl.sum(bon_n, axis=0))


@triton.jit
def _count_kernel(MASK, PART, CU, BLOCK_T: tl.constexpr):
    """The pre-pass of the single-phase path: each sequence's mask sum (its tokens, which the entropy bonus also
    counts), all the aggregation weights need before any token's gradient."""
    b = tl.program_id(0).to(tl.int64)
    start, end = _span(CU, b)
    offs = tl.arange(0, BLOCK_T)
    cnt = tl.zeros([BLOCK_T], PART.dtype.element_ty)
    for t0 in range(0, end - start, BLOCK_T):
        p = start + t0 + offs
        cnt += tl.load(MASK + p, mask=p < end, other=0).to(cnt.dtype)
    tl.store(PART + b * N_PART + C_TOKENS, tl.sum(cnt, axis=0))
    tl.store(PART + b * N_PART + C_BONUS_N, tl.sum(cnt, axis=0))


@triton.jit(do_not_specialize=["N"])
def _quantile_kernel(SORTED, MASK, OUT, P, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    cnt = tl.zeros([BLOCK], tl.int32)
    for i0 in range(0, N, BLOCK):
        cnt += (tl.load(MASK + i0 + offs, mask=i0 + offs < N, other=0) != 0).to(tl.int32)
    n = tl.sum(cnt, axis=0)
    rank = tl.load(P + P_QUANTILE).to(tl.float32) * tl.maximum(n - 1, 0).to(tl.float32)
    below = rank.to(tl.int32)
    frac = rank - below.to(tl.float32)
    lo = tl.load(SORTED + below)
    hi = tl.load(SORTED + below + (frac > 0).to(tl.int32))
    thr = tl.where(frac < 0.5, lo + frac * (hi - lo), hi - (hi - lo) * (1.0 - frac))
    last = tl.load(SORTED + N - 1)
    thr = tl.where(last != last, last, thr)  # a NaN entropy: torch.quantile is NaN, no token kept
    thr = tl.where(n > 0, thr, float("inf"))
    tl.store(OUT + O_THRESHOLD, thr.to(OUT.dtype.element_ty))


@triton.jit(do_not_specialize=["B", "num_items", "per_seq_denom", "phi_per_seq"])
def _finalize_kernel(
    PART, W, OUT, LOSS_PTR, P, SEQ_SCALE, NUM_ITEMS, B, num_items, per_seq_denom, phi_per_seq,
    LOSS: tl.constexpr, HAS_SCALE: tl.constexpr, NI_MODE: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """Aggregation weights ``W[b]`` (loss = sum_b W[b] * PART[b, loss]), the loss, the metrics and each sequence's
    clip fractions."""
    offs = tl.arange(0, BLOCK_B)
    vz = tl.zeros([BLOCK_B], PART.dtype.element_ty)
    cnt, ents, kls, lows, highs, regs, phis, bon, bon_n = vz, vz, vz, vz, vz, vz, vz, vz, vz
    for b0 in range(0, B, BLOCK_B):
        row = (b0 + offs).to(tl.int64) * N_PART
        inb = b0 + offs < B
        cnt += tl.load(PART + row + C_TOKENS, mask=inb, other=0.0)
        ents += tl.load(PART + row + C_ENT, mask=inb, other=0.0)
        kls += tl.load(PART + row + C_KL, mask=inb, other=0.0)
        lows += tl.load(PART + row + C_LOW, mask=inb, other=0.0)
        highs += tl.load(PART + row + C_HIGH, mask=inb, other=0.0)
        regs += tl.load(PART + row + C_REGION, mask=inb, other=0.0)
        phis += tl.load(PART + row + C_PHI, mask=inb, other=0.0)
        bon += tl.load(PART + row + C_BONUS, mask=inb, other=0.0)
        bon_n += tl.load(PART + row + C_BONUS_N, mask=inb, other=0.0)
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
        tokens = tl.load(PART + row * N_PART + C_TOKENS, mask=inb, other=0.0)
        if HAS_SCALE:
            w = tl.load(SEQ_SCALE + row, mask=inb, other=0.0).to(vz.dtype)
        elif LOSS == GRPO or LOSS == SAPO:  # grpo, sapo: mean over sequences of the token mean
            w = 1.0 / (nb * tl.maximum(tokens, 1.0))
        elif LOSS == BNPO:  # bnpo: token mean
            w = vz + 1.0 / count
        elif LOSS == DR_GRPO:  # dr_grpo: sum / (B * max_completion_length)
            w = vz + 1.0 / (nb * tl.load(P + P_MAXLEN))
        elif LOSS == DAPO or LOSS == CISPO or LOSS == VESPO:  # dapo, cispo, vespo: sum / num_items_in_batch
            w = vz + 1.0 / norm
        else:  # luspo: mean over sequences of the token sum
            w = vz + 1.0 / nb
        tl.store(W + row, w, mask=inb)
        pol += tl.where(inb, w * tl.load(PART + row * N_PART + C_LOSS, mask=inb, other=0.0), 0.0)
        # the sequence's clip fractions (a sequence without tokens: 0 / 0, NaN); one flag per sequence as it is
        flags_per = tl.where(per_seq_denom != 0, 1.0, tokens)
        low = tl.load(PART + row * N_PART + C_LOW, mask=inb, other=0.0)
        high = tl.load(PART + row * N_PART + C_HIGH, mask=inb, other=0.0)
        tl.store(PART + row * N_PART + C_LOW_RATIO, low / flags_per, mask=inb)
        tl.store(PART + row * N_PART + C_HIGH_RATIO, high / flags_per, mask=inb)
    policy = tl.sum(pol, axis=0)
    coef = tl.load(P + P_ENT_COEF)
    bonus_n = tl.sum(bon_n, axis=0)
    bonus_mean = tl.sum(bon, axis=0) / tl.maximum(bonus_n, 1.0)
    flag_norm = count
    if per_seq_denom != 0:
        flag_norm = nb
    phi_norm = count
    if phi_per_seq != 0:
        phi_norm = nb
    tl.store(OUT + O_LOSS, policy - coef * bonus_mean)
    tl.store(LOSS_PTR, policy - coef * bonus_mean)
    tl.store(OUT + O_POLICY, policy)
    tl.store(OUT + O_ENT, tl.sum(ents, axis=0) / count)
    tl.store(OUT + O_KL, tl.sum(kls, axis=0) / count)
    tl.store(OUT + O_LOW, tl.sum(lows, axis=0) / flag_norm)
    tl.store(OUT + O_HIGH, tl.sum(highs, axis=0) / flag_norm)
    tl.store(OUT + O_REGION, tl.sum(regs, axis=0) / flag_norm)
    tl.store(OUT + O_ENT_W, -coef / tl.maximum(bonus_n, 1.0))
    tl.store(OUT + O_PHI, tl.sum(phis, axis=0) / phi_norm)
    tl.store(OUT + O_BONUS, tl.sum(bon, axis=0))
    tl.store(OUT + O_BONUS_N, bonus_n)
