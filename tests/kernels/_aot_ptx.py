"""Compile recorded launches for sm_90 with ``_aot_compile`` and report the float widths in each kernel's PTX.

Prints ``_aot_compile``'s lines, then one JSON line per compiled kernel: its name, its pointer argument types,
``f32_arith`` (f32 add/sub/mul/fma/div/sqrt/rcp instructions) and ``f32_any`` (any ``.f32`` in the PTX: an
fp32 parameter, conversion or register).
"""

from __future__ import annotations

import json
import re
import sys

F32_ARITH = re.compile(r"\b(?:add|sub|mul|fma|div|sqrt|rcp|rsqrt)(?:\.[a-z]+)*\.f32\b")


def main(path: str) -> None:
    import triton

    from tests.kernels import _aot_compile

    compiled = []
    compile_ = triton.compile

    def spy(src, *args, **kwargs):
        kernel = compile_(src, *args, **kwargs)
        compiled.append((src, kernel))
        return kernel

    triton.compile = spy
    try:
        _aot_compile.main(path)
    finally:
        triton.compile = compile_
    for src, kernel in compiled:
        ptx = kernel.asm["ptx"]
        print(json.dumps({
            "ptx_of": src.fn.__name__,
            "pointers": {n: t for n, t in src.signature.items() if t.startswith("*")},
            "f32_arith": len(F32_ARITH.findall(ptx)),
            "f32_any": ptx.count(".f32"),
        }))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
