r"""Outcome rewards (PAPO's ORM): is the final answer right?

Both functions follow TRL's reward signature ``f(prompts, completions, completion_ids=None, **kwargs)``:
completions are strings or conversational message lists, dataset columns arrive as keyword lists, and a
row whose gold answer is missing or unparseable gets ``None`` (TRL turns it into NaN and leaves it out).

* :func:`math_accuracy_reward` - TRL's ``accuracy_reward`` (math-verify: LaTeX/sympy equivalence of the first
  ``\boxed{}`` answer against the gold), made to accept plain-string completions and a gold column named
  ``solution`` or ``answer``. ``r = 1`` if equivalent else ``0``.
* :func:`exact_answer_reward` - for datasets whose answers are integers or short strings: the last
  ``\boxed{}`` of the completion (reasoning removed) against the gold, both normalised
  (:func:`normalize_answer`); integers compare as integers (``042 == 42.0 == 42``).
* :func:`get_soft_overlong_punishment` - TRL's DAPO soft overlong penalty, re-exported.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from trl.rewards import accuracy_reward as _trl_accuracy_reward
from trl.rewards import get_soft_overlong_punishment

from .rubric import last_boxed, message_text, strip_think

__all__ = ["exact_answer_reward", "get_soft_overlong_punishment", "math_accuracy_reward", "normalize_answer"]

_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|boxed)\s*\{([^{}]*)\}")
_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")


def _gold_column(solution: Sequence[Any] | None, answer: Sequence[Any] | None, n: int) -> list[Any]:
    gold = solution if solution is not None else answer
    if gold is None:
        raise ValueError("solution/answer: expected a dataset column holding the gold answers, got neither")
    if len(gold) != n:
        raise ValueError(f"solution/answer: expected {n} gold answers (one per completion), got {len(gold)}")
    return list(gold)


def math_accuracy_reward(
    completions: Sequence[Any], solution: Sequence[Any] | None = None, answer: Sequence[Any] | None = None, **kwargs
) -> list[float | None]:
    r"""1.0 if the completion's ``\boxed{}`` answer is math-verify-equivalent to the gold, else 0.0.

    Args:
        completions: strings or conversational message lists (TRL's formats).
        solution: the gold answers (TRL's column name); else ``answer`` is used.
        answer: the gold answers when there is no ``solution`` column.
        **kwargs: the other dataset columns and the trainer's hooks; ``log_extra`` reaches TRL's function, which
            logs the parses.

    Returns:
        One reward per completion: 1.0, 0.0, or ``None`` where the gold is missing or unparseable.

    Examples:
        >>> from papo_trl.rewards import math_accuracy_reward
        >>> math_accuracy_reward([r"so \boxed{\frac{1}{2}}", r"it is \boxed{0.4}"], solution=["$0.5$", "$0.5$"])
        [1.0, 0.0]
    """
    gold = _gold_column(solution, answer, len(completions))
    messages = [[{"role": "assistant", "content": message_text(c)}] for c in completions]
    gold_text = ["" if g is None else str(g) for g in gold]
    return _trl_accuracy_reward(messages, gold_text, log_extra=kwargs.get("log_extra"))


def _gold_answer(gold: Any) -> str:
    """The answer inside a gold value: an int, a ``\\boxed{}`` solution, a GSM8K ``... #### 42`` or plain text."""
    text = str(gold)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    return text.rsplit("####", 1)[1] if "####" in text else text


def normalize_answer(text: str) -> str:
    r"""Canonical form of a short answer: ``$``, ``\text{}``/``\mathrm{}`` wrappers, LaTeX spaces, whitespace and
    a trailing period removed, lower-cased; a number (``1,234``, ``+042``, ``42.0``, ``0.50``) becomes its
    plain decimal form (``1234``, ``42``, ``42``, ``0.5``).

    Args:
        text: an answer, e.g. the content of a ``\boxed{}``.

    Returns:
        The normalised string; two answers are equal iff their normal forms are.

    Examples:
        >>> from papo_trl.rewards import normalize_answer
        >>> normalize_answer(" $1,234.50$ "), normalize_answer(r"\text{Yes}.")
        ('1234.5', 'yes')
    """
    t = text.strip().strip("$")
    for _ in range(3):  # nested wrappers, innermost first
        t = _WRAPPERS.sub(r"\1", t)
    t = re.sub(r"\\[!,;: ]|\s+", "", t).rstrip(".").lower()
    if _NUMBER.fullmatch(t):
        try:
            value = Decimal(t.replace(",", ""))
        except InvalidOperation:
            return t
        if value == value.to_integral_value():
            return str(int(value))
        return format(value.normalize(), "f")
    return t


def exact_answer_reward(
    completions: Sequence[Any], answer: Sequence[Any] | None = None, solution: Sequence[Any] | None = None, **kwargs
) -> list[float | None]:
    r"""1.0 if the last ``\boxed{}`` after the reasoning equals the gold answer once both are normalised
    (:func:`normalize_answer`).

    Args:
        completions: strings or conversational message lists; ``<think>`` reasoning is removed first.
        answer: the gold answers (an int, a string, a ``\boxed{}`` solution or a GSM8K ``#### n`` line).
        solution: the gold answers when there is no ``answer`` column.
        **kwargs: the other dataset columns; ``log_extra`` (from the trainer) logs the parsed answers.

    Returns:
        One reward per completion: 1.0, 0.0 (also without a ``\boxed{}`` answer), or ``None`` for a ``None`` gold.

    Examples:
        >>> from papo_trl.rewards import exact_answer_reward
        >>> exact_answer_reward([r"<think>7?</think> \boxed{042}", "no answer"], answer=[42, 7])
        [1.0, 0.0]
    """
    gold = answer if answer is not None else solution
    gold = _gold_column(gold, None, len(completions))
    rewards: list[float | None] = []
    predicted: list[str] = []
    for completion, g in zip(completions, gold, strict=True):
        boxed = last_boxed(strip_think(message_text(completion)))
        predicted.append("[no boxed answer]" if boxed is None else normalize_answer(boxed))
        if g is None:
            rewards.append(None)
        else:
            rewards.append(float(boxed is not None and normalize_answer(_gold_answer(g)) == predicted[-1]))
    log_extra = kwargs.get("log_extra")
    if log_extra is not None:
        log_extra("exact_answer_parsed", predicted)
    return rewards
