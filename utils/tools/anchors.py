"""Fit anchors to a dataset's boxes and write them to model_data/ (the tutorials' kmeans_for_anchors.py).

  python -m utils.tools.anchors --data DIR [--img 416] [--model yolov4-tiny] [--split train] [--out FILE]

IoU k-means, then YOLOv5-style evolution of the anchors' fitness; prints the best possible recall of the
model's default anchors and of the fitted ones. Train with them: python train.py --anchors FILE (or let
train.py fit them itself with --anchors auto).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nets.yolo import FAMILY_DEFAULTS, MODEL_DATA, read_anchors
from nets.yolo_training import load_hyp
from utils.cli import format_rows, run_cli
from utils.config import MAX_INPUT_SIZE, MODEL_NAMES
from utils.settings import add_flags, check_ranges, from_flat, setting
from utils.data.dataset import default_fallback
from utils.data.formats import open_data
from utils.engine.anchors import DEFAULT_THR, anchors_text, training_wh
from utils.engine.folders import make_dir, write_text
from utils.ops.anchors import best_possible_recall, fit_anchors, fitness, place_in_used, used_anchor_indices, wh_iou


@dataclass
class AnchorSettings:
    """Anchor fitting: input size, evolution length and seed, with their valid ranges."""

    img: int = setting(416, "input size the boxes are letterboxed to, a multiple of 32", low=32, high=MAX_INPUT_SIZE,
                       multiple=32)
    generations: int = setting(1000, "evolution steps after k-means (0 = k-means only)", low=0)
    seed: int = setting(0, "random seed of k-means and evolution", low=0, high=2**31 - 1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m utils.tools.anchors", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="VOC folder, YOLO data.yaml, COCO json or folder, or 'sample'")
    p.add_argument("--split", default="train", help="split whose boxes are fitted (default train, else trainval)")
    p.add_argument("--model", default="yolov4-tiny", choices=MODEL_NAMES,
                   help="the family sets the anchors fitted: yolov4-tiny 5 (of 6 slots: its masks never read the first), "
                        "yolov5* 9 (default yolov4-tiny)")
    p.add_argument("--out", help="anchors file to write (default model_data/<family anchors file>_fitted.txt)")
    add_flags(p, AnchorSettings)
    args = p.parse_args(argv)
    settings = from_flat(AnchorSettings, vars(args))
    check_ranges(settings)
    vars(args).update(dataclasses.asdict(settings))
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    family = "yolov4-tiny" if args.model == "yolov4-tiny" else "yolov5"
    default_file = MODEL_DATA / FAMILY_DEFAULTS[family][0]
    out = Path(args.out) if args.out else default_file.with_name(f"{default_file.stem}_fitted.txt")
    source = open_data(args.data)
    records, _ = source.load(args.split, fallback=default_fallback(args.split))
    wh = training_wh(records, [args.img, args.img])
    thr = load_hyp(args.model, None).get("anchor_t", DEFAULT_THR)
    default = np.asarray(read_anchors(default_file), np.float64)
    used = used_anchor_indices(FAMILY_DEFAULTS[family][1])     # the anchors a level reads: only they take boxes
    fitted = place_in_used(default, used, fit_anchors(wh, len(used), thr, args.seed, args.generations))
    rows = [[name, f"{best_possible_recall(wh, a[used], thr):.4f}", f"{fitness(wh, a[used], thr):.4f}",
             f"{wh_iou(wh, a[used]).max(1).mean():.4f}", anchors_text(a).strip()]
            for name, a in (("default", default), ("fitted", fitted))]
    print(f"{len(wh)} boxes of {len(records)} images ({source.describe()}, split {args.split}) at {args.img} px; "
          f"ratio rule anchor_t {thr:g}")
    print(format_rows(rows, ["anchors", "best possible recall", "fitness", "mean best IoU", "w,h (small to large)"]))
    make_dir(out.parent)
    write_text(out, anchors_text(fitted))
    print(f"wrote {out}; train with: python train.py --data {args.data} --model {args.model} --img {args.img} "
          f"--anchors {out}")
    return out


if __name__ == "__main__":
    run_cli(main)
