"""Latency of an exported model under ONNX Runtime beside our PyTorch path, batch 1, through yolo.YOLO.

  python bench/onnx_speed.py [--images DIR] [--img 416] [--models yolov4-tiny:0,yolov4-tiny:4] [--threads N]
                             [--json out.json]

Per model (random weights from a fixed seed: speed does not depend on them) and runtime, medians of
--repeats windows of --iters calls, after warm-up:
  model_ms   the network alone on a letterboxed batch of one (with --nms graphs: network + decode + NMS)
  e2e_ms     YOLO.predict(image in memory): letterbox + network + decode + NMS + rescale
  file_ms    YOLO.predict(path): the same plus reading and decoding the JPEG
  file_cpu_ms  the same call's CPU time (process, all threads): on a machine shared with other work,
             with --threads 1, the latency one free core would give
Runtimes: torch cpu (fp32), onnxruntime cpu (fp32, raw outputs and --nms), and where CUDA is present
torch cuda (fp16, channels_last, CUDA graph: YOLO's default) and onnxruntime cuda (fp32 and fp16; needs
onnxruntime-gpu, else the rows say why they are missing).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nets.yolo import build_model, make_config  # noqa: E402
from utils.data.sample_data import make_sample_dataset  # noqa: E402
from utils.engine.checkpoint import save_checkpoint  # noqa: E402
from utils.engine.export import export_onnx  # noqa: E402
from utils.engine.onnx_runtime import OnnxModel  # noqa: E402
from yolo import YOLO  # noqa: E402


def timed(fn, repeats: int, iters: int, sync, clock=time.perf_counter) -> float:
    """Median over `repeats` windows of the mean milliseconds of `iters` calls, on `clock`."""
    samples = []
    for _ in range(repeats):
        sync()
        start = clock()
        for _ in range(iters):
            fn()
        sync()
        samples.append((clock() - start) / iters * 1000)
    return statistics.median(samples)


def measure(yolo: YOLO, path: Path, args, sync) -> dict:
    """model / e2e / file milliseconds of one YOLO on one image."""
    image = cv2.imread(str(path))
    batch, _ = yolo.preprocess([image])
    batch = batch.to(yolo.device)
    for _ in range(args.warmup):
        yolo.predict(image)
        yolo.run_network(batch)
    return {"model_ms": timed(lambda: yolo.run_network(batch), args.repeats, args.iters, sync),
            "e2e_ms": timed(lambda: yolo.predict(image), args.repeats, args.iters, sync),
            "file_ms": timed(lambda: yolo.predict(str(path)), args.repeats, args.iters, sync),
            # CPU time of this process per frame (all its threads): what a frame costs on a shared machine
            "file_cpu_ms": timed(lambda: yolo.predict(str(path)), args.repeats, args.iters, sync, time.process_time)}


def runtimes(weights: Path, folder: Path, args) -> list[tuple[str, dict]]:
    """(label, YOLO keyword arguments and weights) of every runtime this machine can run."""
    raw = export_onnx(weights, folder / f"{weights.stem}.onnx", img=args.img)
    nms = export_onnx(weights, folder / f"{weights.stem}_nms.onnx", img=args.img, nms=True)
    rows = [("torch cpu fp32", dict(weights=weights, device="cpu")),
            ("onnxruntime cpu fp32", dict(weights=raw, device="cpu")),
            ("onnxruntime cpu fp32 --nms", dict(weights=nms, device="cpu"))]
    if torch.cuda.is_available():
        half = export_onnx(weights, folder / f"{weights.stem}_half.onnx", img=args.img, half=True)
        rows += [("torch cuda fp16 cuda-graph", dict(weights=weights, device="cuda")),
                 ("onnxruntime cuda fp32", dict(weights=raw, device="cuda")),
                 ("onnxruntime cuda fp16", dict(weights=half, device="cuda"))]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="folder of JPEGs (default: generated 500x375 sample pictures)")
    p.add_argument("--img", type=int, default=416)
    p.add_argument("--models", default="yolov4-tiny:0,yolov4-tiny:4", help="model:phi, comma-separated")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--conf", type=float, default=0.25)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, help="CPU threads for torch and onnxruntime (default: theirs)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="onnx_speed."))
    folder = Path(args.images) if args.images else make_sample_dataset(work / "voc", n_train=2, n_val=0, n_test=0,
                                                                        size=(375, 500)) / "JPEGImages"
    image = sorted(folder.glob("*.jpg"))[0]
    import onnxruntime  # noqa: PLC0415
    env = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
           "providers": onnxruntime.get_available_providers(), "threads": args.threads or "default",
           "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg(),
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "image": str(image),
           "img": args.img, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(env))
    results = []
    for spec in args.models.split(","):
        model, phi = spec.split(":")
        config = make_config(model, phi, [f"c{i}" for i in range(args.classes)], (args.img, args.img))
        torch.manual_seed(0)
        weights = work / f"{model}_{phi}.pt"
        save_checkpoint({"model": build_model(config).state_dict(), "config": config}, weights)
        for label, kwargs in runtimes(weights, work, args):
            try:
                yolo = YOLO(kwargs["weights"], conf=args.conf, device=kwargs["device"])
                if yolo.onnx is not None and args.threads:
                    yolo.onnx = yolo.model = OnnxModel(kwargs["weights"], kwargs["device"], threads=args.threads)
            except ValueError as exc:             # e.g. no CUDAExecutionProvider in this onnxruntime
                print(f"{model} phi {phi:>2}  {label:<28} skipped: {exc}")
                continue
            sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
            row = {"model": model, "phi": phi, "runtime": label, **measure(yolo, image, args, sync)}
            results.append(row)
            print(f"{model} phi {phi:>2}  {label:<28} model {row['model_ms']:7.2f} ms  e2e {row['e2e_ms']:7.2f} ms "
                  f"({1000 / row['e2e_ms']:6.1f} FPS)  with JPEG read {row['file_ms']:7.2f} ms "
                  f"({1000 / row['file_ms']:6.1f} FPS), CPU time {row['file_cpu_ms']:7.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
