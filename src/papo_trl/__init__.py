"""papo_trl: PAPO / GDPO / DAPO / DARO on top of TRL's GRPOTrainer (imports trl, transformers, openai).

``PAPOConfig`` and ``PAPOTrainer`` are imported on first use, so ``papo-train`` can check its arguments before
the heavy imports.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("papo-kernels")  # the distribution that ships both packages
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

__all__ = ["PAPOConfig", "PAPOTrainer"]
_HOMES = {"PAPOConfig": ".config", "PAPOTrainer": ".trainer"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
