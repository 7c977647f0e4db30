"""Detect objects in images, folders, globs, videos and webcams; measure speed; show where the model looks.

  python predict.py --weights logs/<run>/best.pt --source img.jpg | folder/ | 'imgs/*.png' | video.mp4 | 0
  python predict.py --weights best.pt --source img.jpg --mode fps
  python predict.py --weights best.pt --source folder/ --mode heatmap                     # objectness
  python predict.py --weights best.pt --source img.jpg --mode heatmap --cam grad --cam-layer feat2 [--cam-per-box]
  python predict.py --weights best.pt --source img.jpg --mode attention                   # each block's own maps
  python predict.py --weights best.pt --mode export_onnx [--out best.onnx] [--dynamic] [--half] [--simplify] [--nms]
  python predict.py --weights best.onnx --source img.jpg          (ONNX Runtime; every mode takes an .onnx)

Model, classes and input size come from the checkpoint (or the .onnx file's metadata). On CUDA, folders of
JPEGs are decoded, letterboxed, drawn and encoded on the GPU in batches while the next batch is read (--decode);
results are written by background threads.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from nets.attention import load_plugin
from utils.cli import add_plugin_flag, detect_config, print_config, run_cli
from utils.engine.explain import (CAM_METHODS, attention_picture, cam_picture, check_has_attention, default_layer,
                                  resolve_layer, torch_model)
from utils.engine.folders import OutputError, inside, numbered_dir, prepare_out
from utils.config import MAX_INPUT_SIZE, DetectConfig
from utils.settings import add_flags, check_ranges, from_flat, setting
from utils.data.dataset import ImageReadError, load_image
from utils.engine.predict_io import UniqueStems, parse_class_filter, write_image
from utils.data.sources import Source, open_video, resolve_source
from utils.engine.checkpoint import write_plain_checkpoint
from utils.engine.export import DEFAULT_OPSET, MIN_OPSET, export_onnx
from utils.engine.predict_pipeline import Outputs, decode_mode, predict_images, predict_video
from yolo import YOLO

EXPORT_MODE = "export_onnx"
PLAIN_MODE = "export_pt"      # a plain checkpoint of ours, e.g. from an official YOLOv5 .pt


@dataclass
class PredictSettings:
    """Prediction run: input size, batch and timing, with their valid ranges."""

    img: int | None = setting(None, "input size, a multiple of 32", type=int, low=32, high=MAX_INPUT_SIZE, multiple=32,
                              shown="the checkpoint's", metavar="SIZE")
    batch: int = setting(16, "images (or video frames) per forward pass for folders and video files", low=1)
    fps_iters: int = setting(100, "timed iterations in fps mode", low=1)
    cam: str | None = setting(None, "heatmap mode: a class-activation map instead of objectness: eigen (EigenCAM), "
                                    "grad (Grad-CAM) or layer (LayerCAM)", type=str, choices=CAM_METHODS,
                              shown="none: objectness")
    cam_layer: str | None = setting(None, "layer of --cam: an attention point (feat1, feat2, upsample; p3, p4, p5, "
                                          "up5, up4), POINT:in for the map entering its block, or a submodule name",
                                    type=str, shown="the coarsest point, feat2 or p5", metavar="LAYER")
    cam_per_box: bool = setting(False, "--cam per detected box: each box's score is the target and the map is "
                                       "renormalised inside each box")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="checkpoint written by train.py, or an exported .onnx")
    p.add_argument("--source", help="image, folder, glob, video file or webcam index (0); all modes but export_onnx")
    p.add_argument("--mode", default="predict", choices=("predict", "fps", "heatmap", "attention", EXPORT_MODE,
                                                           PLAIN_MODE),
                   help="predict (default), fps (timing on the first image), heatmap (objectness, or --cam), "
                        "attention (each attention block's own maps), export_onnx (write an .onnx file), "
                        "export_pt (a plain weights_only checkpoint, e.g. of an official YOLOv5 .pt)")
    add_flags(p, DetectConfig)
    add_plugin_flag(p)
    add_flags(p, PredictSettings)
    p.add_argument("--device", help="cuda, cuda:N or cpu (default cuda when present)")
    p.add_argument("--half", action=argparse.BooleanOptionalAction,
                   help="fp16 on CUDA (default on with CUDA); with export_onnx: fp16 weights in the file")
    p.add_argument("--out", help="output folder (default a new img_out/exp<N>); with export_onnx: the .onnx file "
                                 "(default the weights' name with .onnx)")
    p.add_argument("--save-txt", action="store_true", help="YOLO-format labels (class cx cy w h, normalised) per image")
    p.add_argument("--save-conf", action="store_true", help="with --save-txt: the score as a sixth column")
    p.add_argument("--save-json", action="store_true", help="all detections in predictions.json")
    p.add_argument("--crop", action="store_true", help="cut-outs of each detection under crops/<class>/")
    p.add_argument("--count", action="store_true", help="print the number of objects per class")
    p.add_argument("--classes", help="keep only these classes: names or indices, comma-separated")
    p.add_argument("--show", action="store_true", help="show results in a window (where a display exists)")
    p.add_argument("--save-images", action=argparse.BooleanOptionalAction, default=True,
                   help="the images with boxes drawn (default on; --no-save-images keeps only --save-txt/--save-json/"
                        "--crop/--count results)")
    p.add_argument("--decode", default="auto", choices=("auto", "opencv", "device"),
                   help="how image folders are decoded: opencv (host threads), device (JPEGs in batches with "
                        "torchvision's decode_jpeg on the model's device, nvJPEG on CUDA, and letterboxed there; "
                        "other files by OpenCV; saved images drawn and encoded there too); auto = device on CUDA "
                        "for more than one batch, else opencv")
    add_export_flags(p)
    args = p.parse_args(argv)
    check_export_flags(args)
    if args.save_conf and not args.save_txt:
        raise ValueError("--save-conf adds the score to the --save-txt labels; pass --save-txt too")
    args.detect = detect_config(args)
    settings = from_flat(PredictSettings, vars(args))
    check_ranges(settings)          # before the checkpoint is read or any folder made
    check_cam_flags(settings, args.mode)
    vars(args).update(dataclasses.asdict(settings))
    return args


def add_export_flags(p: argparse.ArgumentParser) -> None:
    """Flags of --mode export_onnx."""
    group = p.add_argument_group("ONNX export (--mode export_onnx)")
    group.add_argument("--dynamic", action="store_true", help="dynamic batch and input size")
    group.add_argument("--simplify", action="store_true", help="simplify the graph with onnxslim or onnxsim")
    group.add_argument("--nms", action="store_true", help="decode and NMS inside the graph: the output is the final "
                                                          "boxes [K,7] (image, x1, y1, x2, y2, score, class)")
    group.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")


def check_export_flags(args: argparse.Namespace) -> None:
    """--source for every mode but export_onnx; export flags only with it (ValueError, a one-line CLI error)."""
    if args.mode == EXPORT_MODE:
        if args.opset < MIN_OPSET:
            raise ValueError(f"--opset {args.opset}: must be at least {MIN_OPSET}")
        return
    if not args.source and args.mode != PLAIN_MODE:
        raise ValueError(f"--source is required for --mode {args.mode}")
    given = [f for f in ("dynamic", "simplify", "nms") if getattr(args, f)] + (["opset"] if args.opset != DEFAULT_OPSET
                                                                               else [])
    if given:
        raise ValueError(f"--{given[0]} applies to --mode {EXPORT_MODE} only")


def run_export(args: argparse.Namespace) -> Path:
    """Write the .onnx file and say what it holds."""
    out = export_onnx(args.weights, args.out, img=args.img, dynamic=args.dynamic, half=bool(args.half),
                      simplify=args.simplify, nms=args.nms, opset=args.opset)
    parts = [f"opset {args.opset}", "fp16" if args.half else "fp32", "dynamic batch and size" if args.dynamic else
             "static shape", "decode + NMS in the graph" if args.nms else "raw outputs"]
    print(f"{args.weights} -> {out} ({', '.join(parts)}, {out.stat().st_size / 1e6:.1f} MB)")
    return out


def check_cam_flags(settings: PredictSettings, mode: str) -> None:
    """--cam needs --mode heatmap; --cam-layer and --cam-per-box need --cam."""
    if settings.cam and mode != "heatmap":
        raise ValueError(f"--cam draws in --mode heatmap, not --mode {mode}")
    for flag, given in (("--cam-layer", settings.cam_layer is not None), ("--cam-per-box", settings.cam_per_box)):
        if given and not settings.cam:
            raise ValueError(f"{flag} needs --cam eigen|grad|layer")


def run_fps(yolo: YOLO, source: Source, iterations: int) -> None:
    r = yolo.measure_fps(source.paths[0], iterations)
    print(f"{yolo.config['model']} {yolo.config['attention']} at {yolo.input_shape[1]}x{yolo.input_shape[0]}, "
          f"batch 1, {yolo.runtime}{' fp16' if yolo.half else ''}: model {r['model_ms']:.2f} ms ({r['model_fps']:.1f} FPS), "
          f"end to end {r['e2e_ms']:.2f} ms ({r['e2e_fps']:.1f} FPS)")


def run_pictures(source: Source, out: Path, suffix: str, draw) -> None:
    """One picture `draw(image)` per image as <stem>_<suffix>.jpg; unreadable images are skipped and counted
    (a single one is an error)."""
    stems, skipped = UniqueStems(), []
    for path in tqdm(source.paths, desc=suffix, disable=len(source.paths) == 1, file=sys.stdout):
        try:
            image = load_image(path)
        except ImageReadError:
            if len(source.paths) == 1:
                raise
            skipped.append(path)
            continue
        write_image(inside(out, f"{stems(path.name)}_{suffix}.jpg"), draw(image))
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable images (first: {skipped[0]})", file=sys.stderr)
    print(f"{len(source.paths) - len(skipped)} {suffix} images -> {out}")


def picture_mode(args: argparse.Namespace, yolo: YOLO, wanted: set[int] | None) -> tuple[str, object, str] | None:
    """(file suffix, image -> picture, what it draws) of heatmap and attention modes, checked before any folder
    is made."""
    if args.mode == "attention":
        check_has_attention(yolo)
        return "attention", lambda image: attention_picture(yolo, image), "attention maps"
    if args.mode != "heatmap":
        return None
    if not args.cam:
        return "heatmap", yolo.heatmap, "objectness heatmap"
    layer = args.cam_layer or default_layer(torch_model(yolo, "--cam"), yolo.input_shape[0])
    resolve_layer(torch_model(yolo, "--cam"), layer)
    what = f"{args.cam}cam at {layer}{', per box' if args.cam_per_box else ''}"
    return f"{args.cam}cam", lambda image: cam_picture(yolo, image, args.cam, layer, args.cam_per_box, wanted), what


def check_mode(mode: str, source: Source) -> None:
    """fps, heatmap and attention modes read images, not streams."""
    if mode == "fps" and source.kind != "images":
        raise ValueError("--mode fps needs an image --source")
    if mode in ("heatmap", "attention") and source.kind != "images":
        raise ValueError(f"--mode {mode} needs image --source (a file, folder or glob)")


def main(argv: list[str] | None = None) -> Path | None:
    args = parse_args(argv)
    source = resolve_source(args.source) if args.mode not in (EXPORT_MODE, PLAIN_MODE) else None
    if source is not None:
        check_mode(args.mode, source)
    for plugin in args.plugin:
        load_plugin(plugin)
    if args.mode == EXPORT_MODE:
        return run_export(args)
    if args.mode == PLAIN_MODE:
        out = write_plain_checkpoint(args.weights, args.out)
        print(f"{args.weights} -> {out} (model weights and config; torch.load(weights_only=True) reads it)")
        return out
    detect = args.detect
    yolo = YOLO(args.weights, device=args.device, conf=detect.conf, nms_iou=detect.nms_iou, half=args.half,
                img=args.img, multi_label=detect.multi_label)
    if args.mode == "fps":
        run_fps(yolo, source, args.fps_iters)
        return None
    # inputs are checked before the output folder exists: a failed run leaves nothing behind
    wanted = parse_class_filter(args.classes, yolo.class_names)
    decode = decode_mode(args.decode, yolo, len(source.paths) if source.kind == "images" else 0, args.batch)
    pictures = picture_mode(args, yolo, wanted)
    cap = open_video(source) if source.kind != "images" else None
    if source.kind == "images" and len(source.paths) == 1:
        load_image(source.paths[0])     # a single unreadable image is an error, not a skipped file
    try:
        out = prepare_out(Path(args.out) if args.out else numbered_dir(Path("img_out") / "exp"))
    except OutputError:
        if cap is not None:
            cap.release()
        raise
    outputs = None if pictures else Outputs(args, yolo, out, wanted,
                                            device_images=source.kind == "images" and decode == "device")
    decode_shown = decode + (", drawn and encoded there too" if outputs and outputs.draws_on_device else "")
    print_config("predict.py", {"weights": args.weights, "model": yolo.config["model"],
                                "attention": yolo.config["attention"], "source": args.source,
                                "mode": f"{args.mode} ({pictures[2]})" if pictures else args.mode,
                                "input": "x".join(map(str, yolo.input_shape)), "device": yolo.runtime,
                                "conf": detect.conf, "nms_iou": detect.nms_iou,
                                **({"decode": decode_shown} if source.kind == "images" else {}), "out": out})
    if pictures:
        run_pictures(source, out, *pictures[:2])
        return out
    if source.kind == "images":
        predict_images(yolo, source, outputs, args.batch, decode)
    else:
        predict_video(yolo, source, cap, outputs, args.batch)
        outputs.finish()
    return out


if __name__ == "__main__":
    run_cli(main)
