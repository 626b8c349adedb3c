"""Per-token loss terms: TRL's per-token loss with its partial derivatives, and the slots of the small buffers.

``_policy_terms`` is shared by the row kernels (token level, single phase) and the sequence kernel (two phases).
For ratio ``r`` it returns ``ptl`` and ``d_lp = dptl/dlogp`` (``r`` held fixed) and ``d_r = dptl/dr``; autograd's
conventions are kept exactly (``min`` splits a tie's gradient in halves, ``clamp`` passes the gradient on its
closed interval). Token level: ``dL/dlogp_t = m_t (d_lp + d_r r)``. Sequence level (GSPO,
``R = exp(sum_t m_t (logp_t - old_t) / n)``): ``dL/dlogp_t = m_t (d_lp_t + R / n * sum_s m_s d_r_s)``. The
detached factors (off-policy mask times high-entropy mask ``keep``, VESPO's weight ``phi``) scale the policy part.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .config import LOSS_TYPES, VESPO_LN_W_MAX

_c = tl.constexpr
# The kernels' ``LOSS`` constexpr: the index of the loss type in ``LOSS_TYPES``
LOSS_IDS = {name: i for i, name in enumerate(LOSS_TYPES)}
GRPO, BNPO, DR_GRPO, DAPO = (_c(LOSS_IDS[name]) for name in ("grpo", "bnpo", "dr_grpo", "dapo"))
CISPO, SAPO, LUSPO, VESPO = (_c(LOSS_IDS[name]) for name in ("cispo", "sapo", "luspo", "vespo"))
LN_W_MAX = _c(VESPO_LN_W_MAX)
# Slots of the scalar-parameter vector (stored once per config as a small tensor of the arithmetic dtype)
P_EPS_LOW, P_EPS_HIGH, P_DELTA, P_BETA, P_TAU_POS, P_TAU_NEG = _c(0), _c(1), _c(2), _c(3), _c(4), _c(5)
P_ENT_COEF, P_K2, P_KN, P_SCALE, P_CAP, P_MAXLEN = _c(6), _c(7), _c(8), _c(9), _c(10), _c(11)
P_VK_POS, P_VL_POS, P_VK_NEG, P_VL_NEG, P_LN_LOW, P_OPM = _c(12), _c(13), _c(14), _c(15), _c(16), _c(17)
P_QUANTILE, P_FMAX = _c(18), _c(19)
N_PARAMS = 20
# Columns of the per-sequence partial sums (and, from the finalize kernel, the sequence's clip fractions)
C_LOSS, C_TOKENS, C_ENT, C_KL, C_LOW, C_HIGH, C_REGION = _c(0), _c(1), _c(2), _c(3), _c(4), _c(5), _c(6)
C_PHI, C_BONUS, C_BONUS_N, C_LOW_RATIO, C_HIGH_RATIO = _c(7), _c(8), _c(9), _c(10), _c(11)
N_PART = _c(12)
# Slots of the output vector
O_LOSS, O_POLICY, O_ENT, O_KL, O_LOW, O_HIGH, O_REGION, O_ENT_W = (_c(i) for i in range(8))
O_PHI, O_THRESHOLD, O_BONUS, O_BONUS_N = _c(8), _c(9), _c(10), _c(11)
N_OUT = 12
# Bits of the per-token flags: clipped below, clipped above (the CISPO flag for cispo), and the entropy bonus acts on
# the token (two-phase path with the high-entropy mask)
F_LOW, F_HIGH, F_BONUS = _c(1), _c(2), _c(4)
F_CLIPPED = _c(F_LOW.value | F_HIGH.value)


@triton.jit
def _policy_terms(
    logp, ref, adv, isr, r, keep, phi, P,
    LOSS: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_KL: tl.constexpr, BIAS_KL: tl.constexpr,
):  # fmt: skip
    """Per-token loss ``ptl`` (times ``keep`` and the IS weight, plus ``beta * k3``), ``d_lp``, ``d_r``, the KL
    for the metric and the low/high clip flags (high is the CISPO flag for ``cispo``)."""
    zero = r * 0.0
    if LOSS == VESPO:  # vespo: -sg(phi) * A * logp
        ptl = -phi * adv * logp
        d_lp = -phi * adv
        d_r = zero
        low = r < zero
        high = low
    elif LOSS == CISPO:  # cispo: -sg(min(r, eps_high)) * A * logp
        cr = tl.minimum(r, tl.load(P + P_EPS_HIGH))
        ptl = -cr * adv * logp
        d_lp = -cr * adv
        d_r = zero
        low = r < zero
        high = (r > tl.load(P + P_EPS_HIGH)) & (adv > 0)
    elif LOSS == SAPO:  # sapo: -4 sigmoid(tau (r - 1)) / tau * A
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
    ptl = ptl * keep * isr
    d_lp = d_lp * keep * isr
    d_r = d_r * keep * isr
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


@triton.jit
def _gamma(ln_w, adv, P):
    """VESPO's weight ``exp(lambda + k ln w - lambda w)`` (``k``, ``lambda`` by the sign of ``A``), 0 if not finite."""
    nonneg = adv >= 0
    k = tl.where(nonneg, tl.load(P + P_VK_POS), tl.load(P + P_VK_NEG))
    lam = tl.where(nonneg, tl.load(P + P_VL_POS), tl.load(P + P_VL_NEG))
    phi = tl.exp(lam + k * ln_w - lam * tl.exp(ln_w))
    return tl.where(tl.abs(phi) < float("inf"), phi, 0.0)
