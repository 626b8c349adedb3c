"""DAPO dynamic sampling: the prompt stream, row re-balancing, and training with mostly uniform groups."""

import logging
from types import SimpleNamespace

import torch

from papo_trl import PAPOTrainer
from papo_trl.sampling import PromptStream, concat_rows, gather_rows, group_rows, select_groups
from tests.trl.tiny import (
    digit_outcome_reward,
    digit_process_reward,
    tiny_args,
    tiny_dataset,
    tiny_model,
    tiny_tokenizer,
)

TOKENIZER = tiny_tokenizer()


def test_prompt_stream_shards_repeats_and_resumes():
    data = list(range(10))
    streams = [PromptStream(data, 3, 4, seed=0, process_index=p, num_processes=2) for p in range(2)]
    first = [s.next_batch() for s in streams]
    rows = first[0] + first[1]
    assert len(first[0]) == len(first[1]) == 6
    assert [rows[i : i + 4] for i in range(0, 12, 4)] == [[r] * 4 for r in rows[::4]]  # G repeats, contiguous
    assert len(set(rows)) == 3
    for _ in range(5):  # crosses an epoch (3 batches of 3 prompts per epoch of 10)
        streams[0].next_batch()
    resumed = PromptStream(data, 3, 4, seed=0, process_index=0, num_processes=2)
    resumed.load_state_dict(streams[0].state_dict())
    assert resumed.next_batch() == streams[0].next_batch()
    again = PromptStream(data, 3, 4, seed=0, process_index=0, num_processes=2)
    assert again.next_batch() == first[0]


def test_rows_are_padded_on_the_right_side_and_selected_by_group():
    accelerator = SimpleNamespace(pad_across_processes=lambda t, **kw: t, gather=lambda t: t)
    a = {"prompt_ids": torch.tensor([[5, 6]]), "completion_ids": torch.tensor([[7]]), "advantages": torch.ones(1)}
    b = {"prompt_ids": torch.tensor([[4, 5, 6]]), "completion_ids": torch.tensor([[8, 9]]), "advantages": torch.ones(1)}
    merged = concat_rows([gather_rows(accelerator, x, pad_token_id=0) for x in (a, b)], pad_token_id=0)
    assert merged["prompt_ids"].tolist() == [[0, 5, 6], [4, 5, 6]]
    assert merged["completion_ids"].tolist() == [[7, 0], [8, 9]]
    groups, valid = select_groups(torch.tensor([False, True, False, True, True]), target=2)
    assert groups.tolist() == [1, 3] and valid.all()
    groups, valid = select_groups(torch.tensor([False, True, False]), target=2)
    assert groups.tolist() == [1, 0] and valid.tolist() == [True, False]
    assert group_rows(torch.tensor([2, 0]), 3).tolist() == [6, 7, 8, 0, 1, 2]


def mostly_uniform_reward(completions, idx, **kwargs):
    """Uniform (1.0) for odd prompts, the digit reward for even ones: most groups carry no GRPO signal."""
    return [digit_outcome_reward([c])[0] if i % 2 == 0 else 1.0 for c, i in zip(completions, idx, strict=True)]


def constant_reward(completions, **kwargs):
    return [1.0] * len(completions)


def _trainer(tmp_path, reward, **overrides):
    trainer = PAPOTrainer(
        model=tiny_model(TOKENIZER),
        reward_funcs=reward,
        process_reward_funcs=digit_process_reward,
        args=tiny_args(tmp_path, dynamic_sampling=True, **overrides),
        train_dataset=tiny_dataset(),
        processing_class=TOKENIZER,
    )
    captured = []
    set_advantages = trainer._set_advantages

    def spy(output, rewards_per_func, process, G, mode, valid=None, *args):
        out = set_advantages(output, rewards_per_func, process, G, mode, valid, *args)
        captured.append((rewards_per_func.clone(), valid.clone(), out))
        return out

    trainer._set_advantages = spy
    return trainer, captured


def test_dynamic_sampling_fills_the_batch_with_informative_groups(tmp_path):
    trainer, captured = _trainer(tmp_path, mostly_uniform_reward, max_generation_batches=10)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert max(log["dynamic_sampling/rounds"] for log in logs) >= 2
    assert min(log["dynamic_sampling/kept_frac"] for log in logs) < 1.0
    assert all(log["dynamic_sampling/batch_fill"] == 1.0 for log in logs)
    assert trainer._prompt_stream.drawn > 0
    assert len(trainer._logs["advantages"]) == len(trainer._logs["prompt"])  # one logged advantage per completion
    for rewards, valid, out in captured:
        assert valid.all()
        groups = rewards[:, 0].view(-1, 4)
        assert (groups != groups[:, :1]).any(dim=1).all()  # no uniform group reaches the loss
        assert out["completion_ids"].shape[0] == 8 and out["num_items_in_batch"] == out["completion_mask"].sum()


def test_cap_hit_warns_masks_and_trains(tmp_path, caplog):
    trainer, captured = _trainer(tmp_path, constant_reward, max_generation_batches=2)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "Dynamic sampling kept 0 of the 2 groups" in caplog.text
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(log["dynamic_sampling/cap_hit"] == 1.0 and log["dynamic_sampling/rounds"] == 2 for log in logs)
    assert all(log["dynamic_sampling/batch_fill"] == 0.0 and log["loss"] == 0.0 for log in logs)
    for _, valid, out in captured:
        assert not valid.any() and out["completion_mask"].sum() == 0 and (out["advantages"] == 0).all()
