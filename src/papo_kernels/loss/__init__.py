"""Policy loss for group-relative RL (GRPO, DAPO, Dr.GRPO, GSPO, CISPO, SAPO, LUSPO, VESPO), TRL 1.16 semantics."""

from .config import LOSS_TYPES, PolicyLossConfig, PolicyLossOutput
from .fused_linear import fused_linear_policy_loss, linear_logits
from .logits import policy_loss
from .naive import (
    loss_from_logps,
    naive_policy_loss,
    token_logps_and_entropy,
)

__all__ = [
    "LOSS_TYPES",
    "PolicyLossConfig",
    "PolicyLossOutput",
    "fused_linear_policy_loss",
    "linear_logits",
    "loss_from_logps",
    "naive_policy_loss",
    "policy_loss",
    "token_logps_and_entropy",
]
