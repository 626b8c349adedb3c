"""Compile recorded Triton launches for an H100 (sm_90) without a GPU, and report what the machine code does.

Used by the CPU test suite: launches are recorded under the interpreter (arguments described, tensors reduced
to dtype and 16-byte alignment), then this script, run in a process without ``TRITON_INTERPRET``, builds each
specialization exactly as ``JITFunction.run`` would and compiles it to a cubin. Prints one JSON line per
launch: kernel, constexprs, warps, vector loads/stores in the PTX, registers and local-memory (spill) bytes.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile


def describe(arg):
    import torch

    if isinstance(arg, torch.Tensor):
        return ("tensor", str(arg.dtype).removeprefix("torch."), arg.data_ptr() % 16 == 0)
    return arg


def record(kernels: dict[str, object]):
    """Record the launches of ``{"module:name": kernel}`` (arguments and launch options such as ``num_warps``,
    which the interpreter's pre-run hooks do not see); returns the list they go to. Undo with :func:`stop`."""
    calls = []
    for key, k in kernels.items():

        def run(*args, _key=key, _run=k.run, **kwargs):
            options = {n: v for n, v in kwargs.items() if n not in ("grid", "warmup")}
            calls.append((_key, [describe(x) for x in args], {n: describe(v) for n, v in options.items()}))
            return _run(*args, **kwargs)

        k.run = run
    return calls


def stop(kernels: dict[str, object]) -> None:
    for k in kernels.values():
        k.__dict__.pop("run", None)


def main(path: str) -> None:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    class Mock(MockTensor):
        def __init__(self, dtype, aligned):
            super().__init__(dtype)
            self.aligned = aligned

        def data_ptr(self):
            return 0 if self.aligned else 2

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with open(path, "rb") as f:
        calls = pickle.load(f)
    seen = set()
    for key, args, kwargs in calls:
        if repr((key, args, kwargs)) in seen:
            continue
        seen.add(repr((key, args, kwargs)))
        module, name = key.split(":")
        fn = getattr(importlib.import_module(module), name)
        undo = lambda a: Mock(getattr(torch, a[1]), a[2]) if isinstance(a, tuple) and a[:1] == ("tensor",) else a  # noqa: E731
        args = [undo(a) for a in args]
        kwargs = {n: undo(v) for n, v in kwargs.items()}
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        ptx = kernel.asm["ptx"]
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        regs = re.search(r"REG:(\d+)", usage)
        local = re.search(r"LOCAL:(\d+)", usage)
        print(json.dumps({
            "kernel": name,
            "constexprs": {n: v for n, v in kwargs.items() if n.isupper() and not isinstance(v, MockTensor)},
            "vector_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]", ptx)),
            "vector_stores": len(re.findall(r"st\.global(?:\.\w+)*\.v[248]", ptx)),
            "num_warps": options.num_warps,
            "registers": int(regs.group(1)) if regs else None,
            "local_bytes": int(local.group(1)) if local else None,
            "shared": kernel.metadata.shared,
        }))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
