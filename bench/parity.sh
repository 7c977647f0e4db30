#!/usr/bin/env bash
# Issue 17's comparison in one call: our YOLOv5 models and the peer's (ultralytics YOLOv5 v7.0) trained over the
# same seeds at the same time on one machine, every best.pt scored by both evaluators (our get_map.py and the
# peer's val.py), then one table (bench/parity_table.py). Trainval -> test, from scratch, best.pt chosen on test
# by each detector's own per-epoch evaluation, as in every peer comparison of bench/RESULTS.md.
#
# usage: bash bench/parity.sh DATA MODEL...     e.g. bash bench/parity.sh VOCdevkit/BCCD yolov5n
#        (from the project root, after ../shared/peers/setup.sh; python3 with the project's packages and
#        pycocotools; on the device)
# env:   SEEDS ("0 1 2")  EPOCHS (100)  IMG (416)  BATCH (64)  LOGS (/tmp/parity/<data folder name>)
#        PEER_WORKERS (5 data workers per peer training)  MARGIN_EVAL (1: also our get_map.py --margin 0.5)  OUT (if set: the table and both scripts' logs go there)
set -uo pipefail
data=${1:?give the VOC data folder, e.g. VOCdevkit/BCCD}
shift
models=("$@")
(( ${#models[@]} )) || { echo "error: give one or more models: yolov5n yolov5s"; exit 1; }
declare -A variant=([yolov5n]=v5n-new [yolov5s]=v5s)
for m in "${models[@]}"; do [ -n "${variant[$m]+x}" ] || { echo "error: unknown model $m (yolov5n, yolov5s)"; exit 1; }; done
seeds=${SEEDS:-0 1 2}
logs=${LOGS:-/tmp/parity/$(basename "$data")}
mkdir -p "$logs"
logs=$(cd "$logs" && pwd)
ours_variants=$(for m in "${models[@]}"; do printf '%s ' "${variant[$m]}"; done)
n_ours=$(( ${#models[@]} * $(wc -w <<< "$seeds") ))

[ -d .peers/yolov5 ] || { echo "error: no .peers/yolov5 (run ../shared/peers/setup.sh first)"; exit 1; }
export PEER_DATA=$logs/peerdata     # converted once here: the scripts below would each write it at the same time
python3 .peers/voc2yolo.py "$data" "$PEER_DATA" > /dev/null || { echo "error: voc2yolo failed on $data"; exit 1; }

start=$SECONDS
# the peer trains on the CPU's augmentation (its workers), ours on the GPU's: both at once keep the machine busy
for m in "${models[@]}"; do
    MARGIN_EVAL=${MARGIN_EVAL:-1} RUNS=$logs/peer WORKERS=${PEER_WORKERS:-5} SEEDS=$seeds bash bench/peer_seeds.sh "$m" "$data" > "$logs/peer_$m.txt" 2>&1 &
done
OUT= MARGIN_EVAL=${MARGIN_EVAL:-1} DATA=$data LOGS=$logs/ours JOBS=$n_ours BUDGET_S=100000 PEER_EVAL=1 SEEDS=$seeds VARIANTS=$ours_variants \
    bash bench/accuracy_ab.sh > "$logs/ours.txt" 2>&1
echo "parity: ours done at $((SECONDS - start)) s"
wait
echo "parity: peer done at $((SECONDS - start)) s"
grep -hE "^(PEER|FAILED|peer_seeds:|error)" "$logs"/peer_*.txt
grep -hE "^(RESULT|FAILED|accuracy_ab:|error)" "$logs/ours.txt"
python3 bench/parity_table.py --ours "$logs/ours" --peer "$logs/peer" --models "${models[@]}" | tee "$logs/parity_table.md"
if [ -n "${OUT:-}" ]; then
    cp "$logs/parity_table.md" "$OUT/parity_$(basename "$data").md"
    (cd "$logs" && tar czf "$OUT/parity_$(basename "$data")_logs.tgz" --exclude='*.pt' --exclude='peer_val' \
        --exclude='*.jpg' --exclude='*.png' ./*.txt ours/*/s*/ peer/*.log peer/*_s*/results.csv \
        peer/*_s*/map_ours*/summary.json peer/*_s*/peer_eval.json 2>/dev/null)
fi
exit 0
