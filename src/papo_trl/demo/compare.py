"""``papo-train demo --compare``: GRPO, PAPO and PRM-only from one SFT warm start, on the same seed, side by side.

The three runs share the data, the warm-started weights and every hyper-parameter; only the advantages differ
(see :mod:`.run`). PRM-only trains on the step-checker score alone: it can raise the process score while the
answers do not get more correct - the reward hacking that PAPO's decoupled advantages avoid.
"""

from __future__ import annotations

import os
import time

from .model import build_model
from .plots import plot_curves
from .run import METHODS, QUICK, evaluate, prepare, profile_for, train_rl, write_outputs

__all__ = ["run_compare"]


def run_compare(
    seed: int = 0,
    quick: bool = False,
    output_dir: str = "papo_demo_compare",
    methods: tuple[str, ...] = ("grpo", "papo", "prm_only"),
    num_threads: int | None = None,
) -> dict:
    """Train every method in ``methods`` from the same warm start; write ``summary.json`` and ``curves.png``."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {', '.join(METHODS)}, got {methods!r}")
    profile = profile_for(quick)
    os.makedirs(output_dir, exist_ok=True)
    start = time.perf_counter()
    data, tokenizer, warm, sft_seconds = prepare(profile, seed, output_dir, num_threads)
    max_len = profile.max_completion_length
    before = evaluate(warm, tokenizer, data["eval"], max_len, desc="held-out eval (warm start)")
    print(f"[compare] warm start: held-out accuracy {before['accuracy']:.3f}, "
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
        print(f"[compare] {method}: held-out accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, "
              f"process score {before['process_score']:.3f} -> {after['process_score']:.3f}", flush=True)  # fmt: skip
        runs[method] = {"after": after, "improvement": after["accuracy"] - before["accuracy"],
                        "rl_seconds": run["rl_seconds"], "non_finite": run["non_finite"]}  # fmt: skip
        curves[method] = {"train": run["train"], "held_out": run["held_out"]}
    summary = {
        "seed": seed, "quick": profile is QUICK, "methods": list(methods), "before": before, "runs": runs,
        "seconds": {"sft": sft_seconds, "total": time.perf_counter() - start}, "curves": curves,
        "held_out_problems": run["held_out_problems"],
    }  # fmt: skip
    write_outputs(summary, output_dir, plot_curves)
    return summary
