"""Reward functions for PAPO: outcome (ORM) rewards, the rubric judge (PRM) and the demo's step checker, and the
names ``papo-train`` knows them by.

All follow TRL's reward signature ``f(prompts, completions, completion_ids=None, **columns) -> list[float | None]``;
``RubricJudge`` is async (TRL awaits it on its reward event loop).

Light to import (``papo-train`` lists the names before TRL and the judge's client are loaded); the reward functions
load on first use.
"""

import importlib
import os
import sys

__all__ = [
    "DEFAULT_VALID_SCORES",
    "FAILURE_KINDS",
    "OUTCOME_REWARDS",
    "PROCESS_REWARDS",
    "REWARDS",
    "RUBRIC_3_TIER",
    "RubricJudge",
    "build_judge_prompt",
    "build_reward_funcs",
    "check_steps",
    "exact_answer_reward",
    "get_soft_overlong_punishment",
    "math_accuracy_reward",
    "normalize_answer",
    "parse_score",
    "reward_func",
    "step_checker_reward",
    "strip_think",
]
_HOMES = {
    **dict.fromkeys(("FAILURE_KINDS", "RubricJudge"), ".judge"),
    **dict.fromkeys(
        ("exact_answer_reward", "get_soft_overlong_punishment", "math_accuracy_reward", "normalize_answer"), ".outcome"
    ),
    **dict.fromkeys(
        ("DEFAULT_VALID_SCORES", "RUBRIC_3_TIER", "build_judge_prompt", "parse_score", "strip_think"), ".rubric"
    ),
    **dict.fromkeys(("check_steps", "step_checker_reward"), ".step_checker"),
}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _function(name: str):
    """The factory of a reward function without options: the function ``name`` itself."""
    return lambda script_args, training_args: __getattr__(name)


def _soft_overlong_punishment(script_args, training_args):
    return __getattr__("get_soft_overlong_punishment")(
        max_completion_len=training_args.max_completion_length, soft_punish_cache=script_args.soft_punish_cache
    )


def _rubric_judge(script_args, training_args):
    s = script_args
    return __getattr__("RubricJudge")(
        s.judge_base_url, s.judge_model, s.judge_api_key, max_concurrency=s.judge_max_concurrency,
        request_timeout=s.judge_timeout, max_retries=s.judge_max_retries, batch_deadline=s.judge_batch_deadline,
        max_tokens=s.judge_max_tokens, seed=training_args.seed,
        request_kwargs={"reasoning_effort": s.judge_reasoning_effort} if s.judge_reasoning_effort else None,
    )  # fmt: skip


# name -> factory(script_args, training_args): papo-train's script arguments (`soft_punish_cache`, `judge_*`) and
# its PAPOConfig (`max_completion_length`, `seed`)
OUTCOME_REWARDS = {
    "math_accuracy_reward": _function("math_accuracy_reward"),
    "exact_answer_reward": _function("exact_answer_reward"),
    "soft_overlong_punishment": _soft_overlong_punishment,
}
PROCESS_REWARDS = {"rubric_judge": _rubric_judge, "step_checker_reward": _function("step_checker_reward")}
REWARDS = {**OUTCOME_REWARDS, **PROCESS_REWARDS}


def reward_func(name: str, script_args, training_args):
    """The reward function ``name`` names: one of ``REWARDS``, built from the run's arguments, or a dotted import
    path ``module.attr`` (looked up from the current directory first); ``ValueError`` otherwise.

    Args:
        name: a key of ``REWARDS`` or a dotted import path.
        script_args: ``papo-train``'s script arguments (``soft_punish_cache``, ``judge_*``), for the factories
            that read them.
        training_args: the run's ``PAPOConfig`` (``max_completion_length``, ``seed``).

    Returns:
        The reward function, with TRL's reward signature.

    Examples:
        >>> from papo_trl.rewards import reward_func
        >>> reward_func("exact_answer_reward", None, None).__name__
        'exact_answer_reward'
        >>> reward_func("accuracy", None, None)
        Traceback (most recent call last):
        ...
        ValueError: reward function 'accuracy': expected a known name (...) or a dotted import path
    """
    if name in REWARDS:
        return REWARDS[name](script_args, training_args)
    module, _, attr = name.rpartition(".")
    if not module:
        raise ValueError(
            f"reward function {name!r}: expected a known name ({', '.join(REWARDS)}) or a dotted import path"
        )
    sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward function {name!r}: cannot import it ({err})") from err


def build_reward_funcs(names: list[str], script_args, training_args) -> list:
    """The reward functions ``names`` name (see :func:`reward_func`); ``none`` (in any case) names none.

    Args:
        names: keys of ``REWARDS``, dotted import paths, or ``none``.
        script_args: ``papo-train``'s script arguments.
        training_args: the run's ``PAPOConfig``.

    Returns:
        The reward functions, in the order of ``names``.

    Examples:
        >>> from papo_trl.rewards import build_reward_funcs
        >>> [f.__name__ for f in build_reward_funcs(["exact_answer_reward", "step_checker_reward"], None, None)]
        ['exact_answer_reward', 'step_checker_reward']
        >>> build_reward_funcs(["none"], None, None)
        []
    """
    return [reward_func(name, script_args, training_args) for name in names if name.lower() != "none"]
