"""``PAPOTrainer``: TRL's ``GRPOTrainer`` with PAPO / GDPO / Dr. GRPO / DARO advantages and DAPO dynamic sampling.

Hook points in TRL 1.16: ``_calculate_rewards`` (score the process rewards of the correct responses and record the
gathered rewards on the round's rows, :class:`ScoredRows`), ``_generate_and_score_completions`` (dynamic-sampling
rounds, then replace ``advantages`` by the estimator's, computed on the gathered rewards and sliced to this process
exactly as TRL slices), ``_compute_loss`` (the fused linear-head loss inside the model's forward, DARO's
per-bucket weighting; TRL's own loss whenever neither applies) and ``_get_per_token_logps_and_entropies`` (packed
rows with ``padding_free``). Without a PAPO option the advantages are TRL's own, untouched.
"""

from __future__ import annotations

import atexit
import functools
import os
import textwrap

import torch
from accelerate.logging import get_logger
from accelerate.utils import gather, is_peft_model
from datasets import IterableDataset
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.extras.profiling import profiling_context, profiling_decorator
from trl.trainer.utils import (
    get_callable_name,
    is_async_callable,
    shutdown_event_loop_in_daemon,
    start_event_loop_in_daemon,
)

from papo_kernels import dynamic_sampling_mask, kernels_available
from papo_kernels.advantages import check_error, weighted_nansum
from papo_kernels.loss import PolicyLossConfig

from . import vllm_cpu
from .config import AUTO, PROCESS_ESTIMATORS, as_papo_config, unsupported_loss_options
from .daro_state import DAROState
from .diagnostics import advantage_metrics, process_metrics, reward_func_counters, signal_metrics
from .entropy_control import EntropyControl, trl_field
from .estimators import compute_advantages, correctness, fill_unscorable
from .fused_head import add_fused_policy_loss_head
from .loss_step import PolicyLossStep
from .packing import PaddingFree, resolve_padding_free
from .process_rewards import check_process_reward_funcs, score_process_rewards
from .sampling import PromptStream, assemble_rounds, check_row_keys
from .sharding import check_sharding

logger = get_logger(__name__)

PAPO_STATE_NAME = "papo_state.pt"


class ScoredRows(list):
    """The input rows of one generation round. TRL's ``_generate_and_score_completions`` hands them on to
    ``_calculate_rewards``, which records the round's gathered rewards on them: ``(rewards_per_func, process)``,
    ``process`` being ``None`` without process reward functions."""

    rewards: tuple[torch.Tensor, torch.Tensor | None] | None = None


class PAPOTrainer(PolicyLossStep, PaddingFree, GRPOTrainer):
    """[`~trl.GRPOTrainer`] with decoupled process-aware advantages (PAPO), GDPO, Dr. GRPO, DARO and DAPO dynamic
    sampling; see [`PAPOConfig`].

    Without process functions (and with the default `advantage_estimator="auto"`, or `"grpo"`) and without dynamic
    sampling it trains exactly as [`~trl.GRPOTrainer`]: TRL's advantages, the same metric names and values (PAPO's
    `papo/*` diagnostics are logged only when a PAPO option is used), the same loss (fused or TRL's own).

    Its steps are timed with TRL's profiling contexts, reported as `profiling/Time taken: PAPOTrainer.<step>` where
    `report_to` names W&B, MLflow or Trackio: `compute_loss` (the loss, fused or not) and the reward functions as in
    [`~trl.GRPOTrainer`], plus `_set_advantages`, `dynamic_sampling`, `process_rewards` and `daro_step` when those
    PAPO options are on (a drop-in run times only what [`~trl.GRPOTrainer`] times).

    Args:
        model (`str | PreTrainedModel | PeftModel`):
            The policy, as for [`~trl.GRPOTrainer`].
        reward_funcs (`Callable | list[Callable]`):
            The outcome reward functions, as for [`~trl.GRPOTrainer`]; `args.correctness_reward_index` picks the one
            that decides correctness.
        args ([`PAPOConfig`] or [`~trl.GRPOConfig`], *optional*):
            The configuration (a `GRPOConfig` is taken as the same settings in a `PAPOConfig`).
        process_reward_funcs (`Callable | list[Callable]`, *optional*):
            Process reward functions (e.g. a rubric judge), with TRL's reward signature, sync or async. They are
            called after the outcome `reward_funcs`, only for the correct responses when
            `args.process_reward_on_correct_only`; a `None` score leaves the response out of the process statistics.
        *trl_args, **trl_kwargs:
            Every other argument of [`~trl.GRPOTrainer`] (`train_dataset`, `processing_class`, `peft_config`, ...).

    Returns:
        A trainer: `train()` trains, `args.advantage_estimator` holds the resolved estimator.

    Examples:
        >>> import tempfile
        >>> from datasets import Dataset
        >>> from papo_trl import PAPOConfig, PAPOTrainer
        >>> from papo_trl.demo.model import build_model, build_tokenizer  # a tiny model, built without downloads
        >>> from papo_trl.rewards import exact_answer_reward, step_checker_reward
        >>> tokenizer = build_tokenizer()
        >>> args = PAPOConfig(tempfile.mkdtemp(), per_device_train_batch_size=4, num_generations=4, use_cpu=True)
        >>> trainer = PAPOTrainer(
        ...     model=build_model(tokenizer),
        ...     reward_funcs=exact_answer_reward,
        ...     process_reward_funcs=step_checker_reward,
        ...     args=args,
        ...     train_dataset=Dataset.from_list([{"prompt": "2+3=", "answer": "5"}] * 4),
        ...     processing_class=tokenizer,
        ... )
        >>> trainer.args.advantage_estimator  # "auto" with process reward functions
        'papo'
    """

    _tag_names = ["trl", "grpo", "papo"]
    _name = "PAPO"
    _paper = {
        "title": "Stabilizing Rubric Integration Training via Decoupled Advantage Normalization",
        "id": "2603.26535",
        "citation": textwrap.dedent("""\
            @misc{tan2026stabilizingrubricintegrationtraining,
                title        = {{Stabilizing Rubric Integration Training via Decoupled Advantage Normalization}},
                author       = {Zelin Tan and Zhouliang Yu and Bohan Lin and Zijie Geng and Hejia Geng and others},
                year         = 2026,
                eprint       = {arXiv:2603.26535},
            }"""),
    }
    # TRL's names for the entropy controller's state: its own loss, checkpoint and logging use them
    entropy_coef = trl_field("coef")
    _last_world_entropy = trl_field("last_world_entropy")
    _entropy_window_stats = trl_field("window_stats")

    def __init__(self, model, reward_funcs=None, args=None, *trl_args, process_reward_funcs=None, **trl_kwargs):
        process_reward_funcs = check_process_reward_funcs(process_reward_funcs)
        requested = getattr(args, "advantage_estimator", AUTO)  # None and a plain GRPOConfig mean "auto"
        args = as_papo_config(args, model, bool(process_reward_funcs))
        self._entropy_control = EntropyControl(args)  # before GRPOTrainer's __init__ sets the fields above
        vllm_on_cpu = args.use_vllm and vllm_cpu.runs_on_cpu()
        if vllm_on_cpu:
            vllm_cpu.use_cpu_settings()
        super().__init__(model, reward_funcs, args, *trl_args, **trl_kwargs)
        if vllm_on_cpu and args.vllm_mode == "colocate":  # TRL's in-place sync has nothing to load into there
            self.vllm_generation.sync_weights = functools.partial(vllm_cpu.sync_colocated_weights, self.vllm_generation)
        if requested == AUTO:
            logger.info(
                f"advantage_estimator='auto' resolved to {args.advantage_estimator!r} ("
                + ("process_reward_funcs given: PAPO)" if process_reward_funcs else
                   "no process_reward_funcs: TRL's GRPO; pass process_reward_funcs for PAPO)"),
                main_process_only=True,
            )  # fmt: skip
        self.process_reward_funcs = process_reward_funcs
        self.process_reward_func_names = [get_callable_name(f) for f in process_reward_funcs]
        weights = args.process_reward_weights or [1.0] * len(process_reward_funcs)
        self.process_reward_weights = torch.tensor(weights, dtype=torch.float32)
        self._check_trainer_args()
        if any(map(is_async_callable, process_reward_funcs)) and not self._has_async_funcs:
            self._has_async_funcs = True
            self.async_loop_thread, self.async_loop, ready = start_event_loop_in_daemon(name="PAPOTrainer-AsyncLoop")
            ready.wait()
            atexit.register(shutdown_event_loop_in_daemon, self.async_loop_thread, self.async_loop)
        self._daro = None
        if args.advantage_estimator == "daro":
            self._daro = DAROState(
                self.num_generations,
                learning_rate=args.daro_learning_rate,
                init_weight=args.daro_init_weight,
                max_weight=args.daro_max_weight,
                device=self.accelerator.device,
            )
        self._prompt_stream = None
        if args.dynamic_sampling:
            self._prompt_stream = PromptStream(
                self._remove_unused_columns(self.train_dataset, description="Training"),
                args.generation_batch_size // self.num_generations,
                self.num_generations,
                seed=args.seed,
                process_index=self.accelerator.process_index,
                num_processes=self.accelerator.num_processes,
                collate=self.data_collator,
            )
        self._loss_config = None if unsupported_loss_options(args) else PolicyLossConfig.from_trainer_args(args)
        # the fused linear-head loss where its kernels run (CUDA, or CPU under TRITON_INTERPRET) and the options allow
        kernels = kernels_available(self.accelerator.device)
        self._fused_loss = bool(args.use_fused_loss and self._loss_config is not None and kernels)
        check_sharding(args, self.model, self.accelerator, fused_loss=self._fused_loss)
        if self._fused_loss:
            base = self.model.get_base_model() if is_peft_model(self.model) else self.model
            add_fused_policy_loss_head(base, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32)
        self._padding_free = resolve_padding_free(args.padding_free, (self.model, self.ref_model), self._is_vlm)
        # without a PAPO option, TRL's own advantages and metrics: GRPOTrainer's exactly
        papo_options = (bool(process_reward_funcs), args.advantage_estimator != "grpo", args.dynamic_sampling)
        self._papo_advantages = any(papo_options)

    def _check_trainer_args(self) -> None:
        args = self.args
        if args.advantage_estimator in PROCESS_ESTIMATORS and not self.process_reward_funcs:
            raise ValueError(
                f"`advantage_estimator={args.advantage_estimator!r}` needs `process_reward_funcs` (e.g. a rubric "
                "judge); pass them, or leave `advantage_estimator` at 'auto' (TRL's GRPO without them)"
            )
        index = args.correctness_reward_index
        if index is not None and index >= len(self.reward_funcs):
            raise ValueError(
                f"`correctness_reward_index` is {index}, but there are only {len(self.reward_funcs)} outcome "
                "reward functions"
            )
        if len(self.process_reward_weights) != len(self.process_reward_funcs):
            raise ValueError(
                f"`process_reward_weights` has {len(self.process_reward_weights)} entries but there are "
                f"{len(self.process_reward_funcs)} process reward functions"
            )
        if args.dynamic_sampling and isinstance(self.train_dataset, IterableDataset):
            raise ValueError("`dynamic_sampling=True` needs a map-style `train_dataset` (not an IterableDataset)")

    # ------------------------------------------------------------------------------------------------ rewards
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        process = None
        if self.process_reward_funcs:
            n = len(prompts)
            start = self.accelerator.process_index * n
            args = self.args
            correct = correctness(
                rewards_per_func[start : start + n], self.reward_weights, args.correctness_reward_index,
                args.correct_threshold,
            )  # fmt: skip
            rows = torch.nonzero(correct).flatten().tolist() if args.process_reward_on_correct_only else range(n)
            base_kwargs = {"trainer_state": self.state, "log_metric": self._log_metric}
            if self.environments is not None:
                base_kwargs["environments"] = self.environments
            with profiling_context(self, "process_rewards"):
                local = score_process_rewards(
                    self.process_reward_funcs, self.process_reward_func_names, inputs, prompts, completions,
                    completion_ids_list, rows, base_kwargs=base_kwargs, log_extra=self._log_completion_extra,
                    async_loop=getattr(self, "async_loop", None), device=self.accelerator.device,
                )  # fmt: skip
            process = gather(local)
        if isinstance(inputs, ScoredRows):
            inputs.rewards = (rewards_per_func, process)
        return rewards_per_func

    # ------------------------------------------------------------------------------------------------ batches
    def _generate_and_score_completions(self, inputs):
        if not self._papo_advantages:
            return super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        dynamic = self._prompt_stream is not None and mode == "train"
        rounds, kept, target, batch = [], 0, 0, inputs
        while True:
            output, rewards_per_func, process = self._generate_and_score_round(batch)
            if not dynamic:
                rounds.append((output, rewards_per_func, process, None))
                break
            check_row_keys(output)
            outcome = fill_unscorable(weighted_nansum(rewards_per_func, self.reward_weights), G)
            keep = dynamic_sampling_mask(outcome, G)
            rounds.append((output, rewards_per_func, process, keep))
            target = target or keep.numel()
            kept += int(keep.sum().item())
            if kept >= target or len(rounds) >= self.args.max_generation_batches:
                break
            batch = self._prompt_stream.next_batch()
        if dynamic:
            with profiling_context(self, "dynamic_sampling"):
                output, rewards_per_func, process, valid, origin = assemble_rounds(
                    self.accelerator, rounds, target, G, self._tokenizer.pad_token_id
                )
            self._log_dynamic_sampling(mode, len(rounds), kept, target)
            generated = sum(r[1].shape[0] for r in rounds)
            return self._set_advantages(output, rewards_per_func, process, G, mode, valid, origin, generated)
        return self._set_advantages(output, rewards_per_func, process, G, mode)

    def _generate_and_score_round(self, rows):
        """TRL's generation and scoring of one round of input rows: ``(output, rewards_per_func, process)``, the
        rewards gathered over processes as ``_calculate_rewards`` computed them."""
        rows = ScoredRows(rows)
        output = super()._generate_and_score_completions(rows)
        if rows.rewards is None:
            raise RuntimeError("PAPOTrainer._calculate_rewards did not see this round's rows (ScoredRows)")
        return output, *rows.rewards

    def _log_dynamic_sampling(self, mode: str, num_rounds: int, kept: int, target: int) -> None:
        metrics = self._metrics[mode]
        metrics["dynamic_sampling/rounds"].append(float(num_rounds))
        metrics["dynamic_sampling/kept_frac"].append(kept / (target * num_rounds))
        metrics["dynamic_sampling/batch_fill"].append(min(kept, target) / target)
        metrics["dynamic_sampling/cap_hit"].append(float(kept < target))
        if kept < target:
            logger.warning(
                f"Dynamic sampling kept {kept} of the {target} groups a batch needs after {num_rounds} generation "
                f"rounds (`max_generation_batches={self.args.max_generation_batches}`); training on the kept groups "
                "only. Raise `max_generation_batches` or check that the rewards vary within groups."
            )

    @profiling_decorator
    def _set_advantages(self, output, rewards_per_func, process, G, mode, valid=None, origin=None, generated=0):
        """Replace TRL's advantages by the estimator's (on the gathered rewards), log diagnostics, annotate DARO."""
        args = self.args
        correct = correctness(
            rewards_per_func, self.reward_weights, args.correctness_reward_index, args.correct_threshold
        )
        combined = weighted_nansum(process, self.process_reward_weights) if process is not None else None
        adv = compute_advantages(
            args.advantage_estimator, rewards_per_func, combined, correct, G,
            reward_weights=self.reward_weights, scale_rewards=args.scale_rewards,
            multi_objective_aggregation=args.multi_objective_aggregation, lambda_process=args.lambda_process,
            eps=args.advantage_epsilon, valid=valid,
        )  # fmt: skip
        n = output["completion_mask"].shape[0]
        start = self.accelerator.process_index * n
        output["advantages"] = adv.total[start : start + n].to(output["advantages"].dtype)
        if origin is None:
            self._log_advantages(adv.total.tolist())
        else:  # one value per generated row, in generation order, aligned with the logged completions
            logged = torch.zeros(generated, device=adv.total.device)
            logged[origin] = adv.total
            self._log_advantages(logged.tolist())
        check_error(adv.error)  # the kernel's value checks, read once the logging above has synchronised
        metrics = advantage_metrics(adv, correct, valid)
        metrics.update(signal_metrics(adv.total, correct, G, valid, process=combined))
        if process is not None:
            metrics.update(process_metrics(process, self.process_reward_func_names, correct))
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        if self._daro is not None and mode == "train":
            loss_mask = output["completion_mask"] * output.get("tool_mask", 1)
            row_tokens = self.accelerator.gather(loss_mask.sum(dim=1).float())
            buckets, bucket_tokens = self._daro.annotate(correct, row_tokens)
            output["daro_bucket"] = buckets[start : start + n]
            output["daro_bucket_tokens"] = bucket_tokens[start : start + n]
        return output

    # ------------------------------------------------------------------------------------------------ logs and state
    def _log_advantages(self, values: list[float]) -> None:
        """Log ``values`` in place of the advantages TRL logged for the same completions (the last ones)."""
        logged = self._logs["advantages"]
        for _ in range(min(len(values), len(logged))):
            logged.pop()
        logged.extend(values)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        funcs = list(self.reward_funcs) + list(self.process_reward_funcs)
        names = list(self.reward_func_names) + list(self.process_reward_func_names)
        for key, value in reward_func_counters(funcs, names, self.accelerator).items():
            self._metrics[mode][key].append(value)
        super().log(logs, start_time)

    def _papo_state(self) -> dict:
        state = {}
        if self._daro is not None:
            state["daro"] = self._daro.state_dict()
        if self._prompt_stream is not None:
            state["prompt_stream"] = self._prompt_stream.state_dict()
        return state

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        state = self._papo_state()
        if state and self.args.should_save:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            torch.save(state, os.path.join(self._get_output_dir(trial=trial), folder, PAPO_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        path = None if checkpoint is None else os.path.join(checkpoint, PAPO_STATE_NAME)
        if path is None or not os.path.isfile(path):
            return
        state = torch.load(path, map_location="cpu", weights_only=True)  # load_state_dict moves it to the device
        if self._daro is not None and "daro" in state:
            self._daro.load_state_dict(state["daro"])
        if self._prompt_stream is not None and "prompt_stream" in state:
            self._prompt_stream.load_state_dict(state["prompt_stream"])
