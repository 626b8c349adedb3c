"""Policy loss from logits: forward + backward of bf16 logits [B, T, V], ours vs the ways TRL and Liger do it.

Loss: DAPO with a k3 KL term (beta 0.04) and an entropy bonus (entropy_coef 0.01), sequences of 1,024 tokens, the
last 0% or 25% of each sequence padded; reference and old log-probs drawn near the policy's own (reference.py:
the KL term and the clipping at their training size). Sweep (fits the GPU check's budget on one H100):
V = 151,936 and 32,000 x 16k and 32k tokens x 0% and 25% padding.

Methods:
  fused                     papo_kernels.policy_loss, gradient into a new buffer
  fused_inplace             the same with inplace_grad=True (on a copy of the logits; its later repetitions read
                            the previous gradient as logits: the same traffic)
  fused_inplace_no_entropy  in place with the entropy bonus off: Liger's semantics, the like-for-like row
  split, split_inplace_no_entropy
                            the same two with the split-row kernel (loss/split.py, PAPO_ROW_KERNEL=split: a row over
                            K programs that meet at a barrier, one read), beside the row kernel's rows
  trl_kernel                TRL 1.16's Triton selective_log_softmax_and_entropy (padded rows skipped) + the eager loss
  trl_eager                 TRL 1.16's torch branches (per-row log_softmax, entropy in chunks of 128 rows) + the
                            eager loss
  liger                     Liger-Kernel's triton_grpo_loss, in place (no entropy term: compared with the loss
                            without the bonus; skipped with a note when liger_kernel is not installed)
The eager loss is papo_kernels.loss.loss_from_logps, tested equal to TRL's _compute_loss.

Parity: every method's loss and logits gradient against the exact loss of the same bf16 logits (fp64, row
chunks; benchmarks/reference.py). Tolerance for parity_ok: 1e-3 on the loss, 1e-2 on the gradient (bf16 output).
policy_loss_terms.json (parity only, V = 151,936, 4k tokens, 25% padding) repeats the check where each term is
all there is (policy gradient, KL, entropy bonus): a method that dropped a term fails there.
Floor: one read and one write of the live rows of the logits, and the zeros written to the gradient of the
padded rows, at the measured copy rate (a two-pass design: the gradient of a row is written from an L2-resident
second read); the datasheet rate gives fraction_of_peak. Every row also records GPU and wall time (median, min,
max), kernel time, kernels, copies, host syncs, peak memory (see harness.py).

    python benchmarks/bench_policy_loss.py            # the sweep (GPU)
    python benchmarks/bench_policy_loss.py --quick    # tiny shapes, any device (CI smoke test)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from harness import Results, arg_parser, floors, free_memory, interpreted, on_cuda, wanted
from peers import (
    liger_available,
    liger_grpo_loss,
    print_skipped_peers,
    trl_available,
    trl_eager_logps_entropy,
    trl_kernel_logps_entropy,
)
from reference import LogitsReference, LossInputs, near_policy, term_rows, without_entropy_bonus

from papo_kernels import PolicyLossConfig, policy_loss
from papo_kernels.loss import launch, loss_from_logps

CFG = PolicyLossConfig(loss_type="dapo", beta=0.04, entropy_coef=0.01)
SWEEP = [(V, tokens, pad) for V in (151936, 32000) for tokens in (16384, 32768) for pad in (0.0, 0.25)]
QUICK = [(256, 32, 0.25)]
TERMS_SHAPE, SEQ, QUICK_SEQ = (151936, 4096, 0.25), 1024, 16
TERM_METHODS = ("fused", "fused_inplace", "split", "trl_kernel", "trl_eager", "liger")
TOL_LOSS, TOL_GRAD = 1e-3, 1e-2
METHOD_LIMIT_S = 60


@dataclass
class Inputs(LossInputs):
    x: torch.Tensor  # logits [B, T, V], bf16, a leaf

    def exact(self) -> LogitsReference:
        return LogitsReference(self.x, self.ids, self.mask, self.adv, **self.loss_kwargs())


def make_inputs(V: int, tokens: int, pad: float, device: str, seq: int) -> Inputs:
    T = min(seq, tokens)
    B = tokens // T
    g = torch.Generator(device=device).manual_seed(tokens + V)
    x = (torch.randn(B, T, V, device=device, generator=g, dtype=torch.bfloat16) * 2).requires_grad_()
    ids = torch.randint(0, V, (B, T), device=device, generator=g)
    mask = torch.ones(B, T, device=device, dtype=torch.int64)
    mask[:, T - int(T * pad) :] = 0
    adv = torch.randn(B, device=device, generator=g)
    flat = x.detach().view(-1, V)
    ref, old = near_policy(lambda rows: flat[rows], ids, CFG.temperature, g)
    return Inputs(ids=ids, mask=mask, adv=adv, ref=ref, old=old, x=x)


def methods(inp: Inputs, config: PolicyLossConfig, triton_peers: bool) -> dict:
    """name -> (factory of a fwd+bwd callable returning (loss, dlogits), the semantics it computes, note)."""
    x, ids, mask, adv = inp.x, inp.ids, inp.mask, inp.adv
    no_entropy = without_entropy_bonus(config)

    def eager_loss(logps, entropy):
        return loss_from_logps(logps, entropy, mask, adv, **inp.loss_kwargs(), config=config).loss

    def with_grad(leaf, loss_fn):
        def run():
            loss = loss_fn()
            return loss, torch.autograd.grad(loss, leaf)[0]

        return run

    def ours(cfg: PolicyLossConfig, inplace: bool, kernel: str = "rows"):
        def make():
            leaf = x.detach().clone().requires_grad_() if inplace else x

            def loss():
                launch.ROW_KERNEL, saved = kernel, launch.ROW_KERNEL
                try:
                    return policy_loss(leaf, ids, mask, adv, **inp.loss_kwargs(), config=cfg, inplace_grad=inplace).loss
                finally:
                    launch.ROW_KERNEL = saved

            return with_grad(leaf, loss)

        return make

    def liger():
        full = torch.cat([x.detach(), x.detach()[:, -1:]], 1).requires_grad_()  # Liger drops the last position
        loss = liger_grpo_loss(config)

        def run():
            value = loss(full, ids, mask, adv, inp.ref, inp.old)
            return value, torch.autograd.grad(value, full)[0][:, :-1]

        return run

    table = {
        "fused": (ours(config, False), config, None),
        "fused_inplace": (ours(config, True), config, "gradient written into (a copy of) the logits"),
        "fused_inplace_no_entropy": (ours(no_entropy, True), no_entropy, "in place, no entropy bonus: as Liger"),
        "split": (ours(config, False, "split"), config, "the split-row kernel"),
        "split_inplace_no_entropy": (ours(no_entropy, True, "split"), no_entropy, "the split-row kernel, as Liger"),
        "trl_eager": (lambda: with_grad(x, lambda: eager_loss(*trl_eager_logps_entropy(x, ids))), config, None),
    }
    if triton_peers and trl_available():
        table["trl_kernel"] = (lambda: with_grad(x, lambda: eager_loss(*trl_kernel_logps_entropy(x, ids, mask))),
                               config, None)  # fmt: skip
    if triton_peers and liger_available():
        table["liger"] = (liger, no_entropy, "in place, no entropy term (bonus and metric)")
    return table


def parity(exact: LogitsReference, out, semantics: PolicyLossConfig) -> dict:
    """The benchmark's parity check: a method's loss and logits gradient against the exact ones of ``semantics``."""
    errs = exact.parity(out[0], out[1], semantics)
    return {**errs, "parity_ok": errs["rel_err_loss"] <= TOL_LOSS and errs["rel_err_grad"] <= TOL_GRAD}


def padded_floor_bytes(inp: Inputs) -> int:
    """One read and one write of every live row, and the zeros written to the gradient of every padded row."""
    live, V = int(inp.mask.sum()), inp.x.shape[-1]
    return (2 * live + (inp.mask.numel() - live)) * V * inp.x.element_size()


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    device = "cuda" if on_cuda() else "cpu"
    triton_peers = on_cuda() or interpreted()
    print_skipped_peers(triton_peers)
    fl = floors(args.quick)
    results = Results("policy_loss", resume=args.resume, config=CFG.__dict__, floors=fl,
                      tolerance={"loss": TOL_LOSS, "grad": TOL_GRAD})  # fmt: skip
    for V, tokens, pad in QUICK if args.quick else SWEEP:
        inp = make_inputs(V, tokens, pad, device, QUICK_SEQ if args.quick else SEQ)
        work = dict(nbytes=padded_floor_bytes(inp))
        exact = inp.exact()
        for name, (make, semantics, note) in methods(inp, CFG, triton_peers).items():
            if not wanted(args, name):
                continue
            key = dict(method=name, V=V, tokens=tokens, pad=pad, live_tokens=int(inp.mask.sum()), dtype="bf16")
            results.run(key, make, check=partial(parity, exact, semantics=semantics), work=work,
                        limit_s=METHOD_LIMIT_S, note=note)  # fmt: skip
        del inp, exact
        free_memory()
    print(f"wrote {results.path}")
    V, tokens, pad = QUICK[0] if args.quick else TERMS_SHAPE
    terms = Results("policy_loss_terms", resume=args.resume, config=CFG.__dict__, tolerance=results.data["tolerance"])
    term_rows(terms, make_inputs(V, tokens, pad, device, QUICK_SEQ if args.quick else SEQ), CFG,
              partial(methods, triton_peers=triton_peers), lambda inp: partial(parity, inp.exact()),
              tuple(m for m in TERM_METHODS if wanted(args, m)), dict(V=V, tokens=tokens, pad=pad, dtype="bf16"),
              METHOD_LIMIT_S)  # fmt: skip
    print(f"wrote {terms.path}")


if __name__ == "__main__":
    main()
