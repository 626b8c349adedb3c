"""Policy loss from hidden states and the LM head: forward + backward (grads for hidden and head), bf16.

Loss: DAPO with a k3 KL term (beta 0.04) and an entropy bonus (entropy_coef 0.01), on-policy, full-length
sequences of 1,024 tokens. Sweep (fits the GPU check's budget on one H100): the Qwen2.5-7B head (D 3,584,
V 152,064) and the Qwen2.5-0.5B head (D 896, V 151,936) x 4k and 16k tokens.

Methods:
  fused        papo_kernels.fused_linear_policy_loss (token chunks, gradients in the forward, 3 GEMMs a chunk)
  trl_chunked  TRL 1.16's chunked path: ChunkedLogProbFunction on the unmasked tokens (logits recomputed in the
               backward) + the eager loss (papo_kernels.loss.loss_from_logps, tested equal to TRL's _compute_loss)
  liger        Liger-Kernel's LigerFusedLinearGRPOLoss (torch.compile'd chunks; no entropy term: compared with the
               loss without the bonus; skipped with a note when liger_kernel is not installed)
  eager        full bf16 logits h @ W^T, TRL's torch log-probs/entropy and the eager loss (where it fits)

Parity: loss, d_hidden and d_weight against the exact loss of the same bf16 inputs (fp32 GEMMs without TF32,
token chunks; benchmarks/reference.py). Tolerance for parity_ok: 5e-3 on the loss, 2e-2 on each gradient
(what rounding the logits to bf16 costs).
Floor: the 6 N D V flops of three GEMMs (logits, d_hidden, d_weight) at the measured bf16 matmul rate.
A peer that recompiles under torch.compile gets status "recompiles"; one that raises gets "crashed: ...".

    python benchmarks/bench_fused_linear.py            # the sweep (GPU)
    python benchmarks/bench_fused_linear.py --quick    # tiny shapes, any device (CI smoke test)
"""

from __future__ import annotations

from functools import partial

import torch
from harness import Results, arg_parser, floors, flops_floor_ms, free_memory, on_cuda, rel_err, wanted
from peers import (
    liger_available,
    liger_fused_linear_grpo_loss,
    print_skipped_peers,
    trl_available,
    trl_chunked_logps_entropy,
    trl_eager_logps_entropy,
)
from reference import linear_reference, without_entropy_bonus

from papo_kernels import PolicyLossConfig, fused_linear_policy_loss
from papo_kernels.loss import loss_from_logps

CFG = PolicyLossConfig(loss_type="dapo", beta=0.04, entropy_coef=0.01)
HEADS = {"qwen2.5-7b": (3584, 152064), "qwen2.5-0.5b": (896, 151936)}
SWEEP = (4096, 16384)
QUICK_HEADS, QUICK = {"tiny": (32, 512)}, (32,)
TOL_LOSS, TOL_GRAD = 5e-3, 2e-2  # bf16-rounded logits are within them
METHOD_LIMIT_S = 60


def make_inputs(tokens: int, D: int, V: int, device: str, seq: int):
    T = min(seq, tokens)
    B = tokens // T
    g = torch.Generator(device=device).manual_seed(tokens + D)
    h = torch.randn(B, T, D, device=device, generator=g, dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(V, D, device=device, generator=g) / D**0.5 * 2).to(torch.bfloat16).requires_grad_()
    ids = torch.randint(0, V, (B, T), device=device, generator=g)
    mask = torch.ones(B, T, device=device, dtype=torch.int64)
    adv = torch.randn(B, device=device, generator=g)
    ref = -torch.rand(B, T, device=device, generator=g) * 5
    return h, w, ids, mask, adv, ref


def methods(h, w, ids, mask, adv, ref, with_eager: bool) -> dict:
    """name -> (factory of a fwd+bwd callable returning (loss, d_hidden, d_weight), semantics, note)."""

    def eager_loss(logps, entropy):
        return loss_from_logps(logps, entropy, mask, adv, ref_logps=ref, config=CFG).loss

    def with_grads(loss_fn):
        def run():
            loss = loss_fn()
            return (loss, *torch.autograd.grad(loss, (h, w)))

        return run

    def liger():
        loss = liger_fused_linear_grpo_loss(CFG)
        return with_grads(lambda: loss(h, w, ids, mask, adv, ref))

    fused = lambda: fused_linear_policy_loss(h, w, ids, mask, adv, ref_logps=ref, config=CFG).loss  # noqa: E731
    table = {"fused": (lambda: with_grads(fused), CFG, None)}
    if trl_available():
        table["trl_chunked"] = (lambda: with_grads(lambda: eager_loss(*trl_chunked_logps_entropy(h, w, ids, mask))),
                                CFG, None)  # fmt: skip
    if on_cuda() and liger_available():
        table["liger"] = (liger, without_entropy_bonus(CFG), "no entropy term (bonus and metric)")
    if with_eager:
        table["eager"] = (lambda: with_grads(lambda: eager_loss(*trl_eager_logps_entropy(h @ w.t(), ids))), CFG, None)
    return table


def parity_check(h, w, ids, mask, adv, ref):
    """``check(output, semantics)``: a method's deviation from the exact loss and gradients (computed once each)."""
    exact = {}

    def check(out, semantics) -> dict:
        if semantics not in exact:
            exact[semantics] = linear_reference(h, w, ids, mask, adv, semantics, ref_logps=ref)
        names = ("loss", "grad_hidden", "grad_weight")
        errs = {f"rel_err_{k}": rel_err(a, b) for k, a, b in zip(names, out, exact[semantics], strict=True)}
        grad = max(errs["rel_err_grad_hidden"], errs["rel_err_grad_weight"])
        return {**errs, "parity_ok": errs["rel_err_loss"] <= TOL_LOSS and grad <= TOL_GRAD}

    return check


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    device = "cuda" if on_cuda() else "cpu"
    print_skipped_peers()
    if not on_cuda():
        print("note: the Liger peer runs on CUDA only (torch.compile)")
    fl = floors(args.quick)
    results = Results("fused_linear", resume=args.resume, config=CFG.__dict__, floors=fl,
                      tolerance={"loss": TOL_LOSS, "grad": TOL_GRAD})  # fmt: skip
    heads, sweep = (QUICK_HEADS, QUICK) if args.quick else (HEADS, SWEEP)
    for head, (D, V) in heads.items():
        for tokens in sweep:
            h, w, ids, mask, adv, ref = make_inputs(tokens, D, V, device, 16 if args.quick else 1024)
            eager_bytes = tokens * V * 2 * 6  # bf16 logits, their log-softmax, probabilities and gradients
            fits = not on_cuda() or eager_bytes < torch.cuda.mem_get_info()[0] // 2
            checker = parity_check(h, w, ids, mask, adv, ref)
            for name, (make, semantics, note) in methods(h, w, ids, mask, adv, ref, fits).items():
                if not wanted(args, name):
                    continue
                key = dict(method=name, head=head, D=D, V=V, tokens=tokens, dtype="bf16")
                floor = flops_floor_ms(6 * tokens * D * V, fl)
                results.run(key, make, quick=args.quick, check=partial(checker, semantics=semantics),
                            floor_ms=floor, limit_s=METHOD_LIMIT_S, note=note)  # fmt: skip
            del h, w, checker
            free_memory()
    print(f"wrote {results.path}")


if __name__ == "__main__":
    main()
