#!/usr/bin/env bash
# Issue 19's two-GPU measurements, in parts that each fit one device call (the machine stays warm between calls):
#   bash bench/multi_gpu.sh ddp     DDP training speed at global batch 64 and 256 (bench/train_speed.py on one GPU
#                                   against torchrun on two), then torchrun train.py --sync-bn and a resume under
#                                   torchrun, end to end, checked (epochs in results.csv, best.pt, get_map)
#   bash bench/multi_gpu.sh buckets one GPU at batch 64 and 32, and DDP at batch 64 with DDP's gradient buckets of
#                                   25 (default), 4 and 1 MB (bench/train_speed.py --ddp-bucket-mb)
#   bash bench/multi_gpu.sh compiled  with --compile: one GPU at batch 64 and 32, two GPUs at 64
#   bash bench/multi_gpu.sh study   the BCCD attention study (phi 0-4 x 3 seeds) on one GPU (--devices 0), then
#                                   spread over both (the default): wall times and their ratio, study.md of each
# data ${DATA:-VOCdevkit/BCCD}; outputs in ${OUT:-/tmp/multi_gpu}; logs in ${LOGS:-/tmp/multi_gpu_logs}.
# Each step has a time limit so one stuck step still leaves the others; steps.txt says how each ended.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/multi_gpu}
data=${DATA:-VOCdevkit/BCCD}
logs=${LOGS:-/tmp/multi_gpu_logs}
mkdir -p "$out" "$logs"
stamp() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$out/steps.txt"; }
torchrun=(python3 -m torch.distributed.run --standalone --nproc_per_node 2)
bccd=(--data "$data" --train-split trainval --val-split test --img 416)

ddp() {
    nvidia-smi -L > "$out/gpus.txt"; nvidia-smi topo -m >> "$out/gpus.txt" 2>&1
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())" \
        >> "$out/gpus.txt"
    speed=(bench/train_speed.py "${bccd[@]}" --cache gpu --steps 40 --warmup 15 --repeats 3)
    for batch in 64 256; do
        CUDA_VISIBLE_DEVICES=0 timeout 120 python3 "${speed[@]}" --batch $batch 2>&1 | grep "^train_speed\|Error" \
            >> "$out/ddp_speed.txt"
        stamp "train_speed 1 GPU batch $batch rc=${PIPESTATUS[0]}"
        timeout 120 "${torchrun[@]}" "${speed[@]}" --batch $batch 2>&1 | grep "^train_speed\|Error" >> "$out/ddp_speed.txt"
        stamp "train_speed 2 GPUs batch $batch rc=${PIPESTATUS[0]}"
    done
    # end to end: synchronised BatchNorm, then the run resumed under torchrun and extended
    run=(train.py "${bccd[@]}" --batch 64 --save-dir "$logs" --name syncbn --exist-ok)
    start=$EPOCHREALTIME
    timeout 150 "${torchrun[@]}" "${run[@]}" --sync-bn --epochs 20 > "$out/syncbn.txt" 2>&1
    stamp "torchrun train.py --sync-bn --epochs 20 rc=$? wall $(python3 -c "print(f'{$EPOCHREALTIME - $start:.1f}')") s"
    start=$EPOCHREALTIME
    timeout 150 "${torchrun[@]}" train.py --resume "$logs/syncbn/last.pt" --epochs 30 > "$out/resume.txt" 2>&1
    stamp "torchrun train.py --resume --epochs 30 rc=$? wall $(python3 -c "print(f'{$EPOCHREALTIME - $start:.1f}')") s"
    python3 - "$logs/syncbn" >> "$out/syncbn_check.txt" 2>&1 <<'PY'
import csv, sys, torch
from pathlib import Path
folder = Path(sys.argv[1])
rows = list(csv.DictReader(open(folder / "results.csv")))
epochs = [int(r["epoch"]) for r in rows]
last = torch.load(folder / "last.pt", map_location="cpu", weights_only=False)
print(f"results.csv epochs {epochs[0]}..{epochs[-1]} ({len(rows)} rows, unique {len(set(epochs))}); "
      f"last.pt epoch {last.get('epoch')}; best.pt {(folder / 'best.pt').is_file()}; "
      f"best val mAP50 {max((float(r['mAP50']) for r in rows if r['mAP50'] != 'nan'), default=float('nan')):.4f}")
PY
    timeout 60 python3 get_map.py --weights "$logs/syncbn/best.pt" --data "$data" --split test \
        --out "$logs/syncbn/map_test" 2>&1 | tr '\r' '\n' | grep -E "^(VOC mAP|mAP|error|Traceback)" >> "$out/syncbn_check.txt"
    stamp "get_map rc=${PIPESTATUS[0]}"
    # the default two-GPU BCCD run (no --sync-bn: CUDA graphs on), its wall against bench/bccd_run.sh on one GPU
    start=$EPOCHREALTIME
    timeout 150 "${torchrun[@]}" train.py "${bccd[@]}" --batch 64 --epochs 100 --save-dir "$logs" --name ddp100 \
        --exist-ok > "$out/ddp100.txt" 2>&1
    stamp "torchrun train.py --epochs 100 rc=$? wall $(python3 -c "print(f'{$EPOCHREALTIME - $start:.1f}')") s"
    start=$EPOCHREALTIME
    CUDA_VISIBLE_DEVICES=0 timeout 150 python3 train.py "${bccd[@]}" --batch 64 --epochs 100 --save-dir "$logs" \
        --name one100 --exist-ok > "$out/one100.txt" 2>&1
    stamp "one-GPU train.py --epochs 100 rc=$? wall $(python3 -c "print(f'{$EPOCHREALTIME - $start:.1f}')") s"
}

buckets() {   # where DDP's step time goes at 32 images per GPU: one GPU at batch 32, DDP's gradient bucket sizes
    speed=(bench/train_speed.py "${bccd[@]}" --cache gpu --steps 40 --warmup 15 --repeats 3)
    for batch in 64 32; do
        CUDA_VISIBLE_DEVICES=0 timeout 120 python3 "${speed[@]}" --batch $batch 2>&1 | grep "^train_speed\|Error" \
            >> "$out/buckets.txt"
        stamp "train_speed 1 GPU batch $batch rc=${PIPESTATUS[0]}"
    done
    for mb in default 25 4 1; do
        flag=(); [ $mb != default ] && flag=(--ddp-bucket-mb $mb)
        timeout 120 "${torchrun[@]}" "${speed[@]}" --batch 64 "${flag[@]}" 2>&1 | grep "^train_speed\|Error" \
            >> "$out/buckets.txt"
        stamp "train_speed 2 GPUs batch 64 bucket $mb rc=${PIPESTATUS[0]}"
    done
}

compiled() {   # the same at --compile (inductor): one GPU at batch 64 and 32, two GPUs at 64
    speed=(bench/train_speed.py "${bccd[@]}" --cache gpu --steps 40 --warmup 15 --repeats 3 --compile)
    for batch in 64 32; do
        CUDA_VISIBLE_DEVICES=0 timeout 200 python3 "${speed[@]}" --batch $batch 2>&1 | grep "^train_speed\|Error" \
            >> "$out/compiled.txt"
        stamp "train_speed --compile 1 GPU batch $batch rc=${PIPESTATUS[0]}"
    done
    timeout 240 "${torchrun[@]}" "${speed[@]}" --batch 64 2>&1 | grep "^train_speed\|Error" >> "$out/compiled.txt"
    stamp "train_speed --compile 2 GPUs batch 64 rc=${PIPESTATUS[0]}"
}

study() {
    common=(--data "$data" --phi 0,1,2,3,4 --seeds 3 --epochs 100 --img 416 --batch 64 --cache gpu --save-dir "$logs")
    for how in one two; do
        devices=(); [ $how = one ] && devices=(--devices 0)
        rm -rf "${logs:?}/study_$how"
        start=$EPOCHREALTIME
        timeout 280 python3 study.py "${common[@]}" --name "study_$how" "${devices[@]}" > "$out/study_$how.txt" 2>&1
        stamp "study on $how GPU(s) rc=$? wall $(python3 -c "print(f'{$EPOCHREALTIME - $start:.1f}')") s"
        python3 -c "import json; s = json.load(open('$logs/study_$how/study.json')); print('$how', s['concurrency'], 'runs_wall_seconds (training and test evaluations)', s['runs_wall_seconds'], 'analysis', s.get('analysis_seconds'))" \
            >> "$out/study_summary.txt" 2>&1
    done
}

for part in "$@"; do "$part"; done
