"""Calling the process reward functions on a subset of a batch (PAPO scores only the correct responses).

A process reward function has TRL's reward signature, sync or async, and sees only the selected rows: prompts,
completions, completion ids and every dataset column are restricted to them, so a judge is never called for a
response that does not need a score. The result is ``[n, P]`` with NaN for the rows that were not scored and for
``None`` scores (a failed judge call), which leaves them out of the process statistics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from trl.trainer.utils import is_async_callable

SKIPPED_COLUMNS = ("prompt", "completion", "completion_ids")


def check_process_reward_funcs(funcs) -> list[Callable]:
    """Normalise to a list and check each entry is a plain callable (a function, or an object with ``__call__``)."""
    if funcs is None:
        return []
    funcs = list(funcs) if isinstance(funcs, (list, tuple)) else [funcs]
    for i, func in enumerate(funcs):
        if isinstance(func, (str, nn.Module)) or not callable(func):
            raise ValueError(
                f"`process_reward_funcs[{i}]` must be a callable reward function (sync or async) with TRL's "
                f"signature `f(prompts, completions, completion_ids, **columns) -> list[float | None]`, "
                f"got {type(func).__name__}"
            )
    return funcs


def _to_floats(output: Sequence[Any], expected: int, name: str) -> list[float]:
    if len(output) != expected:
        raise ValueError(
            f"The process reward function '{name}' returned {len(output)} rewards, but {expected} were expected "
            "(one per completion it was given)."
        )
    return [float("nan") if r is None else float(r) for r in output]


def score_process_rewards(
    funcs: Sequence[Callable],
    names: Sequence[str],
    inputs: Sequence[dict],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Any],
    rows: Sequence[int],
    *,
    base_kwargs: dict[str, Any],
    log_extra: Callable[[str, list], None] | None = None,
    async_loop: asyncio.AbstractEventLoop | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[len(inputs), len(funcs)]`` process rewards, computed for `rows` only (NaN elsewhere).

    `base_kwargs` are passed through unchanged (``trainer_state``, ``log_metric``); list-valued per-row keyword
    arguments (``environments``) and the dataset columns are restricted to `rows`. ``log_extra`` calls from the
    functions are scattered back to full-batch columns (``None`` for the rows not scored).
    """
    n = len(inputs)
    out = torch.full((n, len(funcs)), float("nan"), dtype=torch.float32, device=device)
    rows = list(rows)
    if not funcs or not rows:
        return out
    kwargs = {key: [inputs[r][key] for r in rows] for key in inputs[0] if key not in SKIPPED_COLUMNS}
    for key, value in base_kwargs.items():
        kwargs[key] = [value[r] for r in rows] if isinstance(value, list) and len(value) == n else value
    if log_extra is not None:

        def scatter_extra(column: str, values: list) -> None:
            full = [None] * n
            for r, v in zip(rows, values, strict=False):
                full[r] = v
            log_extra(column, full)

        kwargs["log_extra"] = scatter_extra
    call = {
        "prompts": [prompts[r] for r in rows],
        "completions": [completions[r] for r in rows],
        "completion_ids": [completion_ids[r] for r in rows],
        **kwargs,
    }
    index = torch.tensor(rows, device=device)
    pending = []
    for j, (func, name) in enumerate(zip(funcs, names, strict=True)):
        if is_async_callable(func):
            pending.append((j, func, name))
        else:
            out[index, j] = torch.tensor(_to_floats(func(**call), len(rows), name), device=device)
    if pending:
        if async_loop is None:
            raise ValueError("async process reward functions need the trainer's event loop (`async_loop`)")

        async def run_all():
            return await asyncio.gather(*(func(**call) for _, func, _ in pending))

        results = asyncio.run_coroutine_threadsafe(run_all(), async_loop).result()
        for (j, _, name), result in zip(pending, results, strict=True):
            out[index, j] = torch.tensor(_to_floats(result, len(rows), name), device=device)
    return out
