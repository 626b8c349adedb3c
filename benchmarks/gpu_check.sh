#!/usr/bin/env bash
# The one command for a GPU machine (see benchmarks/gpu_check.py, or --help): run from anywhere, with .whl/ filled
# by benchmarks/fetch_wheels.sh where the machine has no network. Extra arguments go to gpu_check.py.
cd "$(dirname "$0")/.." && exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
