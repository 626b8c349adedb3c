"""``PAPOConfig``: TRL's ``GRPOConfig`` plus the advantage estimator, PAPO, DAPO dynamic sampling and DARO options."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

from trl import GRPOConfig

from papo_kernels._runtime import is_number, require_finite
from papo_kernels.advantages import check_lambda_process
from papo_kernels.daro import check_weight_bounds
from papo_kernels.loss import LOSS_TYPES

AUTO = "auto"
ADVANTAGE_ESTIMATORS = (AUTO, "papo", "papo_fullnorm", "grpo", "dr_grpo", "gdpo", "daro")
PROCESS_ESTIMATORS = ("papo", "papo_fullnorm")


def unsupported_loss_options(args) -> list[str]:
    """The options of `args` that the ``papo_kernels`` policy loss does not implement (TRL's loss does): it covers
    every option of TRL 1.16's ``_compute_loss`` (``vespo``, ``top_entropy_quantile``, ``off_policy_mask_threshold``
    and ``use_adaptive_entropy`` included), so only a loss type it does not know."""
    return ["loss_type"] if args.loss_type not in LOSS_TYPES else []


def _check_ranges(args) -> None:
    """Reject the out-of-range numbers that TRL would take silently (or fail on much later)."""
    for name in ("learning_rate", "beta", "epsilon"):
        require_finite(name, getattr(args, name), 0)
    check_lambda_process(args.lambda_process)
    if args.epsilon_high is not None and not (is_number(args.epsilon_high) and args.epsilon_high >= args.epsilon):
        raise ValueError(f"`epsilon_high` must be >= `epsilon` ({args.epsilon}), got {args.epsilon_high!r}")


@dataclass
class PAPOConfig(GRPOConfig):
    r"""
    Configuration class for [`PAPOTrainer`]: every [`~trl.GRPOConfig`] parameter keeps its meaning and default
    (TRL's class is where they are defined, the loss options `epsilon`, `epsilon_high`, `beta`, `loss_type`, ...
    included), and the parameters below are added.

    Args:
        > Parameters that control the advantages

        advantage_estimator (`str`, *optional*, defaults to `"auto"`):
            How advantages are computed from the rewards gathered across all processes:

            - `"auto"`: `"papo"` when the trainer is given `process_reward_funcs`, else `"grpo"` (TRL's GRPO, every
              `GRPOConfig` option with its TRL meaning and default). The trainer logs the resolution once and keeps
              the resolved name in its `args` (a copy; the config passed in is left as it was), so a saved config
              records it.
            - `"papo"`: PAPO's decoupled advantages `A = A_out + lambda_process * A_proc`. `A_out` normalises the
              outcome reward over the group; `A_proc` normalises the process reward over the group's *correct*
              responses only (zero for incorrect ones). Needs `process_reward_funcs`.
            - `"papo_fullnorm"`: as `"papo"`, but `A_proc` is normalised over all responses of the group (ablation);
              every response is scored by the process reward functions.
            - `"grpo"`: TRL's GRPO advantages over the outcome rewards (`scale_rewards`,
              `multi_objective_aggregation` and `reward_weights` apply as in [`~trl.GRPOTrainer`]). Without process
              reward functions or `dynamic_sampling`, the trainer is [`~trl.GRPOTrainer`]: its advantages and its
              logged metrics, with no `papo/*` diagnostics.
            - `"dr_grpo"`: Dr. GRPO, group-centred rewards without std scaling (`scale_rewards` is set to `"none"`);
              with process reward functions, PAPO's centring-only variant. Pair with `loss_type="dr_grpo"`.
            - `"gdpo"`: GDPO, each outcome reward normalised within its group, weighted sum, batch-normalised
              (`multi_objective_aggregation` is set to `"normalize_then_sum"`).
            - `"daro"`: GRPO advantages and DARO's loss: one learnable positive weight per pass-rate bucket
              `mu = k/G, 0 < k < G`, loss `sum_mu (w_mu * L_mu - ln w_mu)`; groups with `k = 0` or `k = G` are left
              out of the loss.

            Process reward functions enter the advantage under `"papo"`, `"papo_fullnorm"` and `"dr_grpo"`; under
            the other estimators they are scored and logged only.
        lambda_process (`float`, *optional*, defaults to `1.0`):
            Weight of the process advantage `A_proc` in `A_out + lambda_process * A_proc`.
        advantage_epsilon (`float`, *optional*):
            `eps` in `(r - mean) / (std + eps)`. If `None`, the estimator's reference value: `1e-6` for PAPO (the
            official code) and `1e-4` for the others (TRL).
        correct_threshold (`float`, *optional*, defaults to `1.0`):
            A response is correct iff its correctness reward is `>= correct_threshold`.
        correctness_reward_index (`int` or `None`, *optional*, defaults to `0`):
            Index in `reward_funcs` of the reward that decides correctness. If `None`, the weighted sum of all outcome
            rewards is used. A response whose correctness reward is `None` counts as incorrect.
        process_reward_on_correct_only (`bool`, *optional*, defaults to `True`):
            Call the process reward functions only for correct responses (the official PAPO code does this; it saves
            judge calls, and `A_proc` ignores incorrect responses anyway). Set `False` to score every response (always
            the case under `"papo_fullnorm"`).
        process_reward_weights (`list[float]`, *optional*):
            Weights of the process reward functions, summed into one process score (NaN-aware: a response with no
            process score is left out of the process statistics). If `None`, every weight is `1.0`.

        > Parameters that control the loss

        use_fused_loss (`bool`, *optional*, defaults to `True`):
            Compute the policy loss inside the model's forward with the fused linear-head kernel of `papo_kernels`
            (no logits materialised, gradients computed in the forward) where its kernels run (CUDA, or CPU with
            `TRITON_INTERPRET=1`), for text batches. It covers every option of TRL's loss (every `loss_type`,
            `vespo` included, `top_entropy_quantile`, `off_policy_mask_threshold`, `use_adaptive_entropy`, ...).
            Otherwise, and when `False`, TRL's own loss.
        padding_free (`bool` or `None`, *optional*, defaults to `None`):
            Pack each micro-batch's sequences (prompt + completion, without padding) into one row, `position_ids`
            restarting at each sequence, for every forward: the gradient pass and the log-prob passes without
            gradients (old policy, reference model). No padded token goes through the model or the LM head; the
            loss is the padded one (every sequence-level quantity included). `None`: on where the model's attention
            takes packed sequences (`flash_attention_2`/`3`, `flex_attention`, and `sdpa` or `eager` through
            transformers' packed-sequence masks), for text-only models without recurrent layers; otherwise off.
            `True` where the model cannot take them is a `ValueError`.

        > Parameters that control DAPO dynamic sampling

        dynamic_sampling (`bool`, *optional*, defaults to `False`):
            DAPO dynamic sampling: drop the groups whose outcome rewards are all equal and generate more prompts
            until the generation batch is full of kept groups (the extra prompts are a second seeded pass over
            `train_dataset`). Under PAPO this also drops all-correct groups, whose only signal is `A_proc`.
        max_generation_batches (`int`, *optional*, defaults to `4`):
            At most this many generation rounds per generation batch under `dynamic_sampling`. When the cap is hit,
            the batch is trained on the groups kept so far (the rest of the batch is masked out of the loss) and a
            warning is logged.

        > Parameters that control DARO

        daro_learning_rate (`float`, *optional*, defaults to `1e-2`):
            Adam learning rate of DARO's log-weights `ln w_mu` (their own optimiser, stepped at every optimiser step
            of the policy).
        daro_init_weight (`float`, *optional*, defaults to `1.0`):
            Initial value of every DARO weight `w_mu`.
        daro_max_weight (`float`, *optional*, defaults to `100.0`):
            DARO weights are kept in `[1 / daro_max_weight, daro_max_weight]`.

    Returns:
        A checked configuration; out-of-range values raise `ValueError` naming the parameter, and an estimator's
        TRL options are set (`"dr_grpo"`: `scale_rewards="none"`; `"gdpo"`: `normalize_then_sum`).

    Examples:
        >>> from papo_trl import PAPOConfig
        >>> args = PAPOConfig(output_dir="out", advantage_estimator="dr_grpo", bf16=False)
        >>> args.scale_rewards, args.epsilon, args.lambda_process
        ('none', 0.2, 1.0)
        >>> PAPOConfig(output_dir="out", lambda_process=float("nan"), bf16=False)
        Traceback (most recent call last):
        ...
        ValueError: `lambda_process` must be a finite number >= 0, got nan
    """

    advantage_estimator: str = field(
        default=AUTO,
        metadata={
            "help": "Advantage estimator: 'auto' (papo with process_reward_funcs, else grpo), 'papo', "
            "'papo_fullnorm', 'grpo', 'dr_grpo', 'gdpo' or 'daro'.",
            "choices": list(ADVANTAGE_ESTIMATORS),
        },
    )
    lambda_process: float = field(
        default=1.0, metadata={"help": "Weight of the process advantage in A_out + lambda_process * A_proc."}
    )
    advantage_epsilon: float | None = field(
        default=None,
        metadata={"help": "eps in (r - mean) / (std + eps); None: 1e-6 for PAPO, 1e-4 for the others (TRL)."},
    )
    correct_threshold: float = field(
        default=1.0, metadata={"help": "A response is correct iff its correctness reward is >= this value."}
    )
    correctness_reward_index: int | None = field(
        default=0,
        metadata={"help": "Index in reward_funcs of the correctness reward; None: the weighted outcome sum."},
    )
    process_reward_on_correct_only: bool = field(
        default=True, metadata={"help": "Call the process reward functions only for correct responses."}
    )
    process_reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weights of the process reward functions; None: all 1.0."}
    )
    use_fused_loss: bool = field(
        default=True,
        metadata={"help": "Use the fused linear-head policy loss of papo_kernels where available."},
    )
    padding_free: bool | None = field(
        default=None,
        metadata={"help": "Pack each micro-batch's sequences into one row (no padding); None: where the attention "
                  "takes packed sequences."},
    )  # fmt: skip
    dynamic_sampling: bool = field(
        default=False,
        metadata={"help": "DAPO dynamic sampling: drop groups with equal outcome rewards and generate more."},
    )
    max_generation_batches: int = field(
        default=4, metadata={"help": "At most this many generation rounds per batch under dynamic sampling."}
    )
    daro_learning_rate: float = field(default=1e-2, metadata={"help": "Adam learning rate of DARO's log-weights."})
    daro_init_weight: float = field(default=1.0, metadata={"help": "Initial value of every DARO weight."})
    daro_max_weight: float = field(
        default=100.0, metadata={"help": "DARO weights are kept in [1 / daro_max_weight, daro_max_weight]."}
    )

    def __post_init__(self):
        super().__post_init__()
        _check_ranges(self)
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(
                f"`advantage_estimator` must be one of {', '.join(ADVANTAGE_ESTIMATORS)}; "
                f"got {self.advantage_estimator!r}"
            )
        if self.advantage_epsilon is not None:
            require_finite("advantage_epsilon", self.advantage_epsilon, 0)
        require_finite("correct_threshold", self.correct_threshold)
        index = self.correctness_reward_index
        if index is not None and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
            raise ValueError(f"`correctness_reward_index` must be an integer >= 0 or None, got {index!r}")
        if self.process_reward_weights is not None and not (
            isinstance(self.process_reward_weights, (list, tuple)) and all(map(is_number, self.process_reward_weights))
        ):
            raise ValueError(
                f"`process_reward_weights` must be a list of finite floats or None, got {self.process_reward_weights!r}"
            )
        mgb = self.max_generation_batches
        if not isinstance(mgb, int) or isinstance(mgb, bool) or mgb < 1:
            raise ValueError(f"`max_generation_batches` must be an integer >= 1, got {mgb!r}")
        require_finite("daro_learning_rate", self.daro_learning_rate, 0, strict=True)
        check_weight_bounds(self.daro_init_weight, self.daro_max_weight, prefix="daro_")
        self._resolve_estimator_options()

    def _resolve_estimator_options(self) -> None:
        """Set the options ``advantage_estimator`` fixes (``papo_fullnorm``: a process score for every response;
        ``dr_grpo``: ``scale_rewards='none'``; ``gdpo``: ``normalize_then_sum``) and check the ones it needs."""
        estimator = self.advantage_estimator
        if estimator in PROCESS_ESTIMATORS and self.scale_rewards != "group":
            raise ValueError(
                f"`advantage_estimator={estimator!r}` normalises per group and needs `scale_rewards='group'`, got "
                f"{self.scale_rewards!r}; use `advantage_estimator='dr_grpo'` for centring without scaling"
            )
        if estimator == "papo_fullnorm" and self.process_reward_on_correct_only:
            # full normalisation needs a process score for every response
            self.process_reward_on_correct_only = False
        if estimator == "dr_grpo":
            self.scale_rewards = "none"
        if estimator == "gdpo":
            self.multi_objective_aggregation = "normalize_then_sum"
        unsupported = unsupported_loss_options(self) if estimator == "daro" else []
        if unsupported:
            name = unsupported[0]
            raise ValueError(
                f"`advantage_estimator='daro'` computes its loss with papo_kernels, which does not support "
                f"`{name}={getattr(self, name)!r}` (loss types: {', '.join(LOSS_TYPES)})"
            )


def resolve_estimator(estimator: str, has_process: bool) -> str:
    """The estimator `advantage_estimator` names: ``"auto"`` is ``"papo"`` with process reward functions, else
    ``"grpo"``."""
    return ("papo" if has_process else "grpo") if estimator == AUTO else estimator


def as_papo_config(args, model, has_process: bool) -> PAPOConfig:
    """The trainer's config: `args` (``None`` -> a default ``PAPOConfig``; a plain ``GRPOConfig`` -> the same
    settings as a ``PAPOConfig``), with ``advantage_estimator="auto"`` resolved in a copy (see
    :func:`resolve_estimator`) and the options it fixes set and checked in that copy."""
    if args is None:
        name = model if isinstance(model, str) else model.config._name_or_path or type(model).__name__
        args = PAPOConfig(f"{name.split('/')[-1]}-PAPO")
    elif not isinstance(args, PAPOConfig):
        if not isinstance(args, GRPOConfig):
            raise ValueError(f"`args` must be a PAPOConfig (or a GRPOConfig), got {type(args).__name__}")
        config = PAPOConfig.__new__(PAPOConfig)
        config.__dict__.update(args.__dict__)
        for f in dataclasses.fields(PAPOConfig):
            if f.name not in config.__dict__:
                setattr(config, f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        args = config
    if args.advantage_estimator != AUTO:
        return args
    args = copy.copy(args)
    args.advantage_estimator = resolve_estimator(AUTO, has_process)
    try:
        args._resolve_estimator_options()
    except ValueError as err:
        raise ValueError(
            f"`advantage_estimator='auto'` resolves to {args.advantage_estimator!r} because `process_reward_funcs` "
            f"are given, and {err}; or set `advantage_estimator='grpo'` to only log the process rewards"
        ) from None
    return args
