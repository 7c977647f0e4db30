#!/usr/bin/env bash
# The packed attention study against running its runs one after another, in one device call.
# usage: bench/study_speed.sh [extra study.py flags, e.g. --jobs 8 --mps off]
# data in ${DATA:-VOCdevkit/BCCD} (train -> best.pt on val -> table on test); logs in ${LOGS:-/tmp/study_speed}
#
# Serial is estimated from lone runs, not run: each phi's seed-0 run alone on the idle GPU, times the number
# of seeds (the seeds of one variant train the same data, epochs and shapes, so they cost the same; running
# all 15 one after another would take ~9 minutes more of device time to confirm it). The study then trains
# phi 0-4 x 3 seeds packed (its default --jobs / --mps, or the flags given) and evaluates every best.pt on test.
# Printed: each lone run's wall time and best val mAP50, the study's wall times (training phase and total),
# the ratio to the serial estimate, and whether each seed-0 run of the study reached its lone run's mAP50.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
data=${DATA:-VOCdevkit/BCCD}
logs=${LOGS:-/tmp/study_speed}
read -r -a phis <<< "${PHIS:-0 1 2 3 4}"       # PHIS, SEEDS, TRAIN: override for a quick dry run on CPU
seeds=${SEEDS:-3}
read -r -a train <<< "${TRAIN:---epochs 100 --img 416 --batch 64 --cache gpu}"
rm -rf "$logs"
mkdir -p "$logs"

best_map50() {   # the best per-epoch validation mAP50 in a run's results.csv (a fingerprint of the run)
    "$py" -c "import csv, sys; print(max(float(r['mAP50']) for r in csv.DictReader(open(sys.argv[1]))))" "$1/results.csv"
}

lone_total=0
declare -A lone_map
for phi in "${phis[@]}"; do
    start=$EPOCHREALTIME
    "$py" train.py --data "$data" --phi "$phi" --seed 0 "${train[@]}" --save-dir "$logs/lone" --name "phi$phi" \
        > "$logs/lone_phi$phi.log" 2>&1 || { echo "lone run phi $phi failed:"; tail -3 "$logs/lone_phi$phi.log"; exit 1; }
    end=$EPOCHREALTIME
    secs=$("$py" -c "print(f'{$end - $start:.1f}')")
    lone_total=$("$py" -c "print(round($lone_total + $secs, 1))")
    lone_map[$phi]=$(best_map50 "$logs/lone/phi$phi")
    echo "lone phi $phi: ${secs} s, best val mAP50 ${lone_map[$phi]}"
done
serial=$("$py" -c "print(f'{$lone_total * $seeds:.1f}')")
echo "serial estimate: ${lone_total} s x ${seeds} seeds = ${serial} s"

phi_list=$(IFS=,; echo "${phis[*]}")
start=$EPOCHREALTIME
"$py" study.py --data "$data" --phi "$phi_list" --seeds "$seeds" --save-dir "$logs" --name packed "$@" "${train[@]}" \
    > "$logs/study.log" 2>&1 || { echo "study failed:"; tail -5 "$logs/study.log"; exit 1; }
end=$EPOCHREALTIME
grep -E "runs to train|CUDA MPS|failed" "$logs/study.log" || true
"$py" - "$logs/packed/study.json" "$start" "$end" "$serial" <<'PY'
import json, sys
study, start, end, serial = json.load(open(sys.argv[1])), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
total = end - start
print(f"packed study ({study['concurrency']}): training and test evaluations {study['runs_wall_seconds']:.1f} s, total {total:.1f} s "
      "(with test evaluation, latency and bootstrap)")
print(f"ratio to serial: training and evaluations {study['runs_wall_seconds'] / serial:.3f}x, total {total / serial:.3f}x "
      f"(target <= 0.25x)")
PY
names=(none se cbam eca ca)
for phi in "${phis[@]}"; do
    packed=$(best_map50 "$logs/packed/${names[$phi]}_s0")
    same=$([ "$packed" = "${lone_map[$phi]}" ] && echo equal || echo DIFFERENT)
    echo "phi $phi seed 0: lone ${lone_map[$phi]}, in the study ${packed} ($same)"
done
sed -n '/^| variant/,/^$/p' "$logs/packed/study.md"
