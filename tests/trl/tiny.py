"""Tiny, download-free building blocks for trainer tests: a character tokenizer, a Qwen2-style model, data.

Everything is built in code from a seed, so a test never touches the network and two calls with the same seed
give identical models.
"""

from __future__ import annotations

import contextlib
import zlib

import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2 import modeling_qwen2

DEFAULT_CHARS = "0123456789+-*=()abcdefghijklmnopqrstuvwxyz .,?\\{}"
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")


def tiny_tokenizer(chars: str = DEFAULT_CHARS) -> PreTrainedTokenizerFast:
    """One token per character of `chars` plus ``<pad>``, ``<eos>`` and ``<unk>``; left padding, as TRL wants."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in dict.fromkeys(chars):
        vocab.setdefault(c, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def tiny_model(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, hidden_size: int = 32, num_layers: int = 2
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 causal LM over `tokenizer`'s vocabulary (fp32, eager attention)."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@contextlib.contextmanager
def rotary_in_model_dtype():
    """Qwen2's rotary angles and their cos/sin in the model's dtype. transformers computes them in fp32 whatever the
    model's dtype, and the CPU's vectorised and scalar cos/sin differ in the last bit depending on a row's length:
    the same tokens at the same positions then differ at fp32 rounding between a padded and a packed row. In fp64
    they do not, and left padding (TRL counts a padded prompt's positions from its padding) cancels out of the
    rotary embedding."""

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].to(x.dtype) * self.inv_freq.to(x.device, x.dtype)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    original = modeling_qwen2.Qwen2RotaryEmbedding.forward
    modeling_qwen2.Qwen2RotaryEmbedding.forward = forward
    try:
        yield
    finally:
        modeling_qwen2.Qwen2RotaryEmbedding.forward = original


def tiny_dataset(num_prompts: int = 16) -> Dataset:
    """Standard-format prompts ``"a+b="`` with the answer in column ``answer`` and the row index in ``idx``."""
    rows = [{"prompt": f"{i % 7}+{i % 5}=", "answer": str(i % 7 + i % 5), "idx": i} for i in range(num_prompts)]
    return Dataset.from_list(rows)


def varied_dataset(num_prompts: int = 16) -> Dataset:
    """As :func:`tiny_dataset`, with prompts of 4 to 8 characters (a batch's shorter prompts are left-padded)."""
    rows = [{"prompt": f"{'1' * (i % 5)}{i % 7}+{i % 5}=", "answer": str(i % 7 + i % 5), "idx": i}
            for i in range(num_prompts)]  # fmt: skip
    return Dataset.from_list(rows)


class FixedCompletions:
    """Mixin before a ``GRPOTrainer``: each completion is 1 to 8 random tokens (no EOS), a fixed function of its
    prompt, its position in its group and the step, so that every process layout and every run generates the same."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, **kwargs):
        start, V = self.accelerator.process_index * len(prompt_ids), len(self._tokenizer)
        completions = []
        for i, prompt in enumerate(prompt_ids):
            key = repr((prompt, (start + i) % self.num_generations, self.state.global_step)).encode()
            g = torch.Generator().manual_seed(zlib.crc32(key))
            length = int(torch.randint(1, 9, (1,), generator=g))
            completions.append(torch.randint(3, V, (length,), generator=g).tolist())
        return completions, None


def digit_outcome_reward(completions, **kwargs) -> list[float]:
    """Outcome reward for a random tiny model: 1.0 iff the completion holds a digit (about 3 in 4 do)."""
    return [float(any(c.isdigit() for c in text)) for text in completions]


def digit_process_reward(completions, **kwargs) -> list[float]:
    """Process reward: the fraction of digits in the completion (varies within a group of correct ones)."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def tiny_args(output_dir, config_class=None, **overrides):
    """A fast CPU configuration (8 completions of <= 8 tokens per step, 2 steps, no logging backends)."""
    if config_class is None:
        from papo_trl import PAPOConfig as config_class
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        seed=0,
        save_strategy="no",
        activation_checkpointing=False,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return config_class(**kwargs)
