"""Every public function and class documents its arguments, its result and a runnable example.

Public means exported by ``papo_kernels``, ``papo_trl`` or ``papo_trl.rewards`` (their ``__all__``). The examples
themselves run as doctests (``--doctest-modules``, ``src/conftest.py``).
"""

import importlib
import inspect

import pytest

PACKAGES = ("papo_kernels", "papo_trl", "papo_trl.rewards")
# documented where they are defined: TRL's own function, re-exported
FOREIGN = {"get_soft_overlong_punishment"}
# the module is being redesigned; its docstrings come with the redesign
PENDING = {"fused_linear_policy_loss"}


def _public():
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            obj = getattr(module, name)
            if callable(obj) and name not in FOREIGN | PENDING:
                yield pytest.param(obj, id=f"{package}.{name}")


@pytest.mark.parametrize("obj", list(_public()))
def test_public_api_has_args_returns_and_examples(obj):
    doc = inspect.getdoc(obj) or ""
    sections = ["Args:", "Examples:"] + ([] if inspect.isclass(obj) else ["Returns:"])
    missing = [section for section in sections if section not in doc]
    assert not missing, f"{obj.__qualname__} lacks {missing}"
    assert "\n>>> " in doc or "\n    >>> " in doc, f"{obj.__qualname__} has no runnable example"


def test_the_exemptions_still_hold():
    from trl.rewards import get_soft_overlong_punishment

    from papo_trl import rewards

    assert rewards.get_soft_overlong_punishment is get_soft_overlong_punishment  # TRL's, with TRL's docstring
    import papo_kernels

    assert "Examples:" not in (papo_kernels.fused_linear_policy_loss.__doc__ or "")  # drop from PENDING when added
