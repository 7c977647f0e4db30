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
#        EPOCHS (100)  IMG (416)  BATCH (64)  OUT (if set, the table and one archive of every run's logs and results.csv
#        are written there)
#        EVAL_PERIOD (1: every epoch is evaluated and can become best.pt, as the peer's train.py does;
#        auto: train.py's default schedule, every 10 epochs and every epoch of the last 30 percent)
#        OLD_EVAL (0; 1 adds the protocol before issue 17: NMS 0.5, best class only)
#        MARGIN_EVAL (0; 1 adds get_map.py --margin 0.5, the input of the peer's val.py, into map_margin/)
#        MPS (auto: CUDA MPS when JOBS > 1 and nvidia-cuda-mps-control exists, so the runs' kernels share the GPU)
#        PEER_EVAL (0; 1: every YOLOv5 best.pt is also scored by the peer's own val.py, through
#        bench/to_ultralytics.py, so the evaluators can be told apart from the models; needs .peers/ from
#        ../shared/peers/setup.sh; PEER_DATA names data .peers/voc2yolo.py already converted)
# Runs start seed by seed, so a budget cut leaves every variant with the same seeds; skipped runs are listed.
set -uo pipefail
data=${DATA:-VOCdevkit/BCCD}
logs=${LOGS:-/tmp/accuracy_ab}
seeds=${SEEDS:-0 1 2}
parallel=${JOBS:-6}
budget=${BUDGET_S:-330}
epochs=${EPOCHS:-100}
img=${IMG:-416}
batch=${BATCH:-64}
eval_period=${EVAL_PERIOD:-1}
eval_flag=(--eval-period "$eval_period")
[ "$eval_period" = auto ] && eval_flag=()      # train.py's default schedule
old_eval=${OLD_EVAL:-0}
margin_eval=${MARGIN_EVAL:-0}
peer_eval=${PEER_EVAL:-0}
mkdir -p "$logs"
logs=$(cd "$logs" && pwd)
root=$(pwd)
[ -d "$data/Annotations" ] || { echo "error: no VOC data at $data (set DATA)"; exit 1; }

# YOLOv4-tiny with an IoU objectness target (ultralytics' gr = 1) keeps its own assignment and ignore rule
{ cat model_data/hyp.yolov4-tiny.yaml; echo "obj_iou_ratio: 1.0"; } > "$logs/hyp.yolov4-tiny.iouobj.yaml"
# YOLOv4-tiny with twice the box (CIoU) gain, and with negatives ignored above IoU 0.7 (the default since
# 2026-12-04) or 0.5 (the default before)
sed 's/^box: 0\.05$/box: 0.1/' model_data/hyp.yolov4-tiny.yaml > "$logs/hyp.yolov4-tiny.box2.yaml"
for t in 0.5 0.7; do
    sed -E "s/^ignore_thresh: [0-9.]+ /ignore_thresh: $t /" model_data/hyp.yolov4-tiny.yaml > "$logs/hyp.yolov4-tiny.ignore$t.yaml"
done
grep -q "^box: 0.1$" "$logs/hyp.yolov4-tiny.box2.yaml" && grep -q "^ignore_thresh: 0.5 " "$logs/hyp.yolov4-tiny.ignore0.5.yaml" \
    || { echo "error: model_data/hyp.yolov4-tiny.yaml no longer has the box / ignore_thresh lines these variants edit"; exit 1; }

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
    [v4t-fit-anchors]="--model yolov4-tiny --fitness-map50-95 0.9 --anchors auto"
    [v4t-iouobj-anchors]="--model yolov4-tiny --fitness-map50-95 0.9 --anchors auto --hyp $logs/hyp.yolov4-tiny.iouobj.yaml"
    [v4t-v5head-anchors]="--model yolov4-tiny --head yolov5 --fitness-map50-95 0.9 --anchors auto"
    [v5s-cpuaug2]="--model yolov5s --cache ram --augment cpu --workers 2"
    [v4t-box2]="--model yolov4-tiny --hyp $logs/hyp.yolov4-tiny.box2.yaml"
    [v4t-box2-fit]="--model yolov4-tiny --hyp $logs/hyp.yolov4-tiny.box2.yaml --fitness-map50-95 0.9"
    [v4t-mosaic1]="--model yolov4-tiny --special-aug-ratio 1.0"
    [v4t-ignore0.7]="--model yolov4-tiny --hyp $logs/hyp.yolov4-tiny.ignore0.7.yaml"
    [v4t-ignore0.5]="--model yolov4-tiny --hyp $logs/hyp.yolov4-tiny.ignore0.5.yaml"
    [v4t-compile]="--model yolov4-tiny --compile"
    [v4t-bf16]="--model yolov4-tiny --amp-dtype bf16"
    [v5n-bf16]="--model yolov5n --amp-dtype bf16"
)
order="v5n-old v5n-new v4t v4t-fit v4t-iouobj v4t-v5head v4t-v5head-peer v5n-mosaic0.7 v5s v5s-noamp v5s-cpuaug
       v5s-cpuaug2 v4t-fit-anchors v4t-iouobj-anchors v4t-v5head-anchors v4t-box2 v4t-box2-fit v4t-mosaic1
       v4t-ignore0.7 v4t-ignore0.5 v4t-compile v4t-bf16 v5n-bf16"
variants=${VARIANTS:-$(echo $order | cut -d' ' -f1-6)}
for v in $variants; do [ -n "${flags[$v]+x}" ] || { echo "error: unknown variant $v (known: $order)"; exit 1; }; done

one_run() {   # variant seed: train, then evaluate best.pt with both protocols; the log stays in the run folder
    local v=$1 seed=$2 dir="$logs/$1/s$2" start end
    mkdir -p "$dir"
    start=$EPOCHREALTIME
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=2 python3 train.py --data "$data" --train-split trainval --val-split test --img "$img" --batch "$batch" \
        --epochs "$epochs" --cache gpu --seed "$seed" --save-dir "$logs/$v" --name "s$seed" --exist-ok \
        ${eval_flag[@]+"${eval_flag[@]}"} ${flags[$v]} > "$dir/train.log" 2>&1
    end=$EPOCHREALTIME
    if [ ! -f "$dir/best.pt" ]; then
        echo "FAILED $v s$seed: $(tr '\r' '\n' < "$dir/train.log" | grep -E 'error|Error' | tail -1)"
        return
    fi
    OMP_NUM_THREADS=2 python3 get_map.py --weights "$dir/best.pt" --data "$data" --split test --out "$dir/map_new" \
        > "$dir/map_new.log" 2>&1
    if [ "$old_eval" = 1 ]; then
        OMP_NUM_THREADS=2 python3 get_map.py --weights "$dir/best.pt" --data "$data" --split test --out "$dir/map_old" \
            --nms-iou 0.5 --no-multi-label > "$dir/map_old.log" 2>&1
    fi
    if [ "$margin_eval" = 1 ]; then
        OMP_NUM_THREADS=2 python3 get_map.py --weights "$dir/best.pt" --data "$data" --split test \
            --out "$dir/map_margin" --margin 0.5 > "$dir/map_margin.log" 2>&1
    fi
    if [ "$peer_eval" = 1 ] && [[ "${flags[$v]}" == *yolov5[nsmlx]* ]]; then peer_score "$dir"; fi
    python3 - "$dir" "$v" "$seed" "$(python3 -c "print(round($end - $start, 1))")" <<'EOF'
import json, sys
from pathlib import Path
d, v, seed, wall = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
new = json.loads((d / "map_new/summary.json").read_text())
line = f"RESULT {v} s{seed} wall_s={wall} map50={new['map50']:.4f} map50_95={new['map50_95']:.4f}"
if (d / "map_old/summary.json").is_file():
    old = json.loads((d / "map_old/summary.json").read_text())
    line += f" old_eval_map50={old['map50']:.4f} old_eval_map50_95={old['map50_95']:.4f}"
if (d / "map_margin/summary.json").is_file():
    margin = json.loads((d / "map_margin/summary.json").read_text())
    line += f" margin_eval_map50={margin['map50']:.4f} margin_eval_map50_95={margin['map50_95']:.4f}"
if (d / "peer_eval.json").is_file():
    peer = json.loads((d / "peer_eval.json").read_text())
    line += f" peer_eval_map50={peer['map50']:.4f} peer_eval_map50_95={peer['map50_95']:.4f}"
print(line, flush=True)
EOF
}

peer_data=${PEER_DATA:-/tmp/peerdata/$(basename "$data")}
peer_score() {   # run folder: best.pt as an ultralytics file, scored on the test split by the peer's val.py
    local dir=$1
    PYTHONPATH=$root/.peers/shim${PEER_PYTHONPATH:+:$PEER_PYTHONPATH} python3 bench/to_ultralytics.py --weights "$dir/best.pt" --peer .peers/yolov5 \
        --out "$dir/best_peer.pt" > "$dir/peer_eval.log" 2>&1 || { echo "FAILED conversion $dir"; return; }
    (cd .peers/yolov5 && PYTHONPATH=$root/.peers/shim${PEER_PYTHONPATH:+:$PEER_PYTHONPATH} YOLOV5_CONFIG_DIR=$root/.peers/yolov5 \
        TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 python3 val.py --weights "$dir/best_peer.pt" --data "$peer_data/data.yaml" \
        --img "$img" --batch-size 32 --conf-thres 0.001 --iou-thres 0.6 --half --task val \
        --project "$dir/peer_val" --name run --exist-ok) >> "$dir/peer_eval.log" 2>&1
    # the peer's "all" line: images, instances, P, R, mAP50, mAP50-95
    local m50 m
    read -r m50 m < <(tr '\r' '\n' < "$dir/peer_eval.log" | awk -f "$root/bench/peer_map.awk")
    if [ -n "$m" ]; then echo "{\"map50\": $m50, \"map50_95\": $m}" > "$dir/peer_eval.json"; fi
}
if [ "$peer_eval" = 1 ]; then
    [ -d .peers/yolov5 ] || { echo "error: PEER_EVAL=1 needs .peers/ (../shared/peers/setup.sh)"; exit 1; }
    [ -n "${PEER_DATA:-}" ] || python3 .peers/voc2yolo.py "$data" "$peer_data" > /dev/null \
        || { echo "error: voc2yolo failed on $data"; exit 1; }
fi

# CUDA MPS: the runs' kernels share the GPU instead of taking turns by time slice
if [ "${MPS:-auto}" != 0 ] && [ "$parallel" -gt 1 ] && command -v nvidia-cuda-mps-control > /dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_ab/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_ab/log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    nvidia-cuda-mps-control -d && echo "accuracy_ab: CUDA MPS on" && trap 'echo quit | nvidia-cuda-mps-control' EXIT
fi

t0=$SECONDS
skipped=()
echo "accuracy_ab: variants [$variants] seeds [$seeds], $parallel at once, $epochs epochs, $img px, batch $batch, data $data, logs $logs"
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
print("| variant | n | mAP50 | mAP50-95 | mAP50 (old eval) | mAP50-95 (old eval) | mAP50 (--margin 0.5) | "
      "mAP50-95 (--margin 0.5) | mAP50 (peer's val.py) | mAP50-95 (peer's val.py) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for v in variants:
    runs = [p.parent.parent for p in sorted((logs / v).glob("s*/map_new/summary.json"))]
    def read(name):
        return [json.loads((r / name).read_text()) for r in runs if (r / name).is_file()]
    new, old, peer = read("map_new/summary.json"), read("map_old/summary.json"), read("peer_eval.json")
    margin = read("map_margin/summary.json")
    print(f"| {v} | {len(new)} | " + " | ".join(stat([s[k] for s in part]) for part in (new, old, margin, peer)
                                                for k in ("map50", "map50_95")) + " |")
EOF
if [ -n "${OUT:-}" ]; then   # two files: the device tool brings back at most eight
    cp "$logs/table.txt" "$OUT/accuracy_ab_table.txt"
    (cd "$logs" && tar czf "$OUT/accuracy_ab_runs.tgz" --exclude='*.pt' --exclude='peer_val' */s*/ 2>/dev/null)
fi
