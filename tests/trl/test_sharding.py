"""Start-up checks of sharded setups (``papo_trl.sharding``): each refused setup raises a ``ValueError`` that names
the option to change; accepted setups pass. The two-process runs of ``test_sharded.py`` show the same errors raised
on every process of a real launch."""

from types import SimpleNamespace

import pytest

from papo_trl import PAPOTrainer
from papo_trl.sharding import check_batch_groups, check_sharding, tensor_parallel_head
from tests.trl.tiny import digit_outcome_reward, tiny_args, tiny_dataset, tiny_model, tiny_tokenizer


def batch_args(per_device=6, G=4, steps_per_generation=1, processes=2):
    return SimpleNamespace(
        per_device_train_batch_size=per_device, num_generations=G,
        generation_batch_size=per_device * processes * steps_per_generation,
    )  # fmt: skip


def accelerator(tp_size=1, autotp=0, processes=2):
    parallelism = SimpleNamespace(tp_size=tp_size, tp_enabled=tp_size > 1)
    plugin = SimpleNamespace(deepspeed_config={"tensor_parallel": {"autotp_size": autotp}}) if autotp else None
    return SimpleNamespace(num_processes=processes, parallelism_config=parallelism,
                           state=SimpleNamespace(deepspeed_plugin=plugin))  # fmt: skip


@pytest.mark.parametrize("per_device, G, spg", [(6, 4, 1), (2, 8, 2), (1, 2, 1), (3, 4, 2)])
def test_whole_groups_pass(per_device, G, spg):
    check_batch_groups(batch_args(per_device, G, spg), num_processes=2)  # groups may straddle processes


def test_groups_cut_by_the_process_count_are_refused():
    with pytest.raises(ValueError, match=r"`per_device_train_batch_size` x processes x .* `num_generations` \(4\)"):
        check_batch_groups(batch_args(per_device=3, G=4), num_processes=2)
    stale = batch_args(per_device=6, G=4, processes=1)  # built by one process, run by two
    with pytest.raises(ValueError, match=r"`generation_batch_size` \(6\) is not a multiple .* \(6 x 2 = 12\)"):
        check_batch_groups(stale, num_processes=2)


def test_tensor_parallel_heads_are_found():
    model = tiny_model(tiny_tokenizer())
    assert tensor_parallel_head(model, accelerator()) is None
    assert "`parallelism_config.tp_size` is 2" in tensor_parallel_head(model, accelerator(tp_size=2))
    assert "`tensor_parallel.autotp_size` is 4" in tensor_parallel_head(model, accelerator(autotp=4))


def test_tensor_parallel_head_is_refused_only_for_the_fused_loss():
    model, args = tiny_model(tiny_tokenizer()), batch_args()
    check_sharding(args, model, accelerator(tp_size=2), fused_loss=False)  # TRL's loss calls the head itself
    with pytest.raises(
        ValueError, match=r"`use_fused_loss=True` .* `parallelism_config.tp_size` is 2: .* `use_fused_loss=False`"
    ):
        check_sharding(args, model, accelerator(tp_size=2), fused_loss=True)


def test_trainer_runs_the_checks_at_start_up(tmp_path):
    tokenizer = tiny_tokenizer()
    args = tiny_args(tmp_path, advantage_estimator="grpo", per_device_train_batch_size=8, num_generations=4)
    args.generation_batch_size = 6  # as if built for another process count
    with pytest.raises(ValueError, match=r"`generation_batch_size` \(6\)"):
        PAPOTrainer(model=tiny_model(tokenizer), reward_funcs=digit_outcome_reward, args=args,
                    train_dataset=tiny_dataset(), processing_class=tokenizer)  # fmt: skip
