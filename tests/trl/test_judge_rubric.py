"""The rubric judge's text side: prompt sections, ``<think>`` stripping, ``\\boxed{}`` and ``Score:`` parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from papo_trl.rewards.rubric import (
    RUBRIC_3_TIER,
    build_judge_prompt,
    last_boxed,
    message_text,
    parse_score,
    prompt_problem,
    strip_think,
)


@pytest.mark.parametrize(
    "output, expected",
    [
        ("Analysis: fine.\n\nScore: \\boxed{1}", 1.0),
        ("Score: \\boxed{0.5}", 0.5),
        ("Score: \\boxed{ 0 }", 0.0),
        ("Score: \\boxed{1.0}", 1.0),
        ("Score: \\boxed{\\frac{1}{2}}", 0.5),
        ("Score: \\boxed{1/2}", 0.5),
        ("Score: \\boxed{\\text{0.5}}", 0.5),
        ("Score: $\\boxed{1}$", 1.0),
        ("first \\boxed{0} then final Score: \\boxed{1}", 1.0),
        ("Score: \\fbox{0.5}", 0.5),
        ("Analysis...\nScore: 0.5", 0.5),  # fallback without a box
        ("**Score:** 1", 1.0),
        ("The score is 0", 0.0),
        ("Score: \\boxed{2}", None),  # not a valid tier
        ("Score: \\boxed{0.7}", None),
        ("Score: \\boxed{good}", None),
        ("Score: \\boxed{1", None),  # unbalanced
        ("I cannot decide.", None),
        ("", None),
        (None, None),
        ("Score 1: if completely correct ...", None),  # an echoed rubric line is not a verdict
        ("Score: \\boxed{1}\n<think>or \\boxed{0}?</think>", 1.0),  # reasoning after the verdict is ignored
        ("<think>Score: \\boxed{1}", None),  # unclosed reasoning: no verdict
        ("<think>hmm \\boxed{0}</think>Score: \\boxed{0.5}", 0.5),
    ],
)
def test_parse_score(output, expected):
    assert parse_score(output) == expected


def test_parse_score_custom_tiers_and_fallback_after_invalid_box():
    assert parse_score("Score: \\boxed{0.25}", valid_scores=(0, 0.25, 1)) == 0.25
    assert parse_score("Score: \\boxed{0.5}", valid_scores=(0, 1)) is None
    assert parse_score("\\boxed{x + y} ... Score: 1") == 1.0


@given(
    st.sampled_from([0.0, 0.5, 1.0]),
    st.text(alphabet=st.characters(blacklist_characters="\\{}<>", blacklist_categories=("Cs",)), max_size=200),
)
def test_parse_score_reads_the_final_verdict_after_any_analysis(score, analysis):
    assert parse_score(f"{analysis}\n\nScore: \\boxed{{{score:g}}}") == score


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>scratch</think>answer", "answer"),
        ("a<think>x</think>b<think>y</think>c", "abc"),
        ("reasoning without opening tag</think> answer", "answer"),
        ("answer <think>truncated reasoning", "answer"),
        ("  plain  ", "plain"),
        (None, ""),
    ],
)
def test_strip_think(text, expected):
    assert strip_think(text) == expected


def test_last_boxed_balances_braces():
    assert last_boxed("\\boxed{a} and \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed {42}") == "42"
    assert last_boxed("no box") is None and last_boxed("\\boxed{open") is None


def test_message_text_and_prompt_problem():
    conv = [
        {"role": "assistant", "content": "part 1"},
        {"role": "tool", "content": "tool out"},
        {"role": "assistant", "content": [{"type": "text", "text": "part 2"}]},
    ]
    assert message_text(conv) == "part 1\n\npart 2"
    assert message_text("s") == "s" and message_text(None) == ""
    assert prompt_problem([{"role": "system", "content": "sys"}, {"role": "user", "content": "Q?"}]) == "Q?"
    assert prompt_problem("Q?") == "Q?"
    with pytest.raises(ValueError, match="completion"):
        message_text(42)


def test_prompt_sections_and_latex_braces_are_safe():
    with_ref = build_judge_prompt("Find {x}: \\frac{1}{2}", "x = {1}", "Reference {ref}")
    for section in (
        "## Instruction",
        "## Scoring Rubric",
        "## Problem\nFind {x}: \\frac{1}{2}",
        "## Reference Solution\nReference {ref}",
        "## Student Solution\nx = {1}",
        "## Evaluation",
    ):
        assert section in with_ref
    assert with_ref.rstrip().endswith("Score: \\boxed{...}")
    assert RUBRIC_3_TIER in with_ref and "Score 0.5" in RUBRIC_3_TIER
    without = build_judge_prompt("P", "S", None)
    assert "Reference Solution" not in without and build_judge_prompt("P", "S", "  ") == without
    assert "custom rubric" in build_judge_prompt("P", "S", rubric="custom rubric")
