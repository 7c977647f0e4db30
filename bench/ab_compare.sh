#!/usr/bin/env bash
# The same measurements for two trees of the project, in one call on one machine: training speed
# (bench/train_speed.py) and seeded BCCD runs (bench/bccd_run.sh) with their test mAP.
# usage: bench/ab_compare.sh OTHER_TREE [SEEDS...]   (run from this tree's root; data in VOCdevkit/BCCD)
# OTHER_TREE is a plain copy of another commit (e.g. `git archive COMMIT | tar -x -C DIR`); each tree
# trains with its own code on this tree's VOCdevkit/BCCD. Logs in ${LOGS:-/tmp/logs}.
set -euo pipefail
other=$(cd "$1" && pwd); shift
seeds=${*:-0}
here=$(pwd)
speed="--data VOCdevkit/BCCD --train-split trainval --val-split test --img 416 --cache gpu --steps 40 --warmup 15 --repeats 3 --batch 64"
for tree in "$other" "$here"; do
    label=$([ "$tree" = "$here" ] && echo this || echo other)
    mkdir -p "$tree/VOCdevkit" && [ -e "$tree/VOCdevkit/BCCD" ] || ln -s "$here/VOCdevkit/BCCD" "$tree/VOCdevkit/BCCD"
    (cd "$tree" && python3 bench/train_speed.py $speed | sed "s/^/[$label] /" | grep train_speed)
done
for seed in $seeds; do
    for tree in "$other" "$here"; do
        label=$([ "$tree" = "$here" ] && echo this || echo other)
        (cd "$tree" && LOGS=${LOGS:-/tmp/logs}/$label bash "$here/bench/bccd_run.sh" "s$seed" --cache gpu --seed "$seed" \
            | sed "s/^/[$label] /" | grep RESULT)
    done
done
