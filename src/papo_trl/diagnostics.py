"""PAPO's training diagnostics, computed on the gathered batch (identical on every process).

Keys (averaged over the logging window by TRL's ``log``):

* ``papo/advantage/{mean,std}``, ``papo/A_out/{mean,std}``, ``papo/A_proc/{mean,std}`` over the responses;
* ``papo/process_active_ratio``: fraction of groups whose ``A_proc`` is non-zero;
* ``papo/zero_advantage_frac``: fraction of responses with advantage exactly 0 (no learning signal);
* ``papo/correct_frac`` and ``papo/adv_{correct,incorrect}/{mean,min}``;
* the learning signal by group (:func:`signal_metrics`): ``papo/zero_advantage_group_frac``,
  ``papo/all_correct_group_frac``, ``papo/all_incorrect_group_frac`` and ``papo/process_accuracy_corr``;
* ``process_rewards/<name>/{mean,std}`` over the scored responses, ``process_rewards/scored_frac`` (of all
  responses) and ``process_rewards/scored_frac_correct`` (of the correct ones);
* reward-function counters (a judge's ``stats()``): see :func:`reward_func_counters`.
"""

from __future__ import annotations

import inspect
import math

import torch

from .estimators import Advantages

NAN = float("nan")
# where the learning signal is (the PAPO paper's measure: the responses whose advantage is 0 teach nothing)
SIGNAL_KEYS = (
    "papo/zero_advantage_frac", "papo/zero_advantage_group_frac", "papo/all_correct_group_frac",
    "papo/all_incorrect_group_frac", "papo/process_active_ratio", "papo/process_accuracy_corr",
)  # fmt: skip
INTENSIVE = ("latency", "mean", "seconds", "rate", "ratio", "frac", "size", "avg")


def _mean_std(x: torch.Tensor) -> tuple[float, float]:
    if x.numel() == 0:
        return NAN, NAN
    x = x.double()
    return x.mean().item(), (x.std().item() if x.numel() > 1 else NAN)


def advantage_metrics(adv: Advantages, correct: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, float]:
    """Diagnostics of the advantages of the rows in `valid` (all rows when ``None``)."""
    keep = torch.ones_like(correct) if valid is None else valid
    total, correct = adv.total[keep], correct[keep]
    m = {}
    m["papo/advantage/mean"], m["papo/advantage/std"] = _mean_std(total)
    if adv.outcome is not None:
        m["papo/A_out/mean"], m["papo/A_out/std"] = _mean_std(adv.outcome[keep])
        m["papo/A_proc/mean"], m["papo/A_proc/std"] = _mean_std(adv.process[keep])
        G = keep.numel() // adv.process_active.numel()
        group_keep = keep.view(-1, G).all(dim=1)
        active = adv.process_active[group_keep]
        m["papo/process_active_ratio"] = active.float().mean().item() if active.numel() else NAN
    m["papo/zero_advantage_frac"] = (total == 0).float().mean().item() if total.numel() else NAN
    m["papo/correct_frac"] = correct.float().mean().item() if correct.numel() else NAN
    for name, sel in (("correct", correct), ("incorrect", ~correct)):
        values = total[sel]
        m[f"papo/adv_{name}/mean"] = values.mean().item() if values.numel() else NAN
        m[f"papo/adv_{name}/min"] = values.min().item() if values.numel() else NAN
    return m


def _group_frac(flags: torch.Tensor) -> float:
    return flags.float().mean().item() if flags.numel() else NAN


def process_accuracy_corr(process: torch.Tensor, correct: torch.Tensor) -> float:
    """Pearson correlation ``r = cov(p, c) / (std(p) std(c))`` between the process score ``p`` and correctness
    ``c`` in {0, 1} (the point-biserial correlation), over the responses with a process score (NaN = not scored),
    in float64. NaN where it is undefined: fewer than two scored responses, or ``p`` or ``c`` constant over them -
    in particular when only correct responses are scored (``process_reward_on_correct_only=True``)."""
    scored = ~torch.isnan(process)
    p, c = process[scored].double(), correct[scored].double()
    if p.numel() < 2:
        return NAN
    p, c = p - p.mean(), c - c.mean()
    denominator = (p.square().sum() * c.square().sum()).sqrt()
    return (p * c).sum().div(denominator).item() if denominator > 0 else NAN


def signal_metrics(
    total: torch.Tensor,
    correct: torch.Tensor,
    G: int,
    valid: torch.Tensor | None = None,
    process: torch.Tensor | None = None,
) -> dict[str, float]:
    """Where the batch's learning signal is, over the groups of ``G`` rows in `valid` (all when ``None``):

    * ``papo/zero_advantage_group_frac``: groups whose every advantage ``total`` is exactly 0;
    * ``papo/all_correct_group_frac`` / ``papo/all_incorrect_group_frac``: groups whose responses are all correct /
      all incorrect (under GRPO on a binary outcome these are exactly the zero-advantage groups; PAPO's ``A_proc``
      gives all-correct groups a signal where their process scores differ);
    * ``papo/process_accuracy_corr`` (with `process[N]`, the combined process score, NaN = not scored): see
      :func:`process_accuracy_corr`, over the valid rows.
    """
    keep = torch.ones_like(correct) if valid is None else valid
    groups = keep.view(-1, G).all(dim=1)
    zero, right = (total == 0).view(-1, G)[groups], correct.view(-1, G)[groups]
    m = {
        "papo/zero_advantage_group_frac": _group_frac(zero.all(dim=1)),
        "papo/all_correct_group_frac": _group_frac(right.all(dim=1)),
        "papo/all_incorrect_group_frac": _group_frac(~right.any(dim=1)),
    }
    if process is not None:
        m["papo/process_accuracy_corr"] = process_accuracy_corr(process[keep], correct[keep])
    return m


def process_metrics(process: torch.Tensor, names: list[str], correct: torch.Tensor) -> dict[str, float]:
    """Statistics of the process rewards ``[N, P]`` (NaN = not scored) over the scored responses."""
    m = {}
    for j, name in enumerate(names):
        scored = process[:, j][~torch.isnan(process[:, j])]
        m[f"process_rewards/{name}/mean"], m[f"process_rewards/{name}/std"] = _mean_std(scored)
    any_scored = ~torch.isnan(process).all(dim=1)
    m["process_rewards/scored_frac"] = any_scored.float().mean().item() if any_scored.numel() else NAN
    m["process_rewards/scored_frac_correct"] = any_scored[correct].float().mean().item() if correct.any() else NAN
    return m


def _read_counters(func) -> dict | None:
    stats = getattr(func, "stats", None)
    if callable(stats):
        takes_reset = "reset" in inspect.signature(stats).parameters
        return stats(reset=True) if takes_reset else stats()
    counters = getattr(func, "counters", None)
    counters = counters() if callable(counters) else counters
    return counters if isinstance(counters, dict) else None


def _flatten(prefix: str, counters: dict) -> dict[str, float]:
    out = {}
    for key, value in counters.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flatten(name, value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def reward_func_counters(funcs, names, accelerator) -> dict[str, float]:
    """Counters of the reward functions that expose them (``stats(reset=True)``, ``stats()`` or ``counters``).

    Top-level keys without a ``/`` are prefixed with the function's name; nested dicts are flattened. Over
    processes, counts are summed and intensive values (latencies, means, rates, sizes) averaged, NaN-aware. Every
    process must call this (it gathers).
    """
    local = {}
    for func, name in zip(funcs, names, strict=True):
        counters = _read_counters(func)
        if counters:
            named = {(str(k) if "/" in str(k) else f"{name}/{k}"): v for k, v in counters.items()}
            local.update(_flatten("", named))
    if not local:
        return {}
    keys = sorted(local)
    values = torch.tensor([local[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    gathered = accelerator.gather(values[None]).view(-1, len(keys))
    out = {}
    for j, key in enumerate(keys):
        column = gathered[:, j]
        intensive = any(tok in key.rsplit("/", 1)[-1] for tok in INTENSIVE)
        value = column.nanmean() if intensive else column.nansum()
        out[key] = value.item() if not (intensive and torch.isnan(column).all()) else math.nan
    return out
