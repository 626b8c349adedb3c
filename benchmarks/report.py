"""Run every benchmark and write a Markdown report with plots from ``benchmarks/results/``.

    python benchmarks/report.py              # run all bench_*.py, then write results/REPORT.md
    python benchmarks/report.py --no-run     # only rebuild the report from the JSON already there
    python benchmarks/report.py --quick      # smoke: tiny shapes (always so without CUDA; report in results/cpu/)

Each result file holds ``rows``: flat dicts with a ``method``, an x-axis key (``tokens`` or ``N``), metrics
(``ms``, ``us_per_call``, ``peak_mib``, ``requests_per_s`` ...) and other keys that split the plots
(string values such as ``estimator`` or ``dtype``, and ``G``, ``K``, ``V``, ``D``). Every split gets one
PNG with a panel per metric, one line per method.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
X_KEYS = ("tokens", "N", "concurrency")
METRICS = ("ms", "us_per_call", "peak_mib", "requests_per_s", "fraction_of_floor")
NUMERIC_FACETS = ("G", "K", "V", "D")


def run_all(quick: bool) -> None:
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"== {script.name}", flush=True)
        subprocess.run([sys.executable, str(script), *(["--quick"] if quick else [])], check=True, cwd=HERE.parent)


def _split(rows: list[dict]):
    """Group rows by every key that is not the x axis, a metric or the method."""
    x = next((k for k in X_KEYS if k in rows[0]), None)
    metrics = [m for m in METRICS if any(m in r and r[m] is not None for r in rows)]
    facet_keys = sorted(k for k in rows[0] if k != "method" and (isinstance(rows[0][k], str) or k in NUMERIC_FACETS))
    facets = defaultdict(list)
    for r in rows:
        facets[tuple((k, r.get(k)) for k in facet_keys)].append(r)
    return x, metrics, facets


def plot(name: str, rows: list[dict], out: Path) -> list[str]:
    x, metrics, facets = _split(rows)
    images = []
    if x is None or not metrics:
        return images
    for facet, frows in facets.items():
        fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
        for ax, metric in zip(axes[0], metrics, strict=True):
            by_method = defaultdict(list)
            for r in frows:
                if r.get(metric) is not None:
                    by_method[r["method"]].append((r[x], r[metric]))
            for method, pts in sorted(by_method.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
            ax.set_xscale("log", base=2)
            if metric in ("ms", "us_per_call"):
                ax.set_yscale("log")
            ax.set_xlabel(x)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        title = ", ".join(f"{k}={v}" for k, v in facet)
        fig.suptitle(f"{name} {title}".strip(), fontsize=9)
        fig.tight_layout()
        fname = f"{name}-" + ("-".join(f"{k}{v}" for k, v in facet) or "all") + ".png"
        fig.savefig(out / fname.replace("/", "_"), dpi=110)
        plt.close(fig)
        images.append(fname.replace("/", "_"))
    return images


def table(rows: list[dict]) -> str:
    keys = list(rows[0].keys())
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_report(folder: Path) -> Path:
    sections = ["# Benchmark report", ""]
    files = sorted(folder.glob("*.json"))
    if not files:
        sections.append("No results yet: run the benchmarks on a CUDA GPU.")
    for f in files:
        data = json.loads(f.read_text())
        env = data.get("env", {})
        sections += [f"## {data.get('benchmark', f.stem)}", "",
                     f"Device: **{env.get('device')}**, driver {env.get('driver', '-')}, torch {env.get('torch')}, "
                     f"Triton {env.get('triton')}, measured {env.get('time')}.", ""]
        for key in ("floors", "notes", "summary"):
            if key in data:
                sections += [f"{key}: `{json.dumps(data[key])}`", ""]
        rows = data.get("rows", [])
        if rows:
            sections += [f"![{img}]({img})" for img in plot(f.stem, rows, folder)] + ["", table(rows), ""]
    path = folder / "REPORT.md"
    path.write_text("\n".join(sections) + "\n")
    return path


def main() -> None:
    import torch

    args = set(sys.argv[1:])
    quick = "--quick" in args or not torch.cuda.is_available()  # full sweeps are for GPUs
    if "--no-run" not in args:
        run_all(quick)
    folder = HERE / "results" if torch.cuda.is_available() else HERE / "results" / "cpu"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_report(folder)}")


if __name__ == "__main__":
    main()
