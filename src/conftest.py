"""The docstring examples of ``src/`` as doctests (``--doctest-modules`` in ``pyproject.toml``).

They run on CPU tensors through the torch references, whatever ``tests/conftest.py`` set for the test suite
(Triton's interpreter): an example shows what a user gets on a CPU. Nothing here imports ``papo_kernels`` at
collection time, so the test suite's ``TRITON_INTERPRET`` still reaches the kernels it tests.
"""

import contextlib
import importlib.util
import io

import pytest

# the demo trains a model: its modules hold no examples, and their imports (matplotlib) are not needed here; a
# conftest is no doctest module (--doctest-modules would import both conftests under the one name "conftest")
collect_ignore = ["papo_trl/demo", "conftest.py"]


@pytest.fixture(autouse=True)
def _torch_reference_path(monkeypatch):
    from papo_kernels import _runtime

    monkeypatch.setattr(_runtime, "INTERPRET", False)


@pytest.fixture(autouse=True, scope="session")
def _deepspeed_imported_quietly():
    """accelerate imports DeepSpeed (where it is installed) when the first trainer is built, and DeepSpeed prints
    its device detection to stdout, which a doctest would read as the example's output: import it first."""
    if importlib.util.find_spec("deepspeed") is not None:
        with contextlib.redirect_stdout(io.StringIO()):
            import deepspeed  # noqa: F401
