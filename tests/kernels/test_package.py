"""``papo_kernels`` stands on torch and Triton alone: importing it pulls in no TRL, transformers or openai."""

import subprocess
import sys


def test_import_needs_only_torch_and_triton():
    code = (
        "import sys, papo_kernels\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('trl', 'transformers', 'openai', 'accelerate'))\n"
        "assert not bad, bad\n"
        "assert all(hasattr(papo_kernels, name) for name in papo_kernels.__all__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_version_is_the_installed_distributions():
    """``__version__`` of both packages is read from the installed metadata (pyproject.toml's version)."""
    import importlib.metadata

    import papo_kernels
    import papo_trl

    assert papo_kernels.__version__ == papo_trl.__version__ == importlib.metadata.version("papo-kernels")
