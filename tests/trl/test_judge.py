"""RubricJudge end to end: the real ``openai`` client against a scripted HTTP server on localhost.

Directives such as ``[[judge: fail=500x2]]`` inside a completion tell the server how to answer
(see ``papo_trl.rewards.judge_server``). Timeouts and backoffs are tiny so the file runs in seconds.
"""

from __future__ import annotations

import asyncio
import math
import pickle
import socket
import time

import pytest

from papo_trl.rewards import FAILURE_KINDS, RubricJudge
from papo_trl.rewards.judge_server import LocalJudgeServer

FAST = dict(request_timeout=1.0, max_retries=2, backoff_base=0.01, backoff_max=0.02, batch_deadline=10.0, seed=0)


@pytest.fixture
def server():
    with LocalJudgeServer() as srv:
        yield srv


def grade(judge: RubricJudge, completions, prompts=None, **columns):
    prompts = prompts if prompts is not None else [f"Problem {i}: compute 2 + 2." for i in range(len(completions))]

    async def call():
        try:
            return await judge(prompts=prompts, completions=completions, completion_ids=None, **columns)
        finally:
            await judge.aclose()  # this loop ends here: release its connections

    return asyncio.run(call())


def assert_counters_add_up(stats: dict) -> None:
    parts = ("skipped", "cache_hits", "scored", "failures")
    assert stats["judge/completions"] == sum(stats[f"judge/{k}"] for k in parts)
    assert stats["judge/failures"] == sum(stats[f"judge/failures/{k}"] for k in FAILURE_KINDS)


def user_message(request: dict) -> str:
    return request["messages"][-1]["content"]


def test_grades_conversational_batch_with_reference(server):
    judge = RubricJudge(server.base_url, model="judge-model", system_prompt="You are a strict grader.", **FAST)
    prompts = [
        [{"role": "system", "content": "Reason step by step."}, {"role": "user", "content": f"Q{i}: 2+2?"}]
        for i in range(3)
    ]
    completions = [
        [{"role": "assistant", "content": "<think>[[judge: fail=400]] scratch</think>2 + 2 = 4 [[judge: score=1]]"}],
        [{"role": "assistant", "content": "It is 4 [[judge: score=0.5]]"}],
        [{"role": "assistant", "content": "Four [[judge: score=0]]"}],
    ]
    refs = ["Add: \\boxed{4}", "Add: \\boxed{4}", "Add: \\boxed{4}"]
    assert grade(judge, completions, prompts, solution=refs) == [1.0, 0.5, 0.0]
    first = sorted(server.requests, key=lambda r: user_message(r))[0]
    assert first["model"] == "judge-model" and first["temperature"] == pytest.approx(0.1)
    assert first["messages"][0] == {"role": "system", "content": "You are a strict grader."}
    text = user_message(first)
    sections = (
        "## Scoring Rubric",
        "## Problem\nQ0: 2+2?",
        "## Reference Solution\nAdd: \\boxed{4}",
        "## Student Solution\n2 + 2 = 4",
        "Score: \\boxed{...}",
    )
    order = [text.index(s) for s in sections]
    assert order == sorted(order)
    assert "<think>" not in text and "scratch" not in text and "Reason step by step" not in text
    stats = judge.stats()
    assert (stats["judge/scored"], stats["judge/requests"], stats["judge/failures"]) == (3, 3, 0)
    assert stats["judge/score_mean"] == pytest.approx(0.5)
    assert all(math.isfinite(stats[f"judge/latency_p{q}"]) for q in (50, 90, 99))
    assert_counters_add_up(stats)


def test_problem_column_and_no_reference(server):
    judge = RubricJudge(server.base_url, **FAST)
    assert grade(judge, ["x [[judge: score=0.5]]"], ["chat-formatted prompt"], problem=["Prove it."]) == [0.5]
    text = user_message(server.requests[0])
    assert "## Problem\nProve it." in text and "Reference Solution" not in text


def test_judge_output_forms(server):
    judge = RubricJudge(server.base_url, **FAST)
    completions = [
        "a [[judge: reply=think score=1]]",
        "b [[judge: reply=fallback score=0.5]]",
        "c [[judge: reply=reasoning score=0]]",
    ]
    assert grade(judge, completions) == [1.0, 0.5, 0.0]


def test_valid_scores_are_configurable(server):
    binary = RubricJudge(server.base_url, valid_scores=(0, 1), **FAST)
    assert grade(binary, ["a [[judge: score=0.5]]", "b [[judge: score=1]]"]) == [None, 1.0]
    assert binary.stats()["judge/failures/unparseable"] == 1
    tiers = (0, 0.25, 0.5, 0.75, 1)
    fine = RubricJudge(server.base_url, valid_scores=tiers, rubric="## Scoring Rubric\n5 tiers", **FAST)
    assert grade(fine, ["c [[judge: score=0.75]]"]) == [0.75]
    assert "5 tiers" in user_message(server.requests[-1])


def test_slow_response_times_out_then_retry_succeeds(server):
    judge = RubricJudge(server.base_url, **{**FAST, "request_timeout": 0.5, "max_retries": 1})
    t0 = time.perf_counter()
    assert grade(judge, ["a [[judge: delay=5]]", "b [[judge: delay=5x1 score=0.5]]"]) == [None, 0.5]
    assert time.perf_counter() - t0 < 3.0  # two 0.5 s attempts, not the server's 5 s
    stats = judge.stats()
    assert stats["judge/failures/timeout"] == 1 and stats["judge/requests"] == 4 and stats["judge/retries"] == 2
    assert stats["judge/latency_max"] >= 0.5
    assert_counters_add_up(stats)


def test_server_errors_are_retried_with_backoff(server):
    judge = RubricJudge(server.base_url, **FAST)
    completions = ["a [[judge: fail=500x2 score=0.5]]", "b [[judge: fail=503]]", "c [[judge: fail=429x1]]"]
    assert grade(judge, completions) == [0.5, None, 1.0]
    stats = judge.stats()
    assert stats["judge/requests"] == 3 + 3 + 2 and stats["judge/retries"] == 5
    assert stats["judge/failures/server_error"] == 1 and stats["judge/failures"] == 1


def test_client_errors_are_not_retried(server):
    judge = RubricJudge(server.base_url, **FAST)
    assert grade(judge, ["a [[judge: fail=400]]", "b [[judge: fail=404]]"]) == [None, None]
    stats = judge.stats()
    assert stats["judge/requests"] == 2 and stats["judge/failures/client_error"] == 2


def test_garbage_and_empty_outputs_are_none_not_zero(server):
    judge = RubricJudge(server.base_url, **FAST)
    modes = ["garbage", "empty", "null", "badjson", "drop"]
    assert grade(judge, [f"{m} [[judge: reply={m}]]" for m in modes]) == [None] * 5
    stats = judge.stats()
    expected = {"unparseable": 1, "empty": 2, "invalid_response": 1, "connection": 1}
    assert {k: stats[f"judge/failures/{k}"] for k in expected} == expected
    assert stats["judge/requests"] == 4 + 3  # only the dropped connection is retried
    assert_counters_add_up(stats)


def test_connection_refused():
    with socket.socket() as sock:  # a port that was just free and now has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = RubricJudge(f"http://127.0.0.1:{port}/v1", **FAST)
    assert grade(judge, ["a", "b"]) == [None, None]
    stats = judge.stats()
    assert stats["judge/failures/connection"] == 2 and stats["judge/requests"] == 6


def test_cache_dedup_and_skipped_inputs(server):
    judge = RubricJudge(server.base_url, **FAST)
    completions = [None, "same [[judge: score=0.5]]", "same [[judge: score=0.5]]", "bad [[judge: fail=400]]", None]
    prompts = ["p"] * 5
    assert grade(judge, completions, prompts) == [None, 0.5, 0.5, None, None]
    assert grade(judge, completions, prompts) == [None, 0.5, 0.5, None, None]
    stats = judge.stats()
    assert stats["judge/skipped"] == 4 and stats["judge/deduplicated"] == 1
    assert stats["judge/cache_hits"] == 2 and stats["judge/requests"] == 3  # the 400 twice: failures are not cached
    assert stats["judge/cache_size"] == 1
    assert_counters_add_up(stats)
    judge.reset()
    assert judge.stats()["judge/completions"] == 0 and math.isnan(judge.stats()["judge/latency_p50"])
    grade(judge, completions[1:2], ["p"])
    assert judge.stats()["judge/cache_hits"] == 1


def test_cache_key_includes_problem_and_reference(server):
    judge = RubricJudge(server.base_url, **FAST)
    grade(judge, ["x"], ["p1"])
    grade(judge, ["x"], ["p2"])
    grade(judge, ["x"], ["p2"], solution=["ref"])
    assert judge.stats()["judge/requests"] == 3


def test_batch_deadline_returns_none_for_pending(server):
    judge = RubricJudge(server.base_url, **{**FAST, "request_timeout": 30.0, "batch_deadline": 1.5})
    t0 = time.perf_counter()
    assert grade(judge, ["fast [[judge: score=1]]", "slow [[judge: delay=20]]"]) == [1.0, None]
    assert time.perf_counter() - t0 < 5.0
    stats = judge.stats()
    assert stats["judge/failures/deadline"] == 1
    assert_counters_add_up(stats)


def test_concurrency_is_bounded(server):
    judge = RubricJudge(server.base_url, **{**FAST, "max_concurrency": 4})
    assert grade(judge, [f"{i} [[judge: delay=0.05]]" for i in range(20)]) == [1.0] * 20
    assert server.max_in_flight == 4


def test_batch_of_500_with_mixed_faults(server):
    """Every good response is scored, every failed one is None, the counters add up, all within the deadline."""
    # (directive, expected result, failure kind, requests sent) with max_retries=2
    patterns = [
        ("score=1", 1.0, None, 1),
        ("score=0.5", 0.5, None, 1),
        ("score=0", 0.0, None, 1),
        ("delay=0.05 score=0.5", 0.5, None, 1),
        ("fail=500x1 score=1", 1.0, None, 2),
        ("fail=503", None, "server_error", 3),
        ("delay=5", None, "timeout", 3),
        ("reply=garbage", None, "unparseable", 1),
        ("reply=empty", None, "empty", 1),
        ("fail=400", None, "client_error", 1),
        ("reply=drop", None, "connection", 3),
        ("reply=think score=0.5", 0.5, None, 1),
    ]
    deadline = 30.0
    judge = RubricJudge(server.base_url, **{**FAST, "request_timeout": 1.5, "batch_deadline": deadline})
    chosen = [patterns[(7 * i) % len(patterns)] for i in range(500)]
    completions = [f"solution {i} [[judge: {p[0]}]]" for i, p in enumerate(chosen)]
    t0 = time.perf_counter()
    results = grade(judge, completions)
    elapsed = time.perf_counter() - t0
    assert elapsed < deadline
    assert results == [p[1] for p in chosen]
    stats = judge.stats()
    assert_counters_add_up(stats)
    assert stats["judge/completions"] == 500 and stats["judge/failures/deadline"] == 0
    assert stats["judge/scored"] == sum(p[1] is not None for p in chosen)
    for kind in FAILURE_KINDS:
        assert stats[f"judge/failures/{kind}"] == sum(p[2] == kind for p in chosen), kind
    assert stats["judge/requests"] == sum(p[3] for p in chosen) == sum(server.attempts.values())
    assert stats["judge/retries"] == stats["judge/requests"] - 500
    assert stats["judge/latency_p50"] <= stats["judge/latency_p90"] <= stats["judge/latency_p99"]


def test_runs_on_trl_reward_event_loop_and_across_loops(server):
    from trl.trainer.utils import is_async_callable, shutdown_event_loop_in_daemon, start_event_loop_in_daemon

    judge = RubricJudge(server.base_url, **FAST)
    assert is_async_callable(judge) and judge.__name__ == "rubric_judge"
    thread, loop, ready = start_event_loop_in_daemon(name="reward-loop")
    ready.wait()
    try:
        for _ in range(2):  # the trainer reuses one daemon loop for every step
            future = asyncio.run_coroutine_threadsafe(judge(prompts=["p"] * 2, completions=["a", "b"]), loop)
            assert future.result(timeout=10) == [1.0, 1.0]
        asyncio.run_coroutine_threadsafe(judge.aclose(), loop).result(timeout=10)
    finally:
        shutdown_event_loop_in_daemon(thread, loop)
        loop.close()
    assert grade(judge, ["c"]) == [1.0]  # a new loop gets its own client and semaphore
    assert judge.stats()["judge/requests"] == 3


def test_pickle_round_trip_and_log_metric(server):
    judge = pickle.loads(pickle.dumps(RubricJudge(server.base_url, log_metrics=True, **FAST)))
    logged = {}
    assert grade(judge, ["x [[judge: score=0.5]]"], ["p"], log_metric=lambda k, v: logged.__setitem__(k, v)) == [0.5]
    assert logged["judge/scored"] == 1 and logged["judge/score_mean"] == 0.5 and "judge/latency_p99" in logged


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_concurrency=0),
        dict(max_retries=-1),
        dict(request_timeout=0),
        dict(batch_deadline=-1.0),
        dict(valid_scores=()),
        dict(base_url=""),
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RubricJudge(**{"base_url": "http://127.0.0.1:1/v1", **kwargs})


def test_mismatched_columns_raise():
    judge = RubricJudge("http://127.0.0.1:1/v1", **FAST)
    with pytest.raises(ValueError, match="prompts"):
        grade(judge, ["a", "b"], ["p"])
    with pytest.raises(ValueError, match="solution"):
        grade(judge, ["a", "b"], ["p", "q"], solution=["only one"])
