#!/usr/bin/env bash
# Transfer from a backbone trained here: YOLOv4-tiny trained on BCCD, its backbone loaded for raccoon
# (--backbone-weights), against raccoon from scratch; same epochs, seeds given (default 0 1 2).
# usage: bench/transfer.sh [SEEDS...]; data in VOCdevkit/BCCD and VOCdevkit/raccoon; logs in ${LOGS:-/tmp/logs}
set -euo pipefail
seeds=${*:-0 1 2}
logs=${LOGS:-/tmp/logs}
here=$(cd "$(dirname "$0")" && pwd)
LOGS=$logs bash "$here/bccd_run.sh" bccd_source --cache gpu --seed 0 | grep RESULT
for seed in $seeds; do
    DATA=VOCdevkit/raccoon LOGS=$logs bash "$here/bccd_run.sh" "raccoon_scratch_s$seed" --cache gpu --seed "$seed" \
        | grep RESULT
    DATA=VOCdevkit/raccoon LOGS=$logs bash "$here/bccd_run.sh" "raccoon_transfer_s$seed" --cache gpu --seed "$seed" \
        --backbone-weights "$logs/bccd_source/best.pt" | grep RESULT
done
