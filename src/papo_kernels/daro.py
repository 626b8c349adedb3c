r"""DARO's math: learnable, positive loss weights per pass-rate bucket (Difficulty-Aware Reweighting Policy
Optimization), and the per-bucket sums they are fitted on. The trainer's side of DARO (the optimiser, the statistics
of an optimiser step, their all-reduce, the checkpoint) is :mod:`papo_trl.daro_state`.

A group of ``G`` responses with ``k`` correct ones has pass rate ``mu = k / G``. DARO keeps one weight ``w_mu > 0``
per bucket ``0 < k < G`` (``mu = 0`` and ``mu = 1`` carry no GRPO signal and are left out, as DAPO filters them)
and minimises

    ``L = sum_mu (w_mu * L_mu - ln w_mu)``

with ``L_mu`` the policy loss restricted to the groups of bucket ``mu`` (token mean over that bucket's tokens). At the
optimum over ``w``, ``dL/dw_mu = L_mu - 1 / w_mu = 0``: every bucket contributes ``w_mu * L_mu = 1``, so no
difficulty level dominates the update.

Sign convention. The clipped-surrogate loss ``L_mu`` is signed (on-policy it is ``-sum A |o| / sum |o|`` over the
bucket, of either sign), and ``w * L - ln w`` has no minimum in ``w`` when ``L <= 0``. The weights therefore see the
loss *scale* ``|L_mu|``: they minimise ``sum_mu (w_mu * |L_mu| - ln w_mu)`` (fixed point ``w_mu = 1 / |L_mu|``,
``|w_mu L_mu| = 1``), while the policy minimises ``sum_mu w_mu * L_mu`` with the weights held fixed. Where ``L_mu > 0``
this is exactly the gradient of the joint loss above. The weights are parametrised as ``w = exp(s)`` and kept in
``[1 / max_weight, max_weight]``: a bucket whose ``|L_mu|`` is near 0 would otherwise drive its weight to infinity.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._runtime import is_number, require, require_finite
from .advantages import pass_rate_buckets

__all__ = ["DAROWeights", "bucket_loss_stats", "bucket_totals", "check_weight_bounds", "sequence_buckets"]


def check_weight_bounds(init_weight, max_weight, prefix: str = "") -> None:
    """Raise ``ValueError`` unless ``max_weight >= 1`` is finite and ``init_weight`` lies in ``[1 / max_weight,
    max_weight]``; the message names the arguments with ``prefix`` (``PAPOConfig``'s ``daro_``)."""
    require_finite(f"{prefix}max_weight", max_weight, 1)
    require(
        is_number(init_weight) and 1 / max_weight <= init_weight <= max_weight,
        f"`{prefix}init_weight` must lie in [1 / {prefix}max_weight, {prefix}max_weight] = [{1 / max_weight}, "
        f"{max_weight}], got {init_weight!r}",
    )


def bucket_totals(values: torch.Tensor, buckets: torch.Tensor, G: int, dtype=torch.float64) -> torch.Tensor:
    """``[G + 1]`` in ``dtype``: the sum of ``values`` (detached) over the entries of each bucket ``k = 0..G``."""
    totals = torch.zeros(G + 1, dtype=dtype, device=values.device)
    return totals.index_add_(0, buckets.long().clamp(0, G), values.detach().to(dtype))


def bucket_loss_stats(
    sequence_loss: torch.Tensor, sequence_tokens: torch.Tensor, buckets: torch.Tensor, G: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per bucket ``k = 0..G``: the summed per-token loss and the token count of its sequences.

    ``sequence_loss[B]`` is each sequence's masked sum of the per-token loss, ``sequence_tokens[B]`` its number of
    loss tokens, ``buckets[B]`` the number of correct responses in its group. Returns two fp64 tensors ``[G + 1]``.
    """
    require(sequence_loss.shape == sequence_tokens.shape == buckets.shape, "`sequence_loss`, `sequence_tokens` and "
            f"`buckets` must have the same shape [B], got {tuple(sequence_loss.shape)}, "
            f"{tuple(sequence_tokens.shape)}, {tuple(buckets.shape)}")  # fmt: skip
    return bucket_totals(sequence_loss, buckets, G), bucket_totals(sequence_tokens, buckets, G)


def sequence_buckets(correct: torch.Tensor, sequence_tokens: torch.Tensor, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence of a group-contiguous batch: its group's bucket ``k`` (number of correct responses) and that
    bucket's token count ``T_k`` over the batch (fp32), the inputs of :meth:`DAROWeights.sequence_scale`."""
    buckets = pass_rate_buckets(correct, G).repeat_interleave(G)
    return buckets, bucket_totals(sequence_tokens.float(), buckets, G, torch.float32)[buckets]


class DAROWeights(nn.Module):
    """DARO's weights ``w_k = exp(log_weights[k - 1])`` for the pass-rate buckets ``k = 1..G-1`` (``mu = k/G``).

    ``forward(bucket_loss, bucket_tokens)`` is the weights' objective ``sum_k (w_k |L_k| - ln w_k)`` over the
    buckets present (``bucket_tokens[k] > 0``), with ``L_k = bucket_loss[k] / bucket_tokens[k]`` (detached);
    minimise it with any optimiser, then call :meth:`clamp_`. :meth:`bucket_weights` gives the detached weights
    indexed by ``k = 0..G`` (zero at ``k = 0`` and ``k = G``) for the policy loss, :meth:`sequence_scale` the
    per-sequence loss weights ``w_k / T_k``.

    Args:
        num_generations: the group size ``G`` (at least 2).
        init_weight: the initial value of every ``w_k``, in ``[1 / max_weight, max_weight]``.
        max_weight: the weights stay in ``[1 / max_weight, max_weight]`` (finite, at least 1).

    Returns:
        An ``nn.Module`` whose parameter is ``log_weights[G - 1]``; calling it returns the objective (a scalar).

    Examples:
        >>> import torch
        >>> from papo_kernels import DAROWeights
        >>> daro = DAROWeights(num_generations=4)
        >>> loss = torch.tensor([0.0, 2.0, 0.0, 0.5, 0.0])  # per-bucket loss sums, k = 0..4 (bucket 2 absent)
        >>> tokens = torch.tensor([0.0, 4.0, 0.0, 2.0, 0.0])  # and token counts
        >>> objective = daro(loss, tokens)
        >>> objective
        tensor(0.7500, grad_fn=<SumBackward0>)
        >>> objective.backward()
        >>> torch.optim.SGD(daro.parameters(), lr=0.1).step()
        >>> daro.clamp_()
        >>> daro.bucket_weights()  # |L_1| = 0.5 < 1 raises w_1, |L_3| = 0.25 raises w_3 more
        tensor([0.0000, 1.0513, 1.0000, 1.0779, 0.0000])
    """

    def __init__(self, num_generations: int, init_weight: float = 1.0, max_weight: float = 100.0):
        super().__init__()
        require(
            isinstance(num_generations, int) and num_generations >= 2,
            f"`num_generations` must be an integer >= 2, got {num_generations!r}",
        )
        check_weight_bounds(init_weight, max_weight)
        self.num_generations = num_generations
        self.max_weight = float(max_weight)
        self.log_weights = nn.Parameter(torch.full((num_generations - 1,), math.log(init_weight), dtype=torch.float32))

    @property
    def weights(self) -> torch.Tensor:
        """``w_k`` for ``k = 1..G-1`` (differentiable)."""
        return self.log_weights.exp()

    def bucket_weights(self) -> torch.Tensor:
        """Detached fp32 ``[G + 1]``: ``w_k`` at index ``k``, 0 for the excluded buckets ``k = 0`` and ``k = G``."""
        w = self.weights.detach()
        zero = w.new_zeros(1)
        return torch.cat([zero, w, zero])

    def forward(self, bucket_loss: torch.Tensor, bucket_tokens: torch.Tensor) -> torch.Tensor:
        """``sum_k (w_k |L_k| - ln w_k)`` over the present buckets ``0 < k < G``; inputs ``[G + 1]``."""
        G = self.num_generations
        require(
            bucket_loss.shape == (G + 1,) and bucket_tokens.shape == (G + 1,),
            f"`bucket_loss` and `bucket_tokens` must have shape [{G + 1}], got {tuple(bucket_loss.shape)} "
            f"and {tuple(bucket_tokens.shape)}",
        )
        tokens = bucket_tokens[1:G].detach().to(self.log_weights.device, torch.float32)
        present = tokens > 0
        scale = (bucket_loss[1:G].detach().to(tokens) / tokens.clamp(min=1.0)).abs()
        terms = self.weights * scale - self.log_weights
        return torch.where(present, terms, torch.zeros_like(terms)).sum()

    def sequence_scale(self, buckets: torch.Tensor, bucket_tokens: torch.Tensor) -> torch.Tensor:
        """Per sequence ``w_k / T_k`` (``k`` its bucket, ``T_k`` the bucket's token count), 0 for ``k = 0, G``.

        ``sum_b scale_b * sequence_loss_b = sum_k w_k L_k``: the policy part of DARO's loss as a weighted sum of
        per-sequence loss sums (detached weights; the loss kernels' ``sequence_scale``).
        """
        require(
            buckets.shape == bucket_tokens.shape,
            f"`buckets` and `bucket_tokens` must have the same shape, got {tuple(buckets.shape)} "
            f"and {tuple(bucket_tokens.shape)}",
        )
        w = self.bucket_weights().to(bucket_tokens.device)[buckets.long().clamp(0, self.num_generations)]
        return torch.where(bucket_tokens > 0, w / bucket_tokens.float().clamp(min=1.0), torch.zeros_like(w))

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep every weight in ``[1 / max_weight, max_weight]``."""
        bound = math.log(self.max_weight)
        self.log_weights.clamp_(-bound, bound)

    def extra_repr(self) -> str:
        return f"num_generations={self.num_generations}, max_weight={self.max_weight}"
