"""Policy loss for group-relative RL (GRPO, DAPO, Dr.GRPO, GSPO, CISPO, SAPO, LUSPO, VESPO), TRL 1.16 semantics.

Three entry points, by what the caller has: ``policy_loss`` (logits), ``fused_linear_policy_loss`` (hidden states and
the LM head) and ``loss_from_logps`` (per-token log-probs). Each takes the loss inputs as keywords; ``logits_loss``,
``linear_loss`` and ``logps_loss`` are the same on one :class:`LossInputs`.
"""

from .config import LOSS_TYPES, PolicyLossConfig, PolicyLossOutput
from .fused_linear import fused_linear_policy_loss, linear_logits, linear_loss
from .inputs import LossInputs
from .logits import logits_loss, policy_loss
from .naive import (
    logps_loss,
    loss_from_logps,
    naive_policy_loss,
    token_logps_and_entropy,
)

__all__ = [
    "LOSS_TYPES",
    "LossInputs",
    "PolicyLossConfig",
    "PolicyLossOutput",
    "fused_linear_policy_loss",
    "linear_logits",
    "linear_loss",
    "logits_loss",
    "logps_loss",
    "loss_from_logps",
    "naive_policy_loss",
    "policy_loss",
    "token_logps_and_entropy",
]
