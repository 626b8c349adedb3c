"""The training data of ``papo-train``: a hub dataset, a local directory or file, or the embedded demo task, with
``prompt`` and ``solution`` columns. Light to import (``datasets`` loads on first use)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .startup import UsageError, user_input

if TYPE_CHECKING:
    from .arguments import PAPOScriptArguments

__all__ = ["DEMO_DATASET", "load_training_data"]

DEMO_DATASET = "papo-demo"


def load_training_data(script_args: PAPOScriptArguments, seed: int = 0):
    """``(train, eval or None)`` with ``prompt`` and ``solution`` columns (and the original ones); a dataset that
    cannot be found or read raises ``UsageError``."""
    import datasets

    name = script_args.dataset_name
    expected = f"a hub id, a local dataset directory, a .json/.jsonl/.parquet/.csv file or {DEMO_DATASET!r}"
    if not name:
        raise UsageError(f"--dataset_name: expected {expected}, got nothing")
    kind = name.rsplit(".", 1)[-1].lower()
    if not os.path.exists(name) and (kind in ("json", "jsonl", "parquet", "csv") or name.startswith((".", "/", "~"))):
        raise UsageError(f"--dataset_name: no file or directory {name!r} (expected {expected})")
    with user_input("--dataset_name", ValueError, OSError, ConnectionError):
        if name == DEMO_DATASET:
            from .demo.run import FULL
            from .demo.task import make_splits

            splits = make_splits(1, FULL.n_rl, FULL.n_eval, seed, FULL.task)
            data = datasets.DatasetDict(train=splits["rl"], test=splits["eval"])
            data = data.rename_column("completion", "reference_solution")  # what the rubric judge reads
        elif os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_dict.json")):
            data = datasets.load_from_disk(name)
        elif os.path.isfile(name):
            data = datasets.load_dataset({"jsonl": "json"}.get(kind, kind), data_files=name)
        else:
            data = datasets.load_dataset(name, name=script_args.dataset_config)
    for option in ("dataset_train_split", "dataset_test_split"):
        split = getattr(script_args, option)
        if split is not None and split not in data:
            raise UsageError(f"--{option}: the dataset has no split {split!r} (splits: {', '.join(data)})")
    data = data.map(_standardise(script_args), desc="Formatting prompts")
    test = script_args.dataset_test_split
    return data[script_args.dataset_train_split], (data[test] if test else None)


def _standardise(script_args: PAPOScriptArguments):
    prompt_col, answer_col, system = script_args.prompt_column, script_args.answer_column, script_args.system_prompt

    def fn(row):
        if prompt_col not in row:
            raise UsageError(f"--prompt_column: the dataset has no column {prompt_col!r} (columns: {sorted(row)})")
        prompt = row[prompt_col]
        if system is not None and isinstance(prompt, str):
            prompt = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        out = {"prompt": prompt}
        if answer_col in row:
            out["solution"] = row[answer_col]
        return out

    return fn
