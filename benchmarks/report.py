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
LEAD = ("estimator", "case", "head", "V", "D", "N", "G", "tokens", "pad", "method", "status")
MEASURED = ("gpu_ms", "gpu_ms_min", "gpu_ms_max", "gpu_samples", "wall_ms", "wall_ms_min", "wall_ms_max",
            "wall_samples", "kernel_ms", "ratio_to_fused", "fraction_of_floor", "fraction_of_peak", "kernels",
            "copies", "d2h", "syncs", "peak_mib", "parity_ok")  # fmt: skip
# the split of a training step's time (bench_trainer_step.py)
PROFILE = ("attention", "mlp", "lm_head_loss", "optimizer", "other", "gaps", "window")
# pairs of rows compared in the headline: (ours, peer, what the peer is); like for like where the names say so
LOGITS = [("fused_inplace_no_entropy", "liger", "Liger, both in place without the entropy bonus"),
          ("split_inplace_no_entropy", "liger", "Liger, both in place without the entropy bonus (ours: split rows)"),
          ("split", "fused", "our row kernel (ours: the split-row kernel)"),
          ("fused", "trl_kernel", "TRL's kernel path + eager loss")]  # fmt: skip
LOGITS_ALL = [*LOGITS[:3], ("fused_inplace", "liger", "Liger in place (ours in place, with the entropy bonus)"),
              LOGITS[3], ("fused", "trl_eager", "TRL's eager path")]  # fmt: skip
LINEAR = [("fused", "trl_chunked", "TRL's chunked path + eager loss"),
          ("fused_no_entropy", "liger", "Liger's fused linear GRPO loss, both without the entropy bonus"),
          ("fused_no_entropy", "cce", "Cut Cross-Entropy log-probs + eager loss, both without the bonus")]  # fmt: skip
STEP = [
    ("papo_packed", "trl_default", "TRL's default GRPOTrainer path (ours: packed)"),
    ("papo_padded", "trl_default", "TRL's default GRPOTrainer path (ours: padded)"),
    ("papo_fused", "trl_default", "TRL's default GRPOTrainer path (ours: padded, runs before padding_free)"),
]
# (benchmark, config, label, pairs)
HEADLINES = [
    ("policy_loss", dict(V=151936, tokens=16384, pad=0.25), "loss from logits, V=151,936, 16k tok, 25% pad",
     LOGITS_ALL),
    ("policy_loss", dict(V=151936, tokens=16384, pad=0.0), "same, no padding", LOGITS),
    ("policy_loss", dict(V=151936, tokens=32768, pad=0.25), "loss from logits, V=151,936, 32k tok, 25% pad", LOGITS),
    ("policy_loss", dict(V=32000, tokens=16384, pad=0.0), "loss from logits, V=32,000, 16k tok, no padding", LOGITS),
    ("fused_linear", dict(head="qwen2.5-7b", tokens=16384), "fused linear, Qwen2.5-7B head, 16k tok", LINEAR),
    ("fused_linear", dict(head="qwen2.5-0.5b", tokens=16384), "fused linear, Qwen2.5-0.5B head, 16k tok", LINEAR),
    ("advantages", dict(estimator="grpo", N=65536, G=8), "`grpo_advantages`, N=65,536, G=8, one call",
     [("fused", "trl_eager", "TRL's GRPO formula (sum_then_normalize)")]),
    ("advantages", dict(estimator="papo", N=1024, G=8), "`papo_advantages`, N=1,024, G=8, one call",
     [("fused", "official_loop", "the official PAPO code's per-prompt loop (transcribed)")]),
    ("trainer_step", dict(tokens=4096), "training step, Qwen2.5-0.5B config, 4k tok, no padding", STEP),
    ("trainer_step", dict(tokens=16384, lengths="heavy_tail"),
     "training step, Qwen2.5-0.5B config, 16k tok, heavy-tailed lengths", STEP),
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


def timing(row: dict | None, field: str = "gpu_ms") -> str:
    """``median [min-max] (n)`` of a measured field; ``median (median only)`` for a row that recorded no spread;
    the status of a row that did not run; ``-`` for no row."""
    if row is None:
        return "-"
    if row.get(field) is None:
        return "-" if row.get("gpu_ms") is not None else str(row.get("status", "")).split(":")[0] or "-"
    samples = row.get(f"{field.removesuffix('_ms')}_samples")
    if row.get(f"{field}_min") is None:
        return f"{_time(row[field])} (median only)"
    return f"{_time(row[field])} [{_time(row[f'{field}_min'])}-{_time(row[f'{field}_max'])}] (n={samples})"


def ratio(ours: dict | None, peer: dict | None) -> tuple[float, float | None, float | None] | None:
    """``peer / ours`` GPU time from the medians, with the range the spreads allow (peer min over ours max to peer
    max over ours min); None where either did not run. Above 1: ours is faster."""
    if not ours or not peer or not ours.get("gpu_ms") or not peer.get("gpu_ms"):
        return None
    mid = peer["gpu_ms"] / ours["gpu_ms"]
    if ours.get("gpu_ms_min") is None or peer.get("gpu_ms_min") is None:
        return mid, None, None
    return mid, peer["gpu_ms_min"] / ours["gpu_ms_max"], peer["gpu_ms_max"] / ours["gpu_ms_min"]


def ratio_text(r: tuple | None) -> str:
    if r is None:
        return "-"
    return f"{r[0]:.2f} (medians only)" if r[1] is None else f"{r[0]:.2f} [{r[1]:.2f}-{r[2]:.2f}]"


def floor_text(row: dict | None) -> str:
    if not row or row.get("fraction_of_floor") is None:
        return "-"
    peak = row.get("fraction_of_peak")
    return f"{row['fraction_of_floor']:.2f}" + (f", {peak:.2f}" if peak is not None else "")


def dagger(row: dict | None) -> str:
    return " \u2020" if row is not None and row.get("parity_ok") is False else ""


def find(rows: list[dict], method: str, config: dict) -> dict | None:
    match = [r for r in rows if r.get("method") == method and all(r.get(k) == v for k, v in config.items())]
    return match[0] if match else None


HEADLINE_COLUMNS = ("measure", "ours", "peer", "ours: GPU time", "peer: GPU time", "peer \u00f7 ours", "ours: wall",
                    "peer: wall", "ours: own kernels", "ours: of floor, of peak")  # fmt: skip


def headline(results: dict[str, dict]) -> tuple[str, list[str]]:
    """The README's table (a line per pair of ours and a peer at one configuration: times as median [min-max] (n),
    the ratio from the medians with the range the spreads allow) and the lines that say where a peer is faster."""
    out = ["| " + " | ".join(HEADLINE_COLUMNS) + " |", "|" + "---|" * len(HEADLINE_COLUMNS)]
    wins = []
    for bench, config, label, pairs in HEADLINES:
        rows = results.get(bench, {}).get("rows", [])
        if not rows:
            continue
        for ours_method, peer_method, peer_label in pairs:
            ours, peer = find(rows, ours_method, config), find(rows, peer_method, config)
            r = ratio(ours, peer)
            cells = [label, f"`{ours_method}`{dagger(ours)}", f"{peer_label}{dagger(peer)}", timing(ours),
                     timing(peer), ratio_text(r), timing(ours, "wall_ms"), timing(peer, "wall_ms"),
                     timing(ours, "kernel_ms"), floor_text(ours)]  # fmt: skip
            out.append("| " + " | ".join(cells) + " |")
            if r is not None and r[0] < 1:
                beyond = r[2] is not None and r[2] < 1
                wins.append(f"{peer_label} is faster than `{ours_method}` on {label}: {_time(peer['gpu_ms'])} against "
                            f"{_time(ours['gpu_ms'])} (GPU medians{', every sample' if beyond else ''}).")  # fmt: skip
    return "\n".join(out), wins


def provenance(env: dict) -> str:
    return (f"{env.get('device')}, driver {env.get('driver', '-')}, torch {env.get('torch')}, Triton "
            f"{env.get('triton')}, trl {env.get('trl')}, liger-kernel {env.get('liger-kernel')}, "
            f"cut-cross-entropy {env.get('cut-cross-entropy', '-')}, commit {env.get('commit')}, "
            f"{str(env.get('time', ''))[:10]}")  # fmt: skip


def cuda_tests(folder: Path) -> list[str]:
    """The CUDA suite's result from gpu_check.json and the failed tests' ids (or that the run did not record them)."""
    check = folder / "gpu_check.json"
    if not check.exists():
        return ["CUDA tests: no gpu_check.json in this folder."]
    summary = json.loads(check.read_text())
    if summary.get("tests") is None:
        return ["CUDA tests: not run (no CUDA, or the stage was skipped)."]
    lines = [f"CUDA tests (`pytest tests/kernels` on this GPU): {summary['tests']}."]
    failed = summary.get("failed_tests")
    if failed is None and re.search(r"\d+ (failed|error)", summary["tests"]):
        lines.append("The ids of the failed tests were not recorded by this run.")
    lines += [f"- `{line[:300]}`" for line in failed or []]
    return lines


def floors_text(floors: dict) -> str:
    text = f"Floors: copy {floors['copy_gbs']:.0f} GB/s (read + write), {floors['matmul_dtype']} matmul "
    if "matmuls" not in floors:  # an older run: one square GEMM, and no zeros of the padded rows in the logits floor
        return (text + f"{floors['matmul_tflops']:.0f} TFLOP/s from one square GEMM (n = {floors.get('matmul_n')}). "
                "These floors predate the benchmarks' own GEMM shapes and the padded rows' zeros: the fractions of "
                "the floor in this run are too high.")  # fmt: skip
    best, peak = " x ".join(map(str, floors["matmul_best"])), floors.get("peak")
    text += f"{floors['matmul_tflops']:.0f} TFLOP/s (the best of {len(floors['matmuls'])} GEMMs: M, N, K = {best})"
    return text + (f"; datasheet {peak['hbm_tbs']} TB/s, {peak['bf16_tflops']:.0f} TFLOP/s." if peak else ".")


def profile_table(rows: list[dict]) -> str:
    """Where a training step's time goes: each category's median [min-max] over the profiled steps."""
    rows = [r for r in rows if r.get("profile_samples")]
    if not rows:
        return ""
    head = ["method", "tokens", "steps", *PROFILE]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], str(r.get("tokens")), str(r["profile_samples"])]
        cells += [f"{r[f'{c}_ms']:.3g} [{r[f'{c}_ms_min']:.3g}-{r[f'{c}_ms_max']:.3g}]" for c in PROFILE]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_section(folder: Path, report_dir: Path) -> list[str]:
    results = load(folder)
    env = next((d["env"] for d in results.values()), {})
    lines = [f"## {env.get('device', folder.name)}", "", f"Measured on {provenance(env)}.", ""]
    check = folder / "gpu_check.json"
    if check.exists():
        summary = json.loads(check.read_text())
        stages = ", ".join(f"{s['stage']} {s.get('status', 'ok')} ({s.get('seconds', 0):.0f} s)"
                           for s in summary["stages"])  # fmt: skip
        lines += [f"GPU check: {summary['total_s']:.0f} s of a {summary['budget_s']:.0f} s budget; {stages}.", ""]
    floors = next((d["floors"] for d in results.values() if d.get("floors")), None)
    head, wins = headline(results)
    text = [f"Measured on {provenance(env)}.", "", *cuda_tests(folder), "",
            *([floors_text(floors), ""] if floors else []), head, "",
            "Times: median [min-max] (n samples) of GPU time per call (forward + backward, bf16), and of wall time per "
            "call; own kernels: the device time of the call's kernels alone (profiler). peer \u00f7 ours: from the "
            "medians, in brackets the range the spreads allow (above 1: ours is faster). Floor and peak: the same "
            "work at the measured copy or matmul rate and at the datasheet's. \u2020 outside the parity tolerance.",
            ""]  # fmt: skip
    text += ["Where a peer is faster:", "", *[f"- {w}" for w in wins], ""] if wins else []
    (folder / "HEADLINE.md").write_text("\n".join(text))
    lines += ["### Headline", "", *text[2:]]
    for name, data in results.items():
        rows = data["rows"]
        add_ratios(rows)
        lines += [f"### {name}", ""]
        for key in ("config", "tolerance", "parameters", "model"):
            if key in data:
                lines += [f"{key}: `{json.dumps(data[key])}`", ""]
        if profile_table(rows):
            lines += ["Where a step's time goes (ms, median [min-max] over the profiled steps):", "",
                      profile_table(rows), ""]  # fmt: skip
        images = plot(name, rows, folder / "plots")
        rel = os.path.relpath(folder / "plots", report_dir)
        lines += [f"![{img}]({rel}/{img})" for img in images] + ["", table(rows), ""]
    return lines


def write_report(folders: list[Path], out: Path) -> Path:
    lines = ["# Benchmark report", "", "Generated by `benchmarks/report.py` from the result files beside it. Times "
             "per forward + backward call: the median, min and max over at least 10 samples, or 1 s of samples (GPU "
             "time between CUDA events, L2 flushed; wall time; the device time of the call's own kernels); runs before "
             "that rule recorded a median only. See `benchmarks/harness.py` for every column.", ""]  # fmt: skip
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
