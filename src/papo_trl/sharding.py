"""Start-up checks of a sharded run: a setup that cannot work fails in ``PAPOTrainer.__init__``, on every process
alike and before any collective, with a ``ValueError`` naming the option to change, instead of failing (or hanging
one process while the others wait in a collective) in the middle of a step.

- The generation batch must be a whole number of prompt groups, and a whole number of global micro-batches, for
  the process count of *this* run: ``per_device_train_batch_size x num_processes x steps_per_generation`` must be a
  multiple of ``num_generations`` (TRL checks it when the configuration is built, with the process count of that
  moment; a configuration built in another session, e.g. a notebook before ``notebook_launcher``, carries a stale one).
- The fused linear-head loss reads the whole LM head: it gathers the data-parallel shards of FSDP2 and ZeRO-3, but a
  tensor-parallel head (``parallelism_config.tp_size > 1``, DeepSpeed AutoTP, a transformers ``tp_plan``) is not a
  data-parallel shard: every rank holds different vocabulary rows for the same tokens.
"""

from __future__ import annotations

from torch.distributed.tensor import DTensor


def check_batch_groups(args, num_processes: int) -> None:
    """Raise if the generation batch does not split into whole prompt groups and micro-batches on ``num_processes``."""
    G = args.num_generations
    per_device = args.per_device_train_batch_size
    global_batch = per_device * num_processes
    generation_batch = args.generation_batch_size
    if generation_batch % global_batch:
        raise ValueError(
            f"`generation_batch_size` ({generation_batch}) is not a multiple of `per_device_train_batch_size` x "
            f"processes ({per_device} x {num_processes} = {global_batch}): the configuration was built for another "
            "number of processes; build it in the launched processes, or set `steps_per_generation` instead"
        )
    if generation_batch % G:
        raise ValueError(
            f"`per_device_train_batch_size` x processes x `steps_per_generation` ({per_device} x {num_processes} x "
            f"{generation_batch // global_batch} = {generation_batch}) must be a multiple of `num_generations` ({G}) "
            "so that every prompt group is complete; change `per_device_train_batch_size` or `num_generations`"
        )


def tensor_parallel_head(model, accelerator) -> str | None:
    """Why the LM head of ``model`` is tensor-parallel under ``accelerator``, or ``None`` if it is not."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, DTensor):  # FSDP shards at `prepare`, after this check: a DTensor now is tensor parallelism
        return f"the LM head is already sharded over {weight.device_mesh} with {weight.placements}"
    parallelism = getattr(accelerator, "parallelism_config", None)
    if parallelism is not None and parallelism.tp_enabled:
        return f"`parallelism_config.tp_size` is {parallelism.tp_size}"
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    autotp = (plugin.deepspeed_config.get("tensor_parallel") or {}).get("autotp_size", 0) if plugin else 0
    if autotp and autotp > 1:
        return f"DeepSpeed's `tensor_parallel.autotp_size` is {autotp}"
    return None


def check_sharding(args, model, accelerator, *, fused_loss: bool) -> None:
    """All start-up checks of a sharded run (see the module docstring); ``fused_loss``: the fused head will run."""
    check_batch_groups(args, accelerator.num_processes)
    reason = tensor_parallel_head(model, accelerator) if fused_loss else None
    if reason:
        raise ValueError(
            f"`use_fused_loss=True` computes the loss from the whole LM head, gathered from data-parallel shards "
            f"(FSDP2, DeepSpeed ZeRO-3), but {reason}: a tensor-parallel head cannot be gathered there. Set "
            "`use_fused_loss=False` (TRL's loss, through the model's own head) or train without tensor parallelism"
        )
