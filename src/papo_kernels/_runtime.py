"""Device routing and helpers shared by the kernels.

CUDA tensors run the Triton kernels. CPU tensors run the torch reference, unless ``TRITON_INTERPRET=1`` was set
before import, in which case they run the same Triton kernels through Triton's interpreter (how CI tests them).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def kernels_available(where: torch.Tensor | torch.device | str) -> bool:
    """Whether the Triton kernels serve tensors on a device: CUDA, or the CPU when ``TRITON_INTERPRET=1`` was set
    before ``papo_kernels`` was imported (Triton's interpreter). Elsewhere every function runs its torch reference.

    Args:
        where: a tensor, or a device (``torch.device`` or a string such as ``"cuda:0"``).

    Returns:
        ``True`` where ``papo_kernels`` launches its Triton kernels, ``False`` where it runs the torch reference.

    Examples:
        >>> import torch
        >>> from papo_kernels import kernels_available
        >>> kernels_available("cuda")
        True
        >>> kernels_available(torch.zeros(2)) == kernels_available("cpu")
        True
    """
    device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
    return device.type == "cuda" or (INTERPRET and device.type == "cpu")


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1) (plain integer arithmetic: cheap on the per-call host path)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: the arithmetic dtype (never below fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def require(cond: bool, msg: str, *args) -> None:
    """Raise ``ValueError(msg.format(*args))`` unless `cond`: the one way bad input is reported. With `args` the
    message is only formatted on failure, so a check on a per-call path costs a comparison."""
    if not cond:
        raise ValueError(msg.format(*args) if args else msg)


def is_number(value) -> bool:
    """A finite real number: an ``int`` or ``float``, never a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require_finite(name: str, value, low: float | None = None, *, strict: bool = False) -> None:
    """``value`` a finite number (:func:`is_number`), ``>= low`` (``> low`` when ``strict``) if ``low`` is given; else
    ``ValueError`` naming ``name``, as in "`beta` must be a finite number >= 0, got -1.0"."""
    ok = is_number(value) and (low is None or (value > low if strict else value >= low))
    if not ok:
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        raise ValueError(f"`{name}` must be a finite number{bound}, got {value!r}")


CACHED_TENSORS = 64
"""How many small constant tensors :func:`cached_tensor` keeps (the most recently used)."""
_cache: OrderedDict = OrderedDict()


def cached_tensor(key: Hashable, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The small constant tensor ``make()`` (kernel parameters, scalars) for ``key``, made once while it is among the
    :data:`CACHED_TENSORS` most recently used: no host-to-device copy per call. Callers never write to it."""
    hit = _cache.get(key)
    if hit is None:
        hit = _cache[key] = make()
        if len(_cache) > CACHED_TENSORS:
            _cache.popitem(last=False)
    _cache.move_to_end(key)
    return hit


def check_tensor(name: str, t, *, ndim: tuple[int, ...] | int | None = None, floating: bool | None = None) -> None:
    """Type, rank and dtype-kind check with a message naming the argument."""
    require(isinstance(t, torch.Tensor), "`{}` must be a torch.Tensor, got {}", name, type(t).__name__)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            raise ValueError(f"`{name}` must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    if floating is True:
        require(t.is_floating_point(), "`{}` must be a floating tensor, got {}", name, t.dtype)


def check_same_device(**tensors: torch.Tensor | None) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    ref_name, ref = items[0]
    for name, t in items[1:]:
        require(t.device == ref.device, "`{}` is on {} but `{}` is on {}", name, t.device, ref_name, ref.device)
