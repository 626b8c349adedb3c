"""The split-row kernel: each logits row split over ``K`` programs that meet at a barrier; one read of the logits and
one write of the gradient (the single-phase pass; its launcher is below).

Why: one row of ``V = 151,936`` bf16 logits is 297 KiB, more than an SM holds, and the row kernel (``rows.py``, a
program per row) keeps ~1,600 rows in flight, so its second read of a row misses L2. Here a row is ``K = cdiv(V,
SLICE)`` slices of ``SLICE`` logits, each held in registers by one program of the row's *group*; a group's ``K``
programs go through their rows together:

1. load the slice (the next row's slice is loaded before the barrier below, so its latency overlaps the wait);
2. its partial statistics ``(m_k, s_k, a_k)``: the maximum ``m_k`` of ``y = softcap(x)`` and, with
   ``d = (y - m_k) k2``, ``s_k = sum 2^d`` and ``a_k = sum 2^d d`` (``rows.py`` has the notation), into the group's
   slot for this row (two slots per group, by the parity of the row's turn);
3. the barrier: a release add to the group's counter, then acquire polls until all ``K`` programs have added;
4. every program combines the ``K`` partials: ``M = max m_k``, ``c_k = 2^((m_k - M) k2)``, ``S = sum c_k s_k``,
   ``A = sum c_k (a_k + s_k (m_k - M) k2)``; then ``log2 Z = log2 S``, ``H = ln2 (log2 S - A / S)``, the token's
   log-prob, loss terms and gradient coefficients (program 0 stores the token's outputs);
5. the gradient of its slice from registers (``REREAD``: read again, from L2, which frees the registers).

The double slot makes reuse safe: a program writes turn ``j + 2``'s partials into turn ``j``'s slot only after the
barrier of turn ``j + 1``, which every program of its group reaches only after reading turn ``j``'s partials
(``tests/kernels/test_split_barrier.py`` checks the protocol under random interleavings). The programs of a group
wait for each other, so every program must be resident at once: the launcher sizes the grid to the co-resident
capacity computed from the compiled kernel (registers, shared memory, warps) and launches it cooperatively, and
takes the row kernel where that cannot be guaranteed. Triton's interpreter runs programs one after another, so there
a program *walks* its row's ``K`` slices (``WALK``: the same helpers, the slices read again for the gradient) and
meets itself at the barrier.

Masked rows are never read: their gradient slices are written with zeros and their group skips the barrier (every
program of a group reads the same mask). A target id outside ``[0, V)`` of an unmasked token sets ``ERR`` (no host
synchronisation; the id is not read).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import rows
from .plan import Plan
from .rows import _cap, _grad_block, _row
from .terms import F_HIGH, F_LOW, LOSS_IDS, O_ENT_W, P_K2, P_KN, _load_inputs, _policy_terms

SLICE, SLICE_WARPS = 2048, 4  # logits a program holds and its warps (16-bit logits: 16 a thread, K = 75 at
# V = 151,936); wider logits take proportionally more warps, so a thread holds as many bytes of its slice
REGISTER_BUDGET = 128
"""Registers a thread the occupancy assumes: at most this many leave an SM room for 16 warps (4 programs of 4 warps for
16-bit logits; the sm_90 compile test checks every variant: 16 logits a thread compile to 91-106 registers, 32 a
thread to 185-216)."""
N_STATS = tl.constexpr(3)  # a slot entry: m, s, a
# the row kernel's constants, bound here (Triton's interpreter reads a kernel's constexpr globals from its own module)
LN2, NEG, FLOOR = tl.constexpr(rows.LN2.value), tl.constexpr(rows.NEG.value), tl.constexpr(rows.FLOOR.value)
_DNS = ["sxb", "sxt", "T_x", "row0", "n_rows", "T", "V", "K", "sab", "sat", "sib", "sit", "sdb", "sdt"]


@triton.jit
def _load_slice(X, off, lo, end, SLICE: tl.constexpr):
    """The raw logits ``[lo, lo + SLICE)`` of a row below ``end`` (``V``, or 0 to read nothing), in their storage
    dtype, 0 elsewhere."""
    cols = lo + tl.arange(0, SLICE)
    if lo + SLICE <= end:  # a full slice: unmasked, so the loads vectorise
        x = tl.load(X + off + cols)
    else:
        x = tl.load(X + off + cols, mask=cols < end, other=0.0)
    return x


@triton.jit
def _partials(x, lo, V, P, k2, HAS_SOFTCAP: tl.constexpr, SLICE: tl.constexpr):
    """``(m, s, a)`` of one slice of raw logits ``x``: the maximum of ``y = softcap(x)`` (at least ``NEG``, so an all
    ``-inf`` slice gives no ``inf - inf``) and the sums ``s = sum 2^d``, ``a = sum 2^d d`` with ``d = (y - m) k2``
    (floored: ``-inf`` logits and the columns past ``V`` add 0)."""
    cols = lo + tl.arange(0, SLICE)
    y = tl.where(cols < V, _cap(x.to(P.dtype.element_ty), P, HAS_SOFTCAP), float("-inf"))
    m = tl.maximum(tl.max(y, axis=0), NEG)
    d = tl.maximum((y - m) * k2, FLOOR)
    e = tl.exp2(d)
    return m, tl.sum(e, axis=0), tl.sum(e * d, axis=0)


@triton.jit
def _store_partials(SLOT, k, m, s, a):
    tl.store(SLOT + k * N_STATS, m)
    tl.store(SLOT + k * N_STATS + 1, s)
    tl.store(SLOT + k * N_STATS + 2, a)


@triton.jit
def _combine(SLOT, K, k2, BLOCK_K: tl.constexpr):
    """``(M, log2 S, H)``: the row's maximum, ``log2`` of its sum of exponentials (relative to ``M``) and its entropy,
    from the ``K`` partials of a slot (read past L1: other programs wrote them)."""
    ks = tl.arange(0, BLOCK_K)
    on = ks < K
    m = tl.load(SLOT + ks * N_STATS, mask=on, other=NEG, cache_modifier=".cg")
    s = tl.load(SLOT + ks * N_STATS + 1, mask=on, other=0.0, cache_modifier=".cg")
    a = tl.load(SLOT + ks * N_STATS + 2, mask=on, other=0.0, cache_modifier=".cg")
    big = tl.max(m, axis=0)
    dm = (m - big) * k2
    c = tl.exp2(dm)
    s_all = tl.sum(c * s, axis=0)
    a_all = tl.sum(tl.where(s > 0, c * (a + s * dm), 0.0), axis=0)
    log2s = tl.log2(s_all)
    return big, log2s, (log2s - a_all / s_all) * LN2


@triton.jit
def _barrier(COUNTER, target):
    """Arrive at the group's counter (release: the partials stored before are visible first) and wait until it
    reaches ``target`` (acquire). Counters only grow: turn ``j`` of a group of ``n`` programs waits for
    ``n (j + 1)``."""
    tl.debug_barrier()  # every thread's partial stores precede the arrival
    tl.atomic_add(COUNTER, 1, sem="release")
    while tl.atomic_add(COUNTER, 0, sem="acquire") < target:
        pass
    tl.debug_barrier()


@triton.jit
def _write_grad(x, DX, doff, lo, V, tgt, m, log2s, c, a0, a1, P, k2,
                HAS_SOFTCAP: tl.constexpr, ENT_GRAD: tl.constexpr, SLICE: tl.constexpr):  # fmt: skip
    """``dL/dx`` of the slice ``[lo, lo + SLICE)`` from its raw logits ``x``."""
    cols = lo + tl.arange(0, SLICE)
    g = _grad_block(x.to(m.dtype), cols, tgt, m, log2s, c, a0, a1, P, k2, HAS_SOFTCAP, ENT_GRAD).to(DX.dtype.element_ty)
    _store_slice(DX, doff, lo, V, g, SLICE)


@triton.jit
def _store_slice(DX, doff, lo, V, g, SLICE: tl.constexpr):
    """``g`` into the slice ``[lo, lo + SLICE)`` of a gradient row (unmasked when full: vector stores)."""
    cols = lo + tl.arange(0, SLICE)
    if lo + SLICE <= V:
        tl.store(DX + doff + cols, g)
    else:
        tl.store(DX + doff + cols, g, mask=cols < V)


@triton.jit
def _zero_slice(DX, doff, lo, V, SLICE: tl.constexpr):
    _store_slice(DX, doff, lo, V, tl.zeros([SLICE], DX.dtype.element_ty), SLICE)


@triton.jit(do_not_specialize=_DNS)
def _split_rows(
    X, DX, IDS, MASK, P, GS, W, ENT_W, ADV, OLD, REF, ISR, ROWS,
    LOGP, ENT, RMAX, LOG2S, DLOGP, PTL, KL, FLAGS, SLOTS, COUNTERS, ERR,
    sxb, sxt, T_x, row0, n_rows, T, V, K, sab, sat, sib, sit, sdb, sdt,
    LOSS: tl.constexpr, BIAS_KL: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ENT_GRAD: tl.constexpr, ALIGNED: tl.constexpr, WALK: tl.constexpr, REREAD: tl.constexpr,
    SLICE: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Rows ``i`` of ``X`` (at ``(i // T_x) sxb + (i % T_x) sxt``) for the flat tokens ``row0 + i`` (or
    ``ROWS[row0 + i]``): statistics, loss terms and ``gs * dL/dx`` into the same rows of ``DX`` (see the module
    docstring). ``OLD``, ``REF`` (no KL without it), ``ISR`` and ``ROWS`` are ``None`` when absent."""
    zero = tl.sum(tl.zeros([SLICE], LOGP.dtype.element_ty), axis=0)
    k2 = tl.load(P + P_K2)
    scale = tl.load(GS).to(zero.dtype) * tl.load(P + P_KN)
    ent_w = zero
    if ENT_GRAD:
        ent_w = tl.load(ENT_W)
    pid = tl.program_id(0)
    if WALK:  # one program a group: it walks every slice
        group, k, groups, members = pid, 0, tl.num_programs(0), 1
    else:
        group, k, groups, members = pid // K, pid % K, tl.num_programs(0) // K, K
    lo = k * SLICE
    slots = SLOTS + group.to(tl.int64) * 2 * K * N_STATS
    turn = 0
    if WALK:
        nxt = tl.zeros([SLICE], X.dtype.element_ty)
    else:  # the launcher gives every group a row
        p0, off0, _ = _row(group, row0, ROWS, T_x, sxb, sxt, sdb, sdt, ROWS is not None, ALIGNED)
        nxt = _load_slice(X, off0, lo, tl.where(tl.load(MASK + p0) != 0, V, 0), SLICE)
    for i in range(group, n_rows, groups):
        p, off, doff = _row(i, row0, ROWS, T_x, sxb, sxt, sdb, sdt, ROWS is not None, ALIGNED)
        w = tl.load(MASK + p).to(zero.dtype)
        tgt = tl.load(IDS + p)
        live = w != 0
        ok = (tgt >= 0) & (tgt < V)
        tgt = tgt.to(tl.int32)  # compared with int32 columns
        if live & (ok == 0) & (k == 0):
            tl.store(ERR, 1)
        x = nxt
        if not WALK:  # the next row's slice, in flight during this row's barrier
            j = tl.minimum(i + groups, n_rows - 1)
            np_, noff, _ = _row(j, row0, ROWS, T_x, sxb, sxt, sdb, sdt, ROWS is not None, ALIGNED)
            nxt = _load_slice(X, noff, lo, tl.where((i + groups < n_rows) & (tl.load(MASK + np_) != 0), V, 0), SLICE)
        if live:
            b = p // T
            x_id = tl.load(X + off + tgt, mask=ok, other=0.0)
            adv, old, ref, isr = _load_inputs(zero, b, p - b * T, p, zero == zero, ADV, sab, sat, OLD, REF, ISR,
                                              sib, sit, OLD is not None, REF is not None, ISR is not None)  # fmt: skip
            wb = tl.load(W + b)
            slot = slots + (turn % 2) * K * N_STATS
            if WALK:
                for kk in range(0, K):
                    xk = _load_slice(X, off, kk * SLICE, V, SLICE)
                    m_k, s_k, a_k = _partials(xk, kk * SLICE, V, P, k2, HAS_SOFTCAP, SLICE)
                    _store_partials(slot, kk, m_k, s_k, a_k)
            else:
                m_k, s_k, a_k = _partials(x, lo, V, P, k2, HAS_SOFTCAP, SLICE)
                _store_partials(slot, k, m_k, s_k, a_k)
            _barrier(COUNTERS + group, members * (turn + 1))
            m, log2s, ent = _combine(slot, K, k2, BLOCK_K)
            logp = ((_cap(x_id.to(zero.dtype), P, HAS_SOFTCAP) - m) * k2 - log2s) * LN2
            if OLD is None:
                old = logp
            if REF is None:
                ref = logp
            r = tl.exp(logp - old)
            one = r * 0.0 + 1.0
            ptl, d_lp, d_r, kl, low, high = _policy_terms(
                logp, ref, adv, isr, r, one, one, P, LOSS, HAS_DELTA, REF is not None, BIAS_KL
            )
            g = w * (d_lp + d_r * r)
            if k == 0:
                tl.store(LOGP + p, logp)
                tl.store(ENT + p, ent)
                tl.store(RMAX + p, m)
                tl.store(LOG2S + p, log2s)
                tl.store(DLOGP + p, g)
                tl.store(PTL + p, ptl)
                tl.store(KL + p, kl)
                tl.store(FLAGS + p, low.to(tl.int32) * F_LOW + high.to(tl.int32) * F_HIGH)
            c = scale * wb * g
            h = zero
            if ENT_GRAD:
                h = scale * ent_w * w
            a0 = c + h * ent
            a1 = h * LN2
            if WALK:
                for kk in range(0, K):
                    xk = _load_slice(X, off, kk * SLICE, V, SLICE)
                    _write_grad(xk, DX, doff, kk * SLICE, V, tgt, m, log2s, c, a0, a1, P, k2, HAS_SOFTCAP, ENT_GRAD,
                                SLICE)  # fmt: skip
            else:
                if REREAD:
                    x = _load_slice(X, off, lo, V, SLICE)
                _write_grad(x, DX, doff, lo, V, tgt, m, log2s, c, a0, a1, P, k2, HAS_SOFTCAP, ENT_GRAD, SLICE)
            turn += 1
        else:
            if k == 0:
                tl.store(LOGP + p, zero)
                tl.store(ENT + p, zero)
                tl.store(RMAX + p, zero + NEG)
                tl.store(LOG2S + p, zero)
                tl.store(DLOGP + p, zero)
                tl.store(PTL + p, zero)
                tl.store(KL + p, zero)
                tl.store(FLAGS + p, 0)
            if WALK:
                for kk in range(0, K):
                    _zero_slice(DX, doff, kk * SLICE, V, SLICE)
            else:
                _zero_slice(DX, doff, lo, V, SLICE)


# ------------------------------------------------------------------------------------------------ launcher
SM90 = {"regs": 65536, "threads": 2048, "programs": 32, "shared": 233472, "reg_unit": 256, "shared_reserved": 1024}
"""An H100/H200 SM's limits (CUDA occupancy rules for compute capability 9.0)."""


def programs_per_sm(n_regs: int, num_warps: int, shared: int, sm: dict = SM90) -> int:
    """How many programs of a compiled kernel (``n_regs`` registers a thread, ``shared`` bytes of shared memory) one
    SM holds at once: the least of its thread, program, register (allocated per warp in units of ``reg_unit``) and
    shared-memory limits."""
    threads = 32 * num_warps
    regs_per_warp = -(-n_regs * 32 // sm["reg_unit"]) * sm["reg_unit"]
    by_regs = (sm["regs"] // max(regs_per_warp, 1)) // num_warps
    by_shared = sm["shared"] // (shared + sm["shared_reserved"])
    return max(0, min(sm["threads"] // threads, sm["programs"], by_regs, by_shared))


def split_groups(n_rows: int, K: int, capacity: int) -> int:
    """Groups of ``K`` programs to launch (a grid of ``groups * K`` programs): as many as the ``capacity`` co-resident
    programs hold, at most one a row; 0 when not even one group is co-resident."""
    return min(n_rows, capacity // K)


def cooperative_launch() -> bool:
    """Whether this Triton launches a grid cooperatively (CUDA then refuses a grid that is not co-resident)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_cooperative_grid" in getattr(CUDAOptions, "__dataclass_fields__", {})


@functools.cache
def _sm_limits(index: int) -> tuple[int, dict]:
    props = torch.cuda.get_device_properties(index)
    sm = dict(SM90)
    sm["regs"] = getattr(props, "regs_per_multiprocessor", sm["regs"])
    sm["threads"] = getattr(props, "max_threads_per_multi_processor", sm["threads"])
    sm["shared"] = getattr(props, "shared_memory_per_multiprocessor", sm["shared"])
    return props.multi_processor_count, sm


_CAPACITY: dict = {}
_SPECIALIZING = ("LOSS", "BIAS_KL", "HAS_DELTA", "HAS_SOFTCAP", "ENT_GRAD", "ALIGNED", "WALK", "REREAD", "SLICE",
                 "BLOCK_K", "num_warps")  # fmt: skip
_OPTIONAL = ("OLD", "REF", "ISR", "ROWS")


def capacity(kernel_key, compile_fn, device: torch.device) -> int:
    """Programs of the compiled kernel co-resident on ``device`` (0 when it spills: its register count is then not
    what occupancy assumed), computed once per specialization."""
    hit = _CAPACITY.get(kernel_key)
    if hit is None:
        compiled = compile_fn()
        compiled._init_handles()  # fills n_regs / n_spills
        sms, sm = _sm_limits(device.index if device.index is not None else torch.cuda.current_device())
        per_sm = programs_per_sm(compiled.n_regs, compiled.metadata.num_warps, compiled.metadata.shared, sm)
        hit = _CAPACITY[kernel_key] = 0 if compiled.n_spills else sms * per_sm
    return hit


def split_rows(plan: Plan, x, sxb, sxt, T_x, row0, n_rows, dx, sdb: int, sdt: int, gs, rows=None,
               reread: bool = False) -> bool:  # fmt: skip
    """The single-phase pass over ``n_rows`` rows of ``x`` (as ``launch.fused_rows``) with the split-row kernel;
    ``False``, with nothing launched, where the grid cannot be made co-resident (no cooperative launch in this
    Triton, a spilling kernel, an SM that cannot hold a row's ``K`` programs, or CUDA refusing even one group). Needs
    the aggregation weights first (``launch.prepare_weights``)."""
    assert not plan.two_phase
    if n_rows == 0:
        return True
    V = x.shape[-1]
    K = triton.cdiv(V, SLICE)
    c = plan.cfg
    walk = not x.is_cuda and K > 1  # the interpreter runs programs one after another: a group of one
    kw = dict(
        X=x, DX=dx, IDS=plan.ids, MASK=plan.mask, P=plan.params, GS=gs, W=plan.w, ENT_W=plan.out[O_ENT_W.value :],
        ADV=plan.adv, OLD=plan.old, REF=plan.ref if c.beta != 0.0 else None,
        ISR=plan.isr if c.loss_type != "vespo" else None, ROWS=rows, LOGP=plan.logp, ENT=plan.ent, RMAX=plan.rmax,
        LOG2S=plan.log2s, DLOGP=plan.dlogp, PTL=plan.ptl, KL=plan.kl, FLAGS=plan.flags, ERR=plan.err,
        sxb=sxb, sxt=sxt, T_x=T_x, row0=row0, n_rows=n_rows, T=plan.T, V=V, K=K,
        sab=plan.adv_strides[0], sat=plan.adv_strides[1], sib=plan.isr_strides[0], sit=plan.isr_strides[1],
        sdb=sdb, sdt=sdt, LOSS=LOSS_IDS[c.loss_type], BIAS_KL=c.use_bias_correction_kl, HAS_DELTA=c.delta is not None,
        HAS_SOFTCAP=plan.softcap, ENT_GRAD=c.entropy_coef != 0.0,
        ALIGNED=not (sxb % 16 or sxt % 16 or sdb % 16 or sdt % 16), WALK=walk, REREAD=reread, SLICE=SLICE,
        BLOCK_K=triton.next_power_of_2(K), num_warps=SLICE_WARPS * max(1, x.element_size() // 2),
    )  # fmt: skip
    slots = torch.empty(min(n_rows, 3) * 2 * K * 3, dtype=plan.acc, device=x.device)
    if not x.is_cuda:  # the interpreter: a few groups, each walking its rows' slices (or one slice a row: K programs)
        groups = min(n_rows, 3)
        counters = torch.zeros(groups, dtype=torch.int32, device=x.device)
        _split_rows[(groups * (1 if walk else K),)](SLOTS=slots, COUNTERS=counters, **kw)
        return True
    if not cooperative_launch():
        return False
    key = (tuple((k, v) for k, v in kw.items() if k in _SPECIALIZING or (k in _OPTIONAL and v is None)),
           x.dtype, dx.dtype, plan.acc, x.device)  # fmt: skip
    probe = dict(kw, SLOTS=slots, COUNTERS=plan.err)
    groups = split_groups(n_rows, K, capacity(key, lambda: _split_rows.warmup(**probe, grid=(1,)), x.device))
    slots = torch.empty(groups * 2 * K * 3, dtype=plan.acc, device=x.device)
    counters = torch.zeros(max(groups, 1), dtype=torch.int32, device=x.device)
    while groups:
        try:
            _split_rows[(groups * K,)](SLOTS=slots, COUNTERS=counters, **kw, launch_cooperative_grid=True)
            return True
        except RuntimeError as e:  # CUDA refused a grid it cannot make co-resident (nothing ran): fewer groups
            if "cooperative" not in str(e).lower() and "too large" not in str(e).lower():
                raise  # any other failure is a bug to see, not a reason to fall back
            groups //= 2
            _CAPACITY[key] = groups * K
    return False
