"""Device floors, measured on random data: the device-to-device copy rate and the best dense bf16 matmul rate.

The copy moves 2 GiB (rate = bytes read + bytes written per second). The matmul rate is the best of an 8192 x
8192 x 8192 GEMM and the fused-linear benchmark's own GEMMs (for each head and token count: logits ``[N, D] @
[D, V]``, grad_h ``[N, V] @ [V, D]``, grad_W ``[V, N] @ [N, D]``), each shape's rate recorded. Times are medians
of at least 10 samples (harness.sample_count). The datasheet rates of known devices ride along (harness.PEAKS).
All go to results/<device>/floors.json, where every benchmark reads them to turn the bytes that must move, or the
flops that must be done, into a floor time. On a CPU: small sizes, fp32.

    python benchmarks/floors.py            # measure and write floors.json
    python benchmarks/floors.py --quick    # tiny sizes (CI smoke test)
"""

from __future__ import annotations

import json

from harness import arg_parser, device_info, measure_floors, results_dir


def gemm_shapes(quick: bool) -> list[tuple[int, int, int]]:
    """``(M, N, K)`` of the three GEMMs of every fused-linear configuration (bench_fused_linear.py's sweep)."""
    from bench_fused_linear import HEADS, QUICK, QUICK_HEADS, SWEEP

    heads, sweep = (QUICK_HEADS, QUICK) if quick else (HEADS, SWEEP)
    shapes = {(n, V, D) for D, V in heads.values() for n in sweep}  # logits
    shapes |= {(n, D, V) for D, V in heads.values() for n in sweep}  # grad_h
    shapes |= {(V, D, n) for D, V in heads.values() for n in sweep}  # grad_W
    return sorted(shapes)


def measure(quick: bool) -> dict:
    return measure_floors(quick, gemm_shapes(quick))


def main() -> None:
    args = arg_parser(__doc__, rows=False).parse_args()
    measured = measure(args.quick)
    path = results_dir() / "floors.json"
    path.write_text(json.dumps({"benchmark": "floors", "env": device_info(), "floors": measured}, indent=2) + "\n")
    shape = " x ".join(map(str, measured["matmul_best"]))
    print(f"copy {measured['copy_gbs']:.0f} GB/s, {measured['matmul_dtype']} matmul {measured['matmul_tflops']:.1f} "
          f"TFLOP/s (best: M, N, K = {shape}); datasheet {measured['peak']}")  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
