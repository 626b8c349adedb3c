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
