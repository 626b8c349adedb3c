"""The token-chunk loop of the fused linear policy loss: three cuBLAS GEMMs and one row-kernel launch a chunk.

For the ``n`` unmasked tokens' hidden states ``h[n, D]`` (compute dtype, ``e`` bytes) and the head ``W[V, D]``, the
single-phase path runs, for chunk ``c`` of ``C`` tokens:

* G1 ``z = h_c W^T (+ b)``: ``torch.mm`` (``addmm`` with a bias) into the one ``[C, V]`` buffer, fp32 accumulation;
* R, one launch of the row kernel: statistics, loss terms and ``gs * dL/dz`` written over ``z``;
* G2 ``grad_h[c] = dz W``: fp32 output into the chunk's rows of an fp32 ``[n, D]`` buffer (one GEMM over all of V:
  nothing to accumulate);
* G3 ``grad_W += dz^T h_c``: the first chunk writes the fp32 accumulator (beta = 0: no zero fill), the next ones add
  to it with fp32 output (``addmm(out_dtype=)``); a single chunk writes ``grad_W`` in the weight's dtype directly
  (no accumulator, no cast);
* with a bias, its gradient: a column sum of ``dz``.

The gradients are cast to the parameters' dtypes once, at the end of the forward (the fp32 buffers are freed before
the backward). The two-phase path runs G1 and the statistics for every chunk, the O(B*T) kernels, then G1 again, the
row kernel's gradient pass, G2 and G3 (a single chunk keeps its logits: three GEMMs). Chunks are near-equal slices
(multiples of 128 tokens where the bound allows): no per-chunk allocation, copy or host sync.

``OVERLAP_ROWS`` (off by default, measured by ``benchmarks/bench_fused_linear.py``) splits each chunk in halves and
runs the row kernel of one half on a second stream while the current stream projects the other half (and computes
the first half's G2), so the bandwidth-bound row kernel can fill what the compute-bound GEMMs leave idle.

Memory beyond the inputs, bytes (``e_w``: the weight's element size): ``C V e`` (the buffer) + ``4 n D`` (fp32
``grad_h``) + the weight gradient, ``4 V D`` (the accumulator, more than one chunk) or ``e_w V D`` (one chunk) + ``e
n D`` (the gathered hidden states, with padding) + O(B*T); at the end the buffer is gone and the casts add ``e N D``
and, with an accumulator, ``e_w V D``. TRL 1.16's chunked path holds ``4 V D + 4 N D`` of fp32 gradients, its
``[min(N, 4096), 32768]`` tile (``TILE``) and, at the end of its backward, its casts ``e N D + e_w V D`` (and its
caller's gathered ``h[mask]``, ``e N D``). :func:`chunk_limit` keeps ``C V e`` within ``e_w V D + e n D`` plus the
tile's bytes (``e_w V D`` only with a weight gradient): our peak stays ``e n D`` or more below TRL's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .launch import fused_rows, grad_rows, prepare_weights, sequence_and_finalize, stats_rows
from .plan import Plan

TILE = (4096, 32768)  # TRL 1.16's projection tile: up to 4,096 tokens x 32,768 vocabulary columns
MAX_CHUNK = 16384  # tokens
OVERLAP_ROWS = False  # row kernel on a second stream, concurrent with the GEMMs (see the module docstring)
_OUT_DTYPE = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 8)  # mm/addmm(out_dtype=) on CUDA
_ADDMM_FP32_SELF = [True]  # whether this torch's addmm(out_dtype=fp32) takes an fp32 accumulator as `self`
_SIDE: dict = {}


def chunk_limit(n: int, V: int, D: int, e: int, e_w: int, weight_grad: bool, free_bytes: int | None = None) -> int:
    """Most tokens a chunk may hold: ``C V e <= e_w V D [weight_grad] + e n D + min(n, 4096) 32768 e`` (TRL's peak
    bound, see the module docstring) and, given ``free_bytes``, ``C V e <= free_bytes / 4``; at least 128, at most
    ``MAX_CHUNK``."""
    budget = (e_w * V * D if weight_grad else 0) + e * n * D + min(n, TILE[0]) * TILE[1] * e
    if free_bytes is not None:
        budget = min(budget, free_bytes // 4)
    return max(128, min(MAX_CHUNK, budget // (V * e)))


def chunk_spans(n: int, limit: int) -> list[tuple[int, int]]:
    """``[0, n)`` in ``ceil(n / limit)`` near-equal chunks of at most ``limit`` tokens, each a multiple of 128 (else
    64, 16) tokens where that stays within ``limit``; the last chunk takes the rest."""
    if n <= 0:
        return []
    k = -(-n // limit)
    size = -(-n // k)
    for align in (128, 64, 16):
        if -(-size // align) * align <= limit:
            size = -(-size // align) * align
            break
    return [(c0, min(c0 + size, n)) for c0 in range(0, n, size)]


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a @ b``; an ``out`` wider than ``a`` (fp32 from bf16) gets the fp32 products, never rounded to
    ``a``'s dtype."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    elif out.is_cuda and _OUT_DTYPE:
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:
        torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)


def addmm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` into a (wider) accumulator, products in its dtype."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and _OUT_DTYPE and _ADDMM_FP32_SELF[0]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        except RuntimeError:  # torch releases whose addmm(out_dtype=) wants `self` in the inputs' dtype
            _ADDMM_FP32_SELF[0] = False
            acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    elif acc.is_cuda and _OUT_DTYPE:
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def token_rows(mask: torch.Tensor, n: int) -> torch.Tensor:
    """The flat positions of the ``n`` unmasked tokens (``n`` known: no host sync where ``nonzero_static`` runs)."""
    live = mask.reshape(-1) != 0
    try:
        return torch.nonzero_static(live, size=n).squeeze(1)
    except (AttributeError, NotImplementedError, RuntimeError):
        return live.nonzero().squeeze(1)


@dataclass
class Loop:
    """One call's operands, its chunk buffer and gradient buffers (fp32, or fp64 for fp64 inputs)."""

    plan: Plan
    h: torch.Tensor  # [n, D], compute dtype
    w: torch.Tensor  # [V, D], compute dtype
    b: torch.Tensor | None
    rows: torch.Tensor | None  # flat token of each row of h; None: row i is token i
    gs: torch.Tensor  # the announced upstream gradient
    spans: list[tuple[int, int]]
    buf: torch.Tensor  # [largest chunk, V]
    gh: torch.Tensor | None  # [n, D]
    gw: torch.Tensor | None  # [V, D]: the accumulator, or with one chunk the output
    gb: torch.Tensor | None  # [V]

    def project(self, c0: int, c1: int, at: int = 0) -> torch.Tensor:
        """G1: the logits of tokens ``c0 .. c1`` in the buffer's rows ``at ..``."""
        z = self.buf[at : at + c1 - c0]
        if self.b is None:
            torch.mm(self.h[c0:c1], self.w.t(), out=z)
        else:
            torch.addmm(self.b, self.h[c0:c1], self.w.t(), out=z)
        return z

    def row_pass(self, kernel, z: torch.Tensor, c0: int) -> None:
        """R over rows ``c0 ..`` of the chunk held in ``z``: ``kernel`` is the launch function of ``launch.py``."""
        n, V = z.shape
        if kernel is stats_rows:
            stats_rows(self.plan, z, 0, V, n, c0, n, rows=self.rows)
        else:
            kernel(self.plan, z, 0, V, n, c0, n, z, 0, V, self.gs, rows=self.rows)

    def grad_h(self, c0: int, c1: int, dz: torch.Tensor) -> None:
        """G2 for tokens ``c0 .. c1`` from their rows of ``dz``."""
        if self.gh is not None:
            mm_into(self.gh[c0:c1], dz, self.w)

    def grad_w(self, first: bool, c0: int, c1: int, dz: torch.Tensor) -> None:
        """G3 (and the bias gradient) of the chunk ``c0 .. c1``."""
        if self.gw is not None:
            (mm_into if first else addmm_into)(self.gw, dz.t(), self.h[c0:c1])
        if self.gb is not None:
            self.gb.add_(dz.sum(0, dtype=self.gb.dtype))


def run(loop: Loop, grad: bool) -> None:
    """Every chunk of one call, the O(B*T) kernels included; with ``grad``, the gradients into the loop's buffers."""
    plan, spans = loop.plan, loop.spans
    if plan.two_phase:  # every log-prob and entropy first, then the coefficients, then the chunks again
        z = None
        for c0, c1 in spans:
            z = loop.project(c0, c1)
            loop.row_pass(stats_rows, z, c0)
        sequence_and_finalize(plan)
        for i, (c0, c1) in enumerate(spans if grad else ()):
            z = z if len(spans) == 1 else loop.project(c0, c1)
            loop.row_pass(grad_rows, z, c0)
            loop.grad_h(c0, c1, z)
            loop.grad_w(i == 0, c0, c1, z)
        return
    if not grad:
        for c0, c1 in spans:
            loop.row_pass(stats_rows, loop.project(c0, c1), c0)
        sequence_and_finalize(plan)
        return
    prepare_weights(plan)  # the aggregation weights depend on the mask only: each chunk's gradient in its launch
    streams = Streams(loop.h.device) if OVERLAP_ROWS else None
    for i, (c0, c1) in enumerate(spans):
        if streams is None:
            z = loop.project(c0, c1)
            loop.row_pass(fused_rows, z, c0)
            loop.grad_h(c0, c1, z)
        else:
            z = _overlapped(loop, streams, c0, c1)
        loop.grad_w(i == 0, c0, c1, z)
    sequence_and_finalize(plan)


def _overlapped(loop: Loop, streams: Streams, c0: int, c1: int) -> torch.Tensor:
    """G1 and G2 of a chunk in two halves, each half's row kernel on the second stream (see ``OVERLAP_ROWS``)."""
    half = (c1 - c0) // 2
    mid = c0 + ((half // 64 * 64) or half)
    halves = [(a, b) for a, b in ((c0, mid), (mid, c1)) if b > a]
    done = []
    for a, b in halves:
        z = loop.project(a, b, a - c0)
        with streams.side():
            loop.row_pass(fused_rows, z, a)
            done.append(streams.mark())
    for (a, b), event in zip(halves, done, strict=True):
        streams.wait(event)
        loop.grad_h(a, b, loop.buf[a - c0 : b - c0])
    return loop.buf[: c1 - c0]


class Streams:
    """The current CUDA stream and a second, high-priority one for the row kernel; on CPU tensors every method is a
    no-op, so the same schedule runs in order (how the interpreter tests it)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.main = torch.cuda.current_stream(device)
            key = device.index if device.index is not None else torch.cuda.current_device()
            if key not in _SIDE:
                _SIDE[key] = torch.cuda.Stream(device, priority=-1)
            self.other = _SIDE[key]

    def side(self):
        """Launches on the second stream, after everything the current one has queued."""
        if not self.cuda:
            return contextlib.nullcontext()
        self.other.wait_stream(self.main)
        return torch.cuda.stream(self.other)

    def mark(self):
        """An event after the second stream's work so far."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(self.other)
        return event

    def wait(self, event) -> None:
        """The current stream waits for ``event``."""
        if event is not None:
            self.main.wait_event(event)


def linear_gradients(
    plan: Plan, flat_h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor | None,
    n: int, cd: torch.dtype, needs: tuple[bool, bool, bool], gs: torch.Tensor, chunk_size: int | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """Run the loop over ``flat_h[N, D]`` (the unmasked ``rows``, or all); return ``gs`` times the gradients of
    the loss w.r.t. ``flat_h`` (``[N, D]``), ``weight`` and ``bias``, in their dtypes (None where not needed)."""
    device, acc = flat_h.device, plan.acc
    N, D = flat_h.shape
    V = weight.shape[0]
    need_h, need_w, need_b = needs
    e = torch.empty((), dtype=cd).element_size()
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    limit = chunk_limit(n, V, D, e, weight.element_size(), need_w, free)
    spans = chunk_spans(n, min(limit, int(chunk_size)) if chunk_size else limit)
    h = (flat_h if rows is None else flat_h.index_select(0, rows)).to(cd)
    direct = len(spans) == 1 and weight.dtype in (cd, acc)  # one chunk: grad_W in the weight's dtype, no accumulator
    gw_dtype = weight.dtype if direct else acc
    loop = Loop(
        plan=plan, h=h, w=weight.to(cd), b=None if bias is None else bias.to(cd), rows=rows, gs=gs, spans=spans,
        buf=torch.empty(spans[0][1] if spans else 0, V, dtype=cd, device=device),
        gh=torch.empty(n, D, dtype=acc, device=device) if need_h else None,
        gw=(torch.empty if spans else torch.zeros)(V, D, dtype=gw_dtype, device=device) if need_w else None,
        gb=torch.zeros(V, dtype=acc, device=device) if need_b else None,
    )  # fmt: skip
    run(loop, need_h or need_w or need_b)
    gh, gw, gb = loop.gh, loop.gw, loop.gb
    del loop, h  # the chunk buffer goes before the casts below
    dh = None
    if gh is not None:
        gh = gh.to(flat_h.dtype)
        dh = gh if rows is None else gh.new_zeros(N, D).index_copy_(0, rows, gh)
    dw = None if gw is None else gw.to(weight.dtype)
    db = None if gb is None else gb.to(bias.dtype)
    return dh, dw, db
