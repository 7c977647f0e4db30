#!/usr/bin/env bash
# A/B of the training recipe (issue 17, bench/ACCURACY_DIFF.md): variants x seeds on BCCD from scratch
# (trainval -> test, 416 px, batch 64, 100 epochs, --cache gpu, best.pt chosen on test as bench/bccd_run.sh),
# several training processes at once on one GPU, each best.pt evaluated by get_map.py on the test split
# twice: the evaluation protocol now (NMS IoU 0.6, multi-label) and the one before (0.5, best class only).
# Prints one RESULT line per run and a table of mean +- sd (sample sd) per variant.
#
# usage: bash bench/accuracy_ab.sh                    (from the project root; python3 with the project's packages)
# env:   DATA (VOCdevkit/BCCD)  LOGS (/tmp/accuracy_ab)  SEEDS ("0 1 2")  JOBS (6 processes at once)
#        VARIANTS (names below; default the first six of `order`)
#        BUDGET_S (330: no run starts later than this; a 100-epoch run under 6-way sharing must still
#        finish inside the device call's 600 s)
#        EPOCHS (100)  IMG (416)  OUT (if set, the table and each run's results.csv are copied there)
# Runs start seed by seed, so a budget cut leaves every variant with the same seeds; skipped runs are listed.
set -uo pipefail
data=${DATA:-VOCdevkit/BCCD}
logs=${LOGS:-/tmp/accuracy_ab}
seeds=${SEEDS:-0 1 2}
parallel=${JOBS:-6}
budget=${BUDGET_S:-330}
epochs=${EPOCHS:-100}
img=${IMG:-416}
mkdir -p "$logs"
[ -d "$data/Annotations" ] || { echo "error: no VOC data at $data (set DATA)"; exit 1; }

# YOLOv4-tiny with an IoU objectness target (ultralytics' gr = 1) keeps its own assignment and ignore rule
{ cat model_data/hyp.yolov4-tiny.yaml; echo "obj_iou_ratio: 1.0"; } > "$logs/hyp.yolov4-tiny.iouobj.yaml"

# name | train.py flags. "old" = this project's recipe before issue 17; yolov5n defaults are now ultralytics'
declare -A flags=(
    [v5n-old]="--model yolov5n --lr-schedule cos --special-aug-ratio 0.7 --fitness-map50-95 0"
    [v5n-new]="--model yolov5n"
    [v5s]="--model yolov5s"
    [v5s-noamp]="--model yolov5s --no-amp"
    [v5s-cpuaug]="--model yolov5s --cache ram --augment cpu"
    [v5n-mosaic0.7]="--model yolov5n --special-aug-ratio 0.7"
    [v4t]="--model yolov4-tiny"
    [v4t-fit]="--model yolov4-tiny --fitness-map50-95 0.9"
    [v4t-iouobj]="--model yolov4-tiny --fitness-map50-95 0.9 --hyp $logs/hyp.yolov4-tiny.iouobj.yaml"
    [v4t-v5head]="--model yolov4-tiny --head yolov5 --fitness-map50-95 0.9"
    [v4t-v5head-peer]="--model yolov4-tiny --head yolov5 --fitness-map50-95 0.9 --lr-schedule linear --special-aug-ratio 1.0"
)
order="v5n-old v5n-new v4t v4t-fit v4t-iouobj v4t-v5head v4t-v5head-peer v5n-mosaic0.7 v5s v5s-noamp v5s-cpuaug"
variants=${VARIANTS:-$(echo $order | cut -d' ' -f1-6)}
for v in $variants; do [ -n "${flags[$v]+x}" ] || { echo "error: unknown variant $v (known: $order)"; exit 1; }; done

one_run() {   # variant seed: train, then evaluate best.pt with both protocols; the log stays in the run folder
    local v=$1 seed=$2 dir="$logs/$1/s$2" start end
    mkdir -p "$dir"
    start=$EPOCHREALTIME
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=2 python3 train.py --data "$data" --train-split trainval --val-split test --img "$img" --batch 64 \
        --epochs "$epochs" --cache gpu --seed "$seed" --save-dir "$logs/$v" --name "s$seed" --exist-ok ${flags[$v]} \
        > "$dir/train.log" 2>&1
    end=$EPOCHREALTIME
    if [ ! -f "$dir/best.pt" ]; then
        echo "FAILED $v s$seed: $(tr '\r' '\n' < "$dir/train.log" | grep -E 'error|Error' | tail -1)"
        return
    fi
    OMP_NUM_THREADS=2 python3 get_map.py --weights "$dir/best.pt" --data "$data" --split test --out "$dir/map_new" \
        > "$dir/map_new.log" 2>&1
    OMP_NUM_THREADS=2 python3 get_map.py --weights "$dir/best.pt" --data "$data" --split test --out "$dir/map_old" \
        --nms-iou 0.5 --no-multi-label > "$dir/map_old.log" 2>&1
    python3 - "$dir" "$v" "$seed" "$(python3 -c "print(round($end - $start, 1))")" <<'EOF'
import json, sys
from pathlib import Path
d, v, seed, wall = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
new = json.loads((d / "map_new/summary.json").read_text())
old = json.loads((d / "map_old/summary.json").read_text())
print(f"RESULT {v} s{seed} wall_s={wall} map50={new['map50']:.4f} map50_95={new['map50_95']:.4f} "
      f"old_eval_map50={old['map50']:.4f} old_eval_map50_95={old['map50_95']:.4f}", flush=True)
EOF
}

t0=$SECONDS
skipped=()
echo "accuracy_ab: variants [$variants] seeds [$seeds], $parallel at once, $epochs epochs, $img px, data $data, logs $logs"
for seed in $seeds; do
    for v in $variants; do
        if (( SECONDS - t0 > budget )); then skipped+=("$v/s$seed"); continue; fi
        while (( $(jobs -rp | wc -l) >= parallel )); do wait -n; done
        one_run "$v" "$seed" &
    done
done
wait
echo "accuracy_ab: all runs done in $((SECONDS - t0)) s"
(( ${#skipped[@]} )) && echo "accuracy_ab: not started (past BUDGET_S=$budget s): ${skipped[*]}"

python3 - "$logs" $variants <<'EOF' | tee "$logs/table.txt"
import json, statistics, sys
from pathlib import Path
logs, variants = Path(sys.argv[1]), sys.argv[2:]
def stat(values):
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.3f} +- {sd:.3f}"
print(f"| variant | n | mAP50 | mAP50-95 | mAP50 (old eval) | mAP50-95 (old eval) |")
print("|---|---|---|---|---|---|")
for v in variants:
    runs = sorted((logs / v).glob("s*/map_new/summary.json"))
    olds = [p.parent.parent / "map_old/summary.json" for p in runs]
    new = [json.loads(p.read_text()) for p in runs]
    old = [json.loads(p.read_text()) for p in olds if p.is_file()]
    print(f"| {v} | {len(new)} | {stat([s['map50'] for s in new])} | {stat([s['map50_95'] for s in new])} | "
          f"{stat([s['map50'] for s in old])} | {stat([s['map50_95'] for s in old])} |")
EOF
if [ -n "${OUT:-}" ]; then
    cp "$logs/table.txt" "$OUT/accuracy_ab_table.txt"
    for f in "$logs"/*/s*/results.csv; do
        r=${f#"$logs"/}; cp "$f" "$OUT/$(echo "${r%/results.csv}" | tr '/' '_').csv"
    done
fi
