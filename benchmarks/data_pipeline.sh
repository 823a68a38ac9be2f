#!/usr/bin/env bash
# The input pipeline on this machine's CPUs (BENCHMARKS.md, "Input pipeline"):
#
#   benchmarks/data_pipeline.sh [OUT_DIR]      (default runs/bench/data)
#
# A synthetic ImageNet-like JPEG folder (512 photos, ~500×375, ~96 KB each), the loader alone
# at 256 px (ADM centre crop, flips, float conversion, collation) with 0, 1 and 2 workers, the
# same images prepared once (`denoiselab prepare-data`) and read from the uint8 shards.
# Every image is read once per measurement (batch 32: 2 warm-up + 12 timed batches = 448).
set -euo pipefail
out=${1:-runs/bench/data}
mkdir -p "$out"
[ -d "$out/jpegs" ] || python "$(dirname "$0")/make_jpeg_folder.py" "$out/jpegs" --images 512
bench() {  # bench NAME DATA WORKERS
  python -m denoiselab bench --model JiT-B/16 --image-size 256 --batch 32 --what data \
    --data "$2" --workers "$3" --warmup 2 --data-batches 12 --threads 1 --out "$out/$1" \
    2>/dev/null | tail -n 1
}
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for w in 0 1 2; do bench "folder-w$w" "$out/jpegs" "$w"; done
rm -rf "$out/prepared"
python -m denoiselab prepare-data "$out/jpegs" --out "$out/prepared" --image-size 256 --workers 2
for w in 0 1; do bench "prepared-w$w" "$out/prepared" "$w"; done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
