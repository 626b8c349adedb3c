"""Group advantages: GRPO, GDPO, PAPO, DAPO dynamic sampling and DARO pass-rate buckets."""

from .api import (
    GRPO_EPS,
    PAPO_EPS,
    check_lambda_process,
    dynamic_sampling_mask,
    gdpo_advantages,
    grpo_advantages,
    papo_advantages,
    pass_rate_buckets,
)
from .naive import weighted_nansum
from .types import GroupAdvantages, PAPOAdvantages, check_error

__all__ = [
    "GRPO_EPS",
    "PAPO_EPS",
    "GroupAdvantages",
    "PAPOAdvantages",
    "check_error",
    "check_lambda_process",
    "dynamic_sampling_mask",
    "gdpo_advantages",
    "grpo_advantages",
    "papo_advantages",
    "pass_rate_buckets",
    "weighted_nansum",
]
