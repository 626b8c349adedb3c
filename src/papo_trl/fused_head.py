"""The policy loss computed inside a causal LM's forward, from its last hidden states and LM head.

``add_fused_policy_loss_head(model)`` patches ``model.forward`` the way TRL 1.16's ``add_fused_lm_head`` does:
``model(input_ids, attention_mask, ..., policy_loss=HeadLoss(...))`` runs the backbone, takes the hidden states that
predict the completion tokens and hands them with the LM head to ``papo_kernels.loss.linear_loss`` (no ``[B, T, V]``
logits, gradients computed in the forward) and returns its ``PolicyLossOutput`` with the MoE load-balancing loss
(``None`` without one). Without ``policy_loss`` the forward is the previous one (generation, TRL's own fused head),
so it composes with TRL's patch. Running inside the forward is what makes the head's weight usable when it is
sharded, and the head is gathered once per forward (per micro-batch), never per token chunk nor again in the
backward, because the gradients are computed in the forward:

- FSDP2: when the head belongs to the unit that the backbone unshards (accelerate puts it with the final norm), it
  is a plain tensor here and FSDP2 reduce-scatters its gradient; when it is an FSDP unit of its own, it is still a
  ``DTensor`` shard here and :func:`gather_sharded_head` all-gathers it, its backward reduce-scattering the
  gradient, averaged over the ranks as FSDP2 averages.
- DeepSpeed ZeRO-3: gathered with TRL's ``maybe_gather_lm_head_ctx`` (a no-op where it is already available, e.g.
  tied to the input embeddings); ZeRO-3's hooks reduce the gradient returned by the backward.

Tied embeddings need nothing special; with PEFT, patch the base model before wrapping it, as TRL does (a frozen
head gets no weight gradient and no accumulator).
The head's logit scale and final-logit softcapping are read from the model config with TRL's rules.
"""

from __future__ import annotations

import functools
import types
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import transformers
from packaging.version import Version
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Partial, Replicate
from trl.trainer.utils import maybe_gather_lm_head_ctx

from papo_kernels.loss import LossInputs, PolicyLossConfig, linear_loss


@dataclass
class HeadLoss:
    """What the fused loss takes besides the hidden states and the head: the ``[B, T]`` completion ids at the end of
    ``input_ids``, the loss inputs, the hyper-parameters and the upstream gradient the loss will get (``1 /``
    accumulation steps: a free backward). Packed (``inputs.cu_seqlens``): the ``[1, n]`` completion ids and
    ``predict``, the ``[n]`` flat positions of the packed rows whose hidden states predict them."""

    completion_ids: torch.Tensor
    inputs: LossInputs
    config: PolicyLossConfig
    grad_scale: float = 1.0
    predict: torch.Tensor | None = None


def head_transform(text_config) -> tuple[float, float | None]:
    """``(logit_scale, final_logit_softcapping)`` of a model's LM head, by TRL 1.16's ``add_fused_lm_head`` rules
    (``logit_scale``, ``output_multiplier``, ``lm_head_multiplier``, ``logits_scaling``)."""
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else float(scale)), softcap


def gather_sharded_head(param: torch.Tensor | None, owner: torch.nn.Module) -> torch.Tensor | None:
    """The full tensor of an LM-head parameter that FSDP2 left sharded (a ``DTensor``: the head is an FSDP unit of its
    own, which the fused loss reads without calling it), gathered once, differentiably: its gradient is
    reduce-scattered back to the shards and averaged over the data-parallel ranks, as FSDP2 reduces every other
    gradient (``full_tensor()`` would keep each rank's own, unreduced gradient). Plain tensors pass through."""
    if not isinstance(param, DTensor):
        return param
    if not isinstance(owner, FSDPModule):
        raise ValueError(
            f"`use_fused_loss=True` reads the LM head directly, but its weight is sharded over {param.device_mesh} "
            f"with {param.placements} outside FSDP (tensor parallelism); set `use_fused_loss=False` or shard the head "
            "with FSDP only"
        )
    mesh = param.device_mesh
    full = param.redistribute(mesh, [Replicate()] * mesh.ndim)
    return full.to_local(grad_placements=[Partial("avg")] * mesh.ndim)


def _router_aux_loss(self, text_config, backbone_outputs, attention_mask):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    num_experts = getattr(text_config, "num_experts", None) or getattr(self, "num_experts", None)
    top_k = getattr(text_config, "num_experts_per_tok", None) or getattr(self, "num_experts_per_tok", None)
    return load_balancing_loss_func(backbone_outputs.router_logits, num_experts, top_k, attention_mask)


def add_fused_policy_loss_head(
    model: transformers.PreTrainedModel, *, chunk_size: int | None = None, cast_lm_head_to_fp32: bool = False
) -> None:
    """Patch ``model.forward`` so that ``model(..., policy_loss=HeadLoss(...))`` returns ``(PolicyLossOutput,
    aux_loss)`` computed by the fused linear policy loss (see the module docstring).

    Args:
        model: the causal LM (the base model under PEFT).
        chunk_size: tokens per logits chunk (default: from the free memory and the vocabulary).
        cast_lm_head_to_fp32: project in fp32 outside autocast (TRL's ``cast_lm_head_to_fp32``).
    """
    previous_forward = model.forward
    text_config = model.config.get_text_config()
    logit_scale, softcap = head_transform(text_config)
    backbone_attr = "base_model"
    if text_config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        backbone_attr = "model"

    @functools.wraps(type(model).forward)
    def forward(self, *args, policy_loss: HeadLoss | None = None, **kwargs):
        if policy_loss is None:
            return previous_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone_outputs = getattr(self, backbone_attr)(*args, **kwargs)
        T = policy_loss.completion_ids.shape[1]
        lm_head = self.get_output_embeddings()
        hidden, predict = backbone_outputs.last_hidden_state, policy_loss.predict
        hidden = hidden[:, -T - 1 : -1] if predict is None else hidden.flatten(0, 1)[predict][None]
        hidden = hidden.to(lm_head.weight.device)
        weight = gather_sharded_head(lm_head.weight, lm_head)  # once per forward, before the token chunks
        bias = gather_sharded_head(lm_head.bias, lm_head)
        autocast = nullcontext()
        if cast_lm_head_to_fp32:
            hidden = hidden.float()
            autocast = torch.autocast(hidden.device.type, enabled=False)
        with maybe_gather_lm_head_ctx(weight, bias), autocast:
            output = linear_loss(
                hidden, weight, policy_loss.completion_ids, policy_loss.inputs, policy_loss.config, bias=bias,
                logit_scale=logit_scale, final_logit_softcapping=softcap, chunk_size=chunk_size,
                grad_scale=policy_loss.grad_scale,
            )  # fmt: skip
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _router_aux_loss(self, text_config, backbone_outputs, kwargs.get("attention_mask"))
        return output, aux_loss

    model.forward = types.MethodType(forward, model)
