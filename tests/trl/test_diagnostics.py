"""Learning-signal diagnostics: zero-advantage and all-correct / all-incorrect group shares, process/accuracy
correlation, by hand, against ``torch.corrcoef``, and as the trainer logs them."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from papo_trl.diagnostics import process_accuracy_corr, signal_metrics
from papo_trl.estimators import compute_advantages
from tests.trl.tiny import (
    digit_outcome_reward,
    digit_process_reward,
    tiny_args,
    tiny_dataset,
    tiny_model,
    tiny_tokenizer,
)

NAN = float("nan")
# three groups of G=4: mixed, all correct (process scores differ), all incorrect
OUTCOME = torch.tensor([1.0, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0])
PROCESS = torch.tensor([1.0, 0.5, NAN, NAN, 1, 1, 0.5, 0, NAN, NAN, NAN, NAN])
CORRECT = OUTCOME == 1


def _advantages(estimator):
    return compute_advantages(estimator, OUTCOME[:, None], PROCESS, CORRECT, 4, reward_weights=torch.ones(1))


def test_group_shares_grpo_and_papo():
    grpo = signal_metrics(_advantages("grpo").total, CORRECT, 4, process=PROCESS)
    papo = signal_metrics(_advantages("papo").total, CORRECT, 4, process=PROCESS)
    for m in (grpo, papo):
        assert m["papo/all_correct_group_frac"] == m["papo/all_incorrect_group_frac"] == pytest.approx(1 / 3)
    # GRPO: both uniform groups carry no signal; PAPO's A_proc ranks the all-correct group's responses
    assert grpo["papo/zero_advantage_group_frac"] == pytest.approx(2 / 3)
    assert papo["papo/zero_advantage_group_frac"] == pytest.approx(1 / 3)
    # scored: 1, 0.5 (correct), 1, 1, 0.5, 0 (correct): every scored response is correct
    assert math.isnan(grpo["papo/process_accuracy_corr"])
    assert "papo/process_accuracy_corr" not in signal_metrics(_advantages("grpo").total, CORRECT, 4)


def test_valid_rows_restrict_the_groups():
    valid = torch.tensor([True] * 4 + [False] * 4 + [True] * 4)
    m = signal_metrics(_advantages("papo").total, CORRECT, 4, valid=valid, process=torch.tensor([0.0] * 12))
    assert m["papo/all_correct_group_frac"] == 0.0 and m["papo/all_incorrect_group_frac"] == 0.5
    assert m["papo/zero_advantage_group_frac"] == 0.5
    assert math.isnan(m["papo/process_accuracy_corr"])  # constant process score
    none = signal_metrics(torch.zeros(4), CORRECT[:4], 4, valid=torch.zeros(4, dtype=torch.bool))
    assert all(math.isnan(v) for v in none.values())


def test_process_accuracy_corr_by_hand():
    process = torch.tensor([1.0, 0.0, NAN, 1.0, 0.0])
    correct = torch.tensor([True, False, True, True, True])
    # scored pairs (p, c): (1, 1), (0, 0), (1, 1), (0, 1): r = 1 / sqrt(3)
    assert process_accuracy_corr(process, correct) == pytest.approx(1 / math.sqrt(3))
    assert math.isnan(process_accuracy_corr(torch.tensor([0.3, NAN]), torch.tensor([True, False])))
    assert math.isnan(process_accuracy_corr(torch.tensor([0.3, 0.7]), torch.tensor([True, True])))


@given(st.lists(st.tuples(st.sampled_from([NAN, 0.0, 0.25, 0.5, 1.0]), st.booleans()), min_size=1, max_size=24))
def test_process_accuracy_corr_is_pearson(rows):
    process = torch.tensor([p for p, _ in rows], dtype=torch.float64)
    correct = torch.tensor([c for _, c in rows])
    r = process_accuracy_corr(process, correct)
    scored = ~torch.isnan(process)
    p, c = process[scored], correct[scored].double()
    if p.numel() < 2 or p.std() == 0 or c.std() == 0:
        assert math.isnan(r)
    else:
        assert r == pytest.approx(torch.corrcoef(torch.stack([p, c]))[0, 1].item(), abs=1e-12)
        assert -1.0 - 1e-12 <= r <= 1.0 + 1e-12


def test_trainer_logs_the_signal_metrics(tmp_path):
    """GRPO advantages with a logged-only process reward (a PAPO option): the trainer logs the shares every step,
    consistent with each other (without any PAPO option it logs TRL's metrics only: see test_dropin.py)."""
    from papo_trl import PAPOTrainer

    tokenizer = tiny_tokenizer()
    trainer = PAPOTrainer(
        model=tiny_model(tokenizer), reward_funcs=[digit_outcome_reward], process_reward_funcs=[digit_process_reward],
        args=tiny_args(tmp_path, advantage_estimator="grpo", max_steps=1, process_reward_on_correct_only=False),
        train_dataset=tiny_dataset(), processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    for key in ("papo/zero_advantage_group_frac", "papo/all_correct_group_frac", "papo/all_incorrect_group_frac"):
        assert 0.0 <= log[key] <= 1.0
    # GRPO on a binary outcome: a group has no signal iff it is all correct or all incorrect
    uniform = log["papo/all_correct_group_frac"] + log["papo/all_incorrect_group_frac"]
    assert log["papo/zero_advantage_group_frac"] == pytest.approx(uniform)
    assert log["papo/zero_advantage_frac"] == pytest.approx(uniform)
    corr = log["papo/process_accuracy_corr"]
    assert corr is None or -1.0 <= corr <= 1.0  # None: undefined at this step (TRL logs NaN as None)
