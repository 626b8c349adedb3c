"""Padding-free micro-batches (``PAPOConfig.padding_free``): the sequences of a micro-batch in one row.

TRL 1.16's ``GRPOTrainer`` pads a micro-batch to its longest prompt + completion (prompts on the left, completions
on the right), and every padded position goes through the model. Packed, the real tokens (``attention_mask`` 1) of
the ``B`` sequences are concatenated with ``position_ids`` restarting at 0 for each sequence, and no attention mask:
the attention finds the sequences from the positions (transformers' packed-sequence masks,
``masking_utils.find_packed_sequence_indices``, for ``eager`` and ``sdpa``; the varlen kernels for flash attention;
``flex_attention``'s block mask), as TRL's padding-free ``AsyncGRPOTrainer`` does. Nothing else changes: a token sees
the same tokens at the same relative positions, so with rotary position embeddings every log-prob equals the padded
one (to rounding; TRL's padded forward counts a left-padded prompt's positions from its padding, which rotary
embeddings cancel).

Rows. The attentions that skip what the mask leaves out (:data:`ONE_ROW_ATTENTIONS`) take the whole micro-batch
as one row ``[1, N]``. ``eager`` and ``sdpa`` compute every score their ``[L, L]`` mask covers, so one row would
cost ``N^2`` instead of ``sum_b L_b^2``: for them the sequences are packed, longest first, into rows as wide as the
longest sequence (first fit), and the attention never costs more than the padded batch's; when no two sequences
share a row (no padding to save), the padded batch is kept as it is.

Every forward of a step is packed: the log-prob passes without gradients (old policy, reference model) and TRL's
own loss, through :class:`PaddingFree` (TRL's ``_get_per_token_logps_and_entropies`` on packed rows, its results
read back into TRL's padded ``[B, T]`` layout), and the fused linear-head loss, which takes the packed completions
directly (:meth:`PackedRows.loss_inputs`: ``papo_kernels.loss.LossInputs`` with ``cu_seqlens``), so no padded
position is projected either.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model

from papo_kernels.loss import LossInputs

__all__ = [
    "ONE_ROW_ATTENTIONS", "PACKED_ATTENTIONS", "PackedRows", "PaddingFree", "first_fit", "one_row", "pack_rows",
    "packing_unsupported", "resolve_padding_free",
]  # fmt: skip

PACKED_ATTENTIONS = ("flash_attention_2", "flash_attention_3", "flex_attention", "sdpa", "eager")
"""The attention implementations that take packed sequences (separated by ``position_ids`` alone)."""
ONE_ROW_ATTENTIONS = ("flash_attention_2", "flash_attention_3", "flex_attention")
"""Those whose cost is the sequences' own (varlen kernels, block masks): a micro-batch packs into one row."""
ATTENTION_LAYERS = {"full_attention", "sliding_attention"}


def packing_unsupported(model, is_multimodal: bool = False) -> str | None:
    """Why ``model`` (a causal LM, PEFT-wrapped or not) cannot run packed sequences, or ``None`` if it can: a
    multimodal model, layers other than attention (recurrent or convolutional ones scan across sequences), or an
    attention implementation other than :data:`PACKED_ATTENTIONS` (its own masks)."""
    base = model.get_base_model() if is_peft_model(model) else model
    config = base.config
    text_config = config.get_text_config()
    if is_multimodal or text_config is not config:
        return f"{type(base).__name__} is a multimodal model"
    others = set(getattr(text_config, "layer_types", None) or ()) - ATTENTION_LAYERS
    if others:
        return f"{type(base).__name__} has {sorted(others)} layers, which would run across the packed sequences"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in PACKED_ATTENTIONS:
        return f"its attention is {attention!r}, not one of {', '.join(PACKED_ATTENTIONS)}"
    return None


def resolve_padding_free(requested: bool | None, models, is_multimodal: bool) -> bool:
    """``padding_free`` for these models (the policy, and the reference model if any): ``None`` is on where every
    model's attention takes packed sequences; ``True`` where one cannot is a ``ValueError`` naming the option."""
    reasons = [r for m in models if m is not None and (r := packing_unsupported(m, is_multimodal))]
    if requested and reasons:
        raise ValueError(
            f"`padding_free=True` packs each micro-batch's sequences without padding, but {reasons[0]}; set "
            "`padding_free=False` (or leave it unset: on where the model's attention takes packed sequences)"
        )
    return not reasons if requested is None else bool(requested)


def one_row(model) -> bool:
    """Whether ``model``'s attention takes a whole micro-batch as one row (:data:`ONE_ROW_ATTENTIONS`)."""
    base = model.get_base_model() if is_peft_model(model) else model
    return getattr(base.config, "_attn_implementation", None) in ONE_ROW_ATTENTIONS


@dataclass
class PackedRows:
    """``B`` padded sequences (prompt + completion, ``attention_mask`` 1 on their tokens) packed into ``R < B`` rows
    of ``W`` positions (the tokens of a sequence contiguous in one row, what a row has left at its end unused).

    Attributes:
        input_ids, position_ids: ``[R, W]``, the positions restarting at 0 for each sequence (and each unused
            position: a sequence of its own, which no token attends to).
        completion: ``[B, K]`` bool, the packed completion tokens (the last ``K`` columns).
        predict: ``[n]`` the flat positions in the rows whose hidden states predict the packed completion tokens.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    completion: torch.Tensor
    predict: torch.Tensor

    def completions(self, x: torch.Tensor) -> torch.Tensor:
        """``[1, n]``: the packed completion tokens' entries of a ``[B, K]`` tensor."""
        return x[self.completion][None]

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, K]``: the values at :attr:`predict` of an ``[R, W]`` tensor, 0 elsewhere (differentiable)."""
        return x.new_zeros(self.completion.shape).masked_scatter(self.completion, x.reshape(-1)[self.predict])

    def loss_inputs(self, inputs: LossInputs) -> LossInputs:
        """The padded ``[B, K]`` loss inputs of the completions, packed (``cu_seqlens``)."""
        return inputs.pack(self.completion)


def first_fit(lengths: list[int], width: int) -> tuple[list[int], int]:
    """Each sequence's flat start in rows of ``width`` positions (first fit, longest first), and the row count."""
    room, start = [], [0] * len(lengths)
    for b in sorted(range(len(lengths)), key=lambda b: -lengths[b]):
        row = next((r for r, free in enumerate(room) if free >= lengths[b]), len(room))
        if row == len(room):
            room.append(width)
        start[b] = row * width + width - room[row]
        room[row] -= lengths[b]
    return start, len(room)


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_length: int,
              one_row: bool = True) -> PackedRows | None:  # fmt: skip
    """Pack TRL's ``[B, L]`` batch (left-padded prompts, then ``completion_length`` right-padded completion
    columns) into one row, or (``one_row=False``) rows as wide as the longest sequence; ``None`` when that takes
    ``B`` rows (nothing to save). One read to the host: the lengths, and the layout's check (each row's tokens
    contiguous, a prompt token before a completion's first)."""
    keep = attention_mask.bool()
    B, L = keep.shape
    P = L - completion_length
    count = keep.sum(1)
    first = torch.where(count > 0, keep.int().argmax(1), 0)
    last = L - 1 - keep.flip(1).int().argmax(1)
    contiguous = (count == 0) | (last - first + 1 == count)
    prompted = (first < P) | (last < P)  # a completion token is kept only after a prompt token
    *lengths, ok = torch.cat([count, (contiguous & prompted).all()[None]]).tolist()
    if not ok:
        raise ValueError(
            "`padding_free=True` packs TRL's batches (left-padded prompts of at least one token, right-padded "
            "completions), but a row of `attention_mask` is not one contiguous run of tokens starting in the prompt"
        )
    if one_row:
        width, start, rows = sum(lengths), [0, *itertools.accumulate(lengths)][:-1], 1
    else:
        width = max(lengths)
        start, rows = first_fit(lengths, width)
    if rows >= B:
        return None
    position = keep.cumsum(1) - 1  # each kept token's position in its sequence
    flat = torch.tensor(start, device=keep.device)[:, None] + position  # and in the rows
    ids = input_ids.new_zeros(rows * width).index_put_((flat[keep],), input_ids[keep])
    positions = position.new_zeros(rows * width).index_put_((flat[keep],), position[keep])
    completion = keep[:, P:]
    predict = flat[:, P:][completion] - 1
    return PackedRows(ids.view(rows, width), positions.view(rows, width), completion, predict)


class PaddingFree:
    """Mixin placed before ``GRPOTrainer``: TRL's log-prob passes (old policy, reference model, TRL's own loss) on
    packed rows when ``self._padding_free``, their results in TRL's padded layout (see the module docstring)."""

    def _pack(self, model, input_ids, attention_mask, completion_length: int) -> PackedRows | None:
        """The packed rows of a batch for ``model``, or ``None``: padded (``padding_free`` off, or nothing saved)."""
        if not self._padding_free:
            return None
        return pack_rows(input_ids, attention_mask, completion_length, one_row(self.accelerator.unwrap_model(model)))

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, **multimodal,
    ):  # fmt: skip
        padded = lambda ids, mask: super(PaddingFree, self)._get_per_token_logps_and_entropies(  # noqa: E731
            model, ids, mask, logits_to_keep, None, compute_entropy, compute_aux_loss, **multimodal
        )
        if not self._padding_free or any(value is not None for value in multimodal.values()):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal,
            )  # fmt: skip
        batch_size = batch_size or input_ids.size(0)
        logps, entropies, aux_losses = [], [], []
        for start in range(0, input_ids.size(0), batch_size):  # TRL's chunks, each packed
            ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            rows = self._pack(model, ids, mask, logits_to_keep)
            if rows is None:
                lp, entropy, aux_loss = padded(ids, mask)
            else:
                labels = torch.full_like(rows.input_ids, -100)
                labels.view(-1)[rows.predict] = rows.completions(ids[:, -logits_to_keep:])[0]
                extra = {"output_router_logits": True} if compute_aux_loss else {}
                with self.accelerator.autocast():
                    outputs = model(input_ids=rows.input_ids, position_ids=rows.position_ids, shift_labels=labels,
                                    fused_lm_head=True, **extra)  # fmt: skip
                lp, aux_loss = rows.padded(outputs.log_probs), outputs.aux_loss
                entropy = rows.padded(outputs.entropy) if compute_entropy else None
            logps.append(lp)
            entropies.append(entropy)
            aux_losses.append(aux_loss)
        entropy = torch.cat(entropies) if compute_entropy else None
        return torch.cat(logps), entropy, torch.stack(aux_losses).mean() if compute_aux_loss else None
