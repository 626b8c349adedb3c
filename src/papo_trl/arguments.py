"""The arguments of ``papo-train`` besides ``PAPOConfig`` and TRL's ``ModelConfig``: the demo's, and the data,
rewards and judge of a real run. Light to import (the CLI builds its flags from them before torch is loaded)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .data import DEMO_DATASET
from .demo import METHODS, QUICK_ENV
from .rewards import OUTCOME_REWARDS, PROCESS_REWARDS
from .startup import check_vllm

__all__ = ["DemoArguments", "PAPOScriptArguments"]


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
        metadata={"help": f"Outcome reward functions: {', '.join(OUTCOME_REWARDS)}, {', '.join(PROCESS_REWARDS)} "
                          f"(PRM-only runs) or a dotted import path; the one at correctness_reward_index decides "
                          f"correctness."},
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
