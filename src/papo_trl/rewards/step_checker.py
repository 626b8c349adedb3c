"""Step-checker process reward: the fraction of arithmetic steps ``lhs = rhs`` that are exactly true.

A *step* is a line (or a ``;``-separated segment of one) holding exactly one ``=`` whose two sides use only
numbers, ``+ - * / ( )`` and whitespace (``×``, ``÷``, ``·``, ``−`` are accepted as aliases). Both sides are
evaluated with sympy in exact rational arithmetic (``0.1 + 0.2 = 0.3`` holds), so for a solution with steps
``s_1 .. s_n``::

    process = (1 / n) * sum_i [ value(lhs_i) == value(rhs_i) ]

A step that looks arithmetic but does not parse (``12 + = 5``) or divides by zero counts as wrong; lines with
words, ``\\boxed{}`` answers and prose are not steps. A solution without any step scores ``0.0``: there is no
verified reasoning to reward. The checker never ``eval``s text: expressions are parsed with :mod:`ast` and only
number literals, unary/binary ``+ - * /`` and parentheses are interpreted, so it is safe on model output and
its cost is bounded by the step-length limit.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import sympy

__all__ = ["StepReport", "check_steps", "extract_steps", "step_checker_reward"]

_ALIASES = str.maketrans({"×": "*", "÷": "/", "·": "*", "−": "-", "–": "-"})
_ARITH_SIDE = re.compile(r"^[0-9.+\-*/()\s]*$")
_LEADING_ZEROS = re.compile(r"(?<![\d.])0+(?=\d)")  # "007" is 7; Python's parser rejects it
_MAX_STEP_CHARS = 256  # longer "steps" are not steps: keeps the checker's cost bounded
_MAX_LITERAL_DIGITS = 64
_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


@dataclass(frozen=True)
class StepReport:
    """Outcome of checking one solution: ``n_steps`` found, ``n_correct`` of them exactly true."""

    n_steps: int
    n_correct: int

    @property
    def score(self) -> float:
        """``n_correct / n_steps``, or ``0.0`` when the solution has no step."""
        return self.n_correct / self.n_steps if self.n_steps else 0.0


def _exact(node: ast.AST, source: str) -> sympy.Rational:
    """Exact value of a parsed arithmetic expression; raises ``ValueError`` on anything else.

    Number literals are read from their source text, so decimals stay exact (``0.1`` is 1/10, not a float).
    """
    if isinstance(node, ast.Expression):
        return _exact(node.body, source)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        text = ast.get_source_segment(source, node)
        if text is None or len(text) > _MAX_LITERAL_DIGITS:
            raise ValueError("bad number literal")
        return sympy.Rational(text)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        inner = _exact(node.operand, source)
        return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _exact(node.left, source), _exact(node.right, source)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError("division by zero")
        return _BINOPS[type(node.op)](left, right)
    raise ValueError(f"not an arithmetic expression: {type(node).__name__}")


def _side_value(side: str) -> sympy.Rational:
    source = _LEADING_ZEROS.sub("", side.strip())
    return _exact(ast.parse(source, mode="eval"), source)


def extract_steps(text: str) -> list[tuple[str, str]]:
    """Return the ``(lhs, rhs)`` pairs of every arithmetic step in ``text``, in order."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    steps = []
    for line in text.translate(_ALIASES).splitlines():
        for segment in line.split(";"):
            if segment.count("=") != 1 or len(segment) > _MAX_STEP_CHARS:
                continue
            lhs, rhs = segment.split("=")
            if _ARITH_SIDE.match(lhs) and _ARITH_SIDE.match(rhs) and (lhs.strip() or rhs.strip()):
                steps.append((lhs, rhs))
    return steps


@lru_cache(maxsize=65536)
def _step_is_correct(lhs: str, rhs: str) -> bool:
    try:
        return bool(_side_value(lhs) == _side_value(rhs))
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError):
        return False


def check_steps(text: str) -> StepReport:
    """Check every step of one solution exactly; see the module docstring for what counts as a step.

    Args:
        text: one solution, steps one per line (or ``;``-separated).

    Returns:
        A ``StepReport``: ``n_steps`` found, ``n_correct`` of them exactly true; ``.score`` is their fraction.

    Examples:
        >>> from papo_trl.rewards import check_steps
        >>> report = check_steps("17+8=25\\n25-5=21\\nso the answer is 21")
        >>> report, report.score
        (StepReport(n_steps=2, n_correct=1), 0.5)
    """
    steps = extract_steps(text)
    return StepReport(n_steps=len(steps), n_correct=sum(_step_is_correct(lhs, rhs) for lhs, rhs in steps))


def _completion_text(completion: Any) -> str:
    """Plain text of a completion given as a string or as a list of chat messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and all(isinstance(m, dict) for m in completion):
        parts = []
        for message in completion:
            content = message.get("content", "")
            if isinstance(content, list):  # content blocks: keep the text ones
                content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
            parts.append(content if isinstance(content, str) else "")
        return "\n".join(parts)
    raise ValueError(f"completions must be strings or lists of message dicts, got {type(completion).__name__}")


def step_checker_reward(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
    """TRL reward function: for each completion, the fraction of its arithmetic steps that are correct
    (:func:`check_steps`); the demo's process reward.

    Args:
        prompts: unused (steps are checked on their own); ``None`` or one per completion.
        completions: strings or lists of chat messages.
        **kwargs: the trainer's other keyword arguments, ignored.

    Returns:
        One score in ``[0, 1]`` per completion (0.0 without any step).

    Examples:
        >>> from papo_trl.rewards import step_checker_reward
        >>> step_checker_reward(None, ["17+8=25\\n25-5=21", "2*3=6"])
        [0.5, 1.0]
    """
    if prompts is not None and len(prompts) != len(completions):
        raise ValueError(f"prompts and completions must have the same length, got {len(prompts)}, {len(completions)}")
    return [check_steps(_completion_text(c)).score for c in completions]
