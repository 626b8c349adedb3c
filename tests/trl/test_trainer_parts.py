"""The trainer's building blocks without a model: estimators, correctness, process-reward calls, diagnostics."""

import asyncio
import math
import threading
from types import SimpleNamespace

import pytest
import torch

from papo_kernels.advantages import weighted_nansum
from papo_kernels.advantages.naive import naive_gdpo_advantages, naive_grpo_advantages, naive_papo_advantages
from papo_trl.diagnostics import advantage_metrics, process_metrics, reward_func_counters
from papo_trl.estimators import compute_advantages, correctness, fill_unscorable
from papo_trl.process_rewards import check_process_reward_funcs, score_process_rewards

G = 4


def _batch(seed=0, groups=5, K=2):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 2, (groups * G, K), generator=g).float()
    process = torch.rand(groups * G, generator=g)
    return rewards, process


def test_design_worked_example():
    outcome = torch.tensor([1.0, 1, 1, 0, 0, 0, 0, 0])[:, None]
    process = torch.tensor([1.0, 1, 0.5, 0, 0, 0, 0, 0])
    correct = outcome[:, 0] > 0
    adv = compute_advantages("papo", outcome, process, correct, 8, reward_weights=torch.ones(1))
    expected = torch.tensor([1.7850, 1.7850, 0.0529] + [-0.7246] * 5)
    torch.testing.assert_close(adv.total, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(adv.process[:3], torch.tensor([0.5774, 0.5774, -1.1547]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("estimator, norm, scale_by_std", [("papo", "correct", True), ("papo_fullnorm", "all", True),
                                                           ("dr_grpo", "correct", False)])  # fmt: skip
def test_papo_family_matches_reference(estimator, norm, scale_by_std):
    rewards, process = _batch()
    weights = torch.tensor([1.0, 0.5])
    correct = rewards[:, 0] >= 1
    process = process.masked_fill(~correct, float("nan")) if norm == "correct" else process
    adv = compute_advantages(
        estimator, rewards, process, correct, G, reward_weights=weights, lambda_process=0.7, eps=None
    )
    ref = naive_papo_advantages(
        weighted_nansum(rewards, weights), process, correct, G, lambda_process=0.7, eps=1e-6,
        scale_by_std=scale_by_std, process_norm=norm,
    )  # fmt: skip
    torch.testing.assert_close(adv.total, ref.total, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adv.process_active, ref.process_active)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_matches_trl_reference_with_nan(scale):
    rewards, _ = _batch(1)
    rewards[3, 1] = float("nan")
    rewards[6] = float("nan")  # unscorable row
    weights = torch.tensor([1.0, 2.0])
    adv = compute_advantages("grpo", rewards, None, rewards[:, 0] > 0, G, reward_weights=weights, scale_rewards=scale)
    ref = naive_grpo_advantages(rewards, G, weights=weights, scale=scale, eps=1e-4).advantages
    torch.testing.assert_close(adv.total, ref, atol=1e-5, rtol=1e-5)
    assert adv.total[6] == 0 and adv.outcome is None


def test_dr_grpo_without_process_centres_only():
    rewards, _ = _batch(2)
    adv = compute_advantages("dr_grpo", rewards, None, rewards[:, 0] > 0, G, reward_weights=torch.ones(2))
    ref = naive_grpo_advantages(rewards, G, weights=torch.ones(2), scale="none", eps=1e-4).advantages
    torch.testing.assert_close(adv.total, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("estimator", ["gdpo", "grpo_normalize_then_sum"])
def test_gdpo_matches_reference(estimator):
    rewards, _ = _batch(3)
    weights = torch.tensor([0.3, 1.0])
    agg = "normalize_then_sum" if estimator != "gdpo" else "sum_then_normalize"
    adv = compute_advantages(
        estimator.split("_")[0], rewards, None, rewards[:, 0] > 0, G, reward_weights=weights,
        multi_objective_aggregation=agg,
    )  # fmt: skip
    ref = naive_gdpo_advantages(rewards, G, weights=weights, eps=1e-4).advantages
    torch.testing.assert_close(adv.total, ref, atol=1e-5, rtol=1e-5)


def test_invalid_rows_are_zero_and_out_of_batch_statistics():
    rewards, _ = _batch(4, groups=4, K=1)
    valid = torch.tensor([True] * 12 + [False] * 4)
    adv = compute_advantages(
        "grpo", rewards, None, rewards[:, 0] > 0, G, reward_weights=torch.ones(1), scale_rewards="batch", valid=valid
    )
    ref = naive_grpo_advantages(rewards[:12], G, weights=None, scale="batch", eps=1e-4).advantages
    torch.testing.assert_close(adv.total[:12], ref, atol=1e-5, rtol=1e-5)
    assert (adv.total[12:] == 0).all()


def test_unscorable_rows_get_zero_papo_advantage():
    outcome = torch.tensor([1.0, float("nan"), 0.0, 1.0])[:, None]
    adv = compute_advantages("papo", outcome, None, outcome[:, 0] > 0, G, reward_weights=torch.ones(1))
    assert adv.total[1] == 0
    filled = fill_unscorable(torch.tensor([1.0, float("nan"), 0.0, 1.0, *[float("nan")] * 4]), G)
    torch.testing.assert_close(filled, torch.tensor([1.0, 2 / 3, 0.0, 1.0, 0, 0, 0, 0]))


def test_correctness_index_threshold_and_nan():
    rewards = torch.tensor([[1.0, 0.0], [0.5, 1.0], [float("nan"), 1.0], [1.0, float("nan")]])
    w = torch.ones(2)
    assert correctness(rewards, w, 0, 1.0).tolist() == [True, False, False, True]
    assert correctness(rewards, w, 1, 0.5).tolist() == [False, True, True, False]
    assert correctness(rewards, w, None, 1.5).tolist() == [False, True, False, False]


def _inputs(n):
    return [{"prompt": f"p{i}", "answer": str(i)} for i in range(n)]


def test_process_rewards_called_on_rows_only_and_none_is_nan():
    seen = {}

    def judge(prompts, completions, completion_ids, answer, trainer_state, log_extra, **kwargs):
        seen.update(prompts=prompts, completions=completions, answer=answer, state=trainer_state)
        log_extra("verdict", [f"v{c}" for c in completions])
        return [None if c == "c3" else 0.5 for c in completions]

    extra = {}
    out = score_process_rewards(
        [judge], ["judge"], _inputs(5), [f"p{i}" for i in range(5)], [f"c{i}" for i in range(5)],
        [[i] for i in range(5)], [1, 3, 4], base_kwargs={"trainer_state": "S"},
        log_extra=lambda col, vals: extra.setdefault(col, vals),
    )  # fmt: skip
    assert seen["completions"] == ["c1", "c3", "c4"] and seen["answer"] == ["1", "3", "4"] and seen["state"] == "S"
    assert torch.isnan(out[[0, 2, 3], 0]).all() and out[1, 0] == 0.5 and out[4, 0] == 0.5
    assert extra["verdict"] == [None, "vc1", None, "vc3", "vc4"]


def test_process_rewards_async_and_length_check():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def judge(prompts, completions, **kwargs):
        await asyncio.sleep(0)
        return [1.0] * len(completions)

    def broken(prompts, completions, **kwargs):
        return [1.0]

    try:
        out = score_process_rewards(
            [judge], ["judge"], _inputs(3), ["a"] * 3, ["b"] * 3, [[1]] * 3, [0, 2], base_kwargs={}, async_loop=loop
        )
        assert out[:, 0].tolist()[0] == 1.0 and math.isnan(out[1, 0]) and out[2, 0] == 1.0
        with pytest.raises(ValueError, match="broken"):
            score_process_rewards([broken], ["broken"], _inputs(3), ["a"] * 3, ["b"] * 3, [[1]] * 3, [0, 1],
                                  base_kwargs={})  # fmt: skip
    finally:
        loop.call_soon_threadsafe(loop.stop)


@pytest.mark.parametrize("bad", ["some/judge-model", torch.nn.Linear(2, 2), 3])
def test_process_reward_funcs_must_be_callables(bad):
    with pytest.raises(ValueError, match="process_reward_funcs"):
        check_process_reward_funcs([len, bad])


def test_advantage_metrics():
    adv = compute_advantages(
        "papo", torch.tensor([1.0, 1, 1, 0, 0, 0, 0, 0])[:, None], torch.tensor([1.0, 1, 0.5, 0, 0, 0, 0, 0]),
        torch.tensor([True, True, True, False, False, False, False, False]), 8, reward_weights=torch.ones(1),
    )  # fmt: skip
    correct = torch.tensor([True] * 3 + [False] * 5)
    m = advantage_metrics(adv, correct)
    assert m["papo/process_active_ratio"] == 1.0 and m["papo/correct_frac"] == 3 / 8
    assert m["papo/adv_incorrect/min"] == pytest.approx(-0.7246, abs=1e-4)
    assert m["papo/adv_correct/min"] == pytest.approx(0.0529, abs=1e-4)
    assert m["papo/zero_advantage_frac"] == 0.0
    assert m["papo/A_proc/mean"] == pytest.approx(0.0, abs=1e-6)
    p = process_metrics(torch.tensor([[1.0], [0.5], [float("nan")], [float("nan")]]), ["judge"], correct[:4])
    assert p["process_rewards/judge/mean"] == 0.75 and p["process_rewards/scored_frac"] == 0.5
    assert p["process_rewards/scored_frac_correct"] == pytest.approx(2 / 3)


class _Judge:
    def __init__(self):
        self.resets = 0

    def stats(self, reset=False):
        self.resets += reset
        return {"judge/requests": 4.0, "judge/latency_p50": 0.2, "judge/failures/timeout": 1.0}


class _Counting:
    counters = {"calls": 3, "nested": {"errors": 1}, "label": "x"}


def test_reward_func_counters_reads_and_resets():
    accelerator = SimpleNamespace(device="cpu", gather=lambda t: t)
    judge = _Judge()
    out = reward_func_counters([judge, _Counting(), len], ["judge", "counting", "len"], accelerator)
    assert out == {
        "judge/requests": 4.0, "judge/latency_p50": 0.2, "judge/failures/timeout": 1.0,
        "counting/calls": 3.0, "counting/nested/errors": 1.0,
    }  # fmt: skip
    assert judge.resets == 1
