"""Device floors, measured on random data: the device-to-device copy rate and the dense bf16 matmul rate.

The copy moves 2 GiB (rate = bytes read + bytes written per second), the matmul is 8192 x 8192 x 8192 in bf16;
both are do_bench medians. They go to results/<device>/floors.json, where every benchmark reads them to turn the
bytes that must move, or the flops that must be done, into a floor time. On a CPU: small sizes, fp32.

    python benchmarks/floors.py            # measure and write floors.json
    python benchmarks/floors.py --quick    # tiny sizes (CI smoke test)
"""

from __future__ import annotations

import json

from harness import arg_parser, device_info, measure_floors, results_dir


def main() -> None:
    args = arg_parser(__doc__, rows=False).parse_args()
    measured = measure_floors(args.quick)
    path = results_dir() / "floors.json"
    path.write_text(json.dumps({"benchmark": "floors", "env": device_info(), "floors": measured}, indent=2) + "\n")
    print(f"copy {measured['copy_gbs']:.0f} GB/s, {measured['matmul_dtype']} matmul {measured['matmul_tflops']:.1f} "
          f"TFLOP/s")  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
