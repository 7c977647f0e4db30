#!/usr/bin/env bash
# One from-scratch run (trainval -> test, 416 px, batch 64, 100 epochs) and its get_map.
# usage: bench/bccd_run.sh NAME [extra train.py flags...]; data in ${DATA:-VOCdevkit/BCCD}; logs in ${LOGS:-/tmp/logs}
# Prints the wall time of train.py (process start to exit, per-epoch evaluation included) and the test mAP, and
# whether Python may write bytecode caches: where it may not (PYTHONDONTWRITEBYTECODE, as on the lent GPU
# machines) every process compiles torch's Python modules from source, ~3 s of each run there (bench/RESULTS.md,
# eighth session); a normal install has them compiled.
set -euo pipefail
name=$1; shift
logs=${LOGS:-/tmp/logs}
data=${DATA:-VOCdevkit/BCCD}
start=$EPOCHREALTIME
python3 train.py --data "$data" --train-split trainval --val-split test --img 416 --batch 64 --epochs 100 \
    --save-dir "$logs" --name "$name" --exist-ok "$@" 2>&1 | tr '\r' '\n' | grep -E "^(epoch [0-9]+/[0-9]+  loss|done|error|warning|cached|Traceback|  File|[A-Za-z]*Error)" | sed -n '1,3p;$p' || true
end=$EPOCHREALTIME
python3 get_map.py --weights "$logs/$name/best.pt" --data "$data" --split test --out "$logs/$name/map_test" 2>&1 \
    | tr '\r' '\n' | grep -E "^(VOC mAP|error|Traceback)" || true
python3 -c "import json; s=json.load(open('$logs/$name/map_test/summary.json')); import sys; print('RESULT $name wall_s=%.1f map50_voc=%.4f map50=%.4f map50_95=%.4f bytecode=%s' % ($end - $start, s['map50_voc'], s['map50'], s['map50_95'], 'not-written' if sys.dont_write_bytecode else 'written'))"
