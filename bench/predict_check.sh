#!/usr/bin/env bash
# One GPU call's worth of predict.py checks (issue 18), in the order a session needs them: a BCCD model trained
# (bench/bccd_run.sh: its wall and test mAP), the whole test suite, folder prediction from tmpfs and from the disk
# (bench/predict_speed.py: not saving, saving drawn images, labels + JSON), and the video loop frame by frame
# against batches (bench/video_speed.py). Each step has a time limit, so one slow step still leaves the others.
# usage: bash bench/predict_check.sh; data ${DATA:-VOCdevkit/BCCD}; outputs in ${OUT:-/tmp/predict_check};
# SUITE=0 skips the test suite (~3 minutes on an H200); COUNT (3000 files) and FRAMES (1500) size the runs
set -uo pipefail
out=${OUT:-/tmp/predict_check}
data=${DATA:-VOCdevkit/BCCD}
logs=${LOGS:-/tmp/logs}
mkdir -p "$out"
weights=$logs/check/best.pt
stamp() { echo "$(date -u +%H:%M:%S) $*" >> "$out/steps.txt"; }
stamp start
[ -f "$weights" ] || LOGS=$logs DATA=$data timeout 120 bash bench/bccd_run.sh check > "$out/bccd.txt" 2>&1
stamp "bccd_run rc=$?"
if [ "${SUITE:-1}" != 0 ]; then
    timeout 300 python3 -m pytest -x -q tests -p no:cacheprovider > "$out/suite.txt" 2>&1
    stamp "suite rc=$?"
fi
speed=(python3 bench/predict_speed.py --weights "$weights" --images "$data/JPEGImages" --decodes device
       --count "${COUNT:-3000}" --passes 3)
timeout 150 "${speed[@]}" --tmp /dev/shm 2>&1 | grep -v "predict:\|images, " > "$out/predict_tmpfs.txt"
stamp "predict_speed tmpfs rc=${PIPESTATUS[0]}"
timeout 150 "${speed[@]}" 2>&1 | grep -v "predict:\|images, " > "$out/predict_disk.txt"
stamp "predict_speed disk rc=${PIPESTATUS[0]}"
timeout 150 python3 bench/video_speed.py --weights "$weights" --images "$data/JPEGImages" --frames "${FRAMES:-1500}" \
    --passes 3 --tmp /dev/shm 2>&1 | grep -v "frames in\|clip:\|warm:" > "$out/video.txt"
stamp "video_speed rc=${PIPESTATUS[0]}"
