"""Clipped policy loss for group-relative RL (GRPO, DAPO, Dr.GRPO, GSPO, CISPO, SAPO, LUSPO), TRL semantics."""

from .config import LOSS_TYPES, PolicyLossConfig, PolicyLossOutput
from .logits import policy_loss
from .naive import loss_from_logps, policy_loss_reference, token_logps_and_entropy

__all__ = [
    "LOSS_TYPES",
    "PolicyLossConfig",
    "PolicyLossOutput",
    "loss_from_logps",
    "policy_loss",
    "policy_loss_reference",
    "token_logps_and_entropy",
]
