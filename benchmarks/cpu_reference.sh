#!/usr/bin/env bash
# The CPU numbers of BENCHMARKS.md: the CPU reference configuration JiT-T/4 (32×32, patch 4,
# width 192, depth 6, 3 heads, bottleneck 32, 8 in-context tokens, 10 classes), batch 64,
# 2 threads; bf16 + compile (the specified configuration) and fp32 + compile / eager.
#
#   benchmarks/cpu_reference.sh [OUT_ROOT]      (default runs/bench/cpu)
set -euo pipefail
root=${1:-runs/bench/cpu}
here=$(dirname "$0")
common=(--model JiT-T/4 --batch 64 --threads 2 --what all --profile)
"$here/run_when_quiet.sh" "$root/fp32-compile" "${common[@]}" --dtype fp32 --compile \
  --sample-batch 16
"$here/run_when_quiet.sh" "$root/fp32-eager" "${common[@]}" --dtype fp32 --sample-batch 16
# bf16 matmuls are emulated on CPUs without AVX512-BF16/AMX: keep the sampling run small.
"$here/run_when_quiet.sh" "$root/bf16-compile" "${common[@]}" --dtype bf16 --compile \
  --warmup 1 --repeats 3 --sample-batch 4 --sample-repeats 1
