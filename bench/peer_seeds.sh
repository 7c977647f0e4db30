#!/usr/bin/env bash
# The peer (ultralytics YOLOv5 v7.0) trained over several seeds at once, each best.pt scored by the peer's own
# val.py (its final "all" line) and by our get_map.py: with accuracy_ab.sh PEER_EVAL=1 (our best.pt by both
# evaluators) this separates the models from the evaluators. BCCD-style VOC data, trainval -> test.
#
# usage: bash bench/peer_seeds.sh MODEL [DATA]   (from the project root, after ../shared/peers/setup.sh; on the device)
# env:   SEEDS ("0 1 2")  EPOCHS (100)  IMG (416)  BATCH (64)  WORKERS (5 data workers per training)
#        RUNS (/tmp/peer_seeds/<data folder name>: run folders MODEL_sSEED, each with peer_eval.json (its val.py)
#        and map_ours/summary.json (our get_map.py; map_ours_margin/ with --margin 0.5 when MARGIN_EVAL=1),
#        read by bench/parity_table.py)
#        PEER_DATA (the data already converted by .peers/voc2yolo.py; default: convert it now)
#        PEER_PYTHONPATH (extra import path for the peer, e.g. a folder of its packages)
#        PEER_ARGS (more flags for the peer's train.py, e.g. "--noval": only the last epoch is validated, so its
#        best.pt is the last epoch's weights)
set -uo pipefail
model=${1:?give the peer model, e.g. yolov5n}
data=${2:-VOCdevkit/BCCD}
seeds=${SEEDS:-0 1 2}
epochs=${EPOCHS:-100}
img=${IMG:-416}
batch=${BATCH:-64}
workers=${WORKERS:-5}
root=$(pwd)
peer_data=${PEER_DATA:-/tmp/peerdata/$(basename "$data")}
runs=${RUNS:-/tmp/peer_seeds/$(basename "$data")}
mkdir -p "$runs"
[ -d .peers/yolov5 ] || { echo "error: no .peers/yolov5 (run ../shared/peers/setup.sh first)"; exit 1; }
[ -n "${PEER_DATA:-}" ] || python3 .peers/voc2yolo.py "$data" "$peer_data" > /dev/null \
    || { echo "error: voc2yolo failed on $data"; exit 1; }
peer_env=(env PYTHONPATH="$root/.peers/shim${PEER_PYTHONPATH:+:$PEER_PYTHONPATH}" YOLOV5_CONFIG_DIR="$root/.peers/yolov5"
          TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 PYTHONUNBUFFERED=1)

start=$SECONDS
for seed in $seeds; do
    # shellcheck disable=SC2086  # PEER_ARGS is a list of flags
    (cd .peers/yolov5 && "${peer_env[@]}" python3 train.py --cfg "models/$model.yaml" --weights '' \
        --data "$peer_data/data.yaml" --img "$img" --epochs "$epochs" --batch "$batch" --workers "$workers" \
        --seed "$seed" --project "$runs" --name "${model}_s$seed" --exist-ok ${PEER_ARGS:-} > "$runs/${model}_s$seed.log" 2>&1) &
done
wait
echo "peer_seeds: $model seeds [$seeds] trained in $((SECONDS - start)) s (all at once)"

for seed in $seeds; do
    dir=$runs/${model}_s$seed
    theirs=$(tr '\r' '\n' < "$runs/${model}_s$seed.log" | awk -f "$root/bench/peer_map.awk")
    if [ ! -f "$dir/weights/best.pt" ]; then
        echo "FAILED peer $model s$seed: $(tr '\r' '\n' < "$runs/${model}_s$seed.log" | grep -E 'Error|error' | tail -1)"
        continue
    fi
    python3 get_map.py --weights "$dir/weights/best.pt" --data "$data" --split test --out "$dir/map_ours" \
        > "$dir/map_ours.log" 2>&1
    if [ "${MARGIN_EVAL:-0}" = 1 ]; then
        python3 get_map.py --weights "$dir/weights/best.pt" --data "$data" --split test --out "$dir/map_ours_margin" \
            --margin 0.5 > "$dir/map_ours_margin.log" 2>&1
    fi
    python3 - "$dir" "$model" "$seed" $theirs <<'EOF'
import json, sys
run, model, seed, *theirs = sys.argv[1:]
path = f"{run}/map_ours/summary.json"
if len(theirs) == 2:
    with open(f"{run}/peer_eval.json", "w") as f:
        json.dump({"map50": float(theirs[0]), "map50_95": float(theirs[1])}, f)
try:
    ours = json.load(open(path))
    ours_text = f"our_eval_map50={ours['map50']:.4f} our_eval_map50_95={ours['map50_95']:.4f}"
except (OSError, ValueError, KeyError) as exc:
    ours_text = f"our_eval=failed ({type(exc).__name__})"
peer_text = f"peer_eval_map50={theirs[0]} peer_eval_map50_95={theirs[1]}" if len(theirs) == 2 else "peer_eval=missing"
print(f"PEER {model} s{seed} {peer_text} {ours_text}", flush=True)
EOF
done
