#!/usr/bin/env bash
# Full docs/math.md section 8 sweep on one CUDA GPU: N in {4096, 16384, 32768} x V in {32000, 128256, 151936,
# 262144}, bf16, forward and forward+backward, contenders rlsd[triton], eager, torch.compile(eager) and Liger-Kernel
# (skipped, with the reason recorded, when liger-kernel is not installed: `pip install liger-kernel` first to include
# it), plus the in-place-backward variants rlsd[triton]+inplace and liger+inplace.
#
# One invocation per N, merged into one results file with --resume, so that each command stays well under a
# 10-minute command limit and an interrupted sweep continues where it stopped (rerun the script: finished cases are
# kept). Cases that do not fit in GPU memory are recorded as "oom" (per case, the sweep goes on), e.g. eager at
# 32768 x 262144 (two float32 N x V log_softmax buffers of 34 GB each next to 34 GB of bf16 inputs).
#
# Outputs: bench/results/cuda-<device-slug>.{json,md,png}. Extra arguments are passed to every invocation
# (e.g. --backends rlsd,eager to drop contenders, --peak-bw-tbs 3.35 for a GPU missing from bench/devices.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for N in 4096 16384 32768; do
  python -m bench --device cuda --n "$N" --v 32000,128256,151936,262144 --dtype bf16 --mode both \
    --reps 20 --warmup 3 --lam 0.5 --inplace --case-timeout 540 --resume "$@"
done
