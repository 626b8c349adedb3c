"""Configuration and output types of the clipped policy loss (TRL ``GRPOConfig`` names and defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .._runtime import require

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
IS_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class PolicyLossConfig:
    """The loss hyper-parameters, named and defaulted as in TRL's ``GRPOConfig``.

    Attributes:
        loss_type: ``"dapo"`` (default). Per-token loss and aggregation: ``grpo``/``sapo`` mean of per-sequence
            token means; ``bnpo`` token mean; ``dr_grpo`` sum / (B * max_completion_length); ``dapo``/``cispo``
            sum / num_items_in_batch; ``luspo`` mean over sequences of the token sum.
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
        entropy_coef: ``0.0``. Entropy bonus: ``loss -= entropy_coef * masked token-mean entropy``.
        sapo_temperature_pos: ``1.0``. SAPO gate temperature for positive advantages.
        sapo_temperature_neg: ``1.05``. SAPO gate temperature for non-positive advantages.
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
        )


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
            ``cispo_clip_ratio``; none for ``sapo``), ``policy_loss`` (the loss before the entropy bonus).
        sequence_loss: ``[B]`` fp32, detached: per-sequence masked sum of the per-token loss (after the
            importance-sampling weight and the KL term, before aggregation).
    """

    loss: torch.Tensor
    per_token_logps: torch.Tensor
    entropy: torch.Tensor
    metrics: dict[str, torch.Tensor]
    sequence_loss: torch.Tensor
