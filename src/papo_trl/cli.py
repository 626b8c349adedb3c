"""``papo-train``: the embedded CPU demo, or a real PAPO run from a YAML recipe plus command-line overrides.

Usage::

    papo-train                                   # the embedded demo (PAPO) on the CPU
    papo-train demo [--quick] [--compare] [--method papo|grpo|prm_only] [--seed 0] [--output_dir papo_demo]
    papo-train --config examples/papo_qwen2.5_7b.yaml [--learning_rate 2e-6 ...]
    accelerate launch --config_file zero3.yaml -m papo_trl.cli --config examples/papo_qwen2.5_7b.yaml

The real run parses, in TRL's style (YAML values become defaults, flags override them),
:class:`~.arguments.PAPOScriptArguments` (dataset, reward functions, judge), :class:`~papo_trl.PAPOConfig` (every
field) and TRL's ``ModelConfig`` (model id, dtype, attention, PEFT), then builds the reward functions by name
(:mod:`papo_trl.rewards`), loads the data (:mod:`.data`) and trains. An optional leading ``train`` is accepted.

Bad input (an unknown option, a missing or invalid recipe, an out-of-range number, a missing model, a judge that
does not answer) ends the command before any training with one line on stderr and exit status 2 (see
:mod:`.startup`); ``--debug`` or ``PAPO_DEBUG=1`` shows the traceback instead. Errors during training keep theirs.
"""

from __future__ import annotations

import sys

from .arguments import DemoArguments, PAPOScriptArguments
from .data import load_training_data
from .rewards import build_reward_funcs
from .startup import (
    DEBUG_ENV,
    UsageError,
    adapt_to_machine,
    check_judge,
    check_model,
    cpu_notice,
    debug_requested,
    load_recipe,
    parse_dataclasses,
    split_argv,
    strip_debug,
    user_input,
)

__all__ = ["main", "make_parser", "parse_demo_args", "parse_train_args"]

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
