"""Group advantages (PAPO, GRPO, GDPO): one call of ours vs the torch reference and the eager code RL frameworks run.

Sweep (fits the GPU check's budget): N = 1,024, 65,536 and 262,144 responses x G = 8 and 16; three reward
columns for GRPO/GDPO (one with 1% NaN), outcome/process/correct for PAPO.

Methods:
  fused            the public call as a trainer makes it (argument checks; value checks carried in a flag, no sync)
  fused_validated  the same with validate=True: the value-error flag read at once (one host sync)
  torch_reference  papo_kernels.advantages.naive (the specification), with the public functions' defaults
  trl_eager        TRL 1.16's sum_then_normalize (GRPO) / normalize_then_sum (GDPO), as written in GRPOTrainer
  official_loop    PAPO as its official code computes it (verl's per-prompt Python loop, twice: a transcription,
                   see official_papo_loop), N = 1,024 only
Like for like: our GRPO call against TRL's GRPO formula, our PAPO call against the official loop.

Each row records, besides the GPU time (which, for a call this small, is mostly the host's launch time while the
GPU waits), kernel_ms: the device time of the call's own kernels (profiler; 10 calls, 2 of the loop), beside the
wall time per call. Parity: each result against the torch reference on fp64 copies of the inputs (norm-relative;
parity_ok under 1e-5). Floor: reading the inputs and writing every output once at the measured copy rate; at these
sizes a call is bound by launches and host syncs, which the kernels/copies/syncs columns and wall_ms show.

    python benchmarks/bench_advantages.py            # the sweep (GPU)
    python benchmarks/bench_advantages.py --quick    # tiny shapes, any device (CI smoke test)
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from functools import partial

import torch
from harness import Results, arg_parser, floors, on_cuda, rel_err, tensor_bytes, wanted
from peers import trl_normalize_then_sum, trl_sum_then_normalize

from papo_kernels import gdpo_advantages, grpo_advantages, papo_advantages
from papo_kernels.advantages import GRPO_EPS, PAPO_EPS
from papo_kernels.advantages.naive import naive_gdpo_advantages, naive_grpo_advantages, naive_papo_advantages

SWEEP = [(N, G) for N in (1024, 65536, 262144) for G in (8, 16)]
QUICK = [(64, 8)]
TOL = 1e-5
# a row's timing (at least 10 samples, up to 20 ms for fast calls) and profiled calls (2 for the slow loop)
BUDGET_MS, KERNEL_SAMPLES, LOOP_KERNEL_SAMPLES = 20.0, 10, 2
LOOP_MAX_N = 1024
# the references, called as the public functions are called by default
PAPO_DEFAULTS = dict(lambda_process=1.0, eps=PAPO_EPS, scale_by_std=True, process_norm="correct")
reference_papo = partial(naive_papo_advantages, **PAPO_DEFAULTS)
reference_grpo = partial(naive_grpo_advantages, weights=None, scale="group", eps=GRPO_EPS)
reference_gdpo = partial(naive_gdpo_advantages, weights=None, eps=GRPO_EPS)


def official_papo_loop(outcome, process, correct, G: int, lambda_process: float = 1.0, eps: float = PAPO_EPS):
    """PAPO's advantages as its official code computes them. A transcription from the method's description (the
    official repository builds on verl; DESIGN.md's semantics), not a copy of that code: verl's per-prompt loop
    (``compute_grpo_outcome_advantage``: scores gathered in a dict by prompt index, a mean and std per prompt, then
    one scalar update per response), run over every response's outcome score (``A_out``) and over the correct
    responses' process scores (``A_proc``); a prompt with fewer than two scores or ``std <= eps`` gets 0, and
    ``A_total = A_out + lambda_process * A_proc``."""
    index = [i // G for i in range(outcome.shape[0])]

    def normalized(scores, members):
        id2score = defaultdict(list)
        for i in members:
            id2score[index[i]].append(scores[i])
        id2stats = {}
        for idx, group in id2score.items():
            if len(group) > 1:
                stacked = torch.stack(group)
                mean, std = torch.mean(stacked), torch.std(stacked)
                id2stats[idx] = (mean, std) if std > eps else None
        adv = torch.zeros_like(scores)
        for i in members:
            if id2stats.get(index[i]) is not None:
                mean, std = id2stats[index[i]]
                adv[i] = (scores[i] - mean) / (std + eps)
        return adv

    everyone = range(outcome.shape[0])
    return normalized(outcome, everyone) + lambda_process * normalized(process, [i for i in everyone if correct[i]])


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
    if o.shape[0] <= LOOP_MAX_N:
        papo["official_loop"] = lambda: official_papo_loop(o, p, c, G)
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
                results.run(key, lambda fn=fn: fn, check=check, work=dict(nbytes=moved), budget_ms=BUDGET_MS,
                            kernel_samples=LOOP_KERNEL_SAMPLES if name == "official_loop" else KERNEL_SAMPLES,
                            limit_s=60)  # fmt: skip
    print(f"wrote {results.path}")


if __name__ == "__main__":
    main()
