"""``papo-train demo --compare [--seeds 0 1 2]``: GRPO, PAPO and PRM-only from one SFT warm start per seed.

On each seed the three runs share the data, the warm-started weights and every hyper-parameter; only the
advantages differ (see :mod:`.run`). PRM-only trains on the step-checker score alone: it can raise the process
score while the answers do not get more correct - the reward hacking that PAPO's decoupled advantages avoid.
Over several seeds the summary gives, per method, the mean and the min-max range of the held-out accuracy and
process score and of the learning-signal diagnostics (:mod:`.aggregate`), the plot shades the range
(:func:`.plots.plot_spread`) and a table is printed (:mod:`.table`).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, replace

import torch

from .aggregate import SPREAD, aggregate_runs, spread
from .model import build_model
from .plots import plot_spread
from .run import METHODS, QUICK, evaluate, prepare, profile_for, train_rl, write_outputs
from .table import print_table, write_markdown_table

__all__ = ["COMPARE_RL_STEPS", "COMPARE_THREADS", "compare_profile", "run_compare"]

# RL steps of each compared run (the single run trains 250): held-out accuracy is mostly learnt within 100 steps,
# and nine runs (three methods on three seeds) then fit in 15 minutes on 2 CPU cores
COMPARE_RL_STEPS = 150
# torch threads of each compared run unless asked otherwise: the tiny model gains little from a second thread, and
# two threads slow down several-fold on a 2-core machine as soon as another process takes a core
COMPARE_THREADS = 1


def compare_profile(quick: bool):
    """The quick profile, or the full one with ``COMPARE_RL_STEPS`` RL steps per run."""
    profile = profile_for(quick)
    return profile if profile is QUICK else replace(profile, rl_steps=COMPARE_RL_STEPS)


def run_compare(
    seed: int = 0,
    quick: bool = False,
    output_dir: str = "papo_demo_compare",
    methods: tuple[str, ...] = ("grpo", "papo", "prm_only"),
    num_threads: int | None = None,
    seeds: list[int] | None = None,
) -> dict:
    """Train every method in ``methods`` on every seed of ``seeds`` (default: ``[seed]``), each seed from its own
    warm start, with ``num_threads`` torch threads (default ``COMPARE_THREADS``); write ``summary.json``,
    ``curves.png`` and ``table.md`` and print the table."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {', '.join(METHODS)}, got {methods!r}")
    seeds = [seed] if not seeds else list(seeds)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    profile = compare_profile(quick)
    os.makedirs(output_dir, exist_ok=True)
    start = time.perf_counter()
    num_threads, threads_before = num_threads or COMPARE_THREADS, torch.get_num_threads()
    try:
        per_seed = [_compare_one_seed(profile, s, methods, output_dir, num_threads) for s in seeds]
    finally:
        torch.set_num_threads(threads_before)
    curves = {m: [{"seed": r["seed"], **r["curves"][m]} for r in per_seed] for m in methods}
    for r in per_seed:
        del r["curves"]
    summary = {
        "seeds": seeds, "quick": profile is QUICK, "methods": list(methods), "spread": SPREAD,
        "profile": asdict(profile), "num_threads": num_threads,
        "before": {key: spread([r["before"][key] for r in per_seed]) for key in ("accuracy", "process_score")},
        "runs": aggregate_runs(per_seed, methods), "per_seed": per_seed,
        "seconds": {"total": time.perf_counter() - start}, "curves": curves,
        "held_out_problems": per_seed[0]["held_out_problems"],
    }  # fmt: skip
    write_outputs(summary, output_dir, plot_spread)
    write_markdown_table(summary, os.path.join(output_dir, "table.md"))
    print_table(summary)
    return summary


def _compare_one_seed(profile, seed: int, methods, output_dir: str, num_threads: int | None) -> dict:
    """SFT warm start on ``seed``, then each method from it; per method the final held-out metrics, the
    diagnostics summary, the curves, the RL time and any non-finite values."""
    data, tokenizer, warm, sft_seconds = prepare(profile, seed, output_dir, num_threads)
    max_len = profile.max_completion_length
    before = evaluate(warm, tokenizer, data["eval"], max_len, desc="held-out eval (warm start)")
    print(f"[compare] seed {seed}, warm start: held-out accuracy {before['accuracy']:.3f}, "
          f"process score {before['process_score']:.3f}", flush=True)  # fmt: skip
    # a fresh model per method, loaded with the warm-start weights (a deep copy would keep the SFT trainer's
    # forward wrappers, which still point at the original module)
    warm_state = {name: tensor.detach().clone() for name, tensor in warm.state_dict().items()}
    runs, curves = {}, {}
    for method in methods:
        model = build_model(tokenizer, profile.model, seed=seed)
        model.load_state_dict(warm_state)
        run = train_rl(model, tokenizer, data, method, profile, seed, output_dir)
        after = evaluate(model, tokenizer, data["eval"], max_len, desc=f"held-out eval ({method})")
        zero = run["diagnostics"]["papo/zero_advantage_frac"]["mean"]
        print(f"[compare] seed {seed}, {method}: held-out accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}"
              f", process score {before['process_score']:.3f} -> {after['process_score']:.3f}, zero-advantage share "
              f"{'n/a' if zero is None else f'{zero:.3f}'}", flush=True)  # fmt: skip
        runs[method] = {"after": after, "improvement": after["accuracy"] - before["accuracy"],
                        "diagnostics": run["diagnostics"], "rl_seconds": run["rl_seconds"],
                        "non_finite": run["non_finite"]}  # fmt: skip
        curves[method] = {"train": run["train"], "held_out": run["held_out"]}
    return {"seed": seed, "before": before, "sft_seconds": sft_seconds, "runs": runs, "curves": curves,
            "held_out_problems": run["held_out_problems"]}  # fmt: skip
