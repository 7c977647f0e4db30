#!/usr/bin/env bash
# Where a BCCD run's time outside the epochs goes (issue 18: 100 epochs in 20 s): the default command
# (`train.py --data VOCdevkit/BCCD --train-split trainval --val-split test --img 416 --epochs ${EPOCHS:-100}`) run three
# times: an untimed 1-epoch warm-up (cold CUDA libraries), then once with every output line stamped with the
# seconds since the process started (a timeline: imports, cache, first step, last epoch, final evaluation, exit),
# then once under cProfile (the main thread's cumulative time per function; slower, so only its start-up is
# read). Outputs: $OUT/startup_timeline.txt and $OUT/startup_profile.txt.
# usage: bash bench/startup_profile.sh [extra train.py flags...]; data ${DATA:-VOCdevkit/BCCD}; logs ${LOGS:-/tmp/startup};
# PROFILE=0 skips the cProfile run
set -uo pipefail
logs=${LOGS:-/tmp/startup}
data=${DATA:-VOCdevkit/BCCD}
out=${OUT:-$logs}
mkdir -p "$logs" "$out"
flags=(--data "$data" --train-split trainval --val-split test --img 416 --save-dir "$logs" --exist-ok "$@")
python3 train.py "${flags[@]}" --epochs 1 --name warmup > "$logs/warmup.log" 2>&1 || { tail -3 "$logs/warmup.log"; exit 1; }

stamp() {   # prefix every line (tqdm's \r updates too) with the seconds since $1 (an $EPOCHREALTIME)
    python3 -u -c '
import sys, time
t0 = float(sys.argv[1])
for raw in sys.stdin.buffer:
    for part in raw.decode(errors="replace").replace("\r", "\n").splitlines():
        if part.strip():
            print(f"{time.time() - t0:7.2f}  {part}", flush=True)' "$1"
}
start=$EPOCHREALTIME
PYTHONUNBUFFERED=1 python3 train.py "${flags[@]}" --epochs ${EPOCHS:-100} --name timeline 2>&1 | stamp "$start" > "$logs/timeline.log"
end=$EPOCHREALTIME
{
    echo "wall $(python3 -c "print(f'{$end - $start:.2f}')") s; every line but the progress bars, and each epoch's first bar line:"
    awk '$2 != "epoch" {print; next} {split($3, e, "/"); if (!(e[1] in seen)) {seen[e[1]] = 1; print}}' "$logs/timeline.log"
    python3 - "$logs/timeline/results.csv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print(f"results.csv: {len(rows)} epochs, their seconds sum to {sum(float(r['seconds']) for r in rows):.2f}")
EOF
} > "$out/startup_timeline.txt"

if [ "${PROFILE:-1}" = 1 ]; then
    python3 -m cProfile -o "$logs/train.prof" train.py "${flags[@]}" --epochs ${EPOCHS:-100} --name profiled \
        > "$logs/profiled.log" 2>&1
    python3 - "$logs/train.prof" <<'EOF' > "$out/startup_profile.txt"
import pstats, sys
stats = pstats.Stats(sys.argv[1])
stats.sort_stats("cumulative").print_stats(60)
stats.sort_stats("tottime").print_stats(30)
EOF
fi
cat "$out/startup_timeline.txt"
