"""The embedded CPU demo of ``papo-train``: an arithmetic task, a tiny model, SFT then PAPO (see :mod:`.run`)."""

from .model import build_model, build_tokenizer
from .task import TaskSpec, make_splits

__all__ = ["TaskSpec", "build_model", "build_tokenizer", "make_splits"]
