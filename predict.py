"""Detect objects in images, folders, globs, videos and webcams; measure speed; show where the model looks.

  python predict.py --weights logs/<run>/best.pt --source img.jpg | folder/ | 'imgs/*.png' | video.mp4 | 0
  python predict.py --weights best.pt --source img.jpg --mode fps
  python predict.py --weights best.pt --source folder/ --mode heatmap                     # objectness
  python predict.py --weights best.pt --source img.jpg --mode heatmap --cam grad --cam-layer feat2 [--cam-per-box]
  python predict.py --weights best.pt --source img.jpg --mode attention                   # each block's own maps
  python predict.py --weights best.pt --mode export_onnx [--out best.onnx] [--dynamic] [--half] [--simplify] [--nms]
  python predict.py --weights best.onnx --source img.jpg          (ONNX Runtime; every mode takes an .onnx)

Model, classes and input size come from the checkpoint (or the .onnx file's metadata). On CUDA, folders of
JPEGs are decoded and letterboxed on the GPU in batches while the next batch is read (--decode); results are
written by background threads.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from nets.attention import load_plugin
from utils.cli import add_plugin_flag, detect_config, print_config, run_cli
from utils.engine.explain import (CAM_METHODS, attention_picture, cam_picture, check_has_attention, default_layer,
                                  resolve_layer, torch_model)
from utils.engine.folders import OutputError, inside, make_dir, numbered_dir, prepare_out, safe_component, write_text
from utils.config import MAX_INPUT_SIZE, DetectConfig
from utils.settings import add_flags, check_ranges, from_flat, setting
from utils.data.dataset import ImageReadError, load_image
from utils.engine.predict_io import (BackgroundWrites, UniqueStems, class_counts, draw_fps, json_entries, keep_classes,
                                     parse_class_filter, save_crops, write_image, yolo_label_lines)
from utils.data.image_batches import DecodedBatch, ImageBatches, device_decode_available
from utils.data.sources import Source, display_available, open_video, resolve_source
from utils.engine.checkpoint import write_plain_checkpoint
from utils.engine.export import DEFAULT_OPSET, MIN_OPSET, export_onnx
from utils.ops.plots import detection_rects
from yolo import YOLO


EXPORT_MODE = "export_onnx"
PLAIN_MODE = "export_pt"      # a plain checkpoint of ours, e.g. from an official YOLOv5 .pt


@dataclass
class PredictSettings:
    """Prediction run: input size, batch and timing, with their valid ranges."""

    img: int | None = setting(None, "input size, a multiple of 32", type=int, low=32, high=MAX_INPUT_SIZE, multiple=32,
                              shown="the checkpoint's", metavar="SIZE")
    batch: int = setting(16, "images per forward pass for folders", low=1)
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
                        "other files by OpenCV); auto = device on CUDA, else opencv")
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


class Outputs:
    """Writes every product of a prediction run under one folder; images' files are written in the background."""

    def __init__(self, args: argparse.Namespace, yolo: YOLO, out: Path, wanted: set[int] | None):
        self.args, self.yolo, self.out, self.wanted = args, yolo, out, wanted
        self.stems = UniqueStems()
        self.records: list[dict] = []
        self.totals: Counter = Counter()
        self.show = args.show and display_available()
        if args.show and not self.show:
            print("note: --show: no display here; results are only saved", file=sys.stderr)
        self.needs_pixels = args.save_images or args.crop or self.show
        self.writes = BackgroundWrites(threads=0 if self.show else None)   # windows belong to the main thread

    def image(self, name: str, image: np.ndarray | None, size: tuple[int, int], detections: np.ndarray,
              wait_ms: int = 1) -> None:
        """Record one image's results (its BGR pixels needed only when `needs_pixels`; size = (h, w));
        its files are written by the background writer."""
        detections = keep_classes(detections, self.wanted)
        stem = self.stems(name)           # safe and distinct: a.jpg and a.png do not overwrite each other
        if self.args.save_json:
            self.records += json_entries(name, detections, self.yolo.class_names)
        counts = class_counts(detections, self.yolo.class_names)
        self.totals.update(counts)
        if self.args.count:
            print(f"{name}: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing"))
        self.writes.submit(self._write, stem, image if self.needs_pixels else None, size, detections, wait_ms)

    def _write(self, stem: str, image: np.ndarray | None, size: tuple[int, int], detections: np.ndarray,
               wait_ms: int) -> None:
        """The files of one image: drawing, labels, crops; with --show, the window too (main thread)."""
        if self.args.save_txt:
            labels = make_dir(inside(self.out, "labels"))
            lines = yolo_label_lines(detections, size[1], size[0], score=self.args.save_conf)
            write_text(inside(labels, f"{stem}.txt"), "".join(f"{line}\n" for line in lines))
        if image is None:
            return
        if self.args.save_images or self.show:
            drawn = self.yolo.detect_image(image, detections)
            if self.args.save_images:
                write_image(inside(self.out, f"{stem}.jpg"), drawn)
            if self.show:
                cv2.imshow("predict", drawn)
                cv2.waitKey(wait_ms)
        if self.args.crop:
            save_crops(inside(self.out, "crops"), stem, image, detections, self.yolo.class_names)

    def finish(self) -> None:
        """Wait for the background writes (raising the first failure), then write predictions.json."""
        self.writes.finish()
        if self.args.save_json:
            write_text(inside(self.out, "predictions.json"), json.dumps(self.records, indent=1))


def decode_mode(requested: str, yolo: YOLO) -> str:
    """--decode auto -> device on CUDA where torchvision can decode JPEGs, else opencv; device without it is an error."""
    if requested == "auto":
        return "device" if yolo.device.type == "cuda" and device_decode_available() else "opencv"
    if requested == "device" and not device_decode_available():
        raise ValueError("--decode device: this torchvision has no decode_jpeg; use --decode opencv")
    return requested


def predict_images(yolo: YOLO, source: Source, outputs: Outputs, batch: int, decode: str = "opencv") -> None:
    """Every image of the source, batched; unreadable ones are skipped and counted (a single one is an error)."""
    paths, skipped, found, on_host = source.paths, [], 0, 0
    single = len(paths) == 1
    made = (_device_batches(yolo, paths, batch, outputs.needs_pixels) if decode == "device" else
            _opencv_batches(yolo, paths, batch))
    try:
        for chunk, images, sizes, dets in made:
            skipped += chunk.skipped
            on_host += chunk.on_host
            for path, image, size, det in zip(chunk.paths, images, sizes, dets):
                outputs.image(path.name, image, size, det, wait_ms=0 if single else 1)
                found += len(keep_classes(det, outputs.wanted))
        outputs.finish()
    finally:
        made.close()                   # stops the reading thread at once if a write failed
        outputs.writes.close()
    if on_host:
        print(f"warning: {on_host} images were decoded by OpenCV on the host (not JPEG, or decode_jpeg refused "
              f"them)", file=sys.stderr)
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable images (first: {skipped[0]})", file=sys.stderr)
    summary = ", ".join(f"{k} {v}" for k, v in sorted(outputs.totals.items())) or "no objects"
    print(f"{len(paths) - len(skipped)} images, {found} objects ({summary}) -> {outputs.out}")


def _opencv_batches(yolo: YOLO, paths: list[Path], batch: int):
    """(chunk, BGR arrays, sizes, detections) per batch: decoded by OpenCV here, letterboxed on host threads."""
    for start in tqdm(range(0, len(paths), batch), desc="predict", disable=len(paths) <= batch, file=sys.stdout):
        chunk = DecodedBatch([], [])
        images = []
        for path in paths[start:start + batch]:
            try:
                images.append(load_image(path))
                chunk.paths.append(path)
            except ImageReadError:
                if len(paths) == 1:
                    raise
                chunk.skipped.append(path)
        yield chunk, images, [im.shape[:2] for im in images], yolo.predict(images, batch_size=batch) if images else []


def _device_batches(yolo: YOLO, paths: list[Path], batch: int, needs_pixels: bool):
    """(chunk, BGR arrays or Nones, sizes, detections) per batch: read and decoded on a background thread, on the
    model's device; the arrays are copied back there only when the outputs need pixels."""
    batches = ImageBatches(paths, batch, yolo.device, host_copies=needs_pixels)
    for chunk in tqdm(batches, total=len(batches), desc="predict", disable=len(paths) <= batch, file=sys.stdout):
        if yolo.captures(len(chunk.images)):
            with batches.lock:             # no decoding on the other thread while the graph is captured
                dets = yolo.predict_tensors(chunk.images)
        else:
            dets = yolo.predict_tensors(chunk.images)
        sizes = [tuple(im.shape[1:]) for im in chunk.images]
        yield chunk, chunk.host or [None] * len(chunk.images), sizes, dets


def open_writer(path: Path, fps: float, size: tuple[int, int]) -> cv2.VideoWriter:
    """An mp4 writer; one OpenCV cannot open (no codec, unwritable folder) is an OutputError before any frame."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        raise OutputError(path, "OpenCV could not open a video writer (no mp4v codec, full disk or unwritable folder?)")
    return writer


def predict_video(yolo: YOLO, source: Source, cap: cv2.VideoCapture, outputs: Outputs) -> None:
    """Annotated copy of a video or webcam stream: same size and frame rate, every frame, measured FPS drawn."""
    fps_in = cap.get(cv2.CAP_PROP_FPS) or 30.0
    size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    name = f"webcam{source.webcam}" if source.kind == "webcam" else safe_component(source.paths[0].stem)
    path = inside(outputs.out, f"{name}.mp4")
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if source.kind == "video" else None
    frames, fps, quit_early = 0, 0.0, False
    try:
        writer = open_writer(path, fps_in, size)
    except OutputError:
        cap.release()
        raise
    bar = tqdm(total=total, desc=name, file=sys.stdout)
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            start = time.perf_counter()
            dets = keep_classes(yolo.predict(frame)[0], outputs.wanted)
            drawn = yolo.detect_image(frame, dets)
            elapsed = time.perf_counter() - start
            fps = 1 / elapsed if not fps else 0.9 * fps + 0.1 / elapsed   # smoothed
            writer.write(draw_fps(drawn, fps, avoid=detection_rects(dets, yolo.class_names, frame.shape)))
            frames += 1
            bar.update()
            if outputs.show:
                cv2.imshow("predict", drawn)
                if cv2.waitKey(1) & 0xFF == ord("q"):
                    quit_early = True
                    break
    finally:
        bar.close()
        cap.release()
        writer.release()
    if frames and (not path.is_file() or path.stat().st_size == 0):     # VideoWriter.write never reports a failure
        raise OutputError(path, f"the video writer wrote nothing for {frames} frames (full disk?)")
    if total and total > 0 and frames < total and not quit_early:
        print(f"warning: {source.paths[0]}: read {frames} of {total} frames; the rest could not be decoded "
              f"(a truncated or damaged video)", file=sys.stderr)
    print(f"{frames} frames at {fps:.1f} FPS -> {path}")


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
    decode = decode_mode(args.decode, yolo)
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
    print_config("predict.py", {"weights": args.weights, "model": yolo.config["model"],
                                "attention": yolo.config["attention"], "source": args.source,
                                "mode": f"{args.mode} ({pictures[2]})" if pictures else args.mode,
                                "input": "x".join(map(str, yolo.input_shape)), "device": yolo.runtime,
                                "conf": detect.conf, "nms_iou": detect.nms_iou,
                                **({"decode": decode} if source.kind == "images" else {}), "out": out})
    if pictures:
        run_pictures(source, out, *pictures[:2])
        return out
    outputs = Outputs(args, yolo, out, wanted)
    if source.kind == "images":
        predict_images(yolo, source, outputs, args.batch, decode)
    else:
        predict_video(yolo, source, cap, outputs)
        outputs.finish()
    return out


if __name__ == "__main__":
    run_cli(main)
