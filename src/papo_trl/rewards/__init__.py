"""Reward functions for PAPO: outcome (ORM) rewards, the rubric judge (PRM) and the demo's step checker.

All follow TRL's reward signature ``f(prompts, completions, completion_ids=None, **columns) -> list[float | None]``;
``RubricJudge`` is async (TRL awaits it on its reward event loop).
"""

from .judge import FAILURE_KINDS, RubricJudge
from .outcome import exact_answer_reward, get_soft_overlong_punishment, math_accuracy_reward, normalize_answer
from .rubric import DEFAULT_VALID_SCORES, RUBRIC_3_TIER, build_judge_prompt, parse_score, strip_think
from .step_checker import check_steps, step_checker_reward

__all__ = [
    "DEFAULT_VALID_SCORES",
    "FAILURE_KINDS",
    "RUBRIC_3_TIER",
    "RubricJudge",
    "build_judge_prompt",
    "check_steps",
    "exact_answer_reward",
    "get_soft_overlong_punishment",
    "math_accuracy_reward",
    "normalize_answer",
    "parse_score",
    "step_checker_reward",
    "strip_think",
]
