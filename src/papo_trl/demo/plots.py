"""Training curves of the demo (matplotlib, Agg backend): one line per method, 2 x 2 panels."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import OUTCOME_KEY

PANELS = (
    ("held_out", "accuracy", "held-out accuracy (greedy)"),
    ("held_out", "process_score", "held-out process score (step checker)"),
    ("train", OUTCOME_KEY, "train outcome reward (moving average)"),
    ("train", "completions/mean_length", "train completion length (tokens)"),
)


def _label(source: str, label: str, held_out_problems: dict | None) -> str:
    """A held-out panel's title names its evaluation subset (``{"curve": n, "total": N}``)."""
    if source != "held_out" or not held_out_problems:
        return label
    n, total = held_out_problems["curve"], held_out_problems["total"]
    return f"{label}\n{n} of the {total} held-out problems" if n < total else f"{label}, {n} problems"


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` points (NaN-free input)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(curves: dict[str, dict], path: str, title: str = "", held_out_problems: dict | None = None) -> None:
    """``curves[method] = {"train": [log rows], "held_out": [eval rows]}``, every row holding a ``step``;
    ``held_out_problems = {"curve": n, "total": N}`` names the evaluation subset of the held-out panels."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (source, key, label) in zip(axes.flat, PANELS, strict=True):
        label = _label(source, label, held_out_problems)
        for method, curve in curves.items():
            rows = [r for r in curve[source] if r.get(key) is not None and r[key] == r[key]]
            steps, values = [r["step"] for r in rows], [r[key] for r in rows]
            if source == "train":
                values = moving_average(values, window=max(1, len(values) // 20))
            ax.plot(steps, values, marker="o" if source == "held_out" else None, ms=3, label=method)
        _finish_panel(ax, label)
    _save(fig, path, title, dpi=110)


def _finish_panel(ax, label: str) -> None:
    ax.set_title(label, fontsize=10)
    ax.set_xlabel("RL step")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)


def _save(fig, path: str, title: str, dpi: int) -> None:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


SPREAD_PANELS = (
    ("held_out", "accuracy", "held-out accuracy (greedy)"),
    ("held_out", "process_score", "held-out process score (step checker)"),
    ("train", "papo/zero_advantage_frac", "responses with zero advantage (train)"),
    ("train", "papo/process_active_ratio", "groups where A_proc is active (train)"),
    ("train", OUTCOME_KEY, "accuracy of the sampled responses (train)"),
    ("train", "papo/all_correct_group_frac", "all-correct groups (train)"),
    ("train", "papo/all_incorrect_group_frac", "all-incorrect groups (train)"),
    ("train", "papo/process_accuracy_corr", "corr(process score, correct) (train)"),
)


def band(
    runs: list[dict], source: str, key: str, smooth: int = 10
) -> tuple[list[int], list[float], list[float], list[float]]:
    """``(steps, mean, min, max)`` over ``runs`` (one ``{"train": rows, "held_out": rows}`` per seed) of ``key`` in
    each run's ``source`` rows, at the steps where every run has a finite value; train rows are first smoothed
    per run by a trailing moving average over ``1 / smooth`` of its points."""
    per_run = []
    for run in runs:
        rows = [r for r in run[source] if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
        values = [r[key] for r in rows]
        if source == "train":
            values = moving_average(values, window=max(1, len(values) // smooth))
        per_run.append(dict(zip((r["step"] for r in rows), values, strict=True)))
    steps = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    columns = [[p[s] for p in per_run] for s in steps]
    return steps, [sum(c) / len(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns]


def plot_spread(
    curves: dict[str, list[dict]], path: str, title: str = "", held_out_problems: dict | None = None
) -> None:
    """``curves[method]`` = one ``{"seed", "train", "held_out"}`` per seed: the mean over seeds as a line, the
    min-max range over seeds shaded, 2 x 4 panels (held-out accuracy and process score, the learning signal)."""
    fig, axes = plt.subplots(2, 4, figsize=(17, 7.4))
    for ax, (source, key, label) in zip(axes.flat, SPREAD_PANELS, strict=True):
        label = _label(source, label, held_out_problems)
        for i, (method, runs) in enumerate(curves.items()):
            steps, mean, low, high = band(runs, source, key)
            if not steps:  # a diagnostic the method does not have
                continue
            color = f"C{i}"
            ax.plot(steps, mean, color=color, marker="o" if source == "held_out" else None, ms=3, label=method)
            if len(runs) > 1:
                ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
        _finish_panel(ax, label)
    _save(fig, path, title, dpi=80)
