"""Step-checker process reward: exact arithmetic, step extraction, TRL reward-function contract."""

import time
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from papo_trl.rewards.step_checker import StepReport, check_steps, extract_steps, step_checker_reward


def test_fraction_of_correct_steps():
    text = "12 + 7 = 19\n19 * 3 = 57\n57 - 8 = 48\n\\boxed{48}"
    assert check_steps(text) == StepReport(n_steps=3, n_correct=2)
    assert check_steps(text).score == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "step, correct",
    [
        ("0.1 + 0.2 = 0.3", True),  # exact rationals, not floats
        ("1/3 + 1/3 = 2/3", True),
        ("7 / 2 = 3.5", True),
        ("(2 + 3) * 4 = 20", True),
        ("2 + 3 * 4 = 14", True),  # usual precedence
        ("-5 - -5 = 0", True),
        ("007 = 7", True),
        ("6 × 7 = 42", True),
        ("8 ÷ 2 = 4", True),
        ("10 − 3 = 7", True),
        ("2 + 2 = 5", False),
        ("1 / 0 = 1", False),  # division by zero is a wrong step, not a crash
        ("12 + = 5", False),  # arithmetic-looking but unparseable
        ("2 ** 10 = 1024", False),  # powers are not part of the step language
        ("= 5", False),
    ],
)
def test_single_step(step, correct):
    report = check_steps(step)
    assert report.n_steps == 1
    assert report.n_correct == int(correct)


@pytest.mark.parametrize("text", ["x = 5", "The answer is 4", "a + b = c", "\\boxed{12}", "", "1 = 1 = 1", "="])
def test_non_steps_are_ignored(text):
    assert extract_steps(text) == []
    assert check_steps(text).score == 0.0


def test_semicolon_separated_steps_and_prose_lines():
    text = "First we add.\n3 + 4 = 7; 7 * 2 = 14\nSo the answer is \\boxed{14}"
    assert [(lhs.strip(), rhs.strip()) for lhs, rhs in extract_steps(text)] == [("3 + 4", "7"), ("7 * 2", "14")]
    assert check_steps(text).score == 1.0


def test_reward_function_contract():
    completions = ["1 + 1 = 2\n\\boxed{2}", [{"role": "assistant", "content": "2 * 3 = 7"}], "no steps here"]
    rewards = step_checker_reward(prompts=["p"] * 3, completions=completions, answer=["2", "6", "1"], log_metric=None)
    assert rewards == [1.0, 0.0, 0.0]
    assert all(isinstance(r, float) for r in rewards)


def test_content_blocks_are_read():
    completion = [{"role": "assistant", "content": [{"type": "text", "text": "4 - 1 = 3"}]}]
    assert step_checker_reward(prompts=None, completions=[completion]) == [1.0]


def test_bad_input_raises():
    with pytest.raises(ValueError, match="same length"):
        step_checker_reward(prompts=["a"], completions=["1=1", "2=2"])
    with pytest.raises(ValueError, match="completions"):
        step_checker_reward(prompts=[1], completions=[123])
    with pytest.raises(ValueError, match="text"):
        extract_steps(None)


@given(
    a=st.integers(-999, 999),
    b=st.integers(-999, 999),
    op=st.sampled_from(["+", "-", "*", "/"]),
    delta=st.integers(-3, 3),
)
def test_matches_exact_fraction_arithmetic(a, b, op, delta):
    if op == "/" and b == 0:
        b = 1
    ops = {"+": Fraction.__add__, "-": Fraction.__sub__, "*": Fraction.__mul__, "/": Fraction.__truediv__}
    truth = ops[op](Fraction(a), Fraction(b))
    claimed = truth + delta
    rhs = f"{claimed.numerator}/{claimed.denominator}" if claimed.denominator != 1 else str(claimed.numerator)
    report = check_steps(f"{a} {op} ({b}) = {rhs}")
    assert report.n_steps == 1
    assert report.n_correct == int(delta == 0)


def test_deterministic_and_fast():
    text = "\n".join(f"{i} + {i} = {2 * i + (i % 3 == 0)}" for i in range(200))
    first = check_steps(text)
    start = time.perf_counter()
    for _ in range(5):
        assert check_steps(text) == first
    assert first.n_steps == 200 and first.n_correct == sum(i % 3 != 0 for i in range(200))
    assert time.perf_counter() - start < 2.0


def test_long_lines_are_not_steps():
    assert extract_steps("1 + " * 100 + "1 = 101") == []
