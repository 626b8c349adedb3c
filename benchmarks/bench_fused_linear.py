"""Policy loss from hidden states and the LM head: forward + backward (grads for hidden and head), bf16.

Loss: DAPO with a k3 KL term (beta 0.04) and an entropy bonus (entropy_coef 0.01), full-length sequences of 1,024
tokens; reference and old log-probs drawn near the policy's own (reference.py). Sweep (fits the GPU check's budget
on one H100): the Qwen2.5-7B head (D 3,584, V 152,064) and the Qwen2.5-0.5B head (D 896, V 151,936) x 4k and 16k
tokens.

Methods:
  fused             papo_kernels.fused_linear_policy_loss (token chunks, gradients in the forward, 3 GEMMs a chunk)
  fused_overlap     the same with the row kernel on a second stream (papo_kernels.loss.chunked.OVERLAP_ROWS)
  fused_no_entropy  fused with the entropy bonus off: the semantics of Liger and CCE, the like-for-like row
  trl_chunked       TRL 1.16's chunked path: ChunkedLogProbFunction on the unmasked tokens (logits recomputed in
                    the backward) + the eager loss (papo_kernels.loss.loss_from_logps, tested equal to TRL's
                    _compute_loss)
  liger             Liger-Kernel's LigerFusedLinearGRPOLoss (torch.compile'd chunks, torch._dynamo reset before
                    each shape; no entropy term: compared with the loss without the bonus)
  cce               Apple's Cut Cross-Entropy: per-token log-probs from h and W, its backward weighted per token by
                    the eager loss without the bonus (policy gradient and KL; no entropy); CUDA only
  eager             full bf16 logits h @ W^T, TRL's torch log-probs/entropy and the eager loss (where it fits)
Peers that are not installed are skipped with a note.

Parity: loss, d_hidden and d_weight against the exact loss of the same bf16 inputs (fp32 GEMMs without TF32,
token chunks; benchmarks/reference.py). Tolerance for parity_ok: 5e-3 on the loss, 2e-2 on each gradient
(what rounding the logits to bf16 costs). fused_linear_terms.json (parity only, Qwen2.5-0.5B head, 4k tokens)
repeats the check where each term is all there is (Liger left out: a compilation per case), within 5e-2 and
1e-1: alone, the small KL term feels the bf16 rounding of the logits; a dropped term is off by 1.
Floor: the 6 N D V flops of three GEMMs (logits, d_hidden, d_weight) at the best bf16 matmul rate that cuBLAS
reached on these GEMMs (floors.py); the datasheet rate gives fraction_of_peak. A peer that recompiles under
torch.compile gets status "recompiles"; one that raises gets "crashed: ..."; first_call_s shows compilation.

--profile records the kernel timeline of one warm call of ours per config (torch.profiler, chrome trace): the time
in the three GEMMs, the row kernel, the other kernels and the gaps between them, and each launch with the reason it
exists -> results/<device>/fused_linear_profile.json and .md. --model prints the first-principles time model of one
call that results/fused_linear_profile.md quotes (it measures nothing).

    python benchmarks/bench_fused_linear.py            # the sweep (GPU)
    python benchmarks/bench_fused_linear.py --quick    # tiny shapes, any device (CI smoke test)
    python benchmarks/bench_fused_linear.py --profile  # the timeline of one call per config
    python benchmarks/bench_fused_linear.py --model    # the time model, as Markdown
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from harness import (
    Results,
    arg_parser,
    floors,
    flops_floor_ms,
    free_memory,
    on_cuda,
    rel_err,
    results_dir,
    sync,
    wanted,
    write_result,
)
from peers import (
    cce_available,
    cce_token_logps,
    liger_available,
    liger_fused_linear_grpo_loss,
    print_skipped_peers,
    trl_available,
    trl_chunked_logps_entropy,
    trl_eager_logps_entropy,
)
from reference import LossInputs, linear_reference, near_policy, term_rows, without_entropy_bonus

from papo_kernels import PolicyLossConfig, fused_linear_policy_loss
from papo_kernels.loss import chunked, loss_from_logps

CFG = PolicyLossConfig(loss_type="dapo", beta=0.04, entropy_coef=0.01)
HEADS = {"qwen2.5-7b": (3584, 152064), "qwen2.5-0.5b": (896, 151936)}
SWEEP = (4096, 16384)
QUICK_HEADS, QUICK = {"tiny": (32, 512)}, (32,)
TERMS_HEAD, TERMS_TOKENS, SEQ, QUICK_SEQ = "qwen2.5-0.5b", 4096, 1024, 16
TERM_METHODS = ("fused", "trl_chunked", "cce")
TOL_LOSS, TOL_GRAD = 5e-3, 2e-2  # bf16-rounded logits are within them
# alone, the KL term's gradient beta (1 - exp(ref - logp)) is about beta * NEAR a token, and rounding the logits to
# bf16 moves logp by ~0.01: a few percent of it (a dropped term is off by 1)
TERMS_TOL_LOSS, TERMS_TOL_GRAD = 5e-2, 1e-1
METHOD_LIMIT_S = 60


@dataclass
class Inputs(LossInputs):
    h: torch.Tensor  # hidden states [B, T, D], bf16, a leaf
    w: torch.Tensor  # the head [V, D], bf16, a leaf


def make_inputs(tokens: int, D: int, V: int, device: str, seq: int) -> Inputs:
    T = min(seq, tokens)
    B = tokens // T
    g = torch.Generator(device=device).manual_seed(tokens + D)
    h = torch.randn(B, T, D, device=device, generator=g, dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(V, D, device=device, generator=g) / D**0.5 * 2).to(torch.bfloat16).requires_grad_()
    ids = torch.randint(0, V, (B, T), device=device, generator=g)
    mask = torch.ones(B, T, device=device, dtype=torch.int64)
    adv = torch.randn(B, device=device, generator=g)
    flat = h.detach().view(-1, D)
    ref, old = near_policy(lambda rows: flat[rows] @ w.detach().t(), ids, CFG.temperature, g)
    return Inputs(ids=ids, mask=mask, adv=adv, ref=ref, old=old, h=h, w=w)


def methods(inp: Inputs, config: PolicyLossConfig, with_eager: bool) -> dict:
    """name -> (factory of a fwd+bwd callable returning (loss, d_hidden, d_weight), semantics, note)."""
    h, w, ids, mask, adv = inp.h, inp.w, inp.ids, inp.mask, inp.adv
    no_entropy = without_entropy_bonus(config)

    def eager_loss(cfg: PolicyLossConfig):
        return lambda logps, entropy: loss_from_logps(logps, entropy, mask, adv, **inp.loss_kwargs(), config=cfg).loss

    def with_grads(loss_fn):
        def run():
            loss = loss_fn()
            return (loss, *torch.autograd.grad(loss, (h, w)))

        return run

    def liger():
        loss = liger_fused_linear_grpo_loss(config)
        return with_grads(lambda: loss(h, w, ids, mask, adv, inp.ref, inp.old))

    table = {name: (partial(ours, inp, config, overlap), config, None) for name, overlap in OURS.items()}
    table["fused_no_entropy"] = (partial(ours, inp, no_entropy, False), no_entropy, "no entropy bonus: as Liger, CCE")
    if trl_available():
        table["trl_chunked"] = (lambda: with_grads(lambda: eager_loss(config)(*trl_chunked_logps_entropy(h, w, ids,
                                                                                                        mask))),
                                config, None)  # fmt: skip
    if on_cuda() and liger_available():
        table["liger"] = (liger, no_entropy, "no entropy term (bonus and metric); torch._dynamo reset first")
    if on_cuda() and cce_available():
        table["cce"] = (lambda: with_grads(lambda: eager_loss(no_entropy)(*cce_token_logps(h, w, ids, mask))),
                        no_entropy, "log-probs and their weighted gradient; no entropy")  # fmt: skip
    if with_eager:
        table["eager"] = (lambda: with_grads(lambda: eager_loss(config)(*trl_eager_logps_entropy(h @ w.t(), ids))),
                          config, None)  # fmt: skip
    return table


OURS = {"fused": False, "fused_overlap": True}


def ours(inp: Inputs, config: PolicyLossConfig, overlap: bool):
    """Our fwd+bwd callable, returning (loss, d_hidden, d_weight); ``overlap`` runs the row kernel on a second
    stream (set for the call only)."""
    h, w = inp.h, inp.w

    def run():
        old, chunked.OVERLAP_ROWS = chunked.OVERLAP_ROWS, overlap
        try:
            loss = fused_linear_policy_loss(h, w, inp.ids, inp.mask, inp.adv, **inp.loss_kwargs(), config=config).loss
            return (loss, *torch.autograd.grad(loss, (h, w)))
        finally:
            chunked.OVERLAP_ROWS = old

    return run


def parity_check(inp: Inputs, tol_loss: float = TOL_LOSS, tol_grad: float = TOL_GRAD):
    """``check(output, semantics)``: a method's deviation from the exact loss and gradients (computed once each)."""
    exact = {}

    def check(out, semantics) -> dict:
        if semantics not in exact:
            exact[semantics] = linear_reference(inp.h, inp.w, inp.ids, inp.mask, inp.adv, semantics,
                                                **inp.loss_kwargs())  # fmt: skip
        names = ("loss", "grad_hidden", "grad_weight")
        errs = {f"rel_err_{k}": rel_err(a, b) for k, a, b in zip(names, out, exact[semantics], strict=True)}
        grad = max(errs["rel_err_grad_hidden"], errs["rel_err_grad_weight"])
        return {**errs, "parity_ok": errs["rel_err_loss"] <= tol_loss and grad <= tol_grad}

    return check


# ------------------------------------------------------------------------------------- the timeline of one call
DEVICE_CATS = ("kernel", "gpu_memset", "gpu_memcpy")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
MATMULS = ("G1 logits", "G2 grad_h", "G3 grad_W")
REASONS = {
    "G1 logits": "logits = h_c W^T into the chunk buffer (cuBLAS): one a chunk, two in two phases",
    "G2 grad_h": "grad_h of the chunk's tokens = dlogits W (cuBLAS, fp32 out; split-K helpers count here)",
    "G3 grad_W": "grad_W (+)= dlogits^T h_c (cuBLAS, fp32 accumulator; one chunk: the weight's dtype)",
    "row kernel": "_rows: log-probs, entropy, loss terms and dlogits over the logits, in place: one a chunk",
    "O(B*T) kernels": "aggregation weights before the chunks (count, finalize), loss and metrics after them",
    "backward": "_scale_rows: one a gradient, returns at once when the upstream gradient is the announced one",
    "aten::copy_": "dtype casts: gradients to the parameters' dtypes (or inputs to the compute dtype)",
    "aten::fill_": "fills: zeroed O(B*T) buffers, the bias gradient, autograd's upstream gradient of 1",
    "aten::index_select": "gather of the unmasked tokens' hidden states (padding only)",
    "aten::index_copy_": "scatter of grad_h to all B*T positions (padding only)",
    "check": "target-id range and unmasked-token count, read back at once: the call's one host sync",
}
TRITON_ROLES = {"_rows": "row kernel", "_scale_rows": "backward", "_count_kernel": "O(B*T) kernels",
                "_finalize_kernel": "O(B*T) kernels", "_sequence_kernel": "O(B*T) kernels",
                "_quantile_kernel": "O(B*T) kernels"}  # fmt: skip
CHECK_OPS = ("aten::min", "aten::max", "aten::ne", "aten::sum", "aten::stack", "aten::cat", "aten::_local_scalar_dense",
             "aten::item", "aten::_to_copy", "aten::to")  # fmt: skip


def matmul_role(dims: list, D: int, V: int) -> str:
    """G1, G2 or G3 from the shapes a GEMM op recorded (``a[M, K] @ b[K, N]``: the first pair whose K agree)."""
    mats = [d for d in dims if isinstance(d, list) and len(d) == 2]
    for (M, K), (K2, N) in zip(mats, mats[1:], strict=False):
        if K == K2:
            if K == D and N == V:
                return "G1 logits"
            if K == V and N == D:
                return "G2 grad_h"
            if M == V and N == D:
                return "G3 grad_W"
    return "matmul (other)"


def _role(kernel: dict, op: dict | None, D: int, V: int) -> str:
    name = kernel["name"]
    for key, role in TRITON_ROLES.items():  # Triton names a kernel after its function (older releases add a suffix)
        if name == key or name.startswith(key + "_"):
            return role
    if op is not None and op["name"] in ("aten::mm", "aten::addmm"):
        return matmul_role(op.get("args", {}).get("Input Dims", []), D, V)
    if "DtoH" in name or (op is not None and op["name"] in CHECK_OPS):
        return "check"
    return op["name"] if op is not None else name[:60]


def timeline(trace: dict, D: int, V: int) -> dict:
    """One call's device timeline from a chrome trace (``torch.profiler``): each kernel, memset and memcpy with its
    role (the GEMM it belongs to from the enclosing op's shapes, the Triton kernel, else the op), the time in each
    role, the busy time and the gaps (the window from the first start to the last end, less the busy time)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    launches = {e["args"]["correlation"]: e for e in events if e.get("cat") in LAUNCH_CATS and "correlation" in
                e.get("args", {})}  # fmt: skip
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    items = []
    for k in sorted((e for e in events if e.get("cat") in DEVICE_CATS), key=lambda e: e["ts"]):
        launch = launches.get(k.get("args", {}).get("correlation"))
        around = [o for o in ops if launch is not None and o.get("tid") == launch.get("tid")
                  and o["ts"] <= launch["ts"] <= o["ts"] + o.get("dur", 0)]  # fmt: skip
        op = max(around, key=lambda o: o["ts"], default=None)  # the innermost op
        items.append(dict(role=_role(k, op, D, V), op=op["name"] if op else None, kernel=k["name"][:100],
                          start=float(k["ts"]), dur=float(k.get("dur", 0)),
                          stream=k.get("args", {}).get("stream")))  # fmt: skip
    busy, end = 0.0, None
    for it in sorted(items, key=lambda i: i["start"]):  # the union of the busy intervals, over every stream
        stop = it["start"] + it["dur"]
        if end is None or it["start"] >= end:
            busy += it["dur"]
        elif stop > end:
            busy += stop - end
        end = stop if end is None else max(end, stop)
    t0 = items[0]["start"] if items else 0.0
    window = (end - t0) if items else 0.0
    groups = defaultdict(lambda: [0, 0.0])
    for it in items:
        g = groups[(it["role"], it["op"], it["kernel"])]
        g[0] += 1
        g[1] += it["dur"]
    by_role = defaultdict(lambda: {"launches": 0, "us": 0.0})
    for (role, _, _), (count, us) in groups.items():
        by_role[role]["launches"] += count
        by_role[role]["us"] += us
    return {
        "launches": len(items), "window_us": window, "busy_us": busy, "gap_us": window - busy,
        "matmul_us": sum(by_role[r]["us"] for r in MATMULS if r in by_role), "by_role": dict(by_role),
        "kernels": [dict(role=r, op=o, kernel=k, count=c, us=u, reason=REASONS.get(r, REASONS.get(o or "", "")))
                    for (r, o, k), (c, u) in sorted(groups.items(), key=lambda kv: -kv[1][1])],
        "timeline": [dict(it, start=it["start"] - t0) for it in items[:400]],
    }  # fmt: skip


def trace_of(fn) -> dict:
    """The chrome trace of one call of ``fn`` (CPU ops with their shapes, and CUDA kernels where there is CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda() else [])
    sync()
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        sync()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        return json.loads(path.read_text())


def profile_calls(quick: bool) -> None:
    """``--profile``: the timeline of one warm call of each of ours per config -> fused_linear_profile.json/.md."""
    device = "cuda" if on_cuda() else "cpu"
    fl = floors(quick)
    heads, sweep = (QUICK_HEADS, QUICK) if quick else (HEADS, SWEEP)
    rows = []
    for head, (D, V) in heads.items():
        for tokens in sweep:
            inp = make_inputs(tokens, D, V, device, QUICK_SEQ if quick else SEQ)
            for name, overlap in OURS.items():
                fn = ours(inp, CFG, overlap)
                fn()  # compiles
                row = dict(method=name, head=head, D=D, V=V, tokens=tokens, **timeline(trace_of(fn), D, V))
                row["chunks"] = [c1 - c0 for c0, c1 in chunked.chunk_spans(tokens, chunked.chunk_limit(
                    tokens, V, D, 2, 2, True))]  # fmt: skip
                row["floor_ms"] = flops_floor_ms(6 * tokens * D * V, fl)
                row["fraction_of_floor"] = row["floor_ms"] * 1e3 / row["window_us"] if row["window_us"] else None
                rows.append(row)
                path = write_result("fused_linear_profile", {"floors": fl, "profiles": rows})  # after every call
                (results_dir() / "fused_linear_profile.md").write_text(profile_markdown(rows))
                print(f"{name} {head} {tokens}: {row['launches']} launches, window {row['window_us']:.0f} us, "
                      f"gaps {row['gap_us']:.0f} us, matmuls {row['matmul_us']:.0f} us", flush=True)  # fmt: skip
            del inp
            free_memory()
    print(f"wrote {path}")


def profile_markdown(rows: list[dict]) -> str:
    """The measured profiles as Markdown: time by role and every launch with its reason."""
    out = ["# Fused linear loss: the timeline of one call (measured)\n"]
    for r in rows:
        frac = f"{r['fraction_of_floor']:.2f}" if r["fraction_of_floor"] else "-"
        if not r["launches"]:
            out.append(f"## {r['method']}, {r['head']}, {r['tokens']} tokens: no device timeline (no CUDA)\n")
            continue
        out += [f"## {r['method']}, {r['head']}, {r['tokens']} tokens (chunks {r['chunks']})\n",
                f"window {r['window_us']:.0f} us (floor {r['floor_ms'] * 1e3:.0f} us, {frac} of it), busy "
                f"{r['busy_us']:.0f} us, gaps {r['gap_us']:.0f} us, {r['launches']} launches\n",
                "| role | launches | us | share of window |", "|---|---|---|---|"]  # fmt: skip
        for role, v in sorted(r["by_role"].items(), key=lambda kv: -kv[1]["us"]):
            share = v["us"] / r["window_us"] if r["window_us"] else 0.0
            out.append(f"| {role} | {v['launches']} | {v['us']:.0f} | {share:.3f} |")
        out += ["", "| launches | us | role | op | kernel | why |", "|---|---|---|---|---|---|"]
        out += [f"| {k['count']} | {k['us']:.0f} | {k['role']} | {k['op'] or '-'} | `{k['kernel'][:60]}` | "
                f"{k['reason']} |" for k in r["kernels"]]  # fmt: skip
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------ the first-principles time model
PEAK_TFLOPS, HBM_TBS, SMS, SYNC_MS = 790.0, 3.0, 132, 0.05  # H100: bf16 matmul rate, HBM rate, SMs; one host sync
# the first H100 run (an earlier commit: three passes of the row kernels), ms: ours and TRL 1.16's chunked path
FIRST_RUN = {("qwen2.5-7b", 4096): (29.6, 29.7), ("qwen2.5-7b", 16384): (104.5, 117.1),
             ("qwen2.5-0.5b", 4096): (10.0, 9.9), ("qwen2.5-0.5b", 16384): (35.5, 35.8)}  # fmt: skip
FIXED_LAUNCHES = {"first run": 20, "before": 20, "after": 13}  # a call's launches besides the chunks' (see the .md)


def gemm_ms(M: int, N: int, K: int, out_bytes: int, acc_bytes: int = 0, e: int = 2) -> tuple[float, int]:
    """Model time of ``[M, K] @ [K, N]`` and its launches: the matmul rate times the padded-tile and wave
    efficiency of 128 x 256 tiles (split K, one reduction launch, when the tiles do not fill the SMs), or the HBM
    rate over its bytes, whichever is slower; plus, when it adds to an fp32 accumulator of ``acc_bytes``, reading
    and writing that accumulator at the HBM rate, not overlapped (what the first H100 run's times fit: see
    results/fused_linear_profile.md)."""
    best = (0.0, 1)
    for bm, bn in ((128, 256), (256, 128)):
        tiles = math.ceil(M / bm) * math.ceil(N / bn)
        split = max(1, SMS // tiles)
        work = tiles * split
        best = max(best, (M * N / (tiles * bm * bn) * work / (math.ceil(work / SMS) * SMS), split))
    eff, split = best
    flops_ms = 2 * M * N * K / (PEAK_TFLOPS * 1e12 * eff) * 1e3
    nbytes = e * (M * K + K * N) + out_bytes + (8 * M * N * split if split > 1 else 0)
    hbm_ms = 1e3 / (HBM_TBS * 1e12)
    return max(flops_ms, nbytes * hbm_ms) + 2 * acc_bytes * hbm_ms, 1 + (split > 1)


def model_call(design: str, D: int, V: int, n: int, e: int = 2) -> dict:
    """Model of one fwd+bwd call (bf16, every token unmasked, gradients for h and W): its chunks, launches and the
    time in the GEMMs, the row kernel and the other passes. ``before``: chunks of a quarter of the accumulator's
    bytes (256 MiB - 1 GiB), zero-filled fp32 gradients accumulated with addmm, scaled and cast in the backward, two
    host syncs; ``first run``: the same with three passes of the row kernels; ``after``: ``chunked.py``."""
    old = design != "after"
    if old:
        size = min(max(V * D, 256 << 20), 1 << 30) // (V * e) // 128 * 128
        spans = [(c0, min(c0 + size, n)) for c0 in range(0, n, size)]
        other, syncs = (4 + 4) * V * D + (4 + 4) * n * D + (8 + 6) * (V * D + n * D), 2
    else:
        spans = chunked.chunk_spans(n, chunked.chunk_limit(n, V, D, e, e, True))
        other, syncs = 6 * n * D + (6 * V * D if len(spans) > 1 else 0), 1
    # + the row kernel(s) of a chunk and, after, with more than one chunk, the cast of the accumulator
    passes = 3 if design == "first run" else 2  # over the logits: statistics, (then again) the gradient
    launches = FIXED_LAUNCHES[design] + (passes - 1) * len(spans) + (not old and len(spans) > 1)
    ms = dict.fromkeys(MATMULS, 0.0)
    for i, (c0, c1) in enumerate(spans):
        C = c1 - c0
        if old:  # G2 and G3 add to zero-filled fp32 accumulators
            g2, g3 = (C, D, V, 0, 4 * C * D), (V, D, C, 0, 4 * V * D)
        else:  # G2 writes fp32 rows; G3 writes the accumulator, then adds to it (one chunk: grad_W in bf16)
            g2 = (C, D, V, 4 * C * D)
            g3 = (V, D, C, e * V * D) if len(spans) == 1 else (V, D, C, 0, 4 * V * D) if i else (V, D, C, 4 * V * D)
        for role, shape in zip(MATMULS, ((C, V, D, C * V * e), g2, g3), strict=True):
            t, k = gemm_ms(*shape)
            ms[role] += t
            launches += k
    row = passes * n * V * e / (HBM_TBS * 1e12) * 1e3
    rest = other / (HBM_TBS * 1e12) * 1e3 + syncs * SYNC_MS
    total = sum(ms.values()) + row + rest
    floor = 6 * n * D * V / (PEAK_TFLOPS * 1e12) * 1e3
    return dict(chunks=[c1 - c0 for c0, c1 in spans], launches=launches, **ms, row=row, other=rest, total=total,
                floor=floor, fraction=floor / total, rows_hidden=floor / (total - row))  # fmt: skip


def model_markdown() -> str:
    """The model of every benchmark config, before and after, and the after model scaled by what the first run's
    measured time was over its model (``calibrated``), with its speed-up over TRL's measured time."""
    head_row = ("| head | tokens | design | chunks | launches | G1 | G2 | G3 | row | other | total ms | fraction "
                "| rows hidden | calibrated ms | fraction | x TRL |")  # fmt: skip
    lines = [head_row, "|" + "---|" * 16]
    for head, (D, V) in HEADS.items():
        for n in SWEEP:
            ours_ms, trl_ms = FIRST_RUN[(head, n)]
            k = ours_ms / model_call("first run", D, V, n)["total"]
            for design in ("first run", "before", "after"):
                m = model_call(design, D, V, n)
                sizes = "/".join(map(str, sorted(set(m["chunks"]), reverse=True)))
                cal = m["total"] * k
                cols = [head, n, design, f"{len(m['chunks'])} x {sizes}", m["launches"]]
                cols += [f"{m[c]:.2f}" for c in (*MATMULS, "row", "other", "total", "fraction", "rows_hidden")]
                cols += [f"{cal:.1f}", f"{m['floor'] / cal:.2f}", f"{trl_ms / cal:.2f}"]
                lines.append("| " + " | ".join(map(str, cols)) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--profile", action="store_true", help="the kernel timeline of one call per config")
    parser.add_argument("--model", action="store_true", help="print the time model of one call (runs nothing)")
    args = parser.parse_args()
    if args.model:
        print(model_markdown())
        return
    if args.profile:
        profile_calls(args.quick)
        return
    device = "cuda" if on_cuda() else "cpu"
    print_skipped_peers()
    if not on_cuda():
        print("note: the Liger and Cut Cross-Entropy peers run on CUDA only (torch.compile; Triton kernels with "
              "optional pointers, which the interpreter does not take)")  # fmt: skip
    fl = floors(args.quick)
    tolerance = {"loss": TOL_LOSS, "grad": TOL_GRAD}
    results = Results("fused_linear", resume=args.resume, config=CFG.__dict__, floors=fl, tolerance=tolerance)
    heads, sweep = (QUICK_HEADS, QUICK) if args.quick else (HEADS, SWEEP)
    seq = QUICK_SEQ if args.quick else SEQ
    for head, (D, V) in heads.items():
        for tokens in sweep:
            inp = make_inputs(tokens, D, V, device, seq)
            eager_bytes = tokens * V * 2 * 6  # bf16 logits, their log-softmax, probabilities and gradients
            fits = not on_cuda() or eager_bytes < torch.cuda.mem_get_info()[0] // 2
            checker = parity_check(inp)
            for name, (make, semantics, note) in methods(inp, CFG, fits).items():
                if not wanted(args, name):
                    continue
                key = dict(method=name, head=head, D=D, V=V, tokens=tokens, dtype="bf16")
                results.run(key, make, check=partial(checker, semantics=semantics), work=dict(flops=6 * tokens * D * V),
                            limit_s=METHOD_LIMIT_S, note=note)  # fmt: skip
            del inp, checker
            free_memory()
    print(f"wrote {results.path}")
    head, tokens = (next(iter(QUICK_HEADS)), QUICK[0]) if args.quick else (TERMS_HEAD, TERMS_TOKENS)
    D, V = {**HEADS, **QUICK_HEADS}[head]
    terms = Results("fused_linear_terms", resume=args.resume, config=CFG.__dict__,
                    tolerance={"loss": TERMS_TOL_LOSS, "grad": TERMS_TOL_GRAD})  # fmt: skip
    check = partial(parity_check, tol_loss=TERMS_TOL_LOSS, tol_grad=TERMS_TOL_GRAD)
    term_rows(terms, make_inputs(tokens, D, V, device, seq), CFG, partial(methods, with_eager=False), check,
              tuple(m for m in TERM_METHODS if wanted(args, m)), dict(head=head, D=D, V=V, tokens=tokens, dtype="bf16"),
              METHOD_LIMIT_S)  # fmt: skip
    print(f"wrote {terms.path}")


if __name__ == "__main__":
    main()
