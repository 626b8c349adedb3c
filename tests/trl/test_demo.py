"""The embedded demo: task generator, tokenizer, tiny model, and the quick run end to end."""

import json
import math
import random

import pytest
import torch

from papo_trl.demo import model as demo_model
from papo_trl.demo.model import ALPHABET, build_model, build_tokenizer
from papo_trl.demo.task import TaskSpec, make_dataset, make_problem, make_splits
from papo_trl.diagnostics import SIGNAL_KEYS
from papo_trl.rewards import exact_answer_reward, step_checker_reward


def _left_to_right(prompt: str) -> int:
    tokens = prompt.strip().replace("-", " - ").replace("+", " + ").split()
    total = int(tokens[0])
    for op, value in zip(tokens[1::2], tokens[2::2], strict=True):
        total = total + int(value) if op == "+" else total - int(value)
    return total


@pytest.mark.parametrize("spec", [TaskSpec(), TaskSpec(min_steps=3, max_steps=5, min_value=0, max_value=999)])
def test_reference_solutions_are_correct_step_by_step(spec):
    rng = random.Random(0)
    rows = [make_problem(rng, spec) for _ in range(300)]
    completions = [r["completion"] for r in rows]
    assert exact_answer_reward(completions, answer=[r["answer"] for r in rows]) == [1.0] * len(rows)
    assert step_checker_reward([r["prompt"] for r in rows], completions) == [1.0] * len(rows)
    for row in rows:
        n_steps = row["completion"].count("=")
        assert spec.min_steps <= n_steps <= spec.max_steps
        assert int(row["answer"]) == _left_to_right(row["prompt"]) >= 0
        assert row["prompt"].endswith("\n") and row["completion"].endswith(f"\\boxed{{{row['answer']}}}")
        values = [int(v) for v in row["prompt"].strip().replace("-", "+").split("+")]
        assert all(spec.min_value <= v <= spec.max_value for v in values)


def test_splits_are_seeded_and_held_out():
    a = make_splits(300, 200, 100, seed=7)
    b = make_splits(300, 200, 100, seed=7)
    assert a["sft"]["prompt"] == b["sft"]["prompt"] and a["eval"]["answer"] == b["eval"]["answer"]
    assert make_splits(300, 200, 100, seed=8)["eval"]["prompt"] != a["eval"]["prompt"]
    held_out = set(a["eval"]["prompt"])
    assert len(held_out) == 100  # distinct
    assert not held_out & set(a["sft"]["prompt"]) and not held_out & set(a["rl"]["prompt"])
    assert {len(a["sft"]), len(a["rl"])} == {300, 200}


def test_direct_answers_only_in_the_warm_start_split():
    splits = make_splits(2000, 300, 100, seed=0, direct_fraction=0.5)
    sft = splits["sft"]
    direct = [c for c in sft["completion"] if "=" not in c]
    assert 0.45 < len(direct) / len(sft) < 0.55
    assert all(c.startswith("\\boxed{") for c in direct)
    assert exact_answer_reward(sft["completion"], answer=sft["answer"]) == [1.0] * len(sft)  # direct answers are right
    assert step_checker_reward(None, direct) == [0.0] * len(direct)  # ... but show no work
    for name in ("rl", "eval"):
        assert all("=" in c for c in splits[name]["completion"])
    same_problems = make_splits(2000, 300, 100, seed=0)["sft"]
    assert same_problems["prompt"] == sft["prompt"]  # the style draw does not change the problems
    with pytest.raises(ValueError, match="direct_fraction"):
        make_dataset(10, seed=0, direct_fraction=1.5)


def test_task_bad_input():
    with pytest.raises(ValueError, match="min_steps"):
        TaskSpec(min_steps=0)
    with pytest.raises(ValueError, match="min_value"):
        TaskSpec(min_value=5, max_value=2)
    with pytest.raises(ValueError, match="n must be"):
        make_dataset(0, seed=0)
    with pytest.raises(ValueError, match="could not draw"):
        make_dataset(50, seed=0, spec=TaskSpec(min_steps=1, max_steps=1, min_value=1, max_value=2), distinct=True)


def test_tokenizer_round_trip():
    tok = build_tokenizer()
    rng = random.Random(1)
    texts = [make_problem(rng)["prompt"] + make_problem(rng)["completion"] for _ in range(50)]
    texts += ["".join(rng.choice(ALPHABET) for _ in range(40)) for _ in range(50)]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    assert len(tok("\\boxed{12}")["input_ids"]) == 4  # "\boxed{" is one token
    assert tok.eos_token == "<eos>" and tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id
    batch = tok(["1+2\n", "10+20-3\n"], padding=True)
    assert batch["input_ids"][0][0] == tok.pad_token_id  # left padding for generation
    assert tok.decode([*tok("7\n")["input_ids"], tok.eos_token_id], skip_special_tokens=True) == "7\n"


def test_tiny_model_is_seeded_and_generates():
    tok = build_tokenizer()
    a, b = build_model(tok, seed=3), build_model(tok, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(next(iter(build_model(tok, seed=4).parameters())), next(iter(a.parameters())))
    assert type(a).__name__ == "Qwen2ForCausalLM" and a.config.vocab_size == len(tok)
    assert sum(p.numel() for p in a.parameters()) < 500_000
    enc = tok(["1+2\n", "3-1\n"], return_tensors="pt", padding=True)
    out = a.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] <= enc["input_ids"].shape[1] + 5


def _finite_numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _finite_numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _finite_numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def _check_outputs(out_dir, methods):
    summary = json.loads((out_dir / "summary.json").read_text())
    png = (out_dir / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    numbers = list(_finite_numbers(summary))
    assert numbers and all(math.isfinite(x) for x in numbers)
    expected = ["curves.png", "summary.json"] + (["table.md"] if "seeds" in summary else [])
    assert sorted(p.name for p in out_dir.iterdir()) == expected  # no empty trainer folders
    assert 0 < summary["held_out_problems"]["curve"] <= summary["held_out_problems"]["total"]
    for method in methods:
        runs = summary["curves"][method]
        for run in runs if isinstance(runs, list) else [runs]:
            held_out = run["held_out"]
            assert held_out[0]["step"] == 0 and len(held_out) >= 2
            assert all(0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["process_score"] <= 1.0 for r in held_out)
            assert run["train"], "no training logs recorded"
    return summary


def _check_diagnostics(diagnostics):
    """Every method logs the learning-signal shares; PAPO alone has an A_proc."""
    for key in SIGNAL_KEYS:
        assert set(diagnostics[key]) == {"mean", "start", "end"}
    for key in ("papo/zero_advantage_frac", "papo/all_correct_group_frac", "papo/all_incorrect_group_frac"):
        assert 0.0 <= diagnostics[key]["mean"] <= 1.0


def _figures(summary: dict) -> dict:
    """What the demo reports, less its timings."""
    curves, timing = summary["curves"]["papo"], ("time", "runtime", "per_second")
    train = [{k: v for k, v in row.items() if not any(t in k for t in timing)} for row in curves["train"]]
    return {"before": summary["before"], "after": summary["after"], "held_out": curves["held_out"], "train": train,
            "diagnostics": summary["diagnostics"]}  # fmt: skip


@pytest.mark.slow
def test_quick_demo_end_to_end_and_reproducible(tmp_path, capsys):
    """The quick demo, twice on the same seed in one process: the same figures both times (nothing but the seed
    decides them on a given machine), and it says that it is a smoke run."""
    from papo_trl.cli import main
    from papo_trl.demo.run import QUICK_NOTE

    runs = []
    for name in ("demo", "again"):
        out = tmp_path / name
        assert main(["demo", "--quick", "--output_dir", str(out), "--seed", "0"]) == 0
        runs.append(_check_outputs(out, ["papo"]))
    assert capsys.readouterr().out.count(QUICK_NOTE) == 4  # at the start and at the end of each run
    summary, again = runs
    assert _figures(again) == _figures(summary)
    assert summary["method"] == "papo" and summary["quick"] is True and summary["non_finite"] == []
    for key in ("before", "after"):
        assert 0.0 <= summary[key]["accuracy"] <= 1.0 and summary[key]["mean_length"] > 0
    assert summary["seconds"]["total"] > 0
    _check_diagnostics(summary["diagnostics"])
    assert 0.0 <= summary["diagnostics"]["papo/process_active_ratio"]["mean"] <= 1.0


@pytest.mark.slow
def test_compare_over_seeds(tmp_path, monkeypatch, capsys):
    """The comparison with a micro profile on two seeds: every method runs from each seed's warm start, the summary
    holds the mean and range over seeds, the plot and the table are written."""
    from dataclasses import replace

    from papo_trl.demo import compare, run

    micro = replace(run.QUICK, n_sft=200, n_eval=20, sft_steps=4, rl_steps=2, eval_every=1, n_eval_curve=8)
    monkeypatch.setattr(run, "QUICK", micro)
    monkeypatch.setattr(compare, "QUICK", micro)
    threads = torch.get_num_threads()
    summary = compare.run_compare(quick=True, output_dir=str(tmp_path / "cmp"), seeds=[1, 2])
    assert torch.get_num_threads() == threads and summary["num_threads"] == compare.COMPARE_THREADS
    methods = ["grpo", "papo", "prm_only"]
    _check_outputs(tmp_path / "cmp", methods)
    assert summary["seeds"] == [1, 2] and summary["methods"] == methods and summary["quick"] is True
    assert [r["seed"] for r in summary["per_seed"]] == [1, 2]
    for method in methods:
        assert [c["seed"] for c in summary["curves"][method]] == [1, 2]
        accuracy = summary["runs"][method]["accuracy"]
        finals = [r["runs"][method]["after"]["accuracy"] for r in summary["per_seed"]]
        assert accuracy["values"] == finals and accuracy["n"] == 2
        assert accuracy["min"] == min(finals) and accuracy["max"] == max(finals)
        assert accuracy["mean"] == pytest.approx(sum(finals) / 2)
        assert summary["runs"][method]["non_finite"] == []
        for seed_run in summary["per_seed"]:
            _check_diagnostics(seed_run["runs"][method]["diagnostics"])
    assert summary["runs"]["grpo"]["papo/process_active_ratio"]["n"] == 0  # no A_proc without PAPO
    assert summary["runs"]["papo"]["papo/process_active_ratio"]["n"] == 2
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert all(f"| {method} |" in table for method in methods) and "zero-advantage responses" in table
    printed = capsys.readouterr().out  # the rich table, one column per run
    assert "demo --compare: mean [min, max] over seeds 1, 2" in printed and "zero-advantage" in printed
    with pytest.raises(ValueError, match="methods"):
        compare.run_compare(methods=("ppo",))
    with pytest.raises(ValueError, match="seeds"):
        compare.run_compare(seeds=[0, 0])


def test_model_spec_defaults_are_tiny():
    for spec in (demo_model.TinyModelSpec(), demo_model.VLLM_MODEL):
        assert spec.hidden_size % spec.num_attention_heads == 0
        assert spec.num_attention_heads % spec.num_key_value_heads == 0
    vllm = demo_model.VLLM_MODEL  # the same width in heads vLLM's CPU backend runs
    assert vllm.hidden_size == demo_model.TinyModelSpec().hidden_size
    assert vllm.hidden_size // vllm.num_attention_heads in (32, 64, 80, 96, 112, 128)


def test_curve_recorder_flags_non_finite_training():
    from types import SimpleNamespace

    from papo_trl.demo.run import CurveRecorder

    recorder = CurveRecorder(build_tokenizer(), None, eval_every=10, max_new_tokens=4)
    for step, loss, grad_norm in ((1, 0.5, 1.0), (2, float("nan"), 1.0), (3, 0.1, float("inf"))):
        recorder.on_log(None, SimpleNamespace(global_step=step), None, logs={"loss": loss, "grad_norm": grad_norm})
    recorder.on_log(None, SimpleNamespace(global_step=3), None, logs={"train_runtime": 1.0})  # summary row: skipped
    assert recorder.non_finite == ["loss@2", "grad_norm@3"]
    assert [row["step"] for row in recorder.train] == [1, 2, 3]


def test_spread_over_seeds():
    from papo_trl.demo.aggregate import spread

    s = spread([0.5, None, 0.7, float("nan"), 0.9])
    assert (s["mean"], s["min"], s["max"], s["n"]) == (pytest.approx(0.7), 0.5, 0.9, 3)
    assert s["std"] == pytest.approx(0.2)  # sample std of 0.5, 0.7, 0.9
    assert s["values"][0] == 0.5 and len(s["values"]) == 5
    one, none = spread([0.25]), spread([None])
    assert (one["mean"], one["std"], one["n"]) == (0.25, None, 1)
    assert none["mean"] is none["min"] is none["std"] is None and none["n"] == 0


def test_band_and_table_cells():
    from papo_trl.demo.aggregate import spread
    from papo_trl.demo.plots import band
    from papo_trl.demo.table import format_cell

    runs = [
        {"held_out": [{"step": 0, "accuracy": 0.2}, {"step": 5, "accuracy": 0.6}]},
        {"held_out": [{"step": 0, "accuracy": 0.4}, {"step": 5, "accuracy": float("nan")}]},
    ]
    steps, mean, low, high = band(runs, "held_out", "accuracy")  # step 5 is NaN in one run: left out
    assert steps == [0] and mean == [pytest.approx(0.3)] and (low, high) == ([0.2], [0.4])
    assert format_cell(spread([0.5, 0.75])) == "0.625 [0.500, 0.750]"
    assert format_cell(spread([0.5, 0.75]), two_lines=True) == "0.625\n[0.50, 0.75]"
    assert format_cell(spread([0.5])) == "0.500" and format_cell(spread([])) == format_cell(None) == "-"


def test_compare_profile_trains_fewer_rl_steps():
    from dataclasses import replace

    from papo_trl.demo import compare, run

    assert compare.compare_profile(quick=True) is run.QUICK
    assert compare.compare_profile(quick=False) == replace(run.FULL, rl_steps=compare.COMPARE_RL_STEPS)
    assert compare.COMPARE_RL_STEPS < run.FULL.rl_steps and compare.COMPARE_RL_STEPS % run.FULL.eval_every == 0


def test_demo_methods_log_the_step_checker_on_every_response():
    """GRPO and PRM-only pass the step checker as a logged-only process reward (the ``grpo`` estimator), so the
    trainer logs the same learning-signal diagnostics for all three methods."""
    from papo_trl.demo.run import FULL, rl_trainer_kwargs

    for method, estimator, n_rewards in (("papo", "papo", 1), ("grpo", "grpo", 1), ("prm_only", "grpo", 2)):
        kwargs = rl_trainer_kwargs(method, FULL, seed=0, output_dir="unused")
        assert kwargs["process_reward_funcs"] == [step_checker_reward] and len(kwargs["reward_funcs"]) == n_rewards
        args = kwargs["args"]
        assert args.advantage_estimator == estimator and args.process_reward_on_correct_only is False
    assert rl_trainer_kwargs("prm_only", FULL, 0, "unused")["args"].reward_weights == [0.0, 1.0]


def test_seeds_flag():
    from papo_trl.cli import parse_demo_args, run_demo_command

    assert parse_demo_args(["--compare", "--seeds", "0", "1", "2"]).seeds == [0, 1, 2]
    assert parse_demo_args(["--compare"]).seeds is None
    with pytest.raises(ValueError, match="--seeds needs --compare"):
        run_demo_command(parse_demo_args(["--seeds", "0", "1"]))


def test_plot_names_the_evaluation_subset(tmp_path, monkeypatch):
    from papo_trl.demo import plots

    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    rows = [{"step": s, "accuracy": 0.5, "process_score": 0.5} for s in (0, 25)]
    train = [{"step": s, plots.OUTCOME_KEY: 0.5, "completions/mean_length": 9.0} for s in (1, 2)]
    plots.plot_curves({"papo": {"train": train, "held_out": rows}}, str(tmp_path / "c.png"), title="t",
                      held_out_problems={"curve": 200, "total": 500})  # fmt: skip
    titles = [ax.get_title() for ax in figures[0].axes]
    assert sum("200 of the 500 held-out problems" in t for t in titles) == 2
    assert (tmp_path / "c.png").stat().st_size > 10_000
