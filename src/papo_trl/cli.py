"""``papo-train``: the embedded CPU demo, or a real PAPO run from a YAML recipe plus command-line overrides.

Usage::

    papo-train                                   # the embedded demo (PAPO) on the CPU
    papo-train demo [--quick] [--compare] [--method papo|grpo|prm_only] [--seed 0] [--output_dir papo_demo]
    papo-train --config examples/papo_qwen2.5_7b.yaml [--learning_rate 2e-6 ...]
    accelerate launch --config_file zero3.yaml -m papo_trl.cli --config examples/papo_qwen2.5_7b.yaml

The real run parses, in TRL's style (YAML values become defaults, flags override them),
:class:`PAPOScriptArguments` (dataset, reward functions, judge), :class:`~papo_trl.PAPOConfig` (every field) and
TRL's ``ModelConfig`` (model id, dtype, attention, PEFT). An optional leading ``train`` is accepted.

Bad input (an unknown option, a missing or invalid recipe, an out-of-range number, a missing model, a judge that
does not answer) ends the command before any training with one line on stderr and exit status 2 (see
:mod:`.startup`); ``--debug`` or ``PAPO_DEBUG=1`` shows the traceback instead. Errors during training keep theirs.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field

from .demo import METHODS, QUICK_ENV
from .startup import (
    DEBUG_ENV,
    UsageError,
    adapt_to_machine,
    check_judge,
    check_model,
    check_vllm,
    cpu_notice,
    debug_requested,
    load_recipe,
    parse_dataclasses,
    split_argv,
    strip_debug,
    user_input,
)

__all__ = ["DemoArguments", "PAPOScriptArguments", "build_reward_funcs", "main", "make_parser", "parse_demo_args",
           "parse_train_args"]  # fmt: skip

OUTCOME_REWARDS = ("math_accuracy_reward", "exact_answer_reward", "soft_overlong_punishment")
PROCESS_REWARDS = ("rubric_judge", "step_checker_reward")
DEMO_DATASET = "papo-demo"


@dataclass
class DemoArguments:
    """Arguments of ``papo-train demo``."""

    method: str = field(default="papo", metadata={"help": "RL method: papo, grpo or prm_only.", "choices": METHODS})
    compare: bool = field(default=False, metadata={"help": "Run papo, grpo and prm_only from one warm start."})
    quick: bool = field(
        default=False, metadata={"help": f"A smoke run of the plumbing, too short to learn (also: {QUICK_ENV}=1)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the data, the model and the trainers."})
    seeds: list[int] | None = field(
        default=None, metadata={"help": "With --compare: run on each seed, report mean and min-max (e.g. 0 1 2)."}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Where summary.json and curves.png go; unset: papo_demo[_compare]."}
    )
    num_threads: int | None = field(
        default=None, metadata={"help": "torch CPU threads; unset: torch's choice (1 with --compare)."}
    )
    use_vllm: bool = field(
        default=False, metadata={"help": "Sample the RL responses with vLLM colocated in the trainer (one run)."}
    )

    def __post_init__(self):
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"`num_threads` must be an integer >= 1, got {self.num_threads}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"`seed` must be an integer in [0, 2**32), got {self.seed}")
        if self.use_vllm and self.compare:
            raise ValueError("`use_vllm` samples with vLLM in a single run, not with `compare`")
        if self.use_vllm:
            check_vllm("colocate")


@dataclass
class PAPOScriptArguments:
    """Data, rewards and judge of a real run (the model lives in TRL's ``ModelConfig``)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": f"Hub id, local dataset directory or .json/.jsonl/.parquet/.csv file; "
                          f"'{DEMO_DATASET}' generates the embedded arithmetic task."},
    )  # fmt: skip
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Evaluation split (optional)."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt (renamed 'prompt')."})
    answer_column: str = field(
        default="solution", metadata={"help": "Column holding the gold answer (renamed 'solution')."}
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "If set, plain-text prompts become [system, user] chat messages."}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["math_accuracy_reward"],
        metadata={"help": f"Outcome reward functions: {', '.join(OUTCOME_REWARDS + PROCESS_REWARDS)} (PRM-only "
                          f"runs) or a dotted import path; the one at correctness_reward_index decides correctness."},
    )  # fmt: skip
    process_reward_funcs: list[str] = field(
        default_factory=lambda: ["rubric_judge"],
        metadata={"help": f"Process reward functions: {', '.join(PROCESS_REWARDS)}, a dotted path, or 'none'."},
    )
    soft_punish_cache: int = field(
        default=1024, metadata={"help": "Soft overlong punishment buffer (tokens before max_completion_length)."}
    )
    judge_base_url: str = field(
        default="http://localhost:8001/v1", metadata={"help": "OpenAI-compatible API root of the rubric judge."}
    )
    judge_model: str = field(default="openai/gpt-oss-20b", metadata={"help": "Judge model name on that server."})
    judge_api_key: str = field(default="EMPTY", metadata={"help": "API key of the judge server."})
    judge_max_concurrency: int = field(default=64, metadata={"help": "Judge requests in flight per process."})
    judge_timeout: float = field(default=300.0, metadata={"help": "Seconds per judge request."})
    judge_max_retries: int = field(default=3, metadata={"help": "Retries on timeouts, 5xx and connection errors."})
    judge_batch_deadline: float = field(default=900.0, metadata={"help": "Seconds for one batch of judge calls."})
    judge_max_tokens: int | None = field(default=None, metadata={"help": "Max tokens of a judge answer."})
    judge_reasoning_effort: str | None = field(
        default=None, metadata={"help": "gpt-oss reasoning effort (low, medium, high) where the server supports it."}
    )
    judge_probe_timeout: float = field(
        default=5.0, metadata={"help": "Seconds the judge has to answer at start-up (GET /models); 0: no check."}
    )

    def __post_init__(self):
        for name in ("reward_funcs", "process_reward_funcs"):  # a YAML scalar where a list was meant
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        lowest = {"soft_punish_cache": 0, "judge_max_retries": 0, "judge_probe_timeout": 0, "judge_max_concurrency": 1,
                  "judge_max_tokens": 1}  # fmt: skip
        for name, low in lowest.items():
            if getattr(self, name) is not None and not getattr(self, name) >= low:
                raise ValueError(f"`{name}` must be >= {low}, got {getattr(self, name)}")
        for name in ("judge_timeout", "judge_batch_deadline"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be > 0 seconds, got {getattr(self, name)}")


USAGE = """papo-train [train] [--config RECIPE.yaml] [--debug] [--OPTION VALUE ...]
       papo-train [demo [--quick] [--compare] [--method {papo,grpo,prm_only}] ...]   (papo-train demo --help)"""
EPILOG = (
    "Bad input ends the command with one line on stderr and exit status 2; --debug (or PAPO_DEBUG=1) shows the "
    "traceback. Without a CUDA GPU, options not given on the command line default to --use_cpu true --bf16 false "
    "--use_vllm false."
)


DEBUG_HELP = f"Bare --debug: show the traceback of a bad-input error (also: {DEBUG_ENV}=1)."


def _add_common_flags(parser) -> None:
    """``--config`` and a bare ``--debug`` in the help (``main`` takes both out of argv before parsing)."""
    import argparse

    group = parser.add_argument_group("papo-train")
    group.add_argument("--config", metavar="RECIPE.yaml", default=argparse.SUPPRESS,
                       help="YAML recipe: its values become the defaults, flags override them.")  # fmt: skip
    debug = parser._option_string_actions.get("--debug")  # TrainingArguments has one: it takes a value
    if debug is None:
        group.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    else:
        debug.help = f"{DEBUG_HELP} With a value, transformers' debug features: {debug.help}"


def make_parser():
    """``TrlParser`` over ``PAPOScriptArguments``, ``PAPOConfig`` and TRL's ``ModelConfig``."""
    from trl import ModelConfig, TrlParser

    from .config import PAPOConfig

    description = (
        "Train with PAPOTrainer from a YAML recipe (--config) plus flag overrides. Run `papo-train` without "
        "arguments, or `papo-train demo --help`, for the embedded CPU demo."
    )
    parser = TrlParser((PAPOScriptArguments, PAPOConfig, ModelConfig), prog="papo-train", usage=USAGE,
                       description=description, epilog=EPILOG)  # fmt: skip
    _add_common_flags(parser)
    return parser


def parse_demo_args(argv: list[str]) -> DemoArguments:
    """Parse ``papo-train demo`` flags (a ``--config`` YAML works here too); bad input raises ``UsageError``."""
    from transformers import HfArgumentParser

    argv, config = split_argv(argv)
    parser = HfArgumentParser((DemoArguments,), prog="papo-train demo", epilog=EPILOG.split(";")[0] + ".")
    _add_common_flags(parser)
    (args,) = parse_dataclasses(parser, argv, load_recipe(config), config)
    return args


def parse_train_args(argv: list[str], notices: list[str] | None = None):
    """``(PAPOScriptArguments, PAPOConfig, ModelConfig)`` of a real run; bad input raises ``UsageError``.

    Without a CUDA GPU, the options not given on the command line switch to CPU training (see
    :func:`~papo_trl.startup.adapt_to_machine`); ``notices`` receives the line that says so."""
    argv, config = split_argv(argv)
    recipe = load_recipe(config)
    changed: list[str] = []

    def adapt(namespace, explicit: set[str]) -> None:
        changed.extend(adapt_to_machine(namespace, explicit))

    parsed = parse_dataclasses(make_parser(), argv, recipe, config, adapt=adapt)
    if changed and notices is not None:
        notices.append(cpu_notice(changed))
    return parsed


def _import(path: str):
    module, _, name = path.rpartition(".")
    known = ", ".join(OUTCOME_REWARDS + PROCESS_REWARDS)
    if not module:
        raise ValueError(f"reward function {path!r}: expected a known name ({known}) or a dotted import path")
    sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward function {path!r}: cannot import it ({err})") from err


def build_reward_funcs(names: list[str], script_args: PAPOScriptArguments, training_args) -> list:
    """Reward callables from names: the known outcome/process rewards, or ``module.attr`` import paths."""
    from .rewards import (
        RubricJudge,
        exact_answer_reward,
        get_soft_overlong_punishment,
        math_accuracy_reward,
        step_checker_reward,
    )

    funcs = []
    for name in names:
        if name.lower() == "none":
            continue
        if name == "math_accuracy_reward":
            funcs.append(math_accuracy_reward)
        elif name == "exact_answer_reward":
            funcs.append(exact_answer_reward)
        elif name == "step_checker_reward":
            funcs.append(step_checker_reward)
        elif name == "soft_overlong_punishment":
            length, cache = training_args.max_completion_length, script_args.soft_punish_cache
            funcs.append(get_soft_overlong_punishment(max_completion_len=length, soft_punish_cache=cache))
        elif name == "rubric_judge":
            s = script_args
            funcs.append(RubricJudge(
                s.judge_base_url, s.judge_model, s.judge_api_key, max_concurrency=s.judge_max_concurrency,
                request_timeout=s.judge_timeout, max_retries=s.judge_max_retries,
                batch_deadline=s.judge_batch_deadline, max_tokens=s.judge_max_tokens, seed=training_args.seed,
                request_kwargs={"reasoning_effort": s.judge_reasoning_effort} if s.judge_reasoning_effort else None,
            ))  # fmt: skip
        else:
            funcs.append(_import(name))
    return funcs


def load_training_data(script_args: PAPOScriptArguments, seed: int = 0):
    """``(train, eval or None)`` with ``prompt`` and ``solution`` columns (and the original ones); a dataset that
    cannot be found or read raises ``UsageError``."""
    import datasets

    name = script_args.dataset_name
    expected = "a hub id, a local dataset directory, a .json/.jsonl/.parquet/.csv file or 'papo-demo'"
    if not name:
        raise UsageError(f"--dataset_name: expected {expected}, got nothing")
    kind = name.rsplit(".", 1)[-1].lower()
    if not os.path.exists(name) and (kind in ("json", "jsonl", "parquet", "csv") or name.startswith((".", "/", "~"))):
        raise UsageError(f"--dataset_name: no file or directory {name!r} (expected {expected})")
    with user_input("--dataset_name", ValueError, OSError, ConnectionError):
        if name == DEMO_DATASET:
            from .demo.run import FULL
            from .demo.task import make_splits

            splits = make_splits(1, FULL.n_rl, FULL.n_eval, seed, FULL.task)
            data = datasets.DatasetDict(train=splits["rl"], test=splits["eval"])
            data = data.rename_column("completion", "reference_solution")  # what the rubric judge reads
        elif os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_dict.json")):
            data = datasets.load_from_disk(name)
        elif os.path.isfile(name):
            data = datasets.load_dataset({"jsonl": "json"}.get(kind, kind), data_files=name)
        else:
            data = datasets.load_dataset(name, name=script_args.dataset_config)
    for option in ("dataset_train_split", "dataset_test_split"):
        split = getattr(script_args, option)
        if split is not None and split not in data:
            raise UsageError(f"--{option}: the dataset has no split {split!r} (splits: {', '.join(data)})")
    data = data.map(_standardise(script_args), desc="Formatting prompts")
    test = script_args.dataset_test_split
    return data[script_args.dataset_train_split], (data[test] if test else None)


def _standardise(script_args: PAPOScriptArguments):
    prompt_col, answer_col, system = script_args.prompt_column, script_args.answer_column, script_args.system_prompt

    def fn(row):
        if prompt_col not in row:
            raise UsageError(f"--prompt_column: the dataset has no column {prompt_col!r} (columns: {sorted(row)})")
        prompt = row[prompt_col]
        if system is not None and isinstance(prompt, str):
            prompt = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        out = {"prompt": prompt}
        if answer_col in row:
            out["solution"] = row[answer_col]
        return out

    return fn


def uses_judge(script_args: PAPOScriptArguments) -> bool:
    return "rubric_judge" in script_args.reward_funcs + script_args.process_reward_funcs


def train(script_args: PAPOScriptArguments, training_args, model_args, notices: tuple[str, ...] = ()) -> int:
    """A real PAPO run: check the model, rewards, judge and data (``UsageError`` on bad input), print
    ``notices``, then build the trainer, train and save. Returns the exit status."""
    from trl import get_peft_config

    from .trainer import PAPOTrainer

    training_args.model_init_kwargs = {
        "revision": model_args.model_revision, "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation, "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }  # fmt: skip
    check_model(model_args.model_name_or_path, model_args.model_revision, training_args.trust_remote_code)
    with user_input("--reward_funcs"):
        reward_funcs = build_reward_funcs(script_args.reward_funcs, script_args, training_args)
    with user_input("--process_reward_funcs"):
        process_reward_funcs = build_reward_funcs(script_args.process_reward_funcs, script_args, training_args)
    if uses_judge(script_args):
        check_judge(script_args.judge_base_url, script_args.judge_probe_timeout)
    train_set, eval_set = load_training_data(script_args, training_args.seed)
    for notice in notices:
        print(notice, file=sys.stderr)
    trainer = PAPOTrainer(
        model=model_args.model_name_or_path, reward_funcs=reward_funcs, process_reward_funcs=process_reward_funcs,
        args=training_args, train_dataset=train_set, eval_dataset=eval_set, peft_config=get_peft_config(model_args),
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}")
    return 0


def run_demo_command(args: DemoArguments) -> int:
    """Run the demo (or the comparison); 1 if training produced non-finite values, else 0."""
    if args.compare:
        from .demo.compare import run_compare

        summary = run_compare(seed=args.seed, quick=args.quick, output_dir=args.output_dir or "papo_demo_compare",
                              num_threads=args.num_threads, seeds=args.seeds)  # fmt: skip
        non_finite = [item for run in summary["runs"].values() for item in run["non_finite"]]
    else:
        if args.seeds:
            raise ValueError("--seeds needs --compare (a single run takes --seed)")
        from .demo.run import run_demo

        summary = run_demo(args.method, seed=args.seed, quick=args.quick, output_dir=args.output_dir or "papo_demo",
                           num_threads=args.num_threads, use_vllm=args.use_vllm)  # fmt: skip
        non_finite = summary["non_finite"]
    if non_finite:
        print(f"[demo] training produced non-finite values: {', '.join(non_finite[:10])}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``papo-train`` (and ``python -m papo_trl.cli``): the exit status (2: bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    words = strip_debug(argv)
    try:
        if not words or words[0] == "demo":
            return run_demo_command(parse_demo_args(words[1:]))
        notices = []
        parsed = parse_train_args(words[1:] if words[0] == "train" else words, notices)
        return train(*parsed, notices=tuple(notices))
    except UsageError as err:
        if debug_requested(argv):
            raise
        print(f"papo-train: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
