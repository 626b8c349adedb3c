"""Configuration and output types of the clipped policy loss (TRL ``GRPOConfig`` names and defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .._runtime import require

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
IS_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class PolicyLossConfig:
    """The loss hyper-parameters, named and defaulted as in TRL's ``GRPOConfig``.

    Attributes:
        loss_type: ``"dapo"`` (default). Per-token loss and aggregation: ``grpo``/``sapo`` mean of per-sequence
            token means; ``bnpo`` token mean; ``dr_grpo`` sum / (B * max_completion_length); ``dapo``/``cispo``/
            ``vespo`` sum / num_items_in_batch; ``luspo`` mean over sequences of the token sum.
        epsilon_low: ``0.2``. Lower clip: ``clip(r, 1 - epsilon_low, 1 + epsilon_high)`` (TRL's ``epsilon``).
        epsilon_high: ``None`` (= ``epsilon_low``). Upper clip (DAPO clip-higher); for ``cispo`` the cap on the
            detached ratio, ``min(r, epsilon_high)``.
        delta: ``None``. Two-sided clipping (INTELLECT-2): the unclipped ratio is capped at ``delta``.
        beta: ``0.0``. Weight of the k3 KL to the reference, ``exp(ref - logp) - (ref - logp) - 1``.
        use_bias_correction_kl: ``False``. Multiply the KL term by the importance ratio.
        importance_sampling_level: ``"token"`` (default) ratio per token, or ``"sequence"`` (GSPO): one ratio per
            sequence, ``exp(masked mean of logp - old_logp)``.
        temperature: ``1.0``. The logits are divided by it before the softmax.
        max_completion_length: ``None``. The ``dr_grpo`` normaliser (required for that loss type).
        entropy_coef: ``0.0``. Entropy bonus: ``loss -= entropy_coef * masked token-mean entropy`` (over the tokens
            the policy term keeps when ``top_entropy_quantile < 1``). Adaptive entropy control (TRL's
            ``use_adaptive_entropy``) passes the coefficient it applies to this micro-batch here.
        sapo_temperature_pos: ``1.0``. SAPO gate temperature for positive advantages.
        sapo_temperature_neg: ``1.05``. SAPO gate temperature for non-positive advantages.
        vespo_k_pos, vespo_lambda_pos: ``2.0``, ``3.0``. VESPO's gamma weight ``phi(w) = exp(lambda (1 - w)) w^k``
            of the sequence ratio ``w`` for advantages ``>= 0``.
        vespo_k_neg, vespo_lambda_neg: ``3.0``, ``2.0``. The same for negative advantages.
        top_entropy_quantile: ``1.0``. Keep in the policy term (and the entropy bonus) only the tokens whose entropy
            is at or above the ``1 - top_entropy_quantile`` quantile of the batch's token entropies.
        off_policy_mask_threshold: ``None``. Off-policy sequence mask: drop the policy term of a token whose
            advantage is negative and whose sequence's mean ``sampling_logps - logp`` exceeds the threshold.
    """

    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    beta: float = 0.0
    use_bias_correction_kl: bool = False
    importance_sampling_level: str = "token"
    temperature: float = 1.0
    max_completion_length: int | None = None
    entropy_coef: float = 0.0
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: float | None = None

    def __post_init__(self) -> None:
        require(self.loss_type in LOSS_TYPES, f"`loss_type` must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        require(
            self.importance_sampling_level in IS_LEVELS,
            f"`importance_sampling_level` must be one of {IS_LEVELS}, got {self.importance_sampling_level!r}",
        )
        _finite("epsilon_low", self.epsilon_low)
        if self.epsilon_high is not None:
            _finite("epsilon_high", self.epsilon_high)
        if self.delta is not None:
            _finite("delta", self.delta)
        _finite("beta", self.beta)
        _finite("entropy_coef", self.entropy_coef)
        _finite("temperature", self.temperature)
        require(self.temperature > 0, f"`temperature` must be > 0, got {self.temperature}")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            _finite(name, getattr(self, name))
            require(getattr(self, name) > 0, f"`{name}` must be > 0, got {getattr(self, name)}")
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            _finite(name, getattr(self, name))
        _finite("top_entropy_quantile", self.top_entropy_quantile)
        require(
            0.0 <= self.top_entropy_quantile <= 1.0,
            f"`top_entropy_quantile` must lie in [0, 1], got {self.top_entropy_quantile}",
        )
        if self.off_policy_mask_threshold is not None:
            _finite("off_policy_mask_threshold", self.off_policy_mask_threshold)
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

    @classmethod
    def from_trainer_args(cls, args) -> PolicyLossConfig:
        """Build from a TRL ``GRPOConfig`` (duck-typed: any object with its attribute names)."""
        defaults = cls()
        get = lambda name, default: getattr(args, name, default)  # noqa: E731
        return cls(
            loss_type=get("loss_type", defaults.loss_type),
            epsilon_low=get("epsilon", get("epsilon_low", defaults.epsilon_low)),
            epsilon_high=get("epsilon_high", None),
            delta=get("delta", None),
            beta=get("beta", defaults.beta),
            use_bias_correction_kl=bool(get("use_bias_correction_kl", False)),
            importance_sampling_level=get("importance_sampling_level", defaults.importance_sampling_level),
            temperature=get("temperature", defaults.temperature),
            max_completion_length=get("max_completion_length", None),
            entropy_coef=get("entropy_coef", defaults.entropy_coef),
            sapo_temperature_pos=get("sapo_temperature_pos", defaults.sapo_temperature_pos),
            sapo_temperature_neg=get("sapo_temperature_neg", defaults.sapo_temperature_neg),
            **{name: get(name, getattr(defaults, name)) for name in _TRL_EXTRA},
        )


_TRL_EXTRA = (
    "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "top_entropy_quantile",
    "off_policy_mask_threshold",
)  # fmt: skip


def _finite(name: str, value) -> None:
    require(
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        f"`{name}` must be a finite number, got {value!r}",
    )


class PolicyLossOutput(NamedTuple):
    """What the policy loss returns.

    Attributes:
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
    """

    loss: torch.Tensor
    per_token_logps: torch.Tensor
    entropy: torch.Tensor
    metrics: dict[str, torch.Tensor]
    sequence_loss: torch.Tensor
    entropy_stats: torch.Tensor | None = None
