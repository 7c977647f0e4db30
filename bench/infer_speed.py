"""Inference speed of yolo.YOLO (and, where installed, an ultralytics peer) on the same images.

  python bench/infer_speed.py --images VOCdevkit/BCCD/JPEGImages --img 416 [--peer yolov5nu.yaml yolov8n.yaml]

For each model (random weights; speed does not depend on them) and variant:
  batch-1 model  : the forward pass alone on a letterboxed fp16 tensor already on the GPU
  batch-1 e2e    : YOLO.predict(image in memory): letterbox + upload + model + decode + NMS + download
  batch-N        : YOLO.infer on an uploaded uint8 batch (model + decode + NMS + download), images/s
Variants: eager fp16 channels_last, and the same with the forward captured as a CUDA graph (YOLO's default);
optionally torch.compile. Medians of --repeats timed runs (each after warm-up), CUDA synchronised.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import cv2
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nets.yolo import build_model, make_config  # noqa: E402
from utils.engine.checkpoint import save_checkpoint  # noqa: E402
from yolo import YOLO  # noqa: E402

MODELS = [("yolov4-tiny", 0), ("yolov4-tiny", 4), ("yolov5n", 0), ("yolov5s", 0)]


def timed(fn, repeats: int, inner: int, sync) -> float:
    """Median over `repeats` of the mean time (ms) of `inner` calls."""
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / inner * 1000)
    return statistics.median(samples)


def bench_ours(model_name: str, phi, images: list, args, sync) -> list[dict]:
    config = make_config(model_name, phi, [f"c{i}" for i in range(args.classes)], (args.img, args.img))
    torch.manual_seed(0)
    path = Path(f"/tmp/infer_{model_name}_{phi}.pt")
    save_checkpoint({"model": build_model(config).state_dict(), "config": config}, path)
    rows = []
    for variant, graph in (("eager", False), ("cuda-graph", True)):
        yolo = YOLO(path, conf=args.conf, nms_iou=args.iou, half=True, cuda_graph=graph)
        one, metas = yolo.preprocess(images[:1])
        batch, metas_n = yolo.preprocess(images[:args.batch])
        one_gpu, batch_gpu = one.to(yolo.device), batch.to(yolo.device)
        for _ in range(10):
            yolo.predict(images[0])
            yolo.infer(batch_gpu, metas_n)
        model_ms = timed(lambda: yolo.forward(one_gpu), args.repeats, 50, sync)
        e2e_ms = timed(lambda: yolo.predict(images[0]), args.repeats, 50, sync)
        batch_ms = timed(lambda: yolo.infer(batch_gpu, metas_n), args.repeats, 5, sync)
        rows.append({"model": f"{model_name} phi {phi}", "variant": variant, "b1_model_ms": model_ms,
                     "b1_e2e_ms": e2e_ms, f"b{args.batch}_img_per_s": args.batch / batch_ms * 1000})
    if args.compile and (model_name, phi) == MODELS[0]:   # compiling takes minutes: the first model only
        yolo = YOLO(path, conf=args.conf, nms_iou=args.iou, half=True, cuda_graph=False)
        start = time.perf_counter()
        yolo.model = torch.compile(yolo.model)
        one, _ = yolo.preprocess(images[:1])
        one_gpu = one.to(yolo.device)
        for _ in range(3):
            yolo.forward(one_gpu)
        sync()
        compile_s = time.perf_counter() - start
        model_ms = timed(lambda: yolo.forward(one_gpu), args.repeats, 50, sync)
        e2e_ms = timed(lambda: yolo.predict(images[0]), args.repeats, 50, sync)
        rows.append({"model": f"{model_name} phi {phi}", "variant": f"compile ({compile_s:.0f} s)",
                     "b1_model_ms": model_ms, "b1_e2e_ms": e2e_ms})
    return rows


def bench_peer(yaml_name: str, images: list, args, sync) -> dict:
    """ultralytics' own predict() on the same in-memory images (fp16, same size, conf and IoU)."""
    from ultralytics import YOLO as UltralyticsYOLO  # noqa: PLC0415

    model = UltralyticsYOLO(yaml_name)
    cuda = torch.cuda.is_available()
    kw = dict(imgsz=args.img, quantize=16 if cuda else None, device=0 if cuda else "cpu", conf=args.conf, iou=args.iou,
              verbose=False)
    for _ in range(10):
        model.predict(images[0], **kw)
        model.predict(images[:args.batch], **kw)
    e2e_ms = timed(lambda: model.predict(images[0], **kw), args.repeats, 50, sync)
    batch_ms = timed(lambda: model.predict(images[:args.batch], **kw), args.repeats, 5, sync)
    return {"model": f"ultralytics {yaml_name}", "variant": "predict()", "b1_e2e_ms": e2e_ms,
            f"b{args.batch}_e2e_img_per_s": args.batch / batch_ms * 1000}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of test images")
    p.add_argument("--img", type=int, default=416)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--conf", type=float, default=0.25)
    p.add_argument("--iou", type=float, default=0.45)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also try torch.compile on the first model (slow to start)")
    p.add_argument("--peer", nargs="*", default=[], help="ultralytics model yamls to time beside ours")
    p.add_argument("--ours-batch-e2e", action="store_true", help="also time YOLO.predict on a list (CPU letterbox)")
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--models", type=int, default=len(MODELS), help="time only the first N models of the list")
    args = p.parse_args()
    paths = sorted(Path(args.images).glob("*.jpg"))[:max(args.batch, 1)]
    images = [cv2.imread(str(x)) for x in paths]
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {name}, torch {torch.__version__}, {len(images)} images "
          f"{images[0].shape[1]}x{images[0].shape[0]}, input {args.img}")
    rows = []
    for model_name, phi in MODELS[:args.models]:
        rows += bench_ours(model_name, phi, images, args, sync)
        if args.ours_batch_e2e:
            yolo = YOLO(Path(f"/tmp/infer_{model_name}_{phi}.pt"), conf=args.conf, nms_iou=args.iou, half=True)
            yolo.predict(images[:args.batch])
            ms = timed(lambda: yolo.predict(images[:args.batch]), args.repeats, 5, sync)
            rows.append({"model": f"{model_name} phi {phi}", "variant": "cuda-graph predict(list)",
                         f"b{args.batch}_e2e_img_per_s": args.batch / ms * 1000})
    for yaml_name in args.peer:
        rows.append(bench_peer(yaml_name, images, args, sync))
    for row in rows:
        print("  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
