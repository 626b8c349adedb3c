"""Configuration and output types of the clipped policy loss (TRL ``GRPOConfig`` names and defaults)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .._runtime import require, require_finite

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
"""Every ``loss_type`` (TRL 1.16's): the one list, which ``papo_trl`` imports and the kernels number (``terms.py``)."""
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
"""The loss types with PPO's clipped surrogate (and TRL's ``clip_ratio/*`` metrics)."""
IS_LEVELS = ("token", "sequence")
# VESPO's sequence log-ratio ``ln w`` and gamma weight (TRL's constants)
VESPO_LN_W_MAX = 20.0  # every clamp of ``ln w`` and of its terms is at most this
VESPO_IS_RATIO_MIN = 1e-8  # the IS ratio's log and ``ln w`` are at least ``ln`` of this
VESPO_LAMBDA_MIN = 1e-4  # floor of the gamma weight's ``lambda``
TRL_NAMES = {"epsilon_low": "epsilon"}
"""``PolicyLossConfig`` fields that TRL's ``GRPOConfig`` names differently; every other field has TRL's name."""


@dataclass(frozen=True)
class PolicyLossConfig:
    """The loss hyper-parameters, named and defaulted as in TRL's ``GRPOConfig`` (this class is where the kernels'
    defaults live; ``PAPOTrainer`` reads TRL's fields through :meth:`from_trainer_args`).

    Args:
        loss_type: one of :data:`LOSS_TYPES`. Per-token loss and aggregation: ``grpo``/``sapo`` mean of per-sequence
            token means; ``bnpo`` token mean; ``dr_grpo`` sum / (B * max_completion_length); ``dapo``/``cispo``/
            ``vespo`` sum / num_items_in_batch; ``luspo`` mean over sequences of the token sum.
        epsilon_low: lower clip, ``clip(r, 1 - epsilon_low, 1 + epsilon_high)`` (TRL's ``epsilon``).
        epsilon_high: upper clip (DAPO clip-higher); ``None`` means ``epsilon_low`` (see :attr:`eps_high`). For
            ``cispo`` the cap on the detached ratio, ``min(r, epsilon_high)``.
        delta: two-sided clipping (INTELLECT-2): the unclipped ratio is capped at ``delta``; ``None``: no cap.
        beta: weight of the k3 KL to the reference, ``exp(ref - logp) - (ref - logp) - 1``.
        use_bias_correction_kl: multiply the KL term by the importance ratio.
        importance_sampling_level: ``"token"``: a ratio per token; ``"sequence"`` (GSPO): one ratio per sequence,
            ``exp(masked mean of logp - old_logp)``.
        temperature: the logits are divided by it before the softmax.
        max_completion_length: the ``dr_grpo`` normaliser (required for that loss type).
        entropy_coef: entropy bonus, ``loss -= entropy_coef * masked token-mean entropy`` (over the tokens the policy
            term keeps when ``top_entropy_quantile < 1``). Adaptive entropy control (TRL's ``use_adaptive_entropy``)
            passes the coefficient it applies to this micro-batch here.
        sapo_temperature_pos, sapo_temperature_neg: SAPO's gate temperatures for positive and non-positive
            advantages.
        vespo_k_pos, vespo_lambda_pos: VESPO's gamma weight ``phi(w) = exp(lambda (1 - w)) w^k`` of the sequence ratio
            ``w`` for advantages ``>= 0``.
        vespo_k_neg, vespo_lambda_neg: the same for negative advantages.
        top_entropy_quantile: keep in the policy term (and the entropy bonus) only the tokens whose entropy is at or
            above the ``1 - top_entropy_quantile`` quantile of the batch's token entropies; ``1.0`` keeps all.
        off_policy_mask_threshold: off-policy sequence mask: drop the policy term of a token whose advantage is
            negative and whose sequence's mean ``sampling_logps - logp`` exceeds the threshold; ``None``: no mask.

    Returns:
        A frozen, hashable config; bad values raise ``ValueError`` naming the field.

    Examples:
        >>> from papo_kernels import PolicyLossConfig
        >>> cfg = PolicyLossConfig(loss_type="grpo", epsilon_high=0.28)
        >>> cfg.epsilon_low, cfg.eps_high
        (0.2, 0.28)
        >>> PolicyLossConfig(loss_type="ppo")
        Traceback (most recent call last):
        ...
        ValueError: `loss_type` must be one of ('grpo', 'bnpo', ...), got 'ppo'
    """

    loss_type: str = "dapo"
    # the ratio's clip
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    # KL to the reference
    beta: float = 0.0
    use_bias_correction_kl: bool = False
    # ratio level, logits, normalisation, entropy bonus
    importance_sampling_level: str = "token"
    temperature: float = 1.0
    max_completion_length: int | None = None
    entropy_coef: float = 0.0
    # SAPO's gate -4 sigmoid(tau (r - 1)) / tau
    sapo_temperature_pos: float = 1.0  # tau for A > 0
    sapo_temperature_neg: float = 1.05  # tau for A <= 0
    # VESPO's gamma weight phi(w) = exp(lambda (1 - w)) w^k
    vespo_k_pos: float = 2.0  # k for A >= 0
    vespo_lambda_pos: float = 3.0  # lambda for A >= 0
    vespo_k_neg: float = 3.0  # k for A < 0
    vespo_lambda_neg: float = 2.0  # lambda for A < 0
    # token and sequence masks
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: float | None = None

    def __post_init__(self) -> None:
        require(self.loss_type in LOSS_TYPES, f"`loss_type` must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        require(
            self.importance_sampling_level in IS_LEVELS,
            f"`importance_sampling_level` must be one of {IS_LEVELS}, got {self.importance_sampling_level!r}",
        )
        require_finite("epsilon_low", self.epsilon_low)
        if self.epsilon_high is not None:
            require_finite("epsilon_high", self.epsilon_high)
        if self.delta is not None:
            require_finite("delta", self.delta)
        require_finite("beta", self.beta)
        require_finite("entropy_coef", self.entropy_coef)
        for name in ("temperature", "sapo_temperature_pos", "sapo_temperature_neg"):
            require_finite(name, getattr(self, name), 0, strict=True)
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            require_finite(name, getattr(self, name))
        require_finite("top_entropy_quantile", self.top_entropy_quantile)
        require(
            0.0 <= self.top_entropy_quantile <= 1.0,
            f"`top_entropy_quantile` must lie in [0, 1], got {self.top_entropy_quantile}",
        )
        if self.off_policy_mask_threshold is not None:
            require_finite("off_policy_mask_threshold", self.off_policy_mask_threshold)
        if self.loss_type == "dr_grpo":
            require(
                self.max_completion_length is not None and self.max_completion_length > 0,
                f"`max_completion_length` must be a positive int for loss_type='dr_grpo', "
                f"got {self.max_completion_length!r}",
            )

    @property
    def eps_high(self) -> float:
        """The effective upper clip (``epsilon_high``, or ``epsilon_low`` when unset), as TRL resolves it."""
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high

    @property
    def two_phase(self) -> bool:
        """Whether a token's gradient coefficient needs batch-wide statistics of the current log-probs or
        entropies (sequence-level ratio, entropy quantile, off-policy mask, VESPO's sequence weight)."""
        return (
            self.importance_sampling_level == "sequence" or self.top_entropy_quantile < 1.0
            or self.off_policy_mask_threshold is not None or self.loss_type == "vespo"
        )  # fmt: skip

    @property
    def clipped(self) -> bool:
        """Whether the loss type is PPO's clipped surrogate (one of :data:`CLIPPED_LOSS_TYPES`)."""
        return self.loss_type in CLIPPED_LOSS_TYPES

    @classmethod
    def from_trainer_args(cls, args) -> PolicyLossConfig:
        """Build from a TRL ``GRPOConfig`` (duck-typed: any object with its attribute names, see :data:`TRL_NAMES`);
        a field the object lacks keeps this class's default."""
        values = {}
        for f in dataclasses.fields(cls):
            value = getattr(args, f.name, f.default)
            values[f.name] = getattr(args, TRL_NAMES[f.name], value) if f.name in TRL_NAMES else value
        values["use_bias_correction_kl"] = bool(values["use_bias_correction_kl"])
        return cls(**values)


class PolicyLossOutput(NamedTuple):
    """What the policy loss returns (:func:`~papo_kernels.policy_loss`, :func:`~papo_kernels.fused_linear_policy_loss`,
    :func:`~papo_kernels.loss.loss_from_logps`).

    Args:
        loss: scalar, differentiable (``policy_loss - entropy_coef * entropy`` bonus).
        per_token_logps: ``[B, T]`` fp32, detached, 0 where masked.
        entropy: ``[B, T]`` fp32, detached, 0 where masked.
        metrics: 0-dim detached tensors, logged as TRL logs them: ``entropy`` (masked mean), ``kl`` (when
            ``beta != 0``), ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (or
            ``cispo_clip_ratio``; ``vespo/phi_seq_mean`` for ``vespo``), ``policy_loss`` (the loss before the
            entropy bonus).
        sequence_loss: ``[B]`` fp32, detached: per-sequence masked sum of the per-token loss (after the
            importance-sampling weight and the KL term, before aggregation).
        entropy_stats: ``[2]`` fp32, detached: the sum of the entropies over the tokens the entropy bonus acts on
            (the mask, times the high-entropy mask when ``top_entropy_quantile < 1``) and their count, the window
            statistics of TRL's adaptive entropy control.
        sequence_clip_ratio: ``[B, 2]`` fp32, detached, for the clipped loss types (``None`` otherwise): per
            sequence, the fraction of its tokens clipped below (``r < 1 - epsilon_low`` and ``A < 0``) and above
            (``r > 1 + epsilon_high`` and ``A > 0``), ``r`` after the ``delta`` cap; NaN for a sequence without
            tokens; the flag itself where the ratio is one per sequence (TRL's ``masked_seq_mean``, behind its
            ``clip_ratio/low_min`` and ``clip_ratio/high_max``).
        error: ``[1]`` int32 from the kernels: non-zero when an unmasked token's target id lies outside ``[0, V)``.
            The kernels do not synchronise with the host to check it: :meth:`check` raises (CPU paths raise at once).

    Examples:
        >>> import torch
        >>> from papo_kernels import policy_loss
        >>> logits = torch.zeros(1, 3, 4)
        >>> out = policy_loss(logits, torch.tensor([[0, 1, 2]]), torch.tensor([[1, 1, 0]]), torch.tensor([1.0]))
        >>> out.loss, out.sequence_loss  # dapo, on-policy: -sum A / 2 tokens
        (tensor(-1.), tensor([-2.]))
        >>> out.per_token_logps  # 0 where masked
        tensor([[-1.3863, -1.3863,  0.0000]])
        >>> sorted(out.metrics)
        ['clip_ratio/high_mean', 'clip_ratio/low_mean', 'clip_ratio/region_mean', 'entropy', 'policy_loss']
    """

    loss: torch.Tensor
    per_token_logps: torch.Tensor
    entropy: torch.Tensor
    metrics: dict[str, torch.Tensor]
    sequence_loss: torch.Tensor
    entropy_stats: torch.Tensor | None = None
    sequence_clip_ratio: torch.Tensor | None = None
    error: torch.Tensor | None = None

    def check(self) -> None:
        """Raise ``ValueError`` if the kernels flagged a target id outside ``[0, V)`` (one host sync on CUDA: call it
        where the caller synchronises anyway, e.g. when logging)."""
        if self.error is not None and bool(self.error.any()):
            raise ValueError("`completion_ids` must lie in [0, V) (the vocabulary) for every unmasked token")
