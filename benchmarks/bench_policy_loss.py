"""Policy loss from logits: forward + backward of bf16 logits [B, T, V], ours vs the ways TRL and Liger do it.

Loss: DAPO with a k3 KL term (beta 0.04) and an entropy bonus (entropy_coef 0.01), on-policy, sequences of
1,024 tokens, the last 0% or 25% of each sequence padded. Sweep (fits the GPU check's budget on one H100):
V = 151,936 and 32,000 x 16k and 32k tokens x 0% and 25% padding.

Methods:
  fused          papo_kernels.policy_loss, gradient into a new buffer
  fused_inplace  the same with inplace_grad=True (on a copy of the logits; its later repetitions read the
                 previous gradient as logits: the same traffic)
  trl_kernel     TRL 1.16's Triton selective_log_softmax_and_entropy (padded rows skipped) + the eager loss
  trl_eager      TRL 1.16's torch branches (per-row log_softmax, entropy in chunks of 128 rows) + the eager loss
  liger          Liger-Kernel's triton_grpo_loss (no entropy term: compared with the loss without the bonus;
                 skipped with a note when liger_kernel is not installed)
The eager loss is papo_kernels.loss.loss_from_logps, tested equal to TRL's _compute_loss.

Parity: every method's loss and logits gradient against the exact loss of the same bf16 logits (fp64, row
chunks; benchmarks/reference.py). Tolerance for parity_ok: 1e-3 on the loss, 1e-2 on the gradient (bf16 output).
Floor: one read and one write of the live (unpadded) rows of the logits at the measured copy rate (a two-pass
design: the gradient of a row is written from an L2-resident second read); padded rows need not be touched.
Every row also records GPU and wall time, kernels, copies, host syncs, peak memory (see harness.py).

    python benchmarks/bench_policy_loss.py            # the sweep (GPU)
    python benchmarks/bench_policy_loss.py --quick    # tiny shapes, any device (CI smoke test)
"""

from __future__ import annotations

from functools import partial

import torch
from harness import Results, arg_parser, bytes_floor_ms, floors, free_memory, interpreted, on_cuda, wanted
from peers import (
    liger_available,
    liger_grpo_loss,
    print_skipped_peers,
    trl_available,
    trl_eager_logps_entropy,
    trl_kernel_logps_entropy,
)
from reference import LogitsReference, without_entropy_bonus

from papo_kernels import PolicyLossConfig, policy_loss
from papo_kernels.loss import loss_from_logps

CFG = PolicyLossConfig(loss_type="dapo", beta=0.04, entropy_coef=0.01)
SWEEP = [(V, tokens, pad) for V in (151936, 32000) for tokens in (16384, 32768) for pad in (0.0, 0.25)]
QUICK = [(256, 32, 0.25)]
TOL_LOSS, TOL_GRAD = 1e-3, 1e-2
METHOD_LIMIT_S = 60


def make_inputs(V: int, tokens: int, pad: float, device: str, seq: int):
    T = min(seq, tokens)
    B = tokens // T
    g = torch.Generator(device=device).manual_seed(tokens + V)
    x = (torch.randn(B, T, V, device=device, generator=g, dtype=torch.bfloat16) * 2).requires_grad_()
    ids = torch.randint(0, V, (B, T), device=device, generator=g)
    mask = torch.ones(B, T, device=device, dtype=torch.int64)
    mask[:, T - int(T * pad) :] = 0
    adv = torch.randn(B, device=device, generator=g)
    ref = -torch.rand(B, T, device=device, generator=g) * 5
    return x, ids, mask, adv, ref


def methods(x, ids, mask, adv, ref, triton_peers: bool) -> dict:
    """name -> (factory of a fwd+bwd callable returning (loss, dlogits), the semantics it computes, note)."""

    def eager_loss(logps, entropy):
        return loss_from_logps(logps, entropy, mask, adv, ref_logps=ref, config=CFG).loss

    def with_grad(leaf, loss_fn):
        def run():
            loss = loss_fn()
            return loss, torch.autograd.grad(loss, leaf)[0]

        return run

    def inplace():
        y = x.detach().clone().requires_grad_()
        return with_grad(y, lambda: policy_loss(y, ids, mask, adv, ref_logps=ref, config=CFG, inplace_grad=True).loss)

    def liger():
        full = torch.cat([x.detach(), x.detach()[:, -1:]], 1).requires_grad_()  # Liger drops the last position
        loss = liger_grpo_loss(CFG)

        def run():
            value = loss(full, ids, mask, adv, ref)
            return value, torch.autograd.grad(value, full)[0][:, :-1]

        return run

    table = {
        "fused": (lambda: with_grad(x, lambda: policy_loss(x, ids, mask, adv, ref_logps=ref, config=CFG).loss), CFG,
                  None),
        "fused_inplace": (inplace, CFG, "gradient written into (a copy of) the logits"),
        "trl_eager": (lambda: with_grad(x, lambda: eager_loss(*trl_eager_logps_entropy(x, ids))), CFG, None),
    }  # fmt: skip
    if triton_peers and trl_available():
        table["trl_kernel"] = (lambda: with_grad(x, lambda: eager_loss(*trl_kernel_logps_entropy(x, ids, mask))),
                               CFG, None)  # fmt: skip
    if triton_peers and liger_available():
        table["liger"] = (liger, without_entropy_bonus(CFG), "no entropy term; gradient written into its logits")
    return table


def parity(exact: LogitsReference, out, semantics) -> dict:
    errs = exact.parity(out[0], out[1], semantics)
    return {**errs, "parity_ok": errs["rel_err_loss"] <= TOL_LOSS and errs["rel_err_grad"] <= TOL_GRAD}


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    device = "cuda" if on_cuda() else "cpu"
    triton_peers = on_cuda() or interpreted()
    print_skipped_peers(triton_peers)
    fl = floors(args.quick)
    results = Results("policy_loss", resume=args.resume, config=CFG.__dict__, floors=fl,
                      tolerance={"loss": TOL_LOSS, "grad": TOL_GRAD})  # fmt: skip
    for V, tokens, pad in QUICK if args.quick else SWEEP:
        x, ids, mask, adv, ref = make_inputs(V, tokens, pad, device, 16 if args.quick else 1024)
        live = int(mask.sum())
        floor = bytes_floor_ms(2 * live * V * x.element_size(), fl)
        exact = LogitsReference(x, ids, mask, adv, ref_logps=ref)
        for name, (make, semantics, note) in methods(x, ids, mask, adv, ref, triton_peers).items():
            if not wanted(args, name):
                continue

            key = dict(method=name, V=V, tokens=tokens, pad=pad, live_tokens=live, dtype="bf16")
            results.run(key, make, quick=args.quick, check=partial(parity, exact, semantics=semantics),
                        floor_ms=floor, limit_s=METHOD_LIMIT_S, note=note)  # fmt: skip
        del x, exact
        free_memory()
    print(f"wrote {results.path}")


if __name__ == "__main__":
    main()
