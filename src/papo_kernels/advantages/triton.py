"""Fused group-advantage kernels: one launch for the whole batch.

Each program owns a ``[GPP, BLOCK_G]`` tile (``GPP`` groups of ``G`` responses, ``BLOCK_G = next_pow2(G)``),
reads every reward column once and writes the advantages and the per-group statistics. Batch-wide
normalisation (GRPO ``scale="batch"``, GDPO) needs statistics over all groups: every program publishes its
partial (count, mean, M2) and takes a ticket from an atomic counter; the program holding the last ticket
merges the partials (Chan's parallel variance) and rescales the whole batch, then resets the counter.
Arithmetic is fp32 (fp64 for fp64 inputs). ``N``, ``G``, ``K`` and the group count are runtime arguments, and
the batch-dependent ones are not specialised on, so a new batch size never recompiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import next_pow2
from .types import GroupAdvantages, PAPOAdvantages

TILE = 1024  # responses per program (a power of two)
MAX_G = 16384  # largest group a single tile holds
_SCALE = {"group": 0, "batch": 1, "none": 2}
_counters: dict[tuple, torch.Tensor] = {}


@triton.jit
def _masked_stats(x, valid):
    """Row-wise mean and Bessel std of ``x`` over ``valid``; NaN mean for no values, NaN std for fewer than two."""
    n = tl.sum(valid.to(x.dtype), axis=1)
    mean = tl.sum(tl.where(valid, x, 0.0), axis=1) / n
    d = tl.where(valid, x - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / (n - 1.0)
    std = tl.where(n > 1.0, tl.sqrt(var), float("nan"))
    return mean, std, n


@triton.jit
def _tile(pid, num_groups, G, GPP: tl.constexpr, BLOCK_G: tl.constexpr):
    groups = pid * GPP + tl.arange(0, GPP)
    members = tl.arange(0, BLOCK_G)
    inb = (groups < num_groups)[:, None] & (members < G)[None, :]
    idx = groups[:, None].to(tl.int64) * G + members[None, :]
    return groups, idx, inb


@triton.jit
def _batch_normalize(
    ADV, STD, PART, COUNTER, x, valid, num_groups, N, eps,
    SUBTRACT_MEAN: tl.constexpr, WRITE_STD: tl.constexpr, NP_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):
    """Publish this program's partial stats of ``x``; the last program normalises ``ADV`` over the batch."""
    pid = tl.program_id(0)
    n = tl.sum(tl.sum(valid.to(x.dtype), axis=1), axis=0)
    mean = tl.sum(tl.sum(tl.where(valid, x, 0.0), axis=1), axis=0) / tl.maximum(n, 1.0)
    d = tl.where(valid, x - mean, 0.0)
    m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
    tl.store(PART + pid * 3 + 0, n)
    tl.store(PART + pid * 3 + 1, mean)
    tl.store(PART + pid * 3 + 2, m2)
    num_progs = tl.num_programs(0)
    ticket = tl.atomic_add(COUNTER, 1, sem="acq_rel")
    if ticket == num_progs - 1:
        offs = tl.arange(0, NP_BLOCK)
        tot_n = tl.sum(tl.zeros([NP_BLOCK], x.dtype), axis=0)
        tot_s = tot_n
        for start in range(0, num_progs, NP_BLOCK):
            m = start + offs < num_progs
            pn = tl.load(PART + (start + offs) * 3, mask=m, other=0.0, cache_modifier=".cg")
            pm = tl.load(PART + (start + offs) * 3 + 1, mask=m, other=0.0, cache_modifier=".cg")
            tot_n += tl.sum(pn, axis=0)
            tot_s += tl.sum(pn * pm, axis=0)
        b_mean = tot_s / tot_n
        tot_m2 = tot_n * 0.0
        for start in range(0, num_progs, NP_BLOCK):
            m = start + offs < num_progs
            pn = tl.load(PART + (start + offs) * 3, mask=m, other=0.0, cache_modifier=".cg")
            pm = tl.load(PART + (start + offs) * 3 + 1, mask=m, other=0.0, cache_modifier=".cg")
            pm2 = tl.load(PART + (start + offs) * 3 + 2, mask=m, other=0.0, cache_modifier=".cg")
            dm = tl.where(pn > 0.0, pm - b_mean, 0.0)
            tot_m2 += tl.sum(pm2 + pn * dm * dm, axis=0)
        b_std = tl.sqrt(tot_m2 / (tot_n - 1.0))
        b_std = tl.where(tot_n > 1.0, b_std, float("nan"))
        b_std = tl.where(N > 1, b_std, 0.0)  # TRL: a single response has std 0
        ro = tl.arange(0, BLOCK)
        for start in range(0, N, BLOCK):
            m = start + ro < N
            a = tl.load(ADV + start + ro, mask=m, other=0.0, cache_modifier=".cg")
            if SUBTRACT_MEAN:
                a = a - b_mean
            a = a / (b_std + eps)
            tl.store(ADV + start + ro, tl.where(a == a, a, 0.0), mask=m)
        if WRITE_STD:
            for start in range(0, num_groups, BLOCK):
                m = start + ro < num_groups
                tl.store(STD + start + ro, tl.zeros([BLOCK], x.dtype) + b_std, mask=m)
        tl.atomic_xchg(COUNTER, 0)


@triton.jit(do_not_specialize=["num_groups", "N"])
def _grpo_kernel(
    R, stride_n, stride_k, W, ADV, MEAN, STD, PART, COUNTER,
    num_groups, N, G, K, eps,
    SCALE: tl.constexpr, GPP: tl.constexpr, BLOCK_G: tl.constexpr, NP_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    groups, idx, inb = _tile(pid, num_groups, G, GPP, BLOCK_G)
    acc_t = ADV.dtype.element_ty
    total = tl.zeros([GPP, BLOCK_G], acc_t)
    scorable = tl.zeros([GPP, BLOCK_G], tl.int1)
    for k in range(K):
        r = tl.load(R + idx * stride_n + k * stride_k, mask=inb, other=float("nan")).to(acc_t)
        w = tl.load(W + k).to(acc_t)
        ok = r == r
        total += tl.where(ok, r * w, 0.0)
        scorable = scorable | ok
    valid = inb & scorable
    x = tl.where(valid, total, float("nan"))
    mean, std, _ = _masked_stats(x, valid)
    std = tl.where(G > 1, std, 0.0)
    adv = x - mean[:, None]
    if SCALE == 0:
        adv = adv / (std[:, None] + eps)
    gm = groups < num_groups
    tl.store(MEAN + groups, mean, mask=gm)
    if SCALE == 1:
        tl.store(ADV + idx, adv, mask=inb)
        _batch_normalize(ADV, STD, PART, COUNTER, x, valid, num_groups, N, eps, False, True, NP_BLOCK, BLOCK)
    else:
        tl.store(STD + groups, std, mask=gm)
        tl.store(ADV + idx, tl.where(adv == adv, adv, 0.0), mask=inb)


@triton.jit(do_not_specialize=["num_groups", "N"])
def _gdpo_kernel(
    R, stride_n, stride_k, W, ADV, MEAN, STD, PART, COUNTER,
    num_groups, N, G, K, eps,
    GPP: tl.constexpr, BLOCK_G: tl.constexpr, NP_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    groups, idx, inb = _tile(pid, num_groups, G, GPP, BLOCK_G)
    acc_t = ADV.dtype.element_ty
    total = tl.zeros([GPP, BLOCK_G], acc_t)
    scorable = tl.zeros([GPP, BLOCK_G], tl.int1)
    gm = groups < num_groups
    for k in range(K):
        r = tl.load(R + idx * stride_n + k * stride_k, mask=inb, other=float("nan")).to(acc_t)
        w = tl.load(W + k).to(acc_t)
        ok = inb & (r == r)
        mean, std, _ = _masked_stats(r, ok)
        std = tl.where(G > 1, std, 0.0)
        a = (r - mean[:, None]) / (std[:, None] + eps)
        total += tl.where(a == a, a * w, 0.0)
        scorable = scorable | ok
        tl.store(MEAN + groups * K + k, mean, mask=gm)
        tl.store(STD + groups * K + k, std, mask=gm)
    valid = inb & scorable
    x = tl.where(valid, total, float("nan"))
    tl.store(ADV + idx, x, mask=inb)
    _batch_normalize(ADV, STD, PART, COUNTER, x, valid, num_groups, N, eps, True, False, NP_BLOCK, BLOCK)


@triton.jit
def _gated(x, valid, eps, SCALE_BY_STD: tl.constexpr):
    mean, std, n = _masked_stats(x, valid)
    active = (n >= 2.0) & (std > eps)
    a = x - mean[:, None]
    if SCALE_BY_STD:
        a = a / (std[:, None] + eps)
    return tl.where(active[:, None] & valid, a, 0.0), mean, std, active


@triton.jit(do_not_specialize=["num_groups"])
def _papo_kernel(
    O, P, C, A_TOT, A_OUT, A_PROC, O_MEAN, O_STD, P_MEAN, P_STD, N_CORRECT, ACTIVE,
    num_groups, G, eps, lambda_process,
    SCALE_BY_STD: tl.constexpr, PROCESS_ALL: tl.constexpr, GPP: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid = tl.program_id(0)
    groups, idx, inb = _tile(pid, num_groups, G, GPP, BLOCK_G)
    acc_t = A_TOT.dtype.element_ty
    o = tl.load(O + idx, mask=inb, other=0.0).to(acc_t)
    p = tl.load(P + idx, mask=inb, other=float("nan")).to(acc_t)
    c = inb & (tl.load(C + idx, mask=inb, other=0) != 0)
    a_out, o_mean, o_std, _ = _gated(o, inb, eps, SCALE_BY_STD)
    pool = inb & (p == p)
    if not PROCESS_ALL:
        pool = pool & c
    a_proc, p_mean, p_std, active = _gated(tl.where(pool, p, 0.0), pool, eps, SCALE_BY_STD)
    tl.store(A_TOT + idx, a_out + lambda_process * a_proc, mask=inb)
    tl.store(A_OUT + idx, a_out, mask=inb)
    tl.store(A_PROC + idx, a_proc, mask=inb)
    gm = groups < num_groups
    tl.store(O_MEAN + groups, o_mean, mask=gm)
    tl.store(O_STD + groups, o_std, mask=gm)
    tl.store(P_MEAN + groups, p_mean, mask=gm)
    tl.store(P_STD + groups, p_std, mask=gm)
    tl.store(N_CORRECT + groups, tl.sum(c.to(tl.int32), axis=1), mask=gm)
    tl.store(ACTIVE + groups, active.to(tl.int8), mask=gm)


@triton.jit(do_not_specialize=["num_groups"])
def _group_count_kernel(
    X, VARIES, COUNT, num_groups, G, GPP: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Per group: whether its values are not all equal, and how many are non-zero."""
    groups, idx, inb = _tile(tl.program_id(0), num_groups, G, GPP, BLOCK_G)
    x = tl.load(X + idx, mask=inb, other=0).to(tl.float64)
    hi = tl.max(tl.where(inb, x, float("-inf")), axis=1)
    lo = tl.min(tl.where(inb, x, float("inf")), axis=1)
    gm = groups < num_groups
    tl.store(VARIES + groups, (hi != lo).to(tl.int8), mask=gm)
    tl.store(COUNT + groups, tl.sum((inb & (x != 0)).to(tl.int64), axis=1), mask=gm)


def _launch_shape(num_groups: int, G: int) -> tuple[int, int, tuple[int]]:
    block_g = next_pow2(G)
    gpp = max(1, min(TILE // block_g, next_pow2(num_groups)))
    return gpp, block_g, (triton.cdiv(num_groups, gpp),)


def _counter(device: torch.device) -> torch.Tensor:
    """A zeroed int32 ticket counter per device and stream; the last program of each launch resets it."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    if key not in _counters:
        _counters[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _counters[key]


def _as_columns(rewards: torch.Tensor, weights: torch.Tensor | None, acc: torch.dtype):
    r = rewards if rewards.dim() == 2 else rewards[:, None]
    K = r.shape[1]
    w = torch.ones(K, dtype=acc, device=r.device) if weights is None else weights.to(acc)
    return r, K, w.contiguous()


def _group_normalize(kernel, rewards, G, weights, eps, acc, per_column: bool, **meta) -> GroupAdvantages:
    r, K, w = _as_columns(rewards, weights, acc)
    N, num_groups = r.shape[0], r.shape[0] // G
    gpp, block_g, grid = _launch_shape(num_groups, G)
    adv = torch.empty(N, dtype=acc, device=r.device)
    stat_shape = (num_groups, K) if per_column else (num_groups,)
    mean = torch.empty(stat_shape, dtype=acc, device=r.device)
    std = torch.empty(stat_shape, dtype=acc, device=r.device)
    part = torch.empty(grid[0] * 3, dtype=acc, device=r.device)
    kernel[grid](
        r, r.stride(0), r.stride(1), w, adv, mean, std, part, _counter(r.device),
        num_groups, N, G, K, eps, GPP=gpp, BLOCK_G=block_g, NP_BLOCK=1024, BLOCK=1024, **meta,
    )
    return GroupAdvantages(adv, mean, std)


def grpo_advantages(rewards, G, weights, scale, eps, acc) -> GroupAdvantages:
    return _group_normalize(_grpo_kernel, rewards, G, weights, eps, acc, False, SCALE=_SCALE[scale])


def gdpo_advantages(rewards, G, weights, eps, acc) -> GroupAdvantages:
    return _group_normalize(_gdpo_kernel, rewards, G, weights, eps, acc, True)


def papo_advantages(outcome, process, correct, G, lambda_process, eps, scale_by_std, process_norm, acc):
    N = outcome.shape[0]
    num_groups = N // G
    gpp, block_g, grid = _launch_shape(num_groups, G)
    dev = outcome.device
    vec = [torch.empty(N, dtype=acc, device=dev) for _ in range(3)]
    stats = [torch.empty(num_groups, dtype=acc, device=dev) for _ in range(4)]
    n_correct = torch.empty(num_groups, dtype=torch.int32, device=dev)
    active = torch.empty(num_groups, dtype=torch.int8, device=dev)
    c = (correct.view(torch.uint8) if correct.dtype == torch.bool else correct).contiguous()
    _papo_kernel[grid](
        outcome.contiguous(), process.contiguous(), c, *vec, *stats, n_correct, active,
        num_groups, G, eps, lambda_process,
        SCALE_BY_STD=scale_by_std, PROCESS_ALL=process_norm == "all", GPP=gpp, BLOCK_G=block_g,
    )
    return PAPOAdvantages(*vec, *stats, n_correct, active.view(torch.bool))


def group_counts(x: torch.Tensor, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(varies[num_groups] bool, nonzero count[num_groups] int64) in one launch."""
    num_groups = x.shape[0] // G
    gpp, block_g, grid = _launch_shape(num_groups, G)
    varies = torch.empty(num_groups, dtype=torch.int8, device=x.device)
    count = torch.empty(num_groups, dtype=torch.int64, device=x.device)
    xx = (x.view(torch.uint8) if x.dtype == torch.bool else x).contiguous()
    _group_count_kernel[grid](xx, varies, count, num_groups, G, GPP=gpp, BLOCK_G=block_g)
    return varies.view(torch.bool), count
