"""Mean and spread over seeds: the numbers ``papo-train demo --compare --seeds ...`` reports per method."""

from __future__ import annotations

import math
import statistics

from ..diagnostics import SIGNAL_KEYS

__all__ = ["SPREAD", "aggregate_runs", "finite", "mean", "spread"]

SPREAD = "mean over the seeds, min and max over the seeds (the plot's shaded band), std = sample std (n - 1)"
HELD_OUT_KEYS = ("accuracy", "process_score", "mean_length")


def finite(values) -> list[float]:
    """The finite numbers among `values` (``None``, NaN, inf and non-numbers skipped)."""
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def mean(values: list[float]) -> float | None:
    """The mean, ``None`` for no values."""
    return statistics.fmean(values) if values else None


def spread(values: list[float | None]) -> dict:
    """``mean``, ``min``, ``max``, ``std`` (sample, ``None`` below two values) and ``n`` of the finite entries of
    `values` (``None`` and NaN are skipped; every statistic is ``None`` when none is left), and the ``values``."""
    kept = finite(values)
    std = statistics.stdev(kept) if len(kept) > 1 else None
    return {"mean": mean(kept), "min": min(kept, default=None), "max": max(kept, default=None), "std": std,
            "n": len(kept), "values": list(values)}  # fmt: skip


def aggregate_runs(per_seed: list[dict], methods) -> dict:
    """Per method, the :func:`spread` over seeds of the final held-out ``accuracy``, ``process_score`` and
    ``mean_length``, of the ``improvement`` over the warm start, of each diagnostic's mean over the RL steps
    (``SIGNAL_KEYS``) and of ``rl_seconds``; ``non_finite`` lists every seed's non-finite values."""
    out = {}
    for method in methods:
        runs = [(r["seed"], r["runs"][method]) for r in per_seed]
        agg = {key: spread([run["after"][key] for _, run in runs]) for key in HELD_OUT_KEYS}
        agg["improvement"] = spread([run["improvement"] for _, run in runs])
        for key in SIGNAL_KEYS:
            agg[key] = spread([run["diagnostics"][key]["mean"] for _, run in runs])
        agg["rl_seconds"] = spread([run["rl_seconds"] for _, run in runs])
        agg["non_finite"] = [f"seed {seed}: {item}" for seed, run in runs for item in run["non_finite"]]
        out[method] = agg
    return out
