"""Group advantages: GRPO, GDPO, PAPO, DAPO dynamic sampling and DARO pass-rate buckets."""

from .api import dynamic_sampling_mask, gdpo_advantages, grpo_advantages, papo_advantages, pass_rate_buckets
from .types import GroupAdvantages, PAPOAdvantages, check_error

__all__ = [
    "GroupAdvantages",
    "PAPOAdvantages",
    "check_error",
    "dynamic_sampling_mask",
    "gdpo_advantages",
    "grpo_advantages",
    "papo_advantages",
    "pass_rate_buckets",
]
