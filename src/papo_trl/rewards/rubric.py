r"""The rubric judge's text side: prompt rendering, ``<think>`` stripping and score parsing.

PAPO's process reward asks an LLM judge to grade a *correct* solution on a three-tier rubric (the
DeepSeek-Math-V2 grading standard used by the official code): 1 = completely correct and clearly
demonstrated, 0.5 = generally correct with omitted details or minor errors, 0 = fatal errors or severe
omissions. The prompt has the sections Problem / Reference Solution (only when the dataset has one) /
Student Solution / Evaluation, and the judge ends with ``Score: \boxed{s}``. The score is read from the last
``\boxed{}`` of the judge output (``<think>`` removed), falling back to the last ``Score: s``; anything else
is *unparseable* (``None``), never a silent 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "DEFAULT_VALID_SCORES",
    "RUBRIC_3_TIER",
    "build_judge_prompt",
    "last_boxed",
    "message_text",
    "parse_score",
    "prompt_problem",
    "strip_think",
]

RUBRIC_3_TIER = (
    "## Scoring Rubric\n"
    "* Score 1: If the solution is completely correct, with all steps executed properly and clearly "
    "demonstrated, then the score is 1.\n"
    "* Score 0.5: If the solution is generally correct, but with some details omitted or minor errors, "
    "then the score is 0.5.\n"
    "* Score 0: If the solution does not actually address the required problem, contains fatal errors, "
    "or has severe omissions, then the score is 0.\n\n"
    "Special Rule on References:\n"
    "Referencing anything from any paper does not remove the need to prove the reference. It is acceptable "
    "if and only if the solution also presents a valid proof of the referenced argument(s); otherwise the "
    "solution is scored by the criteria above, and definitely not with a score of 1."
)
"""The official three-tier rubric (scores 1 / 0.5 / 0)."""

DEFAULT_VALID_SCORES: tuple[float, ...] = (0.0, 0.5, 1.0)

_INSTRUCTION = "## Instruction\nYour task is to evaluate the quality of a student's solution to a mathematical problem."
_EVALUATION = (
    "## Evaluation\nAnalyze the solution step by step, then provide your score.\n\n"
    "Analysis:\n...\n\nScore: \\boxed{...}"
)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_SCORE_LINE = re.compile(r"score\s*\**\s*(?:is\s*:?|[:=])\s*\**\s*\$?\s*(\d*\.?\d+(?:\s*/\s*\d+)?)", re.IGNORECASE)
_FRAC = re.compile(r"^\\[dt]?frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}$")
_TEXT_WRAP = re.compile(r"^\\(?:text|mathrm|textbf|mathbf)\s*\{(.*)\}$", re.DOTALL)


def strip_think(text: str | None) -> str:
    """Remove reasoning: every ``<think>...</think>`` block, anything before a lone ``</think>`` and anything
    after an unclosed ``<think>`` (a truncated reasoning trace has no answer).

    Args:
        text: a completion or a judge's reply (``None`` is empty).

    Returns:
        The text without its reasoning, stripped of surrounding whitespace.

    Examples:
        >>> from papo_trl.rewards import strip_think
        >>> strip_think("<think>2 + 2 is 4, or 5?</think> The answer is 4."), strip_think("4 <think>truncated")
        ('The answer is 4.', '4')
    """
    if not text:
        return ""
    text = _THINK_BLOCK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        text = text.split("<think>", 1)[0]
    return text.strip()


def message_text(value: Any) -> str:
    """Text of a completion or prompt given as a string, a message list or a single message.

    Message lists are TRL's conversational format: for completions the assistant turns are joined; content
    may itself be a list of ``{"type": "text", "text": ...}`` parts.
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        content = value.get("content")
        if isinstance(content, list):
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return "" if content is None else str(content)
    if isinstance(value, Sequence):
        turns = [m for m in value if isinstance(m, dict) and m.get("role", "assistant") == "assistant"]
        return "\n\n".join(message_text(m) for m in (turns or value))
    raise ValueError(f"completion: expected a string or a list of messages, got {type(value).__name__}")


def prompt_problem(prompt: Any) -> str:
    """The problem statement inside a prompt: the string itself, or the last user message of a conversation."""
    if isinstance(prompt, str) or prompt is None:
        return prompt or ""
    if isinstance(prompt, dict):
        return message_text(prompt)
    users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    return message_text(users[-1] if users else (prompt[-1] if prompt else None))


def build_judge_prompt(
    problem: str, student_solution: str, reference_solution: str | None = None, rubric: str = RUBRIC_3_TIER
) -> str:
    """Render the judge's user message; the Reference Solution section appears only when one is given.

    Sections are concatenated, never ``str.format``-ed, so LaTeX braces in the texts are safe.

    Args:
        problem: the problem statement.
        student_solution: the completion to grade (its ``<think>`` already removed).
        reference_solution: the dataset's reference solution, if any.
        rubric: the scoring-rubric section.

    Returns:
        The prompt: Instruction, Scoring Rubric, Problem, (Reference Solution,) Student Solution, Evaluation.

    Examples:
        >>> from papo_trl.rewards import build_judge_prompt
        >>> prompt = build_judge_prompt("What is 2+2?", "2+2=4, so the answer is 4.")
        >>> [line for line in prompt.splitlines() if line.startswith("## ")]
        ['## Instruction', '## Scoring Rubric', '## Problem', '## Student Solution', '## Evaluation']
    """
    sections = [_INSTRUCTION, rubric, "## Problem\n" + problem.strip()]
    if reference_solution is not None and str(reference_solution).strip():
        sections.append("## Reference Solution\n" + str(reference_solution).strip())
    sections += ["## Student Solution\n" + student_solution.strip(), _EVALUATION]
    return "\n\n".join(sections)


def last_boxed(text: str | None) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``) with balanced braces, or ``None``."""
    if not text:
        return None
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    open_at = text.find("{", start)
    if open_at < 0 or text[start:open_at].strip() not in ("\\boxed", "\\fbox"):
        return None
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_at + 1 : i].strip()
    return None


def _number(token: str) -> float | None:
    """``1``, ``0.5``, ``.5``, ``1/2``, ``\\frac{1}{2}``, ``$1$``, ``\\text{1}`` as a float; else ``None``."""
    token = token.strip().strip("$").strip()
    wrapped = _TEXT_WRAP.match(token)
    if wrapped:
        token = wrapped.group(1).strip()
    frac = _FRAC.match(token)
    if frac:
        num, den = frac.groups()
    elif "/" in token:
        num, _, den = token.partition("/")
    else:
        num, den = token, "1"
    try:
        value = float(num) / float(den)
    except (ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


def _snap(value: float | None, valid: Iterable[float]) -> float | None:
    if value is None:
        return None
    return next((float(v) for v in valid if math.isclose(value, v, abs_tol=1e-9)), None)


def parse_score(output: str | None, valid_scores: Sequence[float] = DEFAULT_VALID_SCORES) -> float | None:
    r"""The judge's score: the last ``\boxed{}`` of the output with ``<think>`` removed, else the last
    ``Score: s``; ``None`` when neither holds one of ``valid_scores``.

    Args:
        output: the judge's reply (``None`` is unparseable).
        valid_scores: the scores a verdict may take (``1/2``, ``\frac{1}{2}`` and ``0.5`` are the same).

    Returns:
        The score, or ``None`` for an unparseable verdict (never a silent 0).

    Examples:
        >>> from papo_trl.rewards import parse_score
        >>> parse_score(r"The steps are right. Score: \boxed{\frac{1}{2}}"), parse_score("Score: 1")
        (0.5, 1.0)
        >>> parse_score("I cannot decide.") is None
        True
    """
    text = strip_think(output)
    boxed = _snap(_number(last_boxed(text) or ""), valid_scores)
    if boxed is not None:
        return boxed
    for match in reversed(list(_SCORE_LINE.finditer(text))):
        score = _snap(_number(match.group(1)), valid_scores)
        if score is not None:
            return score
    return None
