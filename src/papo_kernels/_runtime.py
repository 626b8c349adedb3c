"""Device routing and helpers shared by the kernels.

CUDA tensors run the Triton kernels. CPU tensors run the torch reference, unless ``TRITON_INTERPRET=1`` was set
before import, in which case they run the same Triton kernels through Triton's interpreter (how CI tests them).
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def use_triton(t: torch.Tensor) -> bool:
    """Whether `t` is served by the Triton kernels (CUDA, or CPU under the interpreter)."""
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: the arithmetic dtype (never below fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def require(cond: bool, msg: str) -> None:
    """Raise ``ValueError(msg)`` unless `cond`: the one way bad input is reported."""
    if not cond:
        raise ValueError(msg)


def check_tensor(name: str, t, *, ndim: tuple[int, ...] | int | None = None, floating: bool | None = None) -> None:
    """Type, rank and dtype-kind check with a message naming the argument."""
    require(isinstance(t, torch.Tensor), f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        require(
            t.dim() in allowed, f"`{name}` must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}"
        )
    if floating is True:
        require(t.is_floating_point(), f"`{name}` must be a floating tensor, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    ref_name, ref = items[0]
    for name, t in items[1:]:
        require(t.device == ref.device, f"`{name}` is on {t.device} but `{ref_name}` is on {ref.device}")
