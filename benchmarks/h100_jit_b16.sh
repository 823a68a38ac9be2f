#!/usr/bin/env bash
# JiT-B/16 at 256×256 on one H100 in bf16 with torch.compile (batch 128 per GPU = the paper's
# 1024 over 8 GPUs). Measured 2026-11-23: 1649 train img/s, 33.6 sample img/s (BENCHMARKS.md).
#
#   benchmarks/h100_jit_b16.sh [OUT_DIR]        (default runs/bench/h100-jit-b16)
set -euo pipefail
out=${1:-runs/bench/h100-jit-b16}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python -m denoiselab.bench --model JiT-B/16 --image-size 256 --batch 128 --dtype bf16 \
  --compile --what all --sample-batch 128 --profile --out "$out"
