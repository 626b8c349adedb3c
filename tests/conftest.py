"""Test-wide setup: without CUDA, every Triton kernel runs through Triton's interpreter on CPU tensors.

``TRITON_INTERPRET`` must be set before ``papo_kernels`` (and so ``triton.jit``) is imported.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICE = "cuda" if HAS_CUDA else "cpu"
# --doctest-modules would import this file as a module named "conftest", as it does src/conftest.py
collect_ignore = ["conftest.py"]


@pytest.fixture
def device() -> str:
    """Where kernels run: CUDA when present, else CPU through the Triton interpreter."""
    return DEVICE


def pytest_collection_modifyitems(config, items):
    from papo_trl import vllm_cpu

    skips = {
        "cuda": None if HAS_CUDA else pytest.mark.skip(reason="needs a CUDA GPU"),
        "vllm": None if vllm_cpu.installed() else pytest.mark.skip(reason=f"needs vLLM: {vllm_cpu.INSTALL_HINT}"),
    }
    for item in items:
        for marker, skip in skips.items():
            if skip is not None and marker in item.keywords:
                item.add_marker(skip)
