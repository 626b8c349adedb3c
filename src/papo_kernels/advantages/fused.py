"""Fused group-advantage kernels: one launch for the whole batch, no host synchronisation.

Each program owns a ``[GPP, BLOCK_G]`` tile (``GPP`` groups of ``G`` responses, ``BLOCK_G = next_pow2(G)``),
reads every input once and writes the advantages, the per-group statistics and its value-error bits.

Arithmetic is fp64 for every input dtype: sums, means, M2 and the scalars ``eps`` and ``lambda_process``, which
reach the kernel as a tensor in the output dtype (a Python float would be fp32 on the GPU). fp64 inputs are
fp64 end to end; fp32 inputs get the fp64 result rounded once, so a near-constant group cannot amplify a
rounding error by ``1/eps``. Outputs are fp64 for fp64 inputs, else fp32.

Cross-program state is an int32 ``STATE = [ticket, error bits]`` per device and stream, zero between calls:
every program ORs its error bits into ``STATE[1]`` and takes a ticket from ``STATE[0]``; the program holding
the last ticket writes the call's error flag, does the batch-wide normalisation where there is one (GRPO
``scale="batch"``, GDPO: merge the programs' (count, mean, M2) partials with Chan's formula, then rescale the
batch) and resets ``STATE``. The host reads nothing and allocates by shape only: the call is CUDA-graph
capturable once a first call on the capturing stream has compiled the kernel and cached ``STATE`` and the scalar
tensor (the warm-up CUDA graphs need anyway). ``N``, ``G``, ``K`` and the group count are runtime arguments (no
recompilation for a new batch).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._runtime import cached_tensor, compute_dtype, next_pow2
from . import types
from .types import GroupAdvantages, PAPOAdvantages

TILE = 1024  # responses per program (a power of two)
MAX_G = 16384  # largest group a single tile holds
TAIL = 4096  # elements per step of the last program's batch rescale (16 loads in flight per thread at 8 warps)
TAIL_WARPS = 8  # warps of the batch-normalising launches, for the single program that rescales the batch
MERGE_BLOCK = tl.constexpr(1024)  # programs' partials read per step by the last program's merge
# GRPO's ``scale`` as the constexpr ``SCALE``
SCALE_GROUP, SCALE_BATCH, SCALE_NONE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_SCALE = {"group": SCALE_GROUP.value, "batch": SCALE_BATCH.value, "none": SCALE_NONE.value}
# The value check of the group counts (``CHECK``): none, a finite ``outcome``, a NaN-free ``correct``
CHECK_NONE, CHECK_OUTCOME, CHECK_CORRECT = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_CHECK = {None: CHECK_NONE.value, "outcome": CHECK_OUTCOME.value, "correct": CHECK_CORRECT.value}
_REWARDS_INF = tl.constexpr(types.REWARDS_INF)
_WEIGHTS_NONFINITE = tl.constexpr(types.WEIGHTS_NONFINITE)
_OUTCOME_NONFINITE = tl.constexpr(types.OUTCOME_NONFINITE)
_PROCESS_INF = tl.constexpr(types.PROCESS_INF)
_CORRECT_NAN = tl.constexpr(types.CORRECT_NAN)
# Slots of ``STATE`` and of a program's partials in ``PART``
TICKET, BITS = tl.constexpr(0), tl.constexpr(1)
P_COUNT, P_MEAN, P_M2, N_STATS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
_states: dict[tuple, torch.Tensor] = {}


# ------------------------------------------------------------------------------------------------ helpers
@triton.jit
def _tile(pid, num_groups, G, GPP: tl.constexpr, BLOCK_G: tl.constexpr):
    groups = pid * GPP + tl.arange(0, GPP)
    members = tl.arange(0, BLOCK_G)
    inb = (groups < num_groups)[:, None] & (members < G)[None, :]
    rows = groups[:, None].to(tl.int64) * G + members[None, :]
    return groups, rows, inb


@triton.jit
def _masked_stats(x, valid):
    """Row-wise mean and Bessel std of fp64 ``x`` over ``valid``; NaN mean for no values, NaN std for fewer than 2."""
    n = tl.sum(valid.to(tl.float64), axis=1)
    mean = tl.sum(tl.where(valid, x, 0.0), axis=1) / n
    d = tl.where(valid, x - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / (n - 1.0)
    std = tl.where(n > 1.0, tl.sqrt(var), float("nan"))
    return mean, std, n


@triton.jit
def _nonfinite(x):
    return (x != x) | (tl.abs(x) == float("inf"))


@triton.jit
def _bit(cond, bit: tl.constexpr):
    """``bit`` if any element of the 2-D ``cond`` is set, else 0 (int32 scalar)."""
    return tl.max(tl.max(cond.to(tl.int32), axis=1), axis=0) * bit


@triton.jit
def _take_ticket(STATE, bits):
    """Publish this program's error bits; True for the program that finishes last."""
    tl.atomic_or(STATE + BITS, bits)
    ticket = tl.atomic_add(STATE + TICKET, 1, sem="acq_rel")
    return ticket == tl.num_programs(0) - 1


@triton.jit
def _release(STATE, ERR):
    """Last program: write the call's error flag and zero ``STATE`` for the next call on this stream."""
    tl.store(ERR, tl.atomic_xchg(STATE + BITS, 0))
    tl.atomic_xchg(STATE + TICKET, 0)


@triton.jit
def _publish(PART, x, valid):
    """Store this program's (count, mean, M2) of ``x`` over ``valid``."""
    pid = tl.program_id(0)
    n = tl.sum(tl.sum(valid.to(tl.float64), axis=1), axis=0)
    mean = tl.sum(tl.sum(tl.where(valid, x, 0.0), axis=1), axis=0) / tl.maximum(n, 1.0)
    d = tl.where(valid, x - mean, 0.0)
    tl.store(PART + pid * N_STATS + P_COUNT, n)
    tl.store(PART + pid * N_STATS + P_MEAN, mean)
    tl.store(PART + pid * N_STATS + P_M2, tl.sum(tl.sum(d * d, axis=1), axis=0))


@triton.jit
def _merge(PART, N, NP_BLOCK: tl.constexpr):
    """Batch mean and Bessel std from every program's partials (Chan et al.); std 0 for a single response."""
    num_progs = tl.num_programs(0)
    offs = tl.arange(0, NP_BLOCK)
    tot_n = tl.sum(tl.zeros([NP_BLOCK], tl.float64), axis=0)
    tot_s = tot_n
    for start in range(0, num_progs, NP_BLOCK):
        m = start + offs < num_progs
        pn = tl.load(PART + (start + offs) * N_STATS + P_COUNT, mask=m, other=0.0, cache_modifier=".cg")
        pm = tl.load(PART + (start + offs) * N_STATS + P_MEAN, mask=m, other=0.0, cache_modifier=".cg")
        tot_n += tl.sum(pn, axis=0)
        tot_s += tl.sum(pn * pm, axis=0)
    mean = tot_s / tot_n
    tot_m2 = tot_n * 0.0
    for start in range(0, num_progs, NP_BLOCK):
        m = start + offs < num_progs
        pn = tl.load(PART + (start + offs) * N_STATS + P_COUNT, mask=m, other=0.0, cache_modifier=".cg")
        pm = tl.load(PART + (start + offs) * N_STATS + P_MEAN, mask=m, other=0.0, cache_modifier=".cg")
        pm2 = tl.load(PART + (start + offs) * N_STATS + P_M2, mask=m, other=0.0, cache_modifier=".cg")
        dm = tl.where(pn > 0.0, pm - mean, 0.0)
        tot_m2 += tl.sum(pm2 + pn * dm * dm, axis=0)
    std = tl.where(tot_n > 1.0, tl.sqrt(tot_m2 / (tot_n - 1.0)), float("nan"))
    return mean, tl.where(N > 1, std, 0.0)  # TRL: a single response has std 0


@triton.jit
def _rescale_step(ptrs, mask, shift, den):
    a = tl.load(ptrs, mask=mask, cache_modifier=".cg").to(tl.float64)
    a = (a - shift) / den
    tl.store(ptrs, tl.where(a == a, a, 0.0), mask=mask)


@triton.jit
def _rescale(ADV, N, shift, den, TAIL: tl.constexpr):
    """``ADV = (ADV - shift) / den`` over the batch, NaN to 0 (the last program, on L2-resident values): unmasked
    full steps (vector loads, ``N`` being unspecialised), then the masked remainder."""
    offs = tl.arange(0, TAIL)
    full = N // TAIL * TAIL
    for start in range(0, full, TAIL):
        _rescale_step(ADV + start + offs, None, shift, den)
    _rescale_step(ADV + full + offs, full + offs < N, shift, den)


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _combined_rewards(
    R, stride_n, stride_k, W, stride_w, MEAN, STD, PARAM, num_groups, G, K,
    PER_COLUMN: tl.constexpr, HAS_W: tl.constexpr, GPP: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    """This program's tile and ``eps``, and ``x = nansum_k w_k x_k`` over the reward columns, ``x_k`` the column
    itself (GRPO) or, with ``PER_COLUMN`` (GDPO), the column normalised within each group (its mean and std stored
    per column). Returns ``groups, rows, inb, eps, x`` (NaN where a row has no scorable reward), where ``x`` is valid,
    and the error bits of the rewards and weights."""
    groups, rows, inb = _tile(tl.program_id(0), num_groups, G, GPP, BLOCK_G)
    eps = tl.load(PARAM).to(tl.float64)
    total = tl.zeros([GPP, BLOCK_G], tl.float64)
    scorable = tl.zeros([GPP, BLOCK_G], tl.int1)
    r_inf = tl.zeros([GPP, BLOCK_G], tl.int1)
    w_bad = tl.zeros([GPP, BLOCK_G], tl.int32)  # int32: the interpreter cannot OR a bool scalar into a bool tile
    gm = groups < num_groups
    for k in range(K):
        r = tl.load(R + rows * stride_n + k * stride_k, mask=inb, other=float("nan")).to(tl.float64)
        ok = inb & (r == r)
        r_inf = r_inf | (tl.abs(r) == float("inf"))
        x = r
        if PER_COLUMN:
            mean, std, _ = _masked_stats(r, ok)
            std = tl.where(G > 1, std, 0.0)
            x = (r - mean[:, None]) / (std[:, None] + eps)
            tl.store(MEAN + groups * K + k, mean, mask=gm)
            tl.store(STD + groups * K + k, std, mask=gm)
        if HAS_W:
            w = tl.load(W + k * stride_w).to(tl.float64)
            w_bad = w_bad | _nonfinite(w).to(tl.int32)
            x = x * w
        if PER_COLUMN:
            total += tl.where(x == x, x, 0.0)
        else:
            total += tl.where(ok, x, 0.0)
        scorable = scorable | ok
    valid = inb & scorable
    bits = _bit(r_inf, _REWARDS_INF) | _bit(w_bad, _WEIGHTS_NONFINITE)
    return groups, rows, inb, eps, tl.where(valid, total, float("nan")), valid, bits


@triton.jit(do_not_specialize=["num_groups", "N"])
def _grpo_kernel(
    R, stride_n, stride_k, W, stride_w, ADV, MEAN, STD, ERR, PART, STATE, PARAM,
    num_groups, N, G, K,
    SCALE: tl.constexpr, HAS_W: tl.constexpr, GPP: tl.constexpr, BLOCK_G: tl.constexpr, TAIL: tl.constexpr,
):  # fmt: skip
    groups, rows, inb, eps, x, valid, bits = _combined_rewards(
        R, stride_n, stride_k, W, stride_w, MEAN, STD, PARAM, num_groups, G, K, False, HAS_W, GPP, BLOCK_G
    )
    mean, std, n = _masked_stats(x, valid)
    std = tl.where(G > 1, std, 0.0)
    adv = x - mean[:, None]
    if SCALE == SCALE_GROUP:
        adv = adv / (std[:, None] + eps)
    gm = groups < num_groups
    tl.store(MEAN + groups, mean, mask=gm)
    if SCALE != SCALE_BATCH:
        tl.store(STD + groups, std, mask=gm)
    tl.store(ADV + rows, tl.where(adv == adv, adv, 0.0), mask=inb)
    if SCALE == SCALE_BATCH:
        _publish(PART, x, valid)
    if _take_ticket(STATE, bits):
        if SCALE == SCALE_BATCH:
            b_std = _merge(PART, N, MERGE_BLOCK)[1]
            _rescale(ADV, N, 0.0, b_std + eps, TAIL)
            for start in range(0, num_groups, TAIL):
                offs = start + tl.arange(0, TAIL)
                tl.store(STD + offs, tl.zeros([TAIL], tl.float64) + b_std, mask=offs < num_groups)
        _release(STATE, ERR)


@triton.jit(do_not_specialize=["num_groups", "N"])
def _gdpo_kernel(
    R, stride_n, stride_k, W, stride_w, ADV, MEAN, STD, ERR, PART, STATE, PARAM,
    num_groups, N, G, K,
    HAS_W: tl.constexpr, GPP: tl.constexpr, BLOCK_G: tl.constexpr, TAIL: tl.constexpr,
):  # fmt: skip
    groups, rows, inb, eps, x, valid, bits = _combined_rewards(
        R, stride_n, stride_k, W, stride_w, MEAN, STD, PARAM, num_groups, G, K, True, HAS_W, GPP, BLOCK_G
    )
    tl.store(ADV + rows, x, mask=inb)
    _publish(PART, x, valid)
    if _take_ticket(STATE, bits):
        b_mean, b_std = _merge(PART, N, MERGE_BLOCK)
        _rescale(ADV, N, b_mean, b_std + eps, TAIL)
        _release(STATE, ERR)


@triton.jit
def _gated(x, valid, eps, SCALE_BY_STD: tl.constexpr):
    mean, std, n = _masked_stats(x, valid)
    active = (n >= 2.0) & (std > eps)
    a = x - mean[:, None]
    if SCALE_BY_STD:
        a = a / (std[:, None] + eps)
    return tl.where(active[:, None] & valid, a, 0.0), mean, std, active


@triton.jit(do_not_specialize=["num_groups", "N"])
def _papo_kernel(
    O, stride_o, P, stride_p, C, stride_c, OUT, N_CORRECT, ACTIVE, ERR, STATE, PARAM,
    num_groups, N, G,
    SCALE_BY_STD: tl.constexpr, PROCESS_ALL: tl.constexpr, GPP: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    """``OUT`` holds ``total, outcome, process`` (``N`` each), then ``o_mean, o_std, p_mean, p_std``."""
    groups, rows, inb = _tile(tl.program_id(0), num_groups, G, GPP, BLOCK_G)
    eps = tl.load(PARAM).to(tl.float64)
    lambda_process = tl.load(PARAM + 1).to(tl.float64)
    o = tl.load(O + rows * stride_o, mask=inb, other=0.0).to(tl.float64)
    p = tl.load(P + rows * stride_p, mask=inb, other=float("nan")).to(tl.float64)
    c_raw = tl.load(C + rows * stride_c, mask=inb, other=0)
    c = inb & (c_raw != 0)
    bits = _bit(_nonfinite(o), _OUTCOME_NONFINITE) | _bit(tl.abs(p) == float("inf"), _PROCESS_INF)
    bits |= _bit(c_raw != c_raw, _CORRECT_NAN)
    a_out, o_mean, o_std, _ = _gated(o, inb, eps, SCALE_BY_STD)
    pool = inb & (p == p)
    if not PROCESS_ALL:
        pool = pool & c
    a_proc, p_mean, p_std, active = _gated(tl.where(pool, p, 0.0), pool, eps, SCALE_BY_STD)
    tl.store(OUT + rows, a_out + lambda_process * a_proc, mask=inb)
    tl.store(OUT + N + rows, a_out, mask=inb)
    tl.store(OUT + 2 * N + rows, a_proc, mask=inb)
    gm = groups < num_groups
    stats = OUT + 3 * N + groups
    tl.store(stats, o_mean, mask=gm)
    tl.store(stats + num_groups, o_std, mask=gm)
    tl.store(stats + 2 * num_groups, p_mean, mask=gm)
    tl.store(stats + 3 * num_groups, p_std, mask=gm)
    tl.store(N_CORRECT + groups, tl.sum(c.to(tl.int32), axis=1), mask=gm)
    tl.store(ACTIVE + groups, active, mask=gm)
    if _take_ticket(STATE, bits):
        _release(STATE, ERR)


@triton.jit(do_not_specialize=["num_groups"])
def _group_count_kernel(
    X, stride_x, VARIES, COUNT, ERR, STATE, num_groups, G,
    CHECK: tl.constexpr, GPP: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    """Per group: whether its values are not all equal to its first, and how many are non-zero."""
    groups, rows, inb = _tile(tl.program_id(0), num_groups, G, GPP, BLOCK_G)
    gm = groups < num_groups
    x = tl.load(X + rows * stride_x, mask=inb, other=0)
    first = tl.load(X + groups.to(tl.int64) * G * stride_x, mask=gm, other=0)
    tl.store(VARIES + groups, tl.max((inb & (x != first[:, None])).to(tl.int8), axis=1) != 0, mask=gm)
    tl.store(COUNT + groups, tl.sum((inb & (x != 0)).to(tl.int64), axis=1), mask=gm)
    bits = 0
    if CHECK == CHECK_OUTCOME:
        bits = _bit(inb & _nonfinite(x), _OUTCOME_NONFINITE)
    if CHECK == CHECK_CORRECT:
        bits = _bit(inb & (x != x), _CORRECT_NAN)
    if _take_ticket(STATE, bits):
        _release(STATE, ERR)


# ------------------------------------------------------------------------------------------------ host side
@functools.lru_cache(maxsize=256)
def _launch_shape(num_groups: int, G: int, tile: int) -> tuple[int, int, tuple[int], int]:
    """(groups per program, BLOCK_G, grid, num_warps) for `num_groups` groups of `G` in tiles of `tile`."""
    block_g = next_pow2(G)
    gpp = max(1, min(tile // block_g, next_pow2(num_groups)))
    return gpp, block_g, (triton.cdiv(num_groups, gpp),), max(4, min(16, gpp * block_g // 256))


def _state(device: torch.device) -> torch.Tensor:
    """The zeroed int32 ``[ticket, error bits]`` of this device and stream; every launch leaves it zeroed."""
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    key = (device, stream)
    state = _states.get(key)
    if state is None:
        state = _states[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return state


def _params(dtype: torch.dtype, device: torch.device, *values: float) -> torch.Tensor:
    """The scalars as a tensor of `dtype` on `device`, made once per (dtype, device, values)."""
    make = lambda: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
    return cached_tensor(("advantages", dtype, device, values), make)


def _group_normalize(kernel, rewards, G, weights, eps, per_column: bool, batch: bool, **meta) -> GroupAdvantages:
    N, dev, dtype = rewards.shape[0], rewards.device, compute_dtype(rewards)
    K, stride_k = (rewards.shape[1], rewards.stride(1)) if rewards.dim() == 2 else (1, 0)
    num_groups = N // G
    gpp, block_g, grid, warps = _launch_shape(num_groups, G, TILE)
    S = num_groups * K if per_column else num_groups
    adv, mean, std = torch.empty(N + 2 * S, dtype=dtype, device=dev).split_with_sizes([N, S, S])
    error = torch.empty((), dtype=torch.int32, device=dev)
    part = torch.empty(grid[0] * N_STATS.value, dtype=torch.float64, device=dev) if batch else adv
    w = rewards if weights is None else weights
    kernel[grid](
        rewards, rewards.stride(0), stride_k, w, w.stride(0), adv, mean, std, error, part, _state(dev),
        _params(dtype, dev, eps), num_groups, N, G, K,
        HAS_W=weights is not None, GPP=gpp, BLOCK_G=block_g, TAIL=TAIL,
        num_warps=max(warps, TAIL_WARPS) if batch else warps, **meta,
    )  # fmt: skip
    if per_column:
        mean, std = mean.view(num_groups, K), std.view(num_groups, K)
    return GroupAdvantages(adv, mean, std, error)


def fused_grpo_advantages(rewards, G, weights, scale, eps) -> GroupAdvantages:
    """``papo_kernels.grpo_advantages`` in one launch (arguments checked by the caller)."""
    return _group_normalize(_grpo_kernel, rewards, G, weights, eps, False, scale == "batch", SCALE=_SCALE[scale])


def fused_gdpo_advantages(rewards, G, weights, eps) -> GroupAdvantages:
    """``papo_kernels.gdpo_advantages`` in one launch (arguments checked by the caller)."""
    return _group_normalize(_gdpo_kernel, rewards, G, weights, eps, True, True)


def fused_papo_advantages(
    outcome, process, correct, G, lambda_process, eps, scale_by_std, process_norm
) -> PAPOAdvantages:
    """``papo_kernels.papo_advantages`` in one launch (arguments checked by the caller)."""
    N, dev, dtype = outcome.shape[0], outcome.device, compute_dtype(outcome)
    num_groups = N // G
    gpp, block_g, grid, warps = _launch_shape(num_groups, G, TILE)
    out = torch.empty(3 * N + 4 * num_groups, dtype=dtype, device=dev)
    n_correct = torch.empty(num_groups, dtype=torch.int32, device=dev)
    active = torch.empty(num_groups, dtype=torch.bool, device=dev)
    error = torch.empty((), dtype=torch.int32, device=dev)
    _papo_kernel[grid](
        outcome, outcome.stride(0), process, process.stride(0), correct, correct.stride(0), out, n_correct, active,
        error, _state(dev), _params(dtype, dev, eps, lambda_process), num_groups, N, G,
        SCALE_BY_STD=scale_by_std, PROCESS_ALL=process_norm == "all", GPP=gpp, BLOCK_G=block_g, num_warps=warps,
    )  # fmt: skip
    return PAPOAdvantages(*out.split_with_sizes([N, N, N] + [num_groups] * 4), n_correct, active, error)


def group_counts(x: torch.Tensor, G: int, check: str | None = None):
    """``(varies[num_groups] bool, nonzero count[num_groups] int64, error)`` in one launch.

    ``check="outcome"`` flags a non-finite ``x`` as a bad ``outcome``, ``"correct"`` a NaN ``x`` as a bad ``correct``.
    """
    num_groups = x.shape[0] // G
    gpp, block_g, grid, warps = _launch_shape(num_groups, G, TILE)
    count = torch.empty(num_groups, dtype=torch.int64, device=x.device)
    varies = torch.empty(num_groups, dtype=torch.bool, device=x.device)
    error = torch.empty((), dtype=torch.int32, device=x.device)
    _group_count_kernel[grid](
        x, x.stride(0), varies, count, error, _state(x.device), num_groups, G,
        CHECK=_CHECK[check], GPP=gpp, BLOCK_G=block_g, num_warps=warps,
    )  # fmt: skip
    return varies, count, error
