"""Training curves of the demo (matplotlib, Agg backend): one line per method, 2 x 2 panels."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .run import OUTCOME_KEY

PANELS = (
    ("held_out", "accuracy", "held-out accuracy (greedy)"),
    ("held_out", "process_score", "held-out process score (step checker)"),
    ("train", OUTCOME_KEY, "train outcome reward (moving average)"),
    ("train", "completions/mean_length", "train completion length (tokens)"),
)


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
        if source == "held_out" and held_out_problems:
            n, total = held_out_problems["curve"], held_out_problems["total"]
            label = f"{label}\n{n} of the {total} held-out problems" if n < total else f"{label}, {n} problems"
        for method, curve in curves.items():
            rows = [r for r in curve[source] if r.get(key) is not None and r[key] == r[key]]
            steps, values = [r["step"] for r in rows], [r[key] for r in rows]
            if source == "train":
                values = moving_average(values, window=max(1, len(values) // 20))
            ax.plot(steps, values, marker="o" if source == "held_out" else None, ms=3, label=method)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
