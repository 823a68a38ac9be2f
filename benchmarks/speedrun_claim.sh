#!/usr/bin/env bash
# speedrun claim: quickstart_hard (baseline) then speedrun, one at a time, 1 thread, nice 10;
# wall + CPU time of each training command and of each 512-sample evaluation, load around each.
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
out=runs/claim
mkdir -p $out
for name in quickstart_hard speedrun; do
  echo "== $name train start $(date -u +%T) $(uptime)" >> $out/log.txt
  /usr/bin/time -f "$name train: %e s wall, %U s user, %S s sys" -a -o $out/times.txt \
    nice -n 10 denoiselab train $name --out $out/$name > $out/$name.train.log 2>&1
  echo "== $name train end $(date -u +%T) $(uptime)" >> $out/log.txt
done
for name in quickstart_hard speedrun; do
  echo "== $name eval start $(date -u +%T) $(uptime)" >> $out/log.txt
  /usr/bin/time -f "$name eval: %e s wall, %U s user, %S s sys" -a -o $out/times.txt \
    nice -n 10 denoiselab eval $out/$name --num 512 --metrics acc_probe,fd_probe --out $out/$name/eval512 > $out/$name.eval.log 2>&1
  echo "== $name eval end $(date -u +%T) $(uptime)" >> $out/log.txt
done
echo done >> $out/log.txt
