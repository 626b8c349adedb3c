"""A tiny Qwen2-style causal LM and a character-level tokenizer for the demo task, built without downloads.

The tokenizer is a ``tokenizers`` word-level model over single characters (digits, ``+ - * / = ( )``, space,
newline, ``}``) plus the multi-character token ``\\boxed{``; a ``Fuse`` decoder concatenates tokens, so
``decode(encode(s)) == s`` for every string over that alphabet. ``<pad>`` and ``<eos>`` are special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

__all__ = ["ALPHABET", "VLLM_MODEL", "TinyModelSpec", "build_tokenizer", "build_model"]

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
BOXED = "\\boxed{"
ALPHABET = tuple("0123456789+-*/=() \n}") + (BOXED,)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over :data:`ALPHABET` (``\\boxed{`` is one token); pads on the left."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + ALPHABET)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # One token per character, except "\boxed{" which stays whole.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.model_max_length = 256
    return tokenizer


@dataclass(frozen=True)
class TinyModelSpec:
    """Size of the demo model (defaults: ~0.2M parameters, 4 heads of 24, about a millisecond per decoding step on
    CPU)."""

    hidden_size: int = 96
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 128


VLLM_MODEL = TinyModelSpec(num_attention_heads=3, num_key_value_heads=1)
"""The demo model as vLLM's CPU backend runs it (``papo-train demo --use_vllm``): the same width in heads of 32, the
smallest head size that backend takes. With fewer heads it learns less on the demo task (README)."""


def build_model(tokenizer: PreTrainedTokenizerFast, spec: TinyModelSpec = TinyModelSpec(), seed: int = 0):
    """Randomly initialised ``Qwen2ForCausalLM`` (tied embeddings) sized by ``spec``, seeded by ``seed``."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None
    )
    return model
