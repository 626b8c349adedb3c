"""Write the Markdown benchmark report, its plots and the headline table from the result files (runs nothing).

    python benchmarks/report.py                    # every GPU folder of results/ -> results/REPORT.md + plots
    python benchmarks/report.py --device cpu --out benchmarks/results/cpu/REPORT.md   # a CPU smoke run's files
    python benchmarks/report.py --readme           # also rewrite the README's performance table (newest GPU run)

Results come from benchmarks/gpu_check.py (or a single bench_*.py): results/<device>/<benchmark>.json, each with
the environment, the floors and flat ``rows`` (config keys, ``method``, ``status`` and the measured fields that
harness.py documents). The report adds ``ratio_to_fused`` (a row's GPU time over ours at the same config), one
PNG per benchmark and split (results/<device>/plots/) and HEADLINE.md, the table the README quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = Path(os.environ.get("PAPO_BENCH_RESULTS") or HERE / "results")
README = HERE.parent / "README.md"
OURS = ("fused", "papo_fused", "papo_packed")
METRICS = ("gpu_ms", "wall_ms", "peak_mib", "fraction_of_floor")
# benchmark -> (x axis, keys that split the plots)
PLOTS = {"policy_loss": ("tokens", ("V", "pad")), "fused_linear": ("tokens", ("head",)),
         "advantages": ("N", ("estimator", "G")), "trainer_step": ("tokens", ("lengths",))}  # fmt: skip
LEAD = ("estimator", "head", "V", "D", "N", "G", "tokens", "pad", "method", "status")
MEASURED = ("gpu_ms", "wall_ms", "ratio_to_fused", "fraction_of_floor", "kernels", "copies", "d2h", "syncs",
            "peak_mib", "parity_ok")  # fmt: skip
COLUMNS = {"ours": OURS, "Liger": ("liger",), "TRL kernel path": ("trl_kernel", "trl_chunked", "trl_default"),
           "TRL eager": ("trl_eager", "eager")}  # fmt: skip
# (benchmark, config, label, {column: config overrides for that column's row})
HEADLINES = [
    ("policy_loss", dict(V=151936, tokens=16384, pad=0.25), "loss from logits, V=151,936, 16k tok, 25% pad", {}),
    ("policy_loss", dict(V=151936, tokens=16384, pad=0.0), "same, no padding", {}),
    ("policy_loss", dict(V=151936, tokens=32768, pad=0.25), "loss from logits, V=151,936, 32k tok, 25% pad", {}),
    ("policy_loss", dict(V=32000, tokens=16384, pad=0.0), "loss from logits, V=32,000, 16k tok, no padding", {}),
    ("fused_linear", dict(head="qwen2.5-7b", tokens=16384), "fused linear, Qwen2.5-7B head, 16k tok", {}),
    ("fused_linear", dict(head="qwen2.5-0.5b", tokens=16384), "fused linear, Qwen2.5-0.5B head, 16k tok", {}),
    ("advantages", dict(estimator="papo", N=65536, G=8), "`papo_advantages`, N=65,536, G=8, one call",
     {"TRL eager": dict(estimator="grpo")}),
    ("trainer_step", dict(tokens=16384), "training step, Qwen2.5-0.5B config, 16k tok", {}),
]  # fmt: skip


def load(folder: Path) -> dict[str, dict]:
    """benchmark name -> result file content, for one device folder (floors and env files left out)."""
    out = {}
    for f in sorted(folder.glob("*.json")):
        data = json.loads(f.read_text())
        for row in data.get("rows", []):
            if row.get("status") == "running":  # the stage's time limit or a fatal error ended the process here
                row["status"] = "killed: the process ended during this measurement"
        if data.get("rows"):
            out[data.get("benchmark", f.stem)] = data
    return out


def config_of(row: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in row.items() if k in LEAD and k not in ("method", "status")))


def add_ratios(rows: list[dict]) -> None:
    ours = {config_of(r): r["gpu_ms"] for r in rows if r.get("method") in OURS and r.get("gpu_ms")}
    for r in rows:
        base = ours.get(config_of(r))
        r["ratio_to_fused"] = r["gpu_ms"] / base if base and r.get("gpu_ms") else None


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def table(rows: list[dict]) -> str:
    keys = [k for k in LEAD if any(k in r for r in rows)]
    keys += [k for k in MEASURED if any(r.get(k) is not None for r in rows)]
    keys += sorted({k for r in rows for k in r} - set(keys) - {"note"})
    keys += ["note"] if any("note" in r for r in rows) else []
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)).replace("|", "/") for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def plot(name: str, rows: list[dict], out: Path) -> list[str]:
    """One PNG per split of ``rows``: a panel per metric, a line per method; only rows that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, split = PLOTS.get(name, ("tokens", ()))
    ran = [r for r in rows if r.get("gpu_ms") is not None and x in r]
    metrics = [m for m in METRICS if any(r.get(m) is not None for r in ran)]
    groups = defaultdict(list)
    for r in ran:
        groups[tuple((k, r.get(k)) for k in split)].append(r)
    images = []
    out.mkdir(parents=True, exist_ok=True)
    for facet, frows in sorted(groups.items(), key=str):
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
        for ax, metric in zip(axes[0], metrics, strict=True):
            by_method = defaultdict(list)
            for r in frows:
                if r.get(metric) is not None:
                    by_method[r["method"]].append((r[x], r[metric]))
            for method, pts in sorted(by_method.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
            ax.set_xscale("log", base=2)
            if metric in ("gpu_ms", "wall_ms", "peak_mib"):
                ax.set_yscale("log")
            ax.set_xlabel(x)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(" ".join([name, *(f"{k}={v}" for k, v in facet)]), fontsize=9)
        fig.tight_layout()
        fname = re.sub(r"[^A-Za-z0-9_.=-]", "_", "-".join([name, *(f"{k}{v}" for k, v in facet)])) + ".png"
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)
        images.append(fname)
    return images


def _time(ms: float) -> str:
    return f"{ms:.3g} ms" if ms >= 1 else f"{ms * 1e3:.3g} us"


def cell(row: dict | None, ours: bool) -> str:
    if row is None:
        return "-"
    status = str(row.get("status", ""))
    if row.get("gpu_ms") is None:
        return status.split(":")[0] or "-"
    text = _time(row["gpu_ms"])
    if row.get("wall_ms") and row["wall_ms"] > 1.5 * row["gpu_ms"]:
        text += f" (wall {_time(row['wall_ms'])})"
    if ours and row.get("fraction_of_floor") is not None:
        text += f", {row['fraction_of_floor']:.2f} of floor"
    if status == "recompiles":
        text += f", recompiles ({row.get('recompiles')} graphs)"
    if row.get("parity_ok") is False:
        text += " \u2020"
    return text


def headline(results: dict[str, dict]) -> str:
    """The README's table: GPU time per fwd+bwd call (wall time where much larger), ours with its floor fraction."""
    out = ["| measure (bf16, fwd+bwd) | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for bench, config, label, overrides in HEADLINES:
        rows = results.get(bench, {}).get("rows", [])
        if not rows:
            continue
        cells = []
        for column, methods in COLUMNS.items():
            want = {**config, **overrides.get(column, {})}
            match = [r for r in rows if r.get("method") in methods and all(r.get(k) == v for k, v in want.items())]
            text = cell(match[0] if match else None, column == "ours")
            cells.append(text + (f" ({want['estimator'].upper()} formula)" if column in overrides and match else ""))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def provenance(env: dict) -> str:
    return (f"{env.get('device')}, driver {env.get('driver', '-')}, torch {env.get('torch')}, Triton "
            f"{env.get('triton')}, trl {env.get('trl')}, liger-kernel {env.get('liger-kernel')}, commit "
            f"{env.get('commit')}, {str(env.get('time', ''))[:10]}")  # fmt: skip


def device_section(folder: Path, report_dir: Path) -> list[str]:
    results = load(folder)
    env = next((d["env"] for d in results.values()), {})
    lines = [f"## {env.get('device', folder.name)}", "", f"Measured on {provenance(env)}.", ""]
    check = folder / "gpu_check.json"
    if check.exists():
        summary = json.loads(check.read_text())
        stages = ", ".join(f"{s['stage']} {s.get('status', 'ok')} ({s.get('seconds', 0):.0f} s)"
                           for s in summary["stages"])  # fmt: skip
        lines += [f"GPU check: {summary['total_s']:.0f} s of a {summary['budget_s']:.0f} s budget; {stages}. "
                  f"CUDA tests: {summary.get('tests')}.", ""]  # fmt: skip
    floors = next((d["floors"] for d in results.values() if d.get("floors")), None)
    if floors:
        lines += [f"Floors: copy {floors['copy_gbs']:.0f} GB/s (read + write), {floors['matmul_dtype']} matmul "
                  f"{floors['matmul_tflops']:.0f} TFLOP/s.", ""]  # fmt: skip
    head = headline(results)
    (folder / "HEADLINE.md").write_text(f"Measured on {provenance(env)}.\n\n{head}\n")
    lines += ["### Headline", "", head, "", "\u2020 outside the parity tolerance (see the tables).", ""]
    for name, data in results.items():
        rows = data["rows"]
        add_ratios(rows)
        lines += [f"### {name}", ""]
        for key in ("config", "tolerance", "parameters", "model"):
            if key in data:
                lines += [f"{key}: `{json.dumps(data[key])}`", ""]
        images = plot(name, rows, folder / "plots")
        rel = os.path.relpath(folder / "plots", report_dir)
        lines += [f"![{img}]({rel}/{img})" for img in images] + ["", table(rows), ""]
    return lines


def write_report(folders: list[Path], out: Path) -> Path:
    lines = ["# Benchmark report", "", "Generated by `benchmarks/report.py` from the result files beside it. Times "
             "are medians of `triton.testing.do_bench` (GPU) per forward + backward call; see `benchmarks/harness.py` "
             "for every column.", ""]  # fmt: skip
    if not folders:
        lines.append("No results yet: run `bash benchmarks/gpu_check.sh` on a CUDA GPU.")
    for folder in folders:
        lines += device_section(folder, out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


def gpu_folders() -> list[Path]:
    return sorted(f for f in RESULTS.iterdir() if f.is_dir() and f.name != "cpu" and not f.name.startswith("."))


def measured_at(folder: Path) -> str:
    env = folder / "env.json"
    return json.loads(env.read_text()).get("time", "") if env.exists() else ""


def update_readme(folder: Path, readme: Path | None = None) -> None:
    """Replace the table between the README's performance markers with ``folder``'s headline."""
    readme = readme or README
    start, end = "<!-- performance:start -->", "<!-- performance:end -->"
    text = readme.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} ... {end} markers")
    body = (folder / "HEADLINE.md").read_text().strip()
    readme.write_text(text[: text.index(start) + len(start)] + "\n" + body + "\n" + text[text.index(end) :])


def main(argv: list[str] | None = None) -> None:
    first, _, rest = __doc__.partition("\n")
    p = argparse.ArgumentParser(description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", nargs="+", metavar="SLUG", help="device folders of results/ (default: every GPU one)")
    p.add_argument("--out", type=Path, default=RESULTS / "REPORT.md", help="the report's path")
    p.add_argument("--readme", action="store_true", help="rewrite the README's performance table (newest folder)")
    args = p.parse_args(argv)
    folders = [RESULTS / d for d in args.device] if args.device else gpu_folders()
    print(f"wrote {write_report(folders, args.out)}")
    for folder in folders:
        if (folder / "HEADLINE.md").exists():
            print(f"\n{folder.name}:\n{(folder / 'HEADLINE.md').read_text()}")
    if args.readme and folders:
        newest = max(folders, key=measured_at)
        update_readme(newest)
        print(f"updated the README's performance table from {newest.name}")


if __name__ == "__main__":
    main()
