"""Outcome rewards: TRL's math-verify accuracy reward (reused), the exact-answer variant, the overlong penalty."""

from __future__ import annotations

import pytest
from trl.rewards import accuracy_reward, get_soft_overlong_punishment

from papo_trl import rewards
from papo_trl.rewards import exact_answer_reward, math_accuracy_reward, normalize_answer


def trl_call(func, completions, **columns):
    """Call ``func`` the way GRPOTrainer._calculate_rewards does."""
    logged = {}
    extra = dict(trainer_state=None, log_extra=lambda k, v: logged.__setitem__(k, v), log_metric=lambda k, v: None)
    out = func(
        prompts=["p"] * len(completions),
        completions=completions,
        completion_ids=[[1]] * len(completions),
        **columns,
        **extra,
    )
    return out, logged


def test_math_accuracy_matches_trl_on_conversational_input():
    solutions = ["\\frac{1}{3}", "\\frac{1}{3}", "$2$", "$x^2$"]
    completions = [
        [{"role": "assistant", "content": c}]
        for c in ("So \\boxed{\\frac{1}{3}}.", "\\boxed{\\frac{1}{2}}", "\\boxed{2.0}", "no answer")
    ]
    ours, logged = trl_call(math_accuracy_reward, completions, solution=solutions)
    assert ours == accuracy_reward(completions, solutions) == [1.0, 0.0, 1.0, 0.0]
    assert {"solution", "gold_parsed", "answer_parsed"} <= logged.keys()


def test_math_accuracy_plain_strings_answer_column_and_missing_gold():
    completions = ["The answer is \\boxed{0.5}", "\\boxed{7}", "\\boxed{3}"]
    out, _ = trl_call(math_accuracy_reward, completions, answer=["\\frac{1}{2}", 7, None])
    assert out == [1.0, 1.0, None]


def test_math_accuracy_rejects_missing_or_short_gold_column():
    with pytest.raises(ValueError, match="solution/answer"):
        math_accuracy_reward(["\\boxed{1}"])
    with pytest.raises(ValueError, match="solution/answer"):
        math_accuracy_reward(["\\boxed{1}", "\\boxed{2}"], solution=["1"])


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("42", "42"),
        ("042", "42"),
        ("+42", "42"),
        ("42.0", "42"),
        ("-7", "-7"),
        ("1,234", "1234"),
        ("0.50", "0.5"),
        (".5", "0.5"),
        ("$42$", "42"),
        ("\\text{42}", "42"),
        ("\\mathrm{ 42 }", "42"),
        ("1\\,000", "1000"),
        ("42.", "42"),
        (" Yes ", "yes"),
        ("x + 1", "x+1"),
        ("1,2", "1,2"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_answer_reward():
    completions = [
        "2 + 2 = 4 so \\boxed{4}",
        [{"role": "assistant", "content": "<think>maybe \\boxed{5}</think>It is \\boxed{1,000}."}],
        "\\boxed{3} no wait \\boxed{12}",
        "no boxed answer: 6",
        "<think>truncated \\boxed{9}",
        "\\boxed{\\text{yes}}",
        "\\boxed{8}",
    ]
    answers = [4, "1000", "The total is 12.\n#### 12", 6, 9, "Yes", None]
    out, logged = trl_call(exact_answer_reward, completions, answer=answers)
    assert out == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, None]
    assert logged["exact_answer_parsed"][:3] == ["4", "1000", "12"]


def test_exact_answer_reward_uses_boxed_gold_solution():
    out, _ = trl_call(exact_answer_reward, ["\\boxed{17}", "\\boxed{18}"], solution=["... \\boxed{17}"] * 2)
    assert out == [1.0, 0.0]


def test_soft_overlong_punishment_is_trls():
    assert rewards.get_soft_overlong_punishment is get_soft_overlong_punishment
    punish = rewards.get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
    assert punish(completion_ids=[[1] * 50, [1] * 90, [1] * 120]) == [0.0, -0.5, -1.0]


def test_reward_names_for_trl_logging():
    assert math_accuracy_reward.__name__ == "math_accuracy_reward"
    assert exact_answer_reward.__name__ == "exact_answer_reward"
