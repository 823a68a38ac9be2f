#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one invocation (≈ 8 minutes on one H100/H200):
#
#   benchmarks/gpu_suite.sh [OUT_DIR]          (default runs/gpu_suite)
#
#   1. tests/test_gpu.py            CUDA numerics (bf16, flash SDPA, compile, FSDP, NCCL)  ≤ 150 s
#   2. denoiselab bench JiT-B/16    the headline: 256 px, batch 128, bf16, whole-model compile,
#                                   train + sample (MFU targets 55 % / 60 %)              ≤ 170 s
#   3. compile modes                B/16 train with max-autotune-no-cudagraphs and
#                                   reduce-overhead (CUDA graphs), only if time is left
#   4. the scale table              B/16, L/16, B/32@512, H/16, G/16 × (DDP, FSDP + activation
#                                   checkpointing): img/s, MFU, peak memory, largest batch;
#                                   rows that do not fit the remaining budget are listed as
#                                   not measured                                         rest
#
# Each step runs under `timeout`, so the whole stays within SUITE_BUDGET_S (default 480 s).
# Everything goes to OUT_DIR; OUT_DIR/summary.md collects what BENCHMARKS.md takes verbatim.
# Re-run only the missing scale rows with e.g.
#   python -m denoiselab.bench.scale --rows JiT-G/16@256:32 --out OUT_DIR/scale-g16
set -uo pipefail
out=${1:-runs/gpu_suite}
budget=${SUITE_BUDGET_S:-480}
mkdir -p "$out"
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
summary="$out/summary.md"
{
  echo "# GPU suite $(date -u +%Y-%m-%dT%H:%M:%SZ), git $(git -C "$root" rev-parse --short HEAD)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "load: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs"
} > "$summary" 2>&1

echo "## 1. tests/test_gpu.py" >> "$summary"
timeout 150 python -m pytest -q -p no:cacheprovider "$root/tests/test_gpu.py" > "$out/test_gpu.txt" 2>&1
echo "exit $? — $(tail -n 1 "$out/test_gpu.txt")" >> "$summary"

echo "## 2. JiT-B/16 headline (train + sample)" >> "$summary"
timeout 170 python -m denoiselab bench --model JiT-B/16 --image-size 256 --batch 128 \
  --dtype bf16 --compile --what all --sample-batch 128 --repeats 10 --out "$out/b16" \
  > "$out/b16.txt" 2>&1
echo "exit $? — $(tail -n 1 "$out/b16.txt")" >> "$summary"

echo "## 3. compile modes (B/16 train)" >> "$summary"
for mode in max-autotune-no-cudagraphs reduce-overhead; do
  if [ "$(left)" -lt 260 ]; then echo "$mode: skipped (time budget)" >> "$summary"; continue; fi
  timeout 110 python -m denoiselab bench --model JiT-B/16 --image-size 256 --batch 128 \
    --dtype bf16 --compile --compile-mode "$mode" --what train --repeats 10 \
    --out "$out/b16-$mode" > "$out/b16-$mode.txt" 2>&1
  echo "$mode: exit $? — $(tail -n 1 "$out/b16-$mode.txt")" >> "$summary"
done

echo "## 4. scale table" >> "$summary"
scale_budget=$(( $(left) - 40 ))  # the last row may overrun its start by a step or two
if [ "$scale_budget" -gt 30 ]; then
  timeout $(( scale_budget + 60 )) python -m denoiselab.bench.scale --budget-s "$scale_budget" \
    --out "$out/scale" > "$out/scale.txt" 2>&1
  echo "exit $?" >> "$summary"
  cat "$out/scale/scale.md" >> "$summary" 2>/dev/null || tail -n 20 "$out/scale.txt" >> "$summary"
else
  echo "skipped (time budget)" >> "$summary"
fi
echo "total $(( $(date +%s) - start )) s" >> "$summary"
cat "$summary"
