"""Group advantages (PAPO, GRPO, GDPO): one call of ours vs the torch reference and the eager code RL frameworks run.

Sweep (fits the GPU check's budget): N = 1,024, 65,536 and 262,144 responses x G = 8 and 16; three reward
columns for GRPO/GDPO (one with 1% NaN), outcome/process/correct for PAPO.

Methods:
  fused            the public call as a trainer makes it (argument checks; value checks carried in a flag, no sync)
  fused_validated  the same with validate=True: the value-error flag read at once (one host sync)
  torch_reference  papo_kernels.advantages.naive (the specification), with the public functions' defaults
  trl_eager        TRL 1.16's sum_then_normalize (GRPO) / normalize_then_sum (GDPO), as written in GRPOTrainer
  verl_loop        verl's per-group Python loop (which PAPO's official code builds on), N = 1,024 only

Parity: each result against the torch reference on fp64 copies of the inputs (norm-relative; parity_ok under
1e-5). Floor: reading the inputs and writing every output once at the measured copy rate; at these sizes a
call is bound by launches and host syncs, which the kernels/copies/syncs columns and wall_ms show.

    python benchmarks/bench_advantages.py            # the sweep (GPU)
    python benchmarks/bench_advantages.py --quick    # tiny shapes, any device (CI smoke test)
"""

from __future__ import annotations

import inspect
from functools import partial

import torch
from harness import Results, arg_parser, bytes_floor_ms, floors, on_cuda, rel_err, tensor_bytes, wanted
from peers import trl_normalize_then_sum, trl_sum_then_normalize

from papo_kernels import gdpo_advantages, grpo_advantages, papo_advantages
from papo_kernels.advantages import GRPO_EPS, PAPO_EPS
from papo_kernels.advantages.naive import naive_gdpo_advantages, naive_grpo_advantages, naive_papo_advantages

SWEEP = [(N, G) for N in (1024, 65536, 262144) for G in (8, 16)]
QUICK = [(64, 8)]
TOL = 1e-5
VERL_MAX_N = 1024
# the references, called as the public functions are called by default
PAPO_DEFAULTS = dict(lambda_process=1.0, eps=PAPO_EPS, scale_by_std=True, process_norm="correct")
reference_papo = partial(naive_papo_advantages, **PAPO_DEFAULTS)
reference_grpo = partial(naive_grpo_advantages, weights=None, scale="group", eps=GRPO_EPS)
reference_gdpo = partial(naive_gdpo_advantages, weights=None, eps=GRPO_EPS)


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


def make_inputs(N: int, G: int, device: str):
    g = torch.Generator(device="cpu").manual_seed(N + G)
    outcome = (torch.rand(N, generator=g) < 0.4).float()
    process = torch.rand(N, generator=g).round(decimals=1)
    rewards = torch.stack([outcome, process, torch.rand(N, generator=g)], dim=1)
    rewards[torch.rand(N, generator=g) < 0.01, 1] = float("nan")
    return [t.to(device) for t in (outcome, process, outcome > 0, rewards)]


def cases(o, p, c, r, G: int) -> dict:
    """estimator -> (inputs, fp64 reference advantages, {method: callable})."""
    checked = "validate" in inspect.signature(papo_advantages).parameters
    nv = {"validate": True} if checked else None
    papo = {"fused": lambda: papo_advantages(o, p, c, G),
            "torch_reference": lambda: reference_papo(o, p, c, G)}  # fmt: skip
    grpo = {"fused": lambda: grpo_advantages(r, G), "trl_eager": lambda: trl_sum_then_normalize(r, G),
            "torch_reference": lambda: reference_grpo(r, G)}  # fmt: skip
    gdpo = {"fused": lambda: gdpo_advantages(r, G), "trl_eager": lambda: trl_normalize_then_sum(r, G),
            "torch_reference": lambda: reference_gdpo(r, G)}  # fmt: skip
    if nv:
        papo["fused_validated"] = lambda: papo_advantages(o, p, c, G, **nv)
        grpo["fused_validated"] = lambda: grpo_advantages(r, G, **nv)
        gdpo["fused_validated"] = lambda: gdpo_advantages(r, G, **nv)
    if o.shape[0] <= VERL_MAX_N:
        papo["verl_loop"] = lambda: verl_loop(o, p, c, G)
    d = lambda t: t.double()  # noqa: E731
    return {
        "papo": ((o, p, c), reference_papo(d(o), d(p), c, G).total, papo),
        "grpo": ((r,), reference_grpo(d(r), G).advantages, grpo),
        "gdpo": ((r,), reference_gdpo(d(r), G).advantages, gdpo),
    }


def main_output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.total if hasattr(out, "total") else out.advantages


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    device = "cuda" if on_cuda() else "cpu"
    fl = floors(args.quick)
    results = Results("advantages", resume=args.resume, floors=fl, tolerance=TOL)
    for N, G in QUICK if args.quick else SWEEP:
        o, p, c, r = make_inputs(N, G, device)
        for estimator, (inputs, exact, methods) in cases(o, p, c, r, G).items():
            moved = tensor_bytes(inputs) + tensor_bytes(methods["fused"]())
            for name, fn in methods.items():
                if not wanted(args, name):
                    continue

                def check(out, exact=exact):
                    err = rel_err(main_output(out), exact)
                    return {"rel_err": err, "parity_ok": err <= TOL}

                key = dict(estimator=estimator, method=name, N=N, G=G)
                results.run(key, lambda fn=fn: fn, quick=args.quick, check=check, rep=20,
                            floor_ms=bytes_floor_ms(moved, fl), limit_s=60)  # fmt: skip
    print(f"wrote {results.path}")


if __name__ == "__main__":
    main()
