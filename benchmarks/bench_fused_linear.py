"""Policy loss from hidden states and the LM head: forward + backward time and peak memory, bf16.

Methods (DAPO loss with a k3 KL term, on-policy, full-length completions, grads for hidden and head):

* ``fused``: ``papo_kernels.fused_linear_policy_loss`` (token chunks, gradients in the forward, 3 GEMMs a chunk).
* ``trl_chunked``: TRL 1.16's path: its chunked log-prob head (``ChunkedLogProbFunction``, logits recomputed in
  the backward) on the unmasked tokens, then its eager loss (``loss_from_logps``, equal to ``_compute_loss``).
* ``liger``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (skipped with a note when ``liger_kernel`` is absent).
* ``eager``: full logits ``h @ W^T``, TRL's eager log-probs/entropy and loss (where it fits in memory).

Reported per row: ``ms``, ``peak_mib`` (above the live inputs), ``ratio_to_fused`` and, for ``fused``,
``fraction_of_floor``: the FLOP floor ``6 N D V / measured bf16 matmul rate`` over our time.

    python benchmarks/bench_fused_linear.py            # full sweep (GPU)
    python benchmarks/bench_fused_linear.py --quick    # smoke test (any device)
"""

from __future__ import annotations

import importlib.util
import inspect

import torch
from bench_policy_loss import trl_eager_logps_entropy
from harness import (
    arg_parser,
    assert_same_results,
    count_launches,
    matmul_tflops,
    peak_memory_mib,
    time_ms,
    write_result,
)

from papo_kernels import PolicyLossConfig, fused_linear_policy_loss
from papo_kernels.loss import loss_from_logps

CFG = PolicyLossConfig(loss_type="dapo", beta=0.04)
HEADS = {"qwen2.5-7b": (3584, 152064), "qwen2.5-0.5b": (896, 151936)}
SEQ = 1024


def make_inputs(tokens: int, D: int, V: int, device: str):
    T = min(SEQ, tokens)
    B = tokens // T
    g = torch.Generator(device=device).manual_seed(tokens + D)
    h = torch.randn(B, T, D, device=device, generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(V, D, device=device, generator=g) / D**0.5 * 2).to(torch.bfloat16).requires_grad_()
    ids = torch.randint(0, V, (B, T), device=device, generator=g)
    mask = torch.ones(B, T, device=device, dtype=torch.int64)
    adv = torch.randn(B, device=device, generator=g)
    ref = -torch.rand(B, T, device=device, generator=g) * 5
    return h, w, ids, mask, adv, ref


def make_methods(h, w, ids, mask, adv, ref, with_eager: bool) -> dict:
    from trl.kernels import ChunkedLogProbFunction

    def eager_loss(logps, entropy):
        return loss_from_logps(logps, entropy, mask, adv, ref_logps=ref, config=CFG).loss

    def with_grads(loss_fn):
        def run():
            loss = loss_fn()
            return (loss, *torch.autograd.grad(loss, (h, w)))

        return run

    def trl_chunked():
        m = mask > 0
        outs = ChunkedLogProbFunction.apply(h[m], w, None, ids[m], 1.0, 32768, None, 1.0, ("log_probs", "entropy"))
        logps, entropy = (x.new_zeros(m.shape).masked_scatter(m, x) for x in outs[:2])
        return eager_loss(logps, entropy)

    methods = {
        "fused": with_grads(lambda: fused_linear_policy_loss(h, w, ids, mask, adv, ref_logps=ref, config=CFG).loss),
        "trl_chunked": with_grads(trl_chunked),
    }
    if with_eager:
        methods["eager"] = with_grads(lambda: eager_loss(*trl_eager_logps_entropy(h @ w.t(), ids)))
    if torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        kw = dict(beta=CFG.beta, use_ref_model=True, epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo")
        kw = {k: v for k, v in kw.items() if k in inspect.signature(LigerFusedLinearGRPOLoss).parameters}
        liger = LigerFusedLinearGRPOLoss(**kw)
        methods["liger"] = with_grads(lambda: liger(h, w, ids, mask, adv, ref_per_token_logps=ref)[0])
    return methods


def check_parity(methods: dict) -> None:
    """TRL's path and eager logits give our loss and gradients (bf16 tolerances) before anything is timed."""
    ours = methods["fused"]()
    for name in ("trl_chunked", "eager"):
        if name in methods:
            assert_same_results(name, methods[name](), ours)


def main() -> None:
    args = arg_parser(__doc__.splitlines()[0]).parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    heads = {"tiny": (16, 256)} if args.quick else HEADS
    sweep = [64] if args.quick else [4096, 8192, 16384, 32768]
    if cuda and importlib.util.find_spec("liger_kernel") is None:
        print("note: liger_kernel is not installed; the Liger peer is skipped (pip install liger-kernel)")
    tflops = matmul_tflops()
    rows = []
    for head, (D, V) in heads.items():
        for tokens in sweep:
            h, w, ids, mask, adv, ref = make_inputs(tokens, D, V, device)
            eager_bytes = tokens * V * 2 * 4  # bf16 logits, their softmax and gradients
            fits = not cuda or eager_bytes < torch.cuda.mem_get_info()[0] // 2
            methods = make_methods(h, w, ids, mask, adv, ref, with_eager=fits)
            if tokens == sweep[0]:  # parity once per head, at the smallest batch
                check_parity(methods)
            base = {}
            for name, fn in methods.items():
                try:
                    ms, peak = time_ms(fn, quick=args.quick), peak_memory_mib(fn)
                except torch.OutOfMemoryError:
                    ms, peak = None, None
                    torch.cuda.empty_cache()
                row = dict(method=name, head=head, D=D, V=V, tokens=tokens, dtype="bf16", ms=ms, peak_mib=peak,
                           launches=count_launches(fn) if ms is not None else None)  # fmt: skip
                base[name] = row
                rows.append(row)
            for row in base.values():
                row["ratio_to_fused"] = None if row["ms"] is None else row["ms"] / base["fused"]["ms"]
            if tflops is not None:
                floor_ms = 6 * tokens * D * V / (tflops * 1e12) * 1e3
                base["fused"]["fraction_of_floor"] = floor_ms / base["fused"]["ms"]
            for row in base.values():
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            del h, w, methods
    path = write_result("fused_linear", {"rows": rows, "matmul_tflops": tflops, "config": CFG.__dict__})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
