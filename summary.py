"""Parameters and GFLOPs of a model: python summary.py --phi 4 [--model yolov5s] [--img 416] [--classes 20] [--all]."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from nets.attention import ATTENTION_NAMES
from nets.yolo import MODEL_NAMES, build_model, make_config
from utils.cli import format_rows, run_cli


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (trainable and frozen)."""
    return sum(p.numel() for p in model.parameters())


def count_gflops(model: torch.nn.Module, img: int) -> float:
    """Forward GFLOPs for one image (a multiply-add counts 2), from torch.utils.flop_counter."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, img, img))
    return counter.get_total_flops() / 1e9


def class_count(value: str) -> int:
    """--classes: a number, or a class-names file whose lines are counted."""
    if value.isdigit() and int(value) > 0:
        return int(value)
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"--classes {value!r}: give a positive number of classes or a class-names file")
    return len([line for line in path.read_text().splitlines() if line.strip()])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="yolov4-tiny", choices=MODEL_NAMES, help="detector (default yolov4-tiny)")
    parser.add_argument("--phi", default="0", help="attention: 0-11 or a name such as ca, cbam (default 0 = none)")
    parser.add_argument("--img", type=int, default=416, help="square input size, a multiple of 32 (default 416)")
    parser.add_argument("--classes", default="20", help="number of classes or a class-names file (default 20)")
    parser.add_argument("--all", action="store_true", help="table over every phi 0-11")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    num_classes = class_count(args.classes)
    phis = range(len(ATTENTION_NAMES)) if args.all else [args.phi]
    names = [f"class{i}" for i in range(num_classes)]
    base = count_parameters(build_model(make_config(args.model, 0, names, (args.img, args.img))))
    rows = []
    for phi in phis:
        config = make_config(args.model, phi, names, (args.img, args.img))
        model = build_model(config)
        params = count_parameters(model)
        rows.append([config["phi"], config["attention"], f"{params:,}", f"{params - base:+,}",
                     f"{count_gflops(model, args.img):.2f}"])
    print(f"{args.model}, {num_classes} classes, {args.img}x{args.img} input")
    print(format_rows(rows, ["phi", "attention", "parameters", "vs phi 0", "GFLOPs"]))


if __name__ == "__main__":
    run_cli(main)
