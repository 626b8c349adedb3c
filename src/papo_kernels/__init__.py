"""papo-kernels: fused Triton kernels for group-relative RL (PAPO, GDPO, DAPO, DARO).

Torch and Triton only; the TRL integration lives in ``papo_trl``.
"""

from importlib.metadata import PackageNotFoundError, version

from ._runtime import kernels_available
from .advantages import (
    GroupAdvantages,
    PAPOAdvantages,
    dynamic_sampling_mask,
    gdpo_advantages,
    grpo_advantages,
    papo_advantages,
    pass_rate_buckets,
)
from .daro import DAROWeights
from .loss import PolicyLossConfig, PolicyLossOutput, fused_linear_policy_loss, policy_loss

try:
    __version__ = version("papo-kernels")  # the installed distribution's, i.e. pyproject.toml's
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

__all__ = [
    "DAROWeights",
    "GroupAdvantages",
    "PAPOAdvantages",
    "PolicyLossConfig",
    "PolicyLossOutput",
    "dynamic_sampling_mask",
    "fused_linear_policy_loss",
    "gdpo_advantages",
    "grpo_advantages",
    "kernels_available",
    "papo_advantages",
    "pass_rate_buckets",
    "policy_loss",
]
