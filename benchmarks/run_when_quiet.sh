#!/usr/bin/env bash
# Run one `denoiselab bench` when the machine is quiet: wait (at most MAX_WAIT_S seconds)
# until the 1-minute load average drops below MAX_LOAD, then run and log `uptime` around it.
#
#   benchmarks/run_when_quiet.sh OUT_DIR [bench args...]
#   MAX_LOAD=2.5 MAX_WAIT_S=900 benchmarks/run_when_quiet.sh runs/bench/x --model JiT-T/4 ...
set -euo pipefail
out=${1:?usage: run_when_quiet.sh OUT_DIR [bench args...]}
shift
max_load=${MAX_LOAD:-2.5}
max_wait=${MAX_WAIT_S:-900}
waited=0
load1() { cut -d' ' -f1 /proc/loadavg; }
while awk -v l="$(load1)" -v m="$max_load" 'BEGIN { exit !(l > m) }' && ((waited < max_wait)); do
  sleep 30
  waited=$((waited + 30))
done
mkdir -p "$out"
{
  echo "start: $(uptime) (waited ${waited}s for load <= ${max_load})"
  python -m denoiselab.bench "$@" --out "$out"
  echo "end:   $(uptime)"
} 2>&1 | tee "$out/log.txt"
