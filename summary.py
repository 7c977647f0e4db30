"""Parameters, GFLOPs (every op, and conv/matmul only) and attention points of a model.

  python summary.py --phi 4 [--model yolov5s] [--img 416] [--classes 20]
  python summary.py --all                                   # every phi 0-11
  python summary.py --attention feat1=ca,feat2=cbam:reduction=8
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from nets.attention import ATTENTION_NAMES, load_plugin
from nets.backbones import backbone_listing
from nets.yolo import build_model, complete_model_config
from utils.cli import add_plugin_flag, format_rows, run_cli, spec_text
from utils.config import ModelConfig, parse_attention_spec
from utils.settings import add_flags
from utils.ops.cost import count_parameters, model_cost


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
    add_flags(parser, ModelConfig)
    parser.add_argument("--classes", default="20", help="number of classes or a class-names file (default 20)")
    parser.add_argument("--all", action="store_true", help="table over every phi 0-11")
    add_plugin_flag(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if getattr(args, "backbone", None) == "list":
        print(backbone_listing())
        return
    for plugin in args.plugin:
        load_plugin(plugin)
    num_classes = class_count(args.classes)
    names = [f"class{i}" for i in range(num_classes)]
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(ModelConfig)}}
    if isinstance(given.get("attention_points"), str):
        given["attention_points"] = parse_attention_spec(given["attention_points"])
    spec = ModelConfig(**given, class_names=names)
    img = spec.input_shape[0]
    variants = [dataclasses.replace(spec, attention=str(phi)) for phi in range(len(ATTENTION_NAMES))] if args.all else [spec]
    base = count_parameters(build_model(complete_model_config(dataclasses.replace(spec, attention="none",
                                                                                  attention_points={}))))
    rows = []
    for variant in variants:
        config = complete_model_config(variant)
        model = build_model(config)
        cost = model_cost(model, img)
        params = cost["parameters"]
        label = config.uniform_attention() or "per point"
        phi = config.to_dict()["phi"]
        rows.append(["-" if phi is None else phi, label, f"{params:,}", f"{params - base:+,}",
                     f"{cost['gflops_matmul']:.3f}", f"{cost['gflops']:.3f}", f"{cost['attention_gflops'] * 1e3:.2f}"])
    print(f"{spec.model}, {num_classes} classes, {img}x{img} input")
    print(format_rows(rows, ["phi", "attention", "parameters", "vs phi 0", "GFLOPs conv/matmul", "GFLOPs all ops",
                             "of which attention (MFLOPs)"]))
    print("conv/matmul: what torch.utils.flop_counter counts; all ops adds pooling, elementwise gates, "
          "activations, sigmoid/softmax and normalisation (utils/ops/cost.py)")
    if not args.all:
        layout = model.attention_layout(img)
        print("\nattention points")
        print(format_rows([[p, f"{c}x{h}x{w}", spec_text(config.block_at(p))] for p, (c, h, w) in layout.items()],
                          ["point", "channels x height x width", "block"]))


if __name__ == "__main__":
    run_cli(main)
