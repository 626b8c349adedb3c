"""The policy loss's inputs besides the log-probs (or the logits or hidden states that give them): one definition,
checked once, taken by the torch reference, the plan of the kernels and every entry point."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .._runtime import check_same_device, check_tensor, require


@dataclass(frozen=True)
class LossInputs:
    """The per-token inputs of the loss of one micro-batch of ``B`` sequences of ``T`` completion tokens, padded
    (``[B, T]``) or packed (one row of ``N`` tokens, ``cu_seqlens``); bad shapes, dtypes or devices raise
    ``ValueError`` naming the field when it is built.

    Packed, sequence ``b`` holds the tokens ``cu_seqlens[b]`` to ``cu_seqlens[b + 1]`` of the row: the token tensors
    are ``[1, N]`` and the per-sequence ones keep their ``B`` rows. Every value of the loss (the ``loss_type``
    aggregation, the sequence-level ratio, VESPO's weight, the entropy quantile, the off-policy mask, the metrics and
    the per-sequence outputs) equals that of the same sequences padded to ``[B, T]`` with ``T`` the longest one (mask
    0 and importance-sampling ratio 1 in the padding, as TRL pads them); no padded position exists, so none is read.

    Args:
        completion_mask: ``[B, T]`` 1 for the tokens in the loss (any dtype; bool too).
        advantages: ``[B]`` (one per sequence) or ``[B, T]``.
        old_logps: ``[B, T]`` log-probs of the policy that sampled (the ratio's denominator); ``None``: on-policy,
            ``old = logps.detach()`` (ratio 1, with its gradient).
        ref_logps: ``[B, T]`` log-probs of the reference model, for the KL term (required when ``config.beta != 0``).
        importance_sampling_ratio: ``[B, T]`` or ``[B, 1]`` vLLM's importance-sampling weight (VESPO: folded into
            its sequence ratio).
        sampling_logps: ``[B, T]`` the sampler's log-probs, for the off-policy mask only; ``None``: ``old_logps``.
        num_items_in_batch: the ``dapo``/``cispo``/``vespo`` normaliser; ``None``: the mask's token count.
        sequence_scale: ``[B]`` per-sequence weights replacing the ``loss_type`` aggregation
            (``loss = sum_b scale_b * sum_t m_bt loss_bt``; DARO's ``w_k / T_k``), detached.
        cu_seqlens: ``[B + 1]`` integer offsets of the packed sequences (``0 = cu_seqlens[0] <= ... <=
            cu_seqlens[B] = N``; checked with one read to the host): the token tensors are then ``[1, N]``,
            ``advantages`` ``[B]`` or ``[1, N]`` and ``importance_sampling_ratio`` ``[1, N]`` or ``[B, 1]``.
            ``None``: padded ``[B, T]``.

    Examples:
        >>> import torch
        >>> from papo_kernels.loss import LossInputs
        >>> LossInputs(torch.ones(2, 3), torch.zeros(2)).shape
        (2, 3)
        >>> LossInputs(torch.ones(2, 3), torch.zeros(3))
        Traceback (most recent call last):
        ...
        ValueError: `advantages` must have shape (2,) or (2, 3), got (3,)
        >>> packed = LossInputs(torch.ones(1, 5), torch.zeros(2), cu_seqlens=torch.tensor([0, 3, 5]))
        >>> packed.shape, packed.num_sequences, packed.max_seqlen  # sequences of 3 and 2 tokens
        ((1, 5), 2, 3)
    """

    completion_mask: Tensor
    advantages: Tensor
    old_logps: Tensor | None = None
    ref_logps: Tensor | None = None
    importance_sampling_ratio: Tensor | None = None
    sampling_logps: Tensor | None = None
    num_items_in_batch: Tensor | float | None = None
    sequence_scale: Tensor | None = None
    cu_seqlens: Tensor | None = None
    max_seqlen: int = field(init=False, compare=False)
    """The longest sequence: ``T`` padded, read from ``cu_seqlens`` packed."""

    def __post_init__(self) -> None:
        check_tensor("completion_mask", self.completion_mask, ndim=2)
        tokens = self.shape
        B = self._check_sequences()
        check_tensor("advantages", self.advantages, ndim=(1, 2), floating=True)
        _require_shape("advantages", self.advantages, (B,), tokens)
        for name in ("old_logps", "ref_logps", "sampling_logps"):
            if (t := getattr(self, name)) is not None:
                check_tensor(name, t, ndim=2, floating=True)
                _require_shape(name, t, tokens)
        if (isr := self.importance_sampling_ratio) is not None:
            check_tensor("importance_sampling_ratio", isr, ndim=2, floating=True)
            _require_shape("importance_sampling_ratio", isr, tokens, (B, 1))
        if self.sequence_scale is not None:
            check_tensor("sequence_scale", self.sequence_scale, ndim=1, floating=True)
            _require_shape("sequence_scale", self.sequence_scale, (B,))
        check_same_device(
            completion_mask=self.completion_mask, advantages=self.advantages, old_logps=self.old_logps,
            ref_logps=self.ref_logps, sampling_logps=self.sampling_logps, importance_sampling_ratio=isr,
            sequence_scale=self.sequence_scale, cu_seqlens=self.cu_seqlens,
        )  # fmt: skip

    def _check_sequences(self) -> int:
        """The number of sequences; packed, ``cu_seqlens`` checked (one read to the host) and ``max_seqlen`` set."""
        cu = self.cu_seqlens
        if cu is None:
            object.__setattr__(self, "max_seqlen", self.shape[1])
            return self.shape[0]
        check_tensor("cu_seqlens", cu, ndim=1)
        require(
            not cu.is_floating_point() and not cu.is_complex() and cu.numel() >= 1,
            "`cu_seqlens` must be a non-empty integer tensor, got {} {}", cu.dtype, tuple(cu.shape),
        )  # fmt: skip
        require(
            self.shape[0] == 1, "packed (`cu_seqlens` given), `completion_mask` must be one row [1, N], got {}",
            self.shape,
        )  # fmt: skip
        offsets = cu.tolist()
        lengths = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
        require(
            offsets[0] == 0 and offsets[-1] == self.shape[1] and min(lengths, default=0) >= 0,
            "`cu_seqlens` must rise from 0 to N = {} (the tokens of `completion_mask`), got {}", self.shape[1],
            offsets,
        )  # fmt: skip
        object.__setattr__(self, "max_seqlen", max(lengths, default=0))
        return len(lengths)

    @property
    def shape(self) -> tuple[int, int]:
        """The token tensors' shape: ``(B, T)`` padded, ``(1, N)`` packed."""
        return tuple(self.completion_mask.shape)

    @property
    def num_sequences(self) -> int:
        """``B``: the sequences (rows padded, spans of ``cu_seqlens`` packed)."""
        return self.shape[0] if self.cu_seqlens is None else self.cu_seqlens.numel() - 1

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @functools.cached_property
    def sequence_index(self) -> Tensor:
        """Packed: ``[N]`` int64, the sequence of each token."""
        N = self.shape[1]
        tokens = torch.arange(N, device=self.cu_seqlens.device)
        return torch.searchsorted(self.cu_seqlens[1:].long(), tokens, right=True)

    def pack(self, keep: Tensor) -> LossInputs:
        """Padded: the tokens where ``keep[B, T]`` (bool) in one row, each row a sequence. The loss is the same when
        the tokens left out are padding (mask 0, IS ratio 1), as TRL's after each completion."""
        B, T = self.shape
        rows = keep.reshape(-1).nonzero().squeeze(1)
        tok = lambda t: None if t is None else t.reshape(-1)[rows].view(1, -1)  # noqa: E731
        isr = self.importance_sampling_ratio
        cu = torch.zeros(B + 1, dtype=torch.int64, device=keep.device)
        torch.cumsum(keep.sum(1), 0, out=cu[1:])
        return replace(
            self, completion_mask=tok(self.completion_mask), old_logps=tok(self.old_logps),
            ref_logps=tok(self.ref_logps), sampling_logps=tok(self.sampling_logps),
            advantages=tok(self.advantages) if self.advantages.dim() == 2 else self.advantages,
            importance_sampling_ratio=tok(isr) if isr is not None and isr.shape[1] == T > 1 else isr, cu_seqlens=cu,
        )  # fmt: skip

    def padded(self) -> tuple[LossInputs, Tensor]:
        """Packed: the same sequences padded to ``[B, max(max_seqlen, 1)]`` (mask 0, importance-sampling ratio 1,
        the rest 0 in the padding), and each token's flat position in that layout (see :func:`pad_tokens`)."""
        B, T = self.num_sequences, max(self.max_seqlen, 1)
        seq = self.sequence_index
        index = seq * T + torch.arange(seq.numel(), device=seq.device) - self.cu_seqlens.long()[seq]
        pad = lambda t, value=0: None if t is None else pad_tokens(t, index, (B, T), value)  # noqa: E731
        isr = self.importance_sampling_ratio
        per_token = lambda t: t is not None and tuple(t.shape) == self.shape  # noqa: E731
        padded = replace(
            self, completion_mask=pad(self.completion_mask), old_logps=pad(self.old_logps),
            ref_logps=pad(self.ref_logps), sampling_logps=pad(self.sampling_logps),
            advantages=pad(self.advantages) if self.advantages.dim() == 2 else self.advantages,
            importance_sampling_ratio=pad(isr, 1.0) if per_token(isr) else isr, cu_seqlens=None,
        )  # fmt: skip
        return padded, index

    def check_tokens(self, name: str, shape: torch.Size) -> None:
        """The mask covers the ``[B, T]`` tokens of ``name`` (the log-probs, logits or hidden states)."""
        require(
            tuple(shape) == self.shape,
            "`completion_mask` must have shape {} (the tokens of `{}`), got {}", tuple(shape), name, self.shape,
        )  # fmt: skip

    def check_config(self, beta: float) -> None:
        """What the loss's configuration requires of the inputs: ``ref_logps`` when ``beta != 0``."""
        require(beta == 0.0 or self.ref_logps is not None, "`ref_logps` is required when config.beta != 0")


def pad_tokens(x: Tensor, index: Tensor, shape: tuple[int, int], value: float = 0) -> Tensor:
    """The packed ``x[1, N]`` laid out as ``[B, T]`` (token ``i`` at flat position ``index[i]``, ``value``
    elsewhere); differentiable."""
    flat = x.new_full((shape[0] * shape[1],), value)
    return flat.index_put((index,), x.reshape(-1)).view(shape)


def _require_shape(name: str, t: Tensor, *shapes: tuple[int, ...]) -> None:
    allowed = " or ".join(map(str, shapes))
    require(tuple(t.shape) in shapes, "`{}` must have shape {}, got {}", name, allowed, tuple(t.shape))


def check_logits_inputs(logits: torch.Tensor, completion_ids: torch.Tensor) -> None:
    """``logits[B, T, V]`` floating and ``completion_ids[B, T]`` integer on its device (no host sync: the range of the
    ids is checked by the kernels, or by :func:`check_ids` on the torch path)."""
    check_tensor("logits", logits, ndim=3, floating=True)
    check_completion_ids(completion_ids, logits.shape[:2])
    check_same_device(logits=logits, completion_ids=completion_ids)


def check_completion_ids(completion_ids: torch.Tensor, shape: torch.Size) -> None:
    """``completion_ids`` an integer tensor of the ``[B, T]`` shape of the tokens."""
    check_tensor("completion_ids", completion_ids, ndim=2)
    require(
        not completion_ids.is_floating_point() and not completion_ids.is_complex(),
        "`completion_ids` must be an integer tensor, got {}", completion_ids.dtype,
    )  # fmt: skip
    require(
        tuple(completion_ids.shape) == tuple(shape),
        "`completion_ids` must have shape {}, got {}", tuple(shape), tuple(completion_ids.shape),
    )  # fmt: skip


def check_ids(completion_ids: torch.Tensor, vocab_size: int) -> None:
    """Target ids (of the unmasked tokens) must lie in ``[0, V)`` (the torch path: one min/max reduction and a host
    sync)."""
    if completion_ids.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(completion_ids)).tolist()
    require(
        0 <= lo and hi < vocab_size,
        f"`completion_ids` must lie in [0, {vocab_size}), got values in [{lo}, {hi}]",
    )
