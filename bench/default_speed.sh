#!/usr/bin/env bash
# Fast by default? train.py with no speed flags against the tuned command, on BCCD (trainval -> test, 416 px,
# 100 epochs, YOLOv4-tiny phi 0, seed 0), each timed from process start to exit (per-epoch evaluation included),
# then its test mAP from get_map.py. Target: default wall within 1.3x of the tuned one.
#   default: no speed flags: --cache auto, --batch auto (the nominal 64 where it fits), the default evaluation
#            schedule (every 10 epochs and every epoch of the last 30 percent)
#   batch16: the default before --batch auto (16: gradients accumulate over 4 batches to --nbs 64)
#   tuned:   --cache gpu --batch 64
#   tuned-every-epoch (with EVERY_EPOCH=1): the tuned command evaluating after every epoch (--eval-period 1)
# usage: bash bench/default_speed.sh [extra train.py flags for all...]; data ${DATA:-VOCdevkit/BCCD}; logs ${LOGS:-/tmp/logs}
set -euo pipefail
logs=${LOGS:-/tmp/logs}
data=${DATA:-VOCdevkit/BCCD}
mkdir -p "$logs"
declare -A wall
# an untimed 1-epoch run first: on a fresh machine the first process reads the CUDA libraries from a cold disk
# cache (seconds), which would be charged to whichever run came first
python3 train.py --data "$data" --train-split trainval --val-split test --img 416 --epochs 1 --save-dir "$logs" \
    --name speed_warmup --exist-ok "$@" > "$logs/speed_warmup.log" 2>&1 || { tail -5 "$logs/speed_warmup.log"; exit 1; }
runs="default batch16 tuned"
[ "${EVERY_EPOCH:-0}" = 1 ] && runs+=" tuned-every-epoch"
for run in $runs; do
    flags=()
    [[ $run == batch16 ]] && flags=(--batch 16)
    [[ $run == tuned* ]] && flags=(--cache gpu --batch 64)
    [[ $run == tuned-every-epoch ]] && flags+=(--eval-period 1)
    start=$EPOCHREALTIME
    python3 train.py --data "$data" --train-split trainval --val-split test --img 416 --epochs 100 \
        --save-dir "$logs" --name "speed_$run" --exist-ok "${flags[@]}" "$@" > "$logs/speed_$run.log" 2>&1 \
        || { tail -5 "$logs/speed_$run.log"; exit 1; }
    end=$EPOCHREALTIME
    wall[$run]=$(python3 -c "print(f'{$end - $start:.1f}')")
    # what the defaults chose: the cache (and why) and how the step ran
    tr '\r' '\n' < "$logs/speed_$run.log" | grep -E "^(cache {2,}|batch |training step:|cached )" || true
    python3 get_map.py --weights "$logs/speed_$run/best.pt" --data "$data" --split test \
        --out "$logs/speed_$run/map_test" > /dev/null 2>&1
    python3 - "$logs/speed_$run" "$run" "${wall[$run]}" <<'EOF'
import csv, json, sys
run_dir, run, wall = sys.argv[1:]
s = json.load(open(f"{run_dir}/map_test/summary.json"))
rows = list(csv.DictReader(open(f"{run_dir}/results.csv")))
epochs_s = sum(float(r["seconds"]) for r in rows)
evaluated = sum(1 for r in rows if r["mAP50"] not in ("", "nan"))
print(f"RESULT {run} wall_s={wall} epochs_s={epochs_s:.1f} outside_epochs_s={float(wall) - epochs_s:.1f} "
      f"evaluated_epochs={evaluated} "
      f"map50={s['map50']:.4f} map50_95={s['map50_95']:.4f}")
EOF
done
python3 -c "print('RATIO default/tuned wall = %.2f (target <= 1.3)' % (${wall[default]} / ${wall[tuned]}))"
python3 -c "print('RATIO batch16/tuned wall = %.2f' % (${wall[batch16]} / ${wall[tuned]}))"
[ -n "${wall[tuned-every-epoch]:-}" ] && python3 -c "print('RATIO tuned/tuned-every-epoch wall = %.2f' % (${wall[tuned]} / ${wall[tuned-every-epoch]}))"
exit 0
