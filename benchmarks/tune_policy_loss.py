"""Launch settings of the policy-loss row kernel on this GPU: vocabulary block, warps and programs, side by side.

For each configuration of ``bench_policy_loss.py`` (DAPO + k3 KL + entropy bonus, bf16), times forward + backward
of ``policy_loss`` (out of place and in place) under each candidate ``(block, warps, programs)`` and Liger's
``triton_grpo_loss`` as the reference, and prints the fraction of the two-pass floor (one read and one write of the
live rows and the zeros of the padded rows, at the measured copy rate). A tuning aid, outside the GPU check: one
do_bench median a row, no parity; the README quotes none of its figures. Programs: ``l2`` is the library's rule
(rows in flight within a share of the L2 so the second read of a row hits it), ``smK`` K programs per SM, ``rows``
one program per row.

    python benchmarks/tune_policy_loss.py [--out results.json] [--V 151936 32000]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from benchmarks.bench_policy_loss import CFG, make_inputs, padded_floor_bytes  # noqa: E402
from benchmarks.peers import liger_available, liger_grpo_loss  # noqa: E402
from benchmarks.reference import without_entropy_bonus  # noqa: E402
from papo_kernels import policy_loss  # noqa: E402
from papo_kernels.loss import launch  # noqa: E402

CANDIDATES = [  # (block, warps, programs); one warp sums per block, wider tiles per lane
    (8192, 16, "l2"), (16384, 16, "l2"), (4096, 8, "sm2"), (4096, 4, "rows"), (2048, 2, "rows"), (2048, 1, "rows"),
    (1024, 1, "rows"),
]  # fmt: skip


def use(block: int, warps: int, policy: str) -> None:
    """Route the library's launches through one candidate setting."""
    default_programs = launch.programs.__wrapped__ if hasattr(launch.programs, "__wrapped__") else launch.programs

    def programs(x, n_rows, w, reuse_bytes=0):
        if policy == "l2":
            return default_programs(x, n_rows, w, reuse_bytes)
        if policy == "rows":
            return n_rows
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return max(1, min(n_rows, sms * int(policy[2:])))

    programs.__wrapped__ = default_programs
    launch.tile = lambda V: (min(block, max(16, 1 << (int(V) - 1).bit_length())), warps)
    launch.programs = programs


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=60)


def time_ours(leaf, inplace: bool, inp) -> float:
    def run():
        out = policy_loss(leaf, inp.ids, inp.mask, inp.adv, **inp.loss_kwargs(), config=CFG, inplace_grad=inplace)
        return torch.autograd.grad(out.loss, leaf)

    return bench(run)


def time_liger(inp) -> float:
    full = torch.cat([inp.x.detach(), inp.x.detach()[:, -1:]], 1).requires_grad_()  # Liger drops the last position
    loss = liger_grpo_loss(without_entropy_bonus(CFG))
    return bench(lambda: torch.autograd.grad(loss(full, inp.ids, inp.mask, inp.adv, inp.ref, inp.old), full))


def copy_rate() -> float:
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / (bench(lambda: b.copy_(a)) * 1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--V", type=int, nargs="+", default=[151936, 32000])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rate = copy_rate()
    rows = []
    for V in args.V:
        for pad in (0.0, 0.25):
            inp = make_inputs(V, args.tokens, pad, "cuda", 1024)
            x, y = inp.x, inp.x.detach().clone().requires_grad_()
            floor_ms = padded_floor_bytes(inp) / rate * 1e3
            liger_ms = time_liger(inp) if liger_available() else None
            rows.append(dict(V=V, pad=pad, method="liger", ms=liger_ms, floor_ms=floor_ms))
            print(f"V={V} pad={pad} liger {liger_ms} ms, two-pass floor {floor_ms:.3f} ms", flush=True)
            for block, warps, policy in CANDIDATES:
                use(block, warps, policy)
                for name, leaf, inplace in (("fused", x, False), ("fused_inplace", y, True)):
                    try:
                        ms, status = time_ours(leaf, inplace, inp), "ok"
                    except Exception as e:  # a candidate that does not compile or fit is a row, not a stop
                        ms, status = float("nan"), f"{type(e).__name__}: {str(e)[:120]}"
                    vs = liger_ms / ms if liger_ms else float("nan")
                    row = dict(V=V, pad=pad, method=name, block=block, warps=warps, programs=policy, ms=ms,
                               floor_ms=floor_ms, fraction=floor_ms / ms, vs_liger=vs, status=status)  # fmt: skip
                    rows.append(row)
                    print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            del inp, x, y
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
