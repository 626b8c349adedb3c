"""papo_trl: PAPO / GDPO / DAPO / DARO on top of TRL's GRPOTrainer (imports trl, transformers, openai)."""

from .config import PAPOConfig
from .trainer import PAPOTrainer

__all__ = ["PAPOConfig", "PAPOTrainer"]
