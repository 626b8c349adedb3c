"""Group advantages: the fused kernel vs the torch reference vs the eager code RL frameworks run.

Peers: ``trl_eager`` is TRL 1.16's ``sum_then_normalize`` / ``normalize_then_sum`` code as written in
``GRPOTrainer._generate_and_score_completions``; ``verl_loop`` is the per-group Python loop of verl's
``compute_grpo_outcome_advantage`` (which PAPO's official code builds on), run for small N only.
Reports microseconds per call and CUDA kernel launches per call.

    python benchmarks/bench_advantages.py            # full sweep (GPU)
    python benchmarks/bench_advantages.py --quick    # smoke test (any device)
"""

from __future__ import annotations

import torch
from harness import arg_parser, count_launches, time_ms, write_result
from peers import trl_normalize_then_sum, trl_sum_then_normalize

from papo_kernels import gdpo_advantages, grpo_advantages, papo_advantages
from papo_kernels.advantages import naive


def verl_loop(outcome: torch.Tensor, process: torch.Tensor, correct: torch.Tensor, G: int, eps: float = 1e-6):
    """verl-style PAPO: Python dicts keyed by prompt, one small torch op per group."""
    scores_out, scores_proc = {}, {}
    for i in range(outcome.shape[0]):
        scores_out.setdefault(i // G, []).append(outcome[i])
        if correct[i]:
            scores_proc.setdefault(i // G, []).append(process[i])
    stats_out = {g: (torch.stack(v).mean(), torch.stack(v).std()) for g, v in scores_out.items()}
    stats_proc = {g: (torch.stack(v).mean(), torch.stack(v).std()) for g, v in scores_proc.items() if len(v) > 1}
    adv = torch.empty_like(outcome)
    for i in range(outcome.shape[0]):
        m, s = stats_out[i // G]
        a = (outcome[i] - m) / (s + eps) if s > eps else outcome[i] * 0
        if correct[i] and i // G in stats_proc:
            pm, ps = stats_proc[i // G]
            a = a + ((process[i] - pm) / (ps + eps) if ps > eps else 0)
        adv[i] = a
    return adv


def check_parity(o, p, c, r, G) -> None:
    """The fused results must equal the peers before any of them is timed."""
    torch.testing.assert_close(grpo_advantages(r, G).advantages, trl_sum_then_normalize(r, G), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gdpo_advantages(r, G).advantages, trl_normalize_then_sum(r, G), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(papo_advantages(o, p, c, G).total, naive.papo_advantages(o, p, c, G).total)


def make_cases(o, p, c, r, G, with_loop: bool) -> dict:
    cases = {
        "papo/fused": lambda: papo_advantages(o, p, c, G, validate=False),
        "papo/torch_reference": lambda: naive.papo_advantages(o, p, c, G),
        "grpo/fused": lambda: grpo_advantages(r, G, validate=False),
        "grpo/torch_reference": lambda: naive.grpo_advantages(r, G),
        "grpo/trl_eager": lambda: trl_sum_then_normalize(r, G),
        "gdpo/fused": lambda: gdpo_advantages(r, G, validate=False),
        "gdpo/torch_reference": lambda: naive.gdpo_advantages(r, G),
        "gdpo/trl_eager": lambda: trl_normalize_then_sum(r, G),
    }
    if with_loop:
        cases["papo/verl_loop"] = lambda: verl_loop(o, p, c, G)
    return cases


def make_inputs(N: int, G: int, device: str):
    g = torch.Generator(device="cpu").manual_seed(N + G)
    outcome = (torch.rand(N, generator=g) < 0.4).float()
    process = torch.rand(N, generator=g).round(decimals=1)
    rewards = torch.stack([outcome, process, torch.rand(N, generator=g)], dim=1)
    rewards[torch.rand(N, generator=g) < 0.01, 1] = float("nan")
    return [t.to(device) for t in (outcome, process, outcome > 0, rewards)]


def main() -> None:
    args = arg_parser(__doc__.splitlines()[0]).parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    Ns = [1024] if args.quick else [1024, 4096, 16384, 65536, 262144]
    Gs = [8] if args.quick else [4, 8, 16, 64]
    rows = []
    for G in Gs:
        for N in Ns:
            o, p, c, r = make_inputs(N, G, device)
            check_parity(o, p, c, r, G)
            cases = make_cases(o, p, c, r, G, with_loop=N <= 4096)
            for name, fn in cases.items():
                est, method = name.split("/")
                us = time_ms(fn, quick=args.quick) * 1e3
                rows.append(dict(estimator=est, method=method, N=N, G=G, us_per_call=us, launches=count_launches(fn)))
                print(f"{est:5s} {method:16s} N={N:7d} G={G:3d} {us:10.1f} us  launches={rows[-1]['launches']}")
    path = write_result("advantages", {"rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
