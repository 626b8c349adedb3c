"""Two CPU processes: groups straddle processes, yet advantages equal the single-process ones on the gathered
rewards, dynamic sampling stays in lockstep, DARO's weights stay identical and, without a PAPO option, the logs are
GRPOTrainer's. The test launches this file with
``accelerate launch --multi_gpu --num_processes 2`` (torch's elastic launcher: ``--cpu`` alone starts one process
unless MPI is configured); ``use_cpu=True`` makes it two gloo processes on CPU. Run as a script, it is one worker.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
G, PER_DEVICE = 4, 6  # 12 rows per step: the second group has rows 4-5 on rank 0 and rows 6-7 on rank 1


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("TRITON_INTERPRET", "1")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", "0", __file__, str(tmp_path),  # the launcher binds the port: none is picked here
    ]  # fmt: skip
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["batches"] >= 2 and rank["max_abs_diff"] < 1e-5
        assert rank["straddling_groups"] >= 1 and rank["process_active_groups"] >= 1
    assert ranks[0]["gathered"] == ranks[1]["gathered"]  # every process saw the same gathered rewards
    assert ranks[0]["rounds"] == ranks[1]["rounds"] and max(ranks[0]["rounds"]) >= 2
    assert ranks[0]["daro_weights"] == ranks[1]["daro_weights"]
    assert ranks[0]["daro_weights"] != [1.0] * (G - 1)
    assert ranks[0]["dropin"] == ranks[1]["dropin"] > 0  # clipped sequences logged as GRPOTrainer logs them


def _worker(out_dir: str) -> None:
    import torch
    from accelerate.utils import gather

    from papo_kernels.advantages.naive import naive_papo_advantages
    from papo_trl import PAPOTrainer
    from tests.trl.test_trainer_sampling import mostly_uniform_reward
    from tests.trl.tiny import digit_process_reward, tiny_args, tiny_dataset, tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    common = dict(per_device_train_batch_size=PER_DEVICE, num_generations=G, max_steps=2)

    def trainer(name, **overrides):
        return PAPOTrainer(
            model=tiny_model(tokenizer),
            reward_funcs=mostly_uniform_reward,
            process_reward_funcs=digit_process_reward,
            args=tiny_args(Path(out_dir) / name, **common, **overrides),
            train_dataset=tiny_dataset(),
            processing_class=tokenizer,
        )

    papo = trainer("papo", dynamic_sampling=True, max_generation_batches=6)
    report = {"batches": 0, "max_abs_diff": 0.0, "straddling_groups": 0, "process_active_groups": 0, "gathered": []}
    set_advantages = papo._set_advantages

    def spy(output, rewards_per_func, process, G_, mode, valid=None, *args):
        out = set_advantages(output, rewards_per_func, process, G_, mode, valid, *args)
        local = out["advantages"]
        everywhere = gather(local)  # process order, as TRL gathers the rewards
        correct = rewards_per_func[:, 0] >= 1.0
        options = dict(lambda_process=1.0, eps=1e-6, scale_by_std=True, process_norm="correct")
        ref = naive_papo_advantages(rewards_per_func[:, 0], process[:, 0], correct, G_, **options)
        ref_total = torch.where(valid, ref.total, torch.zeros_like(ref.total))
        report["batches"] += 1
        report["max_abs_diff"] = max(report["max_abs_diff"], (everywhere - ref_total).abs().max().item())
        rows_per_process = local.shape[0]
        starts = torch.arange(0, everywhere.shape[0], G_)
        report["straddling_groups"] += int(((starts % rows_per_process) + G_ > rows_per_process).sum())
        report["process_active_groups"] += int(ref.process_active.sum())
        report["gathered"].append(torch.nan_to_num(process[:, 0], nan=-1.0).tolist())
        return out

    papo._set_advantages = spy
    papo.train()
    report["rounds"] = [h["dynamic_sampling/rounds"] for h in papo.state.log_history if "loss" in h]

    daro = trainer("daro", advantage_estimator="daro", daro_learning_rate=0.2)
    daro.train()
    report["daro_weights"] = daro._daro.weights.weights.detach().tolist()
    report["dropin"] = _dropin(out_dir, tokenizer)
    rank = papo.accelerator.process_index
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))


def _dropin(out_dir: str, tokenizer) -> int:
    """Without a PAPO option, PAPOTrainer logs what GRPOTrainer logs over two processes, with TRL's loss and the
    fused one (sequence-level ratios: per-sequence clip fractions reduced over processes). Returns the number of
    logged steps with clipped sequences."""
    from trl import GRPOConfig, GRPOTrainer

    from papo_trl import PAPOConfig, PAPOTrainer
    from tests.trl.test_dropin import assert_same_run, weights
    from tests.trl.tiny import digit_outcome_reward, tiny_args, tiny_dataset, tiny_model

    options = dict(per_device_train_batch_size=PER_DEVICE, num_generations=G, max_steps=4, steps_per_generation=2,
                   num_iterations=2, learning_rate=3e-2, epsilon=0.05, loss_type="grpo",
                   importance_sampling_level="sequence")  # fmt: skip

    def train(trainer_class, config_class, name, **extra):
        args = tiny_args(Path(out_dir) / name, config_class=config_class, **options, **extra)
        trainer = trainer_class(model=tiny_model(tokenizer), reward_funcs=digit_outcome_reward, args=args,
                                train_dataset=tiny_dataset(), processing_class=tokenizer)  # fmt: skip
        trainer.initial_weights = weights(trainer)
        trainer.train()
        return trainer

    reference = train(GRPOTrainer, GRPOConfig, "grpo")
    for fused in (False, True):
        assert_same_run(train(PAPOTrainer, PAPOConfig, f"dropin-{fused}", use_fused_loss=fused), reference, not fused)
    return sum(log.get("clip_ratio/region_mean", 0.0) > 0 for log in reference.state.log_history)


if __name__ == "__main__":
    _worker(sys.argv[1])
