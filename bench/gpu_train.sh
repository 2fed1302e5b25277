#!/usr/bin/env bash
# One-GPU training throughput, no Ray needed: depth 12 and depth 20, bf16 + torch.compile, ~50 steps each on
# random tokens, printing tok/s and MFU (nanochat's own figures: >= 41% at d12, >= 46% at d20 on H100).
# Usage: bash bench/gpu_train.sh   (needs torch with CUDA; ~6 minutes including compilation)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for depth in 12 20; do
  python bench/bench_train.py --device cuda --compile --optimizer --depth "$depth" --seq-len 2048 \
    --device-batch-size "${DEVICE_BATCH_SIZE:-16}" --warmup 5 --steps 45 | tail -1
done
