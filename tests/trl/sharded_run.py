"""Worker of the sharded-training tests (``test_sharded.py``): trains a tiny Qwen2 with ``PAPOTrainer`` for a few
steps in each of the runs below and writes, per run, what the test compares: per-step loss, gradient norm and
entropy, the gathered advantages, the final full weights and, under sharding, the LM-head gathers of each step.

``python sharded_run.py OUT`` is the single-process reference; under ``accelerate launch`` with an FSDP2 or
DeepSpeed ZeRO-3 configuration and ``use_cpu: true`` it is one of two gloo processes. accelerate 1.15 turns a CPU
run into plain data parallelism (``use_cpu`` wins over FSDP and DeepSpeed in ``AcceleratorState``), so
:func:`allow_sharding_on_cpu` restores the configured distributed type; everything after that (``fully_shard``,
``deepspeed.initialize``, the collectives, gradient clipping, checkpoints) is the real code path, on gloo.

Generations are a fixed function of (prompt, position in its group, step) so that every process layout produces
the same completions; the global batch is the same (one process: 12 rows; two: 6 each, so a group straddles them).
The runs above pack their micro-batches (``padding_free``, on by default); the ``fp64_*`` runs train in fp64 (sdpa,
rotary angles in fp64, prompts of several lengths) padded and packed, which must agree to 1e-10.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from papo_trl import PAPOTrainer  # noqa: E402
from tests.trl import tiny  # noqa: E402

G, ROWS, STEPS, PROMPTS = 4, 12, 3, 64  # 64 prompts: every run stays in its first epoch
RUNS = {  # name: (config overrides, untied LM head that is sharded on its own)
    "trl_loss": (dict(use_fused_loss=False), False),
    "fused_linear": (dict(use_fused_loss=True), False),
    "fused_linear_sharded_head": (dict(use_fused_loss=True), True),
}
DARO = dict(advantage_estimator="daro", daro_learning_rate=0.2, gradient_accumulation_steps=2, max_steps=4)
# fp64, the fused loss with the head sharded on its own, DARO over an accumulation window: padded and packed
FP64 = {name: dict(DARO, max_steps=2, padding_free=name.endswith("packed")) for name in ("fp64_padded", "fp64_packed")}
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", "1"))
TOKENIZER = tiny.tiny_tokenizer()


def allow_sharding_on_cpu() -> None:
    """Keep the FSDP / DeepSpeed distributed type that a ``use_cpu: true`` accelerate configuration asks for."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, mixed_precision=None, cpu=False, dynamo_plugin=None, deepspeed_plugin=None, fsdp_plugin=None,
                *args, **kwargs):  # fmt: skip
        init(self, mixed_precision, cpu, dynamo_plugin, deepspeed_plugin, fsdp_plugin, *args, **kwargs)
        if self.distributed_type != DistributedType.MULTI_CPU:
            return
        if fsdp_plugin is not None:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
        elif deepspeed_plugin is not None and os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
            deepspeed_plugin.set_mixed_precision(self._mixed_precision)
            deepspeed_plugin.select(_from_accelerator_state=True)
            self.distributed_type, self.deepspeed_plugins = DistributedType.DEEPSPEED, deepspeed_plugin
        PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = patched


class HeadGathers:
    """Records, per training step, the collectives that gather the LM head, with the full shape they produce:
    all-gathers and reduce-scatters of DTensors (a head that is an FSDP2 unit of its own; FSDP2 gathers its units
    through c10d, not through these), and ZeRO-3 all-gathers of a partitioned head (``ds_status`` NOT_AVAILABLE)."""

    def __init__(self):
        import torch.distributed._functional_collectives as funcol

        self.steps, self.current = [], None
        for name in ("all_gather_single", "reduce_scatter_single"):
            setattr(funcol, name, self._spy_dtensor(name, getattr(funcol, name)))

    def record(self, name: str, shape) -> None:
        if self.current is not None:
            self.current.append([name, list(shape)])

    def _spy_dtensor(self, name, fn):
        def spy(tensor, *args, **kwargs):
            out = fn(tensor, *args, **kwargs)
            self.record(name, out.shape if name == "all_gather_single" else tensor.shape)
            return out

        return spy

    def _watch_zero3(self, model) -> None:
        """ZeRO-3 gathers a list of parameters through the first one's ``all_gather(_coalesced)``: wrap them all."""
        head = model.get_output_embeddings().weight
        for param in model.parameters():
            if hasattr(param, "ds_status") and not hasattr(param, "_head_spy"):
                param.all_gather = self._spy_zero3(param.all_gather, param, "param_list", head)
                param.all_gather_coalesced = self._spy_zero3(param.all_gather_coalesced, param, "params", head)
                param._head_spy = True

    def _spy_zero3(self, fn, owner, key: str, head):
        def spy(*args, **kwargs):
            if key in kwargs:
                params = kwargs.pop(key)
            else:
                params, args = (args[0], args[1:]) if args else (None, args)
            params = [owner] if params is None else list(params)
            if any(p is head and p.ds_status.name == "NOT_AVAILABLE" for p in params):
                self.record("zero3_all_gather", head.ds_shape)
            return fn(params, *args, **kwargs)

        return spy

    def step(self, model, run):
        self._watch_zero3(model)
        self.current = []
        try:
            return run()
        finally:
            self.steps.append(self.current)
            self.current = None


class FixedGenerations(tiny.FixedCompletions, PAPOTrainer):
    """``PAPOTrainer`` whose generations depend only on the prompt, the position in its group and the step; it keeps
    the gathered advantages of every generation batch and reports each training step to ``gathers``."""

    gathers: HeadGathers | None = None

    def _set_advantages(self, output, *args, **kwargs):
        output = super()._set_advantages(output, *args, **kwargs)
        self.advantages.append(self.accelerator.gather(output["advantages"]).tolist())
        return output

    def training_step(self, *args, **kwargs):
        if self.gathers is None:
            return super().training_step(*args, **kwargs)
        return self.gathers.step(self.model, lambda: super(FixedGenerations, self).training_step(*args, **kwargs))


def make_trainer(out_dir: Path, overrides: dict, untied: bool = False, gathers: HeadGathers | None = None,
                 fp64: bool = False):  # fmt: skip
    model = tiny.tiny_model(TOKENIZER)
    if fp64:
        model = model.double()
        model.config._attn_implementation = "sdpa"
    if untied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    settings = {**dict(per_device_train_batch_size=ROWS // WORLD_SIZE, num_generations=G, max_steps=STEPS), **overrides}
    trainer = FixedGenerations(
        model=model, reward_funcs=tiny.digit_outcome_reward, process_reward_funcs=tiny.digit_process_reward,
        args=tiny.tiny_args(out_dir, **settings), processing_class=TOKENIZER,
        train_dataset=(tiny.varied_dataset if fp64 else tiny.tiny_dataset)(PROMPTS),
    )  # fmt: skip
    trainer.advantages, trainer.gathers = [], gathers
    if trainer.is_fsdp_enabled:  # as `fsdp_transformer_layer_cls_to_wrap: Qwen2DecoderLayer,Linear`: the head alone
        wrap = ["Qwen2DecoderLayer", "Linear"] if untied else None
        trainer.accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = wrap
    return trainer


def full_weights(trainer) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    params = dict(trainer.model.named_parameters())
    if trainer.is_deepspeed_enabled:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {name: p.detach().clone() for name, p in params.items()}
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for name, p in params.items()}


def record(trainer, out_dir: Path, name: str, **extra) -> None:
    keys = ("step", "loss", "grad_norm", "entropy", "daro/weight_k1", "daro/weight_k3")
    weights = full_weights(trainer)
    if trainer.accelerator.is_main_process:
        torch.save(weights, out_dir / f"{name}.pt")
        curve = [{k: h[k] for k in keys if k in h} for h in trainer.state.log_history if "loss" in h]
        report = dict(backend=trainer.accelerator.distributed_type.name, curve=curve, advantages=trainer.advantages)
        (out_dir / f"{name}.json").write_text(json.dumps({**report, **extra}))


def optimizer_state(trainer) -> list[torch.Tensor]:
    """Every tensor of the optimiser's state (this process's shards), in a fixed order."""
    from torch.distributed.tensor import DTensor

    found = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            found.append((x.to_local() if isinstance(x, DTensor) else x).detach().clone().float().flatten())
        elif isinstance(x, dict):
            for key in sorted(x, key=str):
                walk(x[key])
        elif isinstance(x, (list, tuple)):
            for item in x:
                walk(item)

    walk(trainer.optimizer.state_dict()["state"])
    return found


def daro_run(out_dir: Path, resume: bool) -> None:
    """DARO for 4 steps; with ``resume``, a checkpoint at step 2 and a fresh trainer resumed from it to step 4,
    recording the DARO weights and the optimiser state (this process's shards) as saved and as loaded."""
    checkpoints = dict(save_strategy="steps", save_steps=2) if resume else {}
    first = make_trainer(out_dir / "daro", {**DARO, **checkpoints})
    saved = {}
    save = first._save_checkpoint

    def save_spy(model, trial):
        save(model, trial)
        if first.state.global_step == 2:
            saved.update(daro=first._daro.weights.weights.tolist(), optimizer=optimizer_state(first))

    first._save_checkpoint = save_spy
    first.train()
    record(first, out_dir, "daro")
    if not resume:
        return
    resumed = make_trainer(out_dir / "daro", DARO)
    loaded = {}
    load = resumed._load_optimizer_and_scheduler

    def load_spy(checkpoint):
        load(checkpoint)
        loaded.update(daro=resumed._daro.weights.weights.tolist(), optimizer=optimizer_state(resumed),
                      daro_step=resumed._daro.optimizer.state_dict()["state"][0]["step"].item())  # fmt: skip

    resumed._load_optimizer_and_scheduler = load_spy
    resumed.train(resume_from_checkpoint=str(out_dir / "daro" / "checkpoint-2"))
    pairs = list(zip(saved["optimizer"], loaded["optimizer"], strict=True))
    diff = max((a - b).abs().max().item() for a, b in pairs)
    state = dict(saved_daro=saved["daro"], loaded_daro=loaded["daro"], loaded_daro_step=loaded["daro_step"],
                 optimizer_tensors=len(pairs), optimizer_max_abs_diff=diff)  # fmt: skip
    record(resumed, out_dir, "daro_resumed", ranks=gather_object([state]))


def gather_object(obj: list) -> list:
    from accelerate.utils import gather_object as gather

    return gather(obj) if WORLD_SIZE > 1 else obj


def bad_setups(out_dir: Path) -> dict[str, str]:
    """Start-up errors of setups that cannot work: every process raises the same error, before any collective."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    def error(name, model, **overrides):
        args = tiny.tiny_args(out_dir / name, advantage_estimator="grpo", **overrides)
        if name == "stale_batch_geometry":  # as built by one process: 6 rows (1.5 groups of 4) on each of two
            args.generation_batch_size = args.per_device_train_batch_size
        try:
            PAPOTrainer(model=model, reward_funcs=tiny.digit_outcome_reward, args=args,
                        train_dataset=tiny.tiny_dataset(), processing_class=TOKENIZER)  # fmt: skip
        except ValueError as exc:
            return str(exc)
        return "no error"

    tensor_parallel = tiny.tiny_model(TOKENIZER)  # the head's vocabulary rows split over ranks, as ColwiseParallel
    tensor_parallel.config.tie_word_embeddings = False
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    head = distribute_tensor(tensor_parallel.lm_head.weight.detach().clone(), mesh, [Shard(0)])
    tensor_parallel.lm_head.weight = torch.nn.Parameter(head)
    return {
        "tensor_parallel_head": error("tensor_parallel_head", tensor_parallel, use_fused_loss=True),
        "stale_batch_geometry": error(
            "stale_batch_geometry", tiny.tiny_model(TOKENIZER), per_device_train_batch_size=6
        ),
    }


def main(out_dir: Path) -> None:
    sharded = WORLD_SIZE > 1
    if sharded:
        allow_sharding_on_cpu()
    gathers = HeadGathers() if sharded else None
    for name, (overrides, untied) in RUNS.items():
        trainer = make_trainer(out_dir / name, overrides, untied, gathers if untied else None)
        trainer.train()
        record(trainer, out_dir, name, gathers=trainer.gathers.steps if trainer.gathers else [])
    daro_run(out_dir, resume=trainer.is_fsdp_enabled)  # checkpoint and resume: under FSDP2
    with tiny.rotary_in_model_dtype():
        for name, overrides in FP64.items():
            trainer = make_trainer(out_dir / name, overrides, untied=True, fp64=True)
            trainer.train()
            record(trainer, out_dir, name)
    if sharded:
        errors = bad_setups(out_dir)
        if trainer.accelerator.is_main_process:
            (out_dir / "bad_setups.json").write_text(json.dumps(errors))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
