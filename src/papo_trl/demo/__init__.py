"""The embedded CPU demo of ``papo-train``: an arithmetic task, a tiny model, SFT then PAPO (see :mod:`.run`).

Light to import (the CLI reads ``METHODS`` before torch is loaded); the builders load on first use.
"""

import importlib

METHODS = ("papo", "grpo", "prm_only")
QUICK_ENV = "PAPO_DEMO_QUICK"
OUTCOME_KEY = "rewards/exact_answer_reward/mean"  # the logged outcome reward: the sampled responses' accuracy

__all__ = ["METHODS", "OUTCOME_KEY", "QUICK_ENV", "TaskSpec", "build_model", "build_tokenizer", "make_splits"]
_HOMES = {"TaskSpec": ".task", "make_splits": ".task", "build_model": ".model", "build_tokenizer": ".model"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
