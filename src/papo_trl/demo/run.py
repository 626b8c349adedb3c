"""The embedded demo: warm-start a tiny model with SFT, then RL with PAPO, and show that held-out accuracy rises.

Pipeline (CPU, no downloads): make the arithmetic task (:mod:`.task`), build the tokenizer and a tiny Qwen2
model (:mod:`.model`), SFT it briefly with TRL's ``SFTTrainer``, evaluate it on held-out problems with greedy
decoding (accuracy and step-checker process score), train with ``PAPOTrainer``, evaluate again, and write
``summary.json`` and ``curves.png`` into the output directory.

Half of the warm-start solutions state the bare answer (``\\boxed{36}``) instead of working it out, as much web
text does. The warm-started model therefore often answers directly, which a model this small gets wrong on
multi-step problems, and is right on the held-out set only some of the time (about 30-40%; the heads-of-32
model ``papo-train demo --use_vllm`` builds for vLLM, about 10-25%). Its sampled answers sometimes show the steps
and are then right more often: RL has to discover that working step by step pays, which it does within a few dozen
steps (the process score rises with the accuracy).

Methods (same rewards, different advantages):

* ``papo``: outcome reward (exact boxed answer) + step-checker process reward, PAPO's decoupled advantages
  ``A = A_out + lambda_process * A_proc`` (``A_proc`` normalised over the correct responses only);
* ``grpo``: GRPO on the outcome reward only;
* ``prm_only``: GRPO on the step-checker score only - the reward-hacking baseline of the PAPO paper.

Every method passes the step checker as a process reward, scored on every response: PAPO trains on it, GRPO and
PRM-only (the ``grpo`` estimator, TRL's advantages) only log it. So the trainer logs the same learning-signal
diagnostics for all three (``papo/zero_advantage_frac`` and the group shares, see
:func:`papo_trl.diagnostics.signal_metrics`); ``summary.json`` holds their means over the RL steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace

import datasets
import torch
from tqdm.auto import tqdm
from transformers import ProgressCallback, TrainerCallback, set_seed

from ..diagnostics import SIGNAL_KEYS
from ..rewards import exact_answer_reward, step_checker_reward
from . import METHODS, OUTCOME_KEY, QUICK_ENV
from .aggregate import finite, mean
from .model import VLLM_MODEL, TinyModelSpec, build_model, build_tokenizer
from .plots import plot_curves
from .task import TaskSpec, make_splits


@dataclass
class DemoProfile:
    """Sizes and hyper-parameters of one demo run (``full`` is the default, ``quick`` the CI smoke run)."""

    n_sft: int = 8000
    n_rl: int = 4000
    n_eval: int = 500
    direct_fraction: float = 0.5
    sft_steps: int = 800
    sft_batch_size: int = 64
    sft_learning_rate: float = 3e-3
    rl_steps: int = 250
    prompts_per_step: int = 16
    num_generations: int = 8
    rl_learning_rate: float = 2e-4
    max_completion_length: int = 40
    eval_every: int = 25
    n_eval_curve: int = 200
    task: TaskSpec = field(default_factory=TaskSpec)
    model: TinyModelSpec = field(default_factory=TinyModelSpec)


FULL = DemoProfile()
QUICK = replace(
    FULL, n_sft=2000, n_rl=256, n_eval=100, sft_steps=120, rl_steps=12, prompts_per_step=4, num_generations=4,
    eval_every=4, n_eval_curve=50,
)  # fmt: skip


QUICK_NOTE = (
    "[demo] --quick is a smoke run: it checks the plumbing in a few steps, too few to learn, so its figures do not "
    "rise; `papo-train` runs the full demo, which learns"
)


def profile_for(quick: bool) -> DemoProfile:
    """The quick profile if asked for (or ``PAPO_DEMO_QUICK=1`` in the environment), else the full one."""
    return QUICK if quick or os.environ.get(QUICK_ENV, "") not in ("", "0", "false") else FULL


@torch.no_grad()
def evaluate(model, tokenizer, dataset, max_new_tokens: int = 40, batch_size: int = 250, desc: str | None = None):
    """Greedy held-out evaluation: ``accuracy`` (exact boxed answer) and ``process_score`` (mean step-checker
    score over all responses), plus ``mean_length`` in tokens."""
    was_training = model.training
    model.eval()
    prompts, answers = list(dataset["prompt"]), list(dataset["answer"])
    texts, lengths = [], []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=desc is None):
        enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        completion_ids = out[:, enc["input_ids"].shape[1] :]
        texts += tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        lengths += (completion_ids != tokenizer.pad_token_id).sum(dim=1).tolist()
    model.train(was_training)
    outcome = exact_answer_reward(texts, answer=answers)
    process = step_checker_reward(prompts, texts)
    n = len(texts)
    return {"accuracy": sum(outcome) / n, "process_score": sum(process) / n, "mean_length": sum(lengths) / n}


def warm_start(model, tokenizer, dataset, profile: DemoProfile, seed: int, output_dir: str) -> float:
    """Supervised warm start on ``dataset`` (worked solutions and bare answers) with TRL's ``SFTTrainer``; returns
    seconds."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=os.path.join(output_dir, "sft"), max_steps=profile.sft_steps,
        per_device_train_batch_size=profile.sft_batch_size, learning_rate=profile.sft_learning_rate,
        lr_scheduler_type="constant_with_warmup", warmup_steps=20, weight_decay=0.0, max_length=64,
        logging_steps=max(1, profile.sft_steps // 10), save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), seed=seed, data_seed=seed, dataloader_num_workers=0,
        bf16=False, **_no_checkpointing(SFTConfig),  # fp32: faster than bf16 autocast on CPU, exact enough anywhere
    )  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    quiet_progress(trainer, {"loss": "loss", "mean_token_accuracy": "token_acc"})
    start = time.perf_counter()
    trainer.train()
    _remove_if_empty(args.output_dir)
    return time.perf_counter() - start


def _remove_if_empty(path: str) -> None:
    """The trainers create their ``output_dir`` even when they save nothing: leave no empty folder behind."""
    with contextlib.suppress(OSError):  # not empty, or already gone
        os.rmdir(path)


def _no_checkpointing(config_cls) -> dict:
    """Activation checkpointing off, under the option's name in the installed transformers (renamed in v5)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}


def rl_trainer_kwargs(method: str, profile: DemoProfile, seed: int, output_dir: str, use_vllm: bool = False) -> dict:
    """``PAPOTrainer`` keyword arguments (reward functions and ``PAPOConfig``) of one demo method; ``use_vllm``:
    generate with vLLM, colocated in the trainer."""
    from ..config import PAPOConfig

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    common = dict(
        output_dir=os.path.join(output_dir, method), max_steps=profile.rl_steps,
        per_device_train_batch_size=profile.prompts_per_step * profile.num_generations,
        num_generations=profile.num_generations, learning_rate=profile.rl_learning_rate, lr_scheduler_type="constant",
        weight_decay=0.0, max_completion_length=profile.max_completion_length, temperature=1.0, beta=0.0,
        epsilon=0.2, epsilon_high=0.28, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), use_fused_loss=torch.cuda.is_available(), seed=seed, data_seed=seed,
        dataloader_num_workers=0, bf16=False, process_reward_on_correct_only=False, **_no_checkpointing(PAPOConfig),
        use_vllm=use_vllm, vllm_mode="colocate",
    )  # fmt: skip
    # the step checker is every method's process reward (scored on every response): PAPO trains on it, GRPO and
    # PRM-only only log it - and the trainer logs the learning-signal diagnostics of all three
    process = dict(process_reward_funcs=[step_checker_reward])
    if method in ("papo", "grpo"):
        args = PAPOConfig(advantage_estimator=method, **common)
        return dict(reward_funcs=[exact_answer_reward], args=args, **process)
    # PRM-only: the step-checker score is the only reward that moves the policy; the outcome is logged
    args = PAPOConfig(advantage_estimator="grpo", reward_weights=[0.0, 1.0], correctness_reward_index=0, **common)
    return dict(reward_funcs=[exact_answer_reward, step_checker_reward], args=args, **process)


class _PostfixProgress(ProgressCallback):
    """The trainer's progress bar, labelled ``desc``, showing a few logged values (and those ``extra()`` returns)
    as its postfix instead of printing every log."""

    def __init__(self, keys: dict[str, str], desc: str | None = None, extra=None):
        super().__init__()
        self.keys, self.desc, self.extra = keys, desc, extra

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None and self.desc:
            self.training_bar.set_description(self.desc, refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs:
            shown = {short: f"{logs[key]:.3g}" for key, short in self.keys.items() if isinstance(logs.get(key), float)}
            shown.update(self.extra() if self.extra else {})
            self.training_bar.set_postfix(shown, refresh=False)


def quiet_progress(trainer, keys: dict[str, str], desc: str | None = None, extra=None) -> None:
    """Replace ``trainer``'s progress callback by one labelled ``desc`` that shows ``keys`` (log key -> short name)
    and ``extra()`` (short name -> text) as a postfix."""
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_PostfixProgress(keys, desc, extra))


class CurveRecorder(TrainerCallback):
    """Records the trainer's logs and a greedy held-out evaluation every ``eval_every`` steps."""

    def __init__(self, tokenizer, eval_dataset, eval_every: int, max_new_tokens: int):
        self.tokenizer, self.eval_dataset = tokenizer, eval_dataset
        self.eval_every, self.max_new_tokens = eval_every, max_new_tokens
        self.train: list[dict] = []
        self.held_out: list[dict] = []
        self.non_finite: list[str] = []

    def evaluate_at(self, model, step: int) -> None:
        metrics = evaluate(model, self.tokenizer, self.eval_dataset, self.max_new_tokens)
        self.held_out.append({"step": step, **metrics})

    def on_log(self, args, state, control, logs=None, **kwargs):
        row = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "loss" in row:
            self.train.append({"step": state.global_step, **row})
            self.non_finite += [f"{k}@{state.global_step}" for k in ("loss", "grad_norm") if not _finite(row.get(k))]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.eval_every == 0 or state.global_step == state.max_steps:
            self.evaluate_at(model, state.global_step)


def _finite(value) -> bool:
    return value is None or math.isfinite(value)


def train_rl(
    model, tokenizer, data, method: str, profile: DemoProfile, seed: int, output_dir: str, use_vllm: bool = False
) -> dict:
    """RL from the warm-started ``model`` (trained in place), sampling with vLLM if ``use_vllm``; returns the curves,
    timing and a NaN report."""
    from ..trainer import PAPOTrainer

    set_seed(seed)
    curve_set = data["eval"].select(range(min(profile.n_eval_curve, len(data["eval"]))))
    recorder = CurveRecorder(tokenizer, curve_set, profile.eval_every, profile.max_completion_length)
    recorder.evaluate_at(model, 0)
    kwargs = rl_trainer_kwargs(method, profile, seed, output_dir, use_vllm)
    print(f"[demo] RL ({method}): {profile.rl_steps} steps of {profile.prompts_per_step} prompts x "
          f"{profile.num_generations} samples, generated with {'vLLM' if use_vllm else 'transformers'}",
          flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="papo-demo-") as warm_dir:
        if use_vllm:  # vLLM starts from the policy's files: the warm-started weights
            model.save_pretrained(warm_dir)
            tokenizer.save_pretrained(warm_dir)
            model.name_or_path = warm_dir
        trainer = PAPOTrainer(
            model=model, train_dataset=data["rl"], processing_class=tokenizer, callbacks=[recorder], **kwargs
        )
        # the accuracy of the sampled responses at each step, and the latest greedy held-out accuracy
        held_out = lambda: {"held_out_acc": f"{recorder.held_out[-1]['accuracy']:.3f}"}  # noqa: E731
        keys = {OUTCOME_KEY: "train_acc", "papo/zero_advantage_frac": "zero_adv"}
        quiet_progress(trainer, keys, desc=f"RL {method}, seed {seed}", extra=held_out)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    _remove_if_empty(trainer.args.output_dir)
    non_finite = list(recorder.non_finite)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        non_finite.append("parameters")
    held_out_problems = {"curve": len(curve_set), "total": len(data["eval"])}
    return {"train": recorder.train, "held_out": recorder.held_out, "rl_seconds": seconds, "non_finite": non_finite,
            "diagnostics": diagnostics_summary(recorder.train), "held_out_problems": held_out_problems}  # fmt: skip


def diagnostics_summary(train_rows: list[dict], tail: float = 0.1) -> dict[str, dict]:
    """The learning-signal diagnostics (``SIGNAL_KEYS``) of one run: per key, the mean over the logged RL steps
    (steps where it is undefined are skipped; ``None`` if it never is), and the means over the first and the last
    ``tail`` of the steps (``start``, ``end``)."""
    out = {}
    for key in SIGNAL_KEYS:
        values = finite(row.get(key) for row in train_rows)
        k = max(1, round(tail * len(values)))
        out[key] = {"mean": mean(values), "start": mean(values[:k]), "end": mean(values[-k:])}
    return out


def prepare(profile: DemoProfile, seed: int, output_dir: str, num_threads: int | None = None):
    """Seeded data, tokenizer and SFT-warm-started model; returns ``(data, tokenizer, model, sft_seconds)``."""
    if num_threads:
        torch.set_num_threads(num_threads)
    if profile is QUICK:
        print(QUICK_NOTE, flush=True)
    datasets.disable_progress_bars()  # the trainers' own bars are enough
    set_seed(seed)
    data = make_splits(profile.n_sft, profile.n_rl, profile.n_eval, seed, profile.task, profile.direct_fraction)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, profile.model, seed=seed)
    print(f"[demo] warm start: SFT of a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter model on "
          f"{profile.n_sft} solutions ({profile.direct_fraction:.0%} bare answers), {profile.sft_steps} steps",
          flush=True)  # fmt: skip
    sft_seconds = warm_start(model, tokenizer, data["sft"], profile, seed, output_dir)
    return data, tokenizer, model, sft_seconds


def run_demo(
    method: str = "papo",
    seed: int = 0,
    quick: bool = False,
    output_dir: str = "papo_demo",
    num_threads: int | None = None,
    use_vllm: bool = False,
) -> dict:
    """The whole demo for one method (RL samples from vLLM if ``use_vllm``); writes ``summary.json`` and
    ``curves.png`` and returns the summary."""
    profile = profile_for(quick)
    os.makedirs(output_dir, exist_ok=True)
    start = time.perf_counter()
    if use_vllm:
        profile = replace(profile, model=VLLM_MODEL)
    data, tokenizer, model, sft_seconds = prepare(profile, seed, output_dir, num_threads)
    before = evaluate(model, tokenizer, data["eval"], profile.max_completion_length, desc="held-out eval (before RL)")
    print(_line("before RL", before), flush=True)
    run = train_rl(model, tokenizer, data, method, profile, seed, output_dir, use_vllm)
    after = evaluate(model, tokenizer, data["eval"], profile.max_completion_length, desc="held-out eval (after RL)")
    print(_line(f"after RL ({method})", after), flush=True)
    summary = {
        "method": method, "seed": seed, "quick": profile is QUICK, "profile": asdict(profile),
        "generation": "vllm" if use_vllm else "transformers",
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "before": before, "after": after, "improvement": after["accuracy"] - before["accuracy"],
        "seconds": {"sft": sft_seconds, "rl": run["rl_seconds"], "total": time.perf_counter() - start},
        "non_finite": run["non_finite"], "diagnostics": run["diagnostics"],
        "curves": {method: {"train": run["train"], "held_out": run["held_out"]}},
        "held_out_problems": run["held_out_problems"],
    }  # fmt: skip
    write_outputs(summary, output_dir, plot_curves)
    return summary


def write_outputs(summary: dict, output_dir: str, plot) -> None:
    """``summary.json`` (strict JSON: non-finite numbers become ``null``) and ``curves.png``."""
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(_strict(summary), f, indent=2, allow_nan=False)
    path = os.path.join(output_dir, "curves.png")
    plot(summary["curves"], path, title=_title(summary), held_out_problems=summary["held_out_problems"])
    print(f"wrote {output_dir}/summary.json and {output_dir}/curves.png", flush=True)
    if summary["quick"]:
        print(QUICK_NOTE, flush=True)


def _title(summary: dict) -> str:
    kind = "comparison" if "runs" in summary else summary["method"]
    seeds = summary.get("seeds", [summary.get("seed")])
    seeds = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))} (mean, min-max)"
    return f"papo-train demo: {kind}, {seeds}{', quick' if summary['quick'] else ''}"


def _strict(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def _line(label: str, metrics: dict) -> str:
    return (
        f"[demo] {label}: held-out accuracy {metrics['accuracy']:.3f}, process score {metrics['process_score']:.3f}, "
        f"mean length {metrics['mean_length']:.1f} tokens"
    )
