"""Evaluate a checkpoint: VOC mAP@0.5, COCO mAP@[.5:.95] and mAP@0.5, per-class AP, P/R/F1.

  python get_map.py --weights logs/<run>/best.pt [--data DIR] [--split test] [--out map_out]

Model, classes and input size (unless --img) come from the checkpoint (or an exported .onnx file's metadata). Writes detections.json (COCO results),
ground_truth.json (COCO) and summary.json into --out, so anyone can recompute the numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from utils.engine.checkpoint import load_checkpoint
from utils.engine.onnx_runtime import is_onnx, onnx_checkpoint_view
from utils.cli import add_plugin_flag, detect_config, print_config, run_cli
from nets.attention import load_plugin
from utils.config import EVAL_DETECTION, MAX_INPUT_SIZE, DataConfig, DetectConfig
from utils.settings import add_flags, check_ranges, from_flat, setting
from utils.engine.folders import prepare_out, write_text
from utils.data.dataset import LoadReport
from utils.data.formats import open_data
from utils.engine.evaluate import Evaluator
from utils.ops.metrics import format_table
from yolo import YOLO


@dataclass
class EvalSettings:
    """Evaluation: input size, score for P/R/F1, batch and decoding threads, with their valid ranges."""

    img: int | None = setting(None, "input size, a multiple of 32", type=int, low=32, high=MAX_INPUT_SIZE, multiple=32,
                              shown="the checkpoint's", metavar="SIZE")
    score_threshold: float = setting(0.5, "score for precision/recall/F1", low=0.0, high=1.0)
    batch: int = setting(32, "images per forward pass", low=1)
    workers: int = setting(4, "image-decoding threads", low=0)
    margin: float = setting(0.0, "gray margin kept around each image, in strides (32 px): the input grows to "
                                 "hold it; 0.5 is what ultralytics' val.py feeds (a 4:3 image at 416 on "
                                 "448x352) and scores edge objects higher", low=0.0, high=4.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="checkpoint written by train.py (best.pt / last.pt) or an "
                                                    "exported .onnx")
    p.add_argument("--data", help="VOC folder, YOLO data.yaml, COCO json or folder, or 'sample' (default: the data "
                                  "the run trained on)")
    p.add_argument("--split", default="test", help="split to evaluate: train, val, test or the data's own name "
                                                   "(default test, else val)")
    p.add_argument("--out", default="map_out", help="folder for detections.json, ground_truth.json, summary.json")
    add_flags(p, DetectConfig, defaults=EVAL_DETECTION)
    add_plugin_flag(p)
    add_flags(p, EvalSettings)
    p.add_argument("--device", help="cuda, cuda:N or cpu (default cuda when present)")
    p.add_argument("--half", action=argparse.BooleanOptionalAction, help="fp16 on CUDA (default on with CUDA)")
    args = p.parse_args(argv)
    args.detect = detect_config(args, EVAL_DETECTION)
    settings = from_flat(EvalSettings, vars(args))
    check_ranges(settings)          # before the checkpoint is read or any folder made
    vars(args).update(dataclasses.asdict(settings))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    for plugin in args.plugin:
        load_plugin(plugin)
    detect = args.detect
    ckpt = onnx_checkpoint_view(args.weights) if is_onnx(args.weights) else load_checkpoint(args.weights)
    data = args.data or (ckpt.get("train_args") or {}).get("data") or DataConfig().data
    source = open_data(data)
    class_names = ckpt["config"]["class_names"]
    report = LoadReport()
    records, _ = source.load(args.split, class_names, fallback="val" if args.split == "test" else None,
                             report=report)
    split = report.split                 # the split actually read (test falls back to val, with a warning)
    yolo = YOLO(args.weights, device=args.device, conf=detect.conf, nms_iou=detect.nms_iou, half=args.half,
                multi_label=detect.multi_label, img=args.img, margin=args.margin)
    out = prepare_out(Path(args.out))     # a bad --out fails now, not after the whole evaluation
    print_config("get_map.py", {"weights": args.weights, "model": ckpt["config"]["model"],
                                "attention": ckpt["config"]["attention"], "data": source.path,
                                "format": source.describe(), "split": split,
                                "images": len(records), "classes": ", ".join(class_names),
                                "input": "x".join(map(str, yolo.input_shape))
                                         + (f" + a margin of {args.margin:g} strides" if args.margin else ""),
                                "device": yolo.runtime,
                                "conf": detect.conf, "nms_iou": detect.nms_iou, "multi_label": detect.multi_label})
    evaluator = Evaluator(records, class_names, batch_size=args.batch, workers=args.workers)
    summary, coco_gt, coco_dets = evaluator.full(yolo, args.score_threshold)
    summary.update(weights=str(args.weights), data=str(source.path), format=source.format, split=split,
                   conf=detect.conf, nms_iou=detect.nms_iou, multi_label=detect.multi_label, margin=args.margin)
    write_text(out / "detections.json", json.dumps(coco_dets))
    write_text(out / "ground_truth.json", json.dumps(coco_gt))
    write_text(out / "summary.json", json.dumps(summary, indent=2))
    print(format_table(summary, class_names))
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"VOC mAP@0.5 {fmt(summary['map50_voc'])}  COCO mAP@0.5 {fmt(summary['map50'])}  "
          f"COCO mAP@[.5:.95] {fmt(summary['map50_95'])}  -> {out}/summary.json")
    return summary


if __name__ == "__main__":
    run_cli(main)
