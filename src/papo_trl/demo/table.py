"""The comparison's final table: printed with ``rich`` and written as Markdown (``table.md``, the README's table).

In Markdown one row per method (and the warm start), each cell the mean over the seeds followed by the min-max
range over them, e.g. ``0.786 [0.702, 0.810]`` (the mean alone with one seed); on the terminal the same table
transposed (one column per method, the range under the mean) to fit 80 columns. Held-out metrics are the final greedy
evaluation; the learning-signal columns are means over the RL steps of the trainer's diagnostics.
"""

from __future__ import annotations

__all__ = ["COLUMNS", "format_cell", "print_table", "table_rows", "write_markdown_table"]

COLUMNS = (
    ("accuracy", "held-out accuracy"),
    ("process_score", "held-out process score"),
    ("papo/zero_advantage_frac", "zero-advantage responses"),
    ("papo/zero_advantage_group_frac", "zero-advantage groups"),
    ("papo/all_correct_group_frac", "all-correct groups"),
    ("papo/all_incorrect_group_frac", "all-incorrect groups"),
    ("papo/process_active_ratio", "A_proc active groups"),
    ("papo/process_accuracy_corr", "corr(process, correct)"),
)


def format_cell(stats: dict | None, two_lines: bool = False) -> str:
    """``mean [min, max]`` to three decimals (to two, under the mean, with `two_lines`), the mean alone for one
    value, ``-`` when there is none."""
    if not stats or stats["mean"] is None:
        return "-"
    if stats["n"] < 2:
        return f"{stats['mean']:.3f}"
    if two_lines:
        return f"{stats['mean']:.3f}\n[{stats['min']:.2f}, {stats['max']:.2f}]"
    return f"{stats['mean']:.3f} [{stats['min']:.3f}, {stats['max']:.3f}]"


def table_rows(summary: dict, two_lines: bool = False) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of the comparison summary: the warm start, then one row per method."""
    header = ["run"] + [label for _, label in COLUMNS]
    warm = ["warm start"] + [format_cell(summary["before"].get(key), two_lines) for key, _ in COLUMNS]
    rows = [[method] + [format_cell(summary["runs"][method].get(key), two_lines) for key, _ in COLUMNS]
            for method in summary["methods"]]  # fmt: skip
    return header, [warm, *rows]


def _caption(summary: dict) -> str:
    seeds = summary["seeds"]
    stats = "mean [min, max] over seeds" if len(seeds) > 1 else "seed"
    return f"demo --compare: {stats} {', '.join(map(str, seeds))}; {summary['seconds']['total'] / 60:.1f} min"


def print_table(summary: dict) -> None:
    """Print the table to the terminal with ``rich``, one column per run."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    header, rows = table_rows(summary, two_lines=True)
    columns = list(zip(header, *rows, strict=True))  # transposed: one row per metric
    table = Table(title=escape(_caption(summary)), box=box.SIMPLE_HEAD, show_lines=True, pad_edge=False)
    for i, name in enumerate(columns[0]):
        table.add_column(escape(name), justify="left" if i == 0 else "right", no_wrap=i > 0, min_width=14 - 2 * i)
    for row in columns[1:]:
        table.add_row(*map(escape, row))
    Console().print(table)


def write_markdown_table(summary: dict, path: str) -> None:
    """Write the table as Markdown, under its caption."""
    header, rows = table_rows(summary)
    lines = [_caption(summary), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
