#!/usr/bin/env bash
# Fill the git-ignored .whl/ with the wheels a GPU machine without network lacks; benchmarks/gpu_check.py installs
# them there with pip --no-index --no-deps. All are pure Python (about 2.7 MB together), so the real `datasets`
# travels too (its heavy dependencies, pyarrow, pandas, fsspec, xxhash and huggingface-hub, are on the image):
#   trl 1.16.0                  the TRL peers, the chunked LM head, GRPOTrainer (bench_trainer_step.py)
#   liger-kernel 0.8.5          the Liger peers (measured with torch 2.11 / Triton 3.6)
#   cut-cross-entropy 25.1.1    Apple's Cut Cross-Entropy, the fused-linear log-prob peer (Triton; 23 kB)
#   datasets 5.2.0              imported by trl.trainer at module level; with dill and multiprocess, its two missing deps
# Quack (quack-kernels) stays out: its CuTe DSL runtime, nvidia-cutlass-dsl-libs-cu13 4.8.1, is a 92 MB wheel, more
# than the 64 MiB that travel to the GPU machine with the tree.
# Usage, from anywhere: bash benchmarks/fetch_wheels.sh   (PYTHON=python3.12 PY_VERSION=3.12 to override)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}  # the GPU image's Python (multiprocess ships one wheel per Python version)
WHEELS=(trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
rm -rf .whl && mkdir .whl  # one version of each: two of the same package stop the install
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
ls -l .whl
du -sh .whl
