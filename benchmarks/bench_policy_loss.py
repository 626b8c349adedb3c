"""Policy loss from logits: forward + backward time and peak memory, fused kernels vs the ways TRL and Liger do it.

Methods (bf16 logits ``[B, T, V]``, DAPO loss with a k3 KL term, on-policy, 25% padding):

* ``fused`` / ``fused_inplace``: ``papo_kernels.policy_loss`` (gradient into a new buffer / into the logits; the
  in-place runs after the others, and its repetitions read the previous gradient as logits: same traffic).
* ``trl_eager``: TRL 1.16's torch path from logits (``selective_log_softmax`` + ``entropy_from_logits`` torch
  branches, row/chunk loops as written) + TRL's loss (``loss_from_logps``, tested equal to ``_compute_loss``).
* ``trl_kernel``: TRL 1.16's Triton ``selective_log_softmax_and_entropy`` + the same eager loss.
* ``liger``: Liger-Kernel's ``triton_grpo_loss`` (skipped with a note when ``liger_kernel`` is absent).

Reported per row: ``ms`` (median fwd+bwd), ``peak_mib`` (above the live logits), ``ratio_to_fused`` (their time
over ours) and, for ``fused``, ``fraction_of_floor``: the bandwidth floor (two reads and one write of the logits at
the measured device-to-device copy rate) over our time, and ``extra_fraction``: memory beyond the logits and
their gradient, as a fraction of the logits' size.

    python benchmarks/bench_policy_loss.py            # full sweep (GPU)
    python benchmarks/bench_policy_loss.py --quick    # smoke test (any device)
"""

from __future__ import annotations

import importlib.util
import inspect
import os

import torch
import torch.nn.functional as F
from harness import (
    arg_parser,
    assert_same_results,
    copy_bandwidth_gbs,
    count_launches,
    peak_memory_mib,
    time_ms,
    write_result,
)

from papo_kernels import PolicyLossConfig, policy_loss
from papo_kernels.loss import loss_from_logps

CFG = PolicyLossConfig(loss_type="dapo", beta=0.04)
ROWS_PER_SEQ = 1024


def trl_eager_logps_entropy(logits: torch.Tensor, ids: torch.Tensor):
    """TRL 1.16 ``selective_log_softmax`` and ``entropy_from_logits``, torch branches (bf16: per-row loop)."""
    rows = zip(logits, ids, strict=True)
    logps = torch.stack([F.log_softmax(row, -1).gather(-1, i.unsqueeze(-1)).squeeze(-1) for row, i in rows])
    ent = []
    for chunk in logits.reshape(-1, logits.shape[-1]).split(128, dim=0):
        lp = F.log_softmax(chunk, dim=-1)
        ent.append(-(torch.exp(lp) * lp).sum(-1))
    return logps, torch.cat(ent).reshape(logits.shape[:-1])


def make_inputs(tokens: int, V: int, device: str):
    T = min(ROWS_PER_SEQ, tokens)
    B = tokens // T
    g = torch.Generator(device=device).manual_seed(tokens + V)
    x = (torch.randn(B, T, V, device=device, generator=g) * 2).to(torch.bfloat16).requires_grad_()
    ids = torch.randint(0, V, (B, T), device=device, generator=g)
    mask = torch.ones(B, T, device=device, dtype=torch.int64)
    mask[:, T - T // 4 :] = 0
    adv = torch.randn(B, device=device, generator=g)
    ref = -torch.rand(B, T, device=device, generator=g) * 5
    return x, ids, mask, adv, ref


def make_methods(x, ids, mask, adv, ref, use_triton_peers: bool) -> dict:
    """Each method: fwd + bwd, returning (loss, dlogits). ``fused_inplace`` comes last: it overwrites ``x``."""

    def eager_loss(logps, entropy):
        return loss_from_logps(logps, entropy, mask, adv, ref_logps=ref, config=CFG).loss

    def with_grad(loss_fn):
        def run():
            loss = loss_fn()
            return loss, torch.autograd.grad(loss, x)[0]

        return run

    methods = {
        "fused": with_grad(lambda: policy_loss(x, ids, mask, adv, ref_logps=ref, config=CFG).loss),
        "trl_eager": with_grad(lambda: eager_loss(*trl_eager_logps_entropy(x, ids))),
    }
    if use_triton_peers:
        from trl.kernels.logprob_entropy import selective_log_softmax_and_entropy

        methods["trl_kernel"] = with_grad(lambda: eager_loss(*selective_log_softmax_and_entropy(x, ids)))
        if importlib.util.find_spec("liger_kernel") is not None:
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss

            # Liger takes the [B, T + 1, V] logits of a causal LM and drops the last position
            full = torch.cat([x.detach(), x.detach()[:, -1:]], 1).requires_grad_()

            kw = dict(temperature=1.0, beta=CFG.beta, eps_low=0.2, eps_high=0.2, inplace=True, loss_type="dapo",
                      reduce=True)  # fmt: skip
            kw = {k: v for k, v in kw.items() if k in inspect.signature(triton_grpo_loss).parameters}

            def liger():
                out = triton_grpo_loss(full, None, ref, ids, adv, mask, **kw)
                loss = out[0] if isinstance(out, tuple) else out
                if loss.dim() > 0:  # older versions return the per-token loss
                    loss = (loss * mask).sum() / mask.sum().clamp(min=1)
                return loss, torch.autograd.grad(loss, full)[0]

            methods["liger"] = liger
    inplace = lambda: policy_loss(x, ids, mask, adv, ref_logps=ref, config=CFG, inplace_grad=True).loss  # noqa: E731
    methods["fused_inplace"] = with_grad(inplace)
    return methods


def check_parity(methods: dict) -> None:
    """Every method gives the same loss and logits gradient as ours before anything is timed."""
    ref_loss, ref_grad = methods["fused"]()
    for name, fn in methods.items():
        if name in ("fused", "fused_inplace", "liger"):  # in place: the buffer is overwritten
            continue
        assert_same_results(name, fn(), (ref_loss, ref_grad))


def main() -> None:
    args = arg_parser(__doc__.splitlines()[0]).parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if args.quick:
        sweep = [(512, 64)]
    else:
        sweep = [(V, n) for V in (151936, 32000) for n in (2048, 4096, 8192, 16384, 32768)]
    if cuda and importlib.util.find_spec("liger_kernel") is None:
        print("note: liger_kernel is not installed; the Liger peer is skipped (pip install liger-kernel)")
    bw = copy_bandwidth_gbs()
    rows = []
    for V, tokens in sweep:
        x, ids, mask, adv, ref = make_inputs(tokens, V, device)
        methods = make_methods(x, ids, mask, adv, ref, use_triton_peers=cuda or interp)
        if tokens == min(n for _, n in sweep):  # parity once per vocabulary, at the smallest batch
            check_parity(methods)
        logits_bytes = x.numel() * x.element_size()
        base = {}
        for name, fn in methods.items():
            try:
                ms = time_ms(fn, quick=args.quick)
                peak = peak_memory_mib(fn)
            except torch.OutOfMemoryError:
                ms, peak = None, None
                torch.cuda.empty_cache()
            row = dict(method=name, V=V, tokens=tokens, dtype="bf16", ms=ms, peak_mib=peak,
                       launches=count_launches(fn) if ms is not None else None)  # fmt: skip
            base[name] = row
            rows.append(row)
        ours = base["fused"]["ms"]
        for row in base.values():
            row["ratio_to_fused"] = None if row["ms"] is None else row["ms"] / ours
        if bw is not None:
            floor_ms = 3 * logits_bytes / (bw * 1e9) * 1e3
            base["fused"]["fraction_of_floor"] = floor_ms / ours
            for key, grad_bytes in (("fused", logits_bytes), ("fused_inplace", 0)):
                if base[key]["peak_mib"] is not None:
                    base[key]["extra_fraction"] = (base[key]["peak_mib"] * 2**20 - grad_bytes) / logits_bytes
        for row in base.values():
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    path = write_result("policy_loss", {"rows": rows, "copy_bandwidth_gbs": bw, "config": CFG.__dict__})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
