"""The demo task: chained integer arithmetic solved step by step, one operation per line.

A problem is ``x_0 op_1 x_1 ... op_k x_k`` evaluated left to right (only ``+`` and ``-``, so left to right is
also the usual order). Its reference solution writes one step per operation, then the boxed answer::

    prompt:      "47+18-29\\n"
    completion:  "47+18=65\\n65-29=36\\n\\boxed{36}"

Every intermediate result stays in ``[0, max_value * (max_steps + 1)]`` (a subtraction is only drawn when it keeps the
running total non-negative), so the vocabulary is digits, ``+ - =``, newline and the answer box. The outcome
reward (:func:`papo_trl.rewards.exact_answer_reward`) compares the boxed answer with the ``answer`` column; the
step checker (:func:`papo_trl.rewards.step_checker_reward`) scores the ``a op b = c`` lines.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from datasets import Dataset

__all__ = ["TaskSpec", "make_problem", "make_dataset", "make_splits"]


@dataclass(frozen=True)
class TaskSpec:
    """Difficulty knobs: ``min_steps..max_steps`` operations on operands drawn from ``[min_value, max_value]``.

    Mixing lengths gives a mix of easy and hard problems, so accuracy grows smoothly while training.
    """

    min_steps: int = 1
    max_steps: int = 3
    min_value: int = 1
    max_value: int = 20

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if not 0 <= self.min_value <= self.max_value:
            raise ValueError(f"need 0 <= min_value <= max_value, got {self.min_value}, {self.max_value}")


def make_problem(rng: random.Random, spec: TaskSpec = TaskSpec()) -> dict[str, str]:
    """One problem as ``{"prompt", "completion", "answer"}`` (``completion`` is the step-by-step reference)."""
    total = rng.randint(spec.min_value, spec.max_value)
    expression, steps = str(total), []
    for _ in range(rng.randint(spec.min_steps, spec.max_steps)):
        operand = rng.randint(spec.min_value, spec.max_value)
        op = "-" if operand <= total and rng.random() < 0.5 else "+"
        result = total - operand if op == "-" else total + operand
        steps.append(f"{total}{op}{operand}={result}")
        expression += f"{op}{operand}"
        total = result
    completion = "\n".join(steps) + f"\n\\boxed{{{total}}}"
    return {"prompt": expression + "\n", "completion": completion, "answer": str(total)}


def make_dataset(
    n: int,
    seed: int,
    spec: TaskSpec = TaskSpec(),
    exclude: set[str] | None = None,
    distinct: bool = False,
    direct_fraction: float = 0.0,
) -> Dataset:
    """``n`` problems drawn from ``seed``, none of whose prompts is in ``exclude`` (and all different if
    ``distinct``). A ``direct_fraction`` of the completions state the answer without the steps: ``\\boxed{36}``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= direct_fraction <= 1.0:
        raise ValueError(f"direct_fraction must be in [0, 1], got {direct_fraction}")
    rng, style_rng, seen, rows = random.Random(seed), random.Random(seed + 7919), set(exclude or ()), []
    for _ in range(100 * n):
        row = make_problem(rng, spec)
        if row["prompt"] not in seen:
            if distinct:
                seen.add(row["prompt"])
            if style_rng.random() < direct_fraction:
                row["completion"] = f"\\boxed{{{row['answer']}}}"
            rows.append(row)
            if len(rows) == n:
                return Dataset.from_list(rows)
    raise ValueError(f"could not draw {n} problems from {spec} outside `exclude`; lower n or widen the value range")


def make_splits(
    n_sft: int, n_rl: int, n_eval: int, seed: int, spec: TaskSpec = TaskSpec(), direct_fraction: float = 0.0
) -> dict[str, Dataset]:
    """``sft`` and ``rl`` training splits and a held-out ``eval`` split of distinct problems that never appear in
    the training splits; ``direct_fraction`` of the ``sft`` completions are bare answers (see :func:`make_dataset`)."""
    evaluation = make_dataset(n_eval, seed + 1, spec, distinct=True)
    held_out = set(evaluation["prompt"])
    sft = make_dataset(n_sft, seed + 2, spec, exclude=held_out, direct_fraction=direct_fraction)
    rl = make_dataset(n_rl, seed + 3, spec, exclude=held_out)
    return {"sft": sft, "rl": rl, "eval": evaluation}
