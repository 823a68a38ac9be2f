#!/usr/bin/env bash
# Issue 18's step costs (BENCHMARKS.md, "Token routing and Muon"): the training step of the
# quickstart network (JiT-S/8 narrowed to width 128, depth 4, 2 heads; 32×32, batch 32, fp32,
# one thread) against token routing and Muon, timed round-robin in one run; then Muon again
# with oneDNN capped at AVX2 (as on a CPU without AVX512-BF16: bf16 matmuls emulated); then
# routing on JiT-T/4 (64 patch tokens instead of 16).
#
#   benchmarks/routing_muon.sh [OUT_ROOT]      (default runs/bench/issue18)
set -euo pipefail
root=${1:-runs/bench/issue18}
quick=(--model JiT-S/8 --set model.hidden_size=128 --set model.depth=4 --set model.num_heads=2
       --batch 32 --dtype fp32 --what train --threads 1 --warmup 3 --repeats 20 --matmul-max-size 512)
denoiselab bench "${quick[@]}" --routing tread:0.5:1:2 sprint:0.75:1:2 \
  --optim muon:bf16 muon:fp32 muon --out "$root/quickstart"
ONEDNN_MAX_CPU_ISA=AVX2 denoiselab bench "${quick[@]}" --optim muon:bf16 muon:fp32 muon \
  --out "$root/quickstart-avx2"
denoiselab bench --model JiT-T/4 --batch 32 --dtype fp32 --what train --threads 1 --warmup 3 \
  --repeats 10 --matmul-max-size 512 --routing tread:0.5:1:3 sprint:0.75:1:3 --out "$root/jit-t4"
