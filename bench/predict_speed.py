"""Folder prediction speed, end to end from files on disk: the host path (--decode opencv) against the device path
(--decode device), with and without saving the drawn images, plus the ceilings of each stage.

  python bench/predict_speed.py --weights /tmp/logs/speed_tuned/best.pt --images VOCdevkit/BCCD/JPEGImages \
      --count 3000 --batch 64

The JPEGs are copied round-robin into a temporary folder of --count files. Each row runs predict.py's own
folder loop (predict_images: read, decode, letterbox, model, NMS, results written by the background writer)
not saving, saving the drawn images, or saving labels and JSON only (--save-txt --save-json), on the whole
folder after a warm-up pass on a full batch and one of the folder's last batch's size (CUDA context, cuDNN, a
graph captured for each batch size, so no timed pass captures one), --passes times, and reports each pass's
images/s = files / seconds and the CPU cores the process kept busy
(its user and kernel CPU seconds over the pass's seconds; file writes are kernel time). Stage
rows: reading + decoding only (each path), model + NMS only on a letterboxed batch, then that split into the
model (with box decode) and NMS alone, once per NMS method, and saving on the device path split into drawing
and JPEG encoding, to say what bounds each path. With --stage-times, one more saving pass of the device path
with each thread's stages timed in wall and CPU seconds (the main loop's model + NMS and whole loop, the reader's
decoding, painting's plan and paint, encoding, the writers, and every wait for a full stage), how much of each
ran beside a stage of another thread, and for how long 0, 1, 2, ... stage calls ran at once: stages that take
turns instead of overlapping show there. With --ablate R, R rounds of saving passes of the device path, each
round one pass per variant: everything, then one stage replaced by a stand-in (no file writes; 16-byte files
instead of JPEG encoding; no painting; the first plan of each batch size painted again instead of planning; no
planning or painting). The variants alternate within each round, so a host that slows as it writes (as the
lent machines do) slows them alike.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import predict  # noqa: E402
from utils.data.dataset import load_image  # noqa: E402
from utils.data.image_batches import ImageBatches, decode_chunk  # noqa: E402
from utils.data.sources import resolve_source  # noqa: E402
from utils.engine.predict_io import encode_jpegs  # noqa: E402
from utils.engine.predict_pipeline import Outputs, predict_images  # noqa: E402
from utils.ops.boxes import NMS_METHODS, non_max_suppression  # noqa: E402
from utils.ops.draw_tensors import draw_on_tensors  # noqa: E402
from yolo import YOLO  # noqa: E402


def replicate(images: Path, count: int, folder: Path) -> list[Path]:
    """`count` copies of the JPEGs of `images`, round-robin, as distinct files."""
    sources = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not sources:
        raise SystemExit(f"no JPEGs in {images}")
    for i in range(count):
        shutil.copyfile(sources[i % len(sources)], folder / f"{i:06d}_{sources[i % len(sources)].name}")
    return sorted(folder.iterdir())


def warm_up_folder(paths: list[Path], batch: int, folder: Path) -> Path:
    """`folder` with copies of the first files of `paths`: one full batch, then as many as the last batch of
    `paths` has, so that a pass over it meets every batch size a pass over `paths` does (each size's CUDA graph
    is captured there, not in a timed pass)."""
    folder.mkdir()
    for path in paths[:batch + (len(paths) % batch or batch)]:
        shutil.copyfile(path, folder / path.name)
    return folder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> np.ndarray:
    """This process's CPU time so far, all threads: [user, kernel] seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return np.array([usage.ru_utime, usage.ru_stime])


SAVING_LABELS = ["--no-save-images", "--save-txt", "--save-json"]      # what folder_run's save="labels" passes
SAVES = {"nothing": False, "images": True, "labels": "labels"}          # --saves: folder_run's save for each row


def folder_run(yolo: YOLO, folder: Path, out: Path, decode: str, batch: int, save: bool | str) -> float:
    """Seconds for predict.py's folder loop over `folder` (its results under `out`): saving the drawn images
    (True), nothing (False) or "labels" (each image's YOLO labels and predictions.json, no images)."""
    argv = ["--weights", yolo.weights, "--source", str(folder), "--decode", decode, "--batch", str(batch)]
    args = predict.parse_args(argv + (SAVING_LABELS if save == "labels" else [] if save else ["--no-save-images"]))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    outputs = Outputs(args, yolo, out, None, device_images=decode == "device")
    source = resolve_source(str(folder))
    sync(yolo.device)
    start = time.perf_counter()
    predict_images(yolo, source, outputs, batch, decode)
    sync(yolo.device)
    return time.perf_counter() - start


def decode_only(paths: list[Path], batch: int, device: torch.device, decode: str) -> float:
    """Seconds to read and decode every file: decode_jpeg batches on `device`, or OpenCV on 8 host threads."""
    sync(device)
    start = time.perf_counter()
    if decode == "device":
        for _ in ImageBatches(paths, batch, device):
            pass
    else:
        with ThreadPoolExecutor(8) as pool:
            for _ in pool.map(load_image, paths):
                pass
    sync(device)
    return time.perf_counter() - start


def images_per_second(fn, images: int, repeats: int, device: torch.device) -> float:
    """Images/s of `fn` (which handles `images` images a call): 3 untimed calls, then `repeats` timed ones."""
    for _ in range(3):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return repeats * images / (time.perf_counter() - start)


def model_only(yolo: YOLO, paths: list[Path], batch: int, repeats: int) -> float:
    """Images/s of model + decode + NMS on one letterboxed batch (no reading, no letterbox)."""
    tensors, metas = yolo.preprocess([load_image(p) for p in paths[:batch]])
    tensors = tensors.to(yolo.device)
    return images_per_second(lambda: yolo.infer(tensors, metas), len(metas), repeats, yolo.device)


def stage_split(yolo: YOLO, paths: list[Path], batch: int, repeats: int) -> list[tuple[str, float]]:
    """Images/s of the model alone (forward + box decode) and of NMS alone on its output, each NMS method."""
    tensors, _ = yolo.preprocess([load_image(p) for p in paths[:batch]])
    tensors = tensors.to(yolo.device)

    def rate(fn) -> float:
        return images_per_second(fn, batch, repeats, yolo.device)

    def decoded() -> torch.Tensor:
        outputs = yolo.forward(tensors)
        return yolo.head.decode_outputs(outputs, yolo.cells(outputs))

    pred = decoded()
    rows = [(f"model + box decode only, batch {batch}", rate(decoded))]
    for method in NMS_METHODS[1:]:
        kept = sum(len(d) for d in non_max_suppression(pred, yolo.conf, yolo.nms_iou, yolo.max_det,
                                                       yolo.multi_label, method=method))
        rows.append((f"NMS only, {method} ({kept / batch:.1f} boxes/image kept)", rate(
            lambda m=method: non_max_suppression(pred, yolo.conf, yolo.nms_iou, yolo.max_det, yolo.multi_label,
                                                 method=m))))
    return rows


def device_saving_split(yolo: YOLO, paths: list[Path], batch: int, repeats: int) -> list[tuple[str, float]]:
    """Images/s of what saving costs on the device path, on one decoded batch and its detections: drawing
    (draw_on_tensors), JPEG encoding with the copy back (encode_jpegs), and both."""
    images = decode_chunk(paths[:batch], yolo.device).images
    detections = yolo.predict_tensors(images)
    drawn = draw_on_tensors(images, detections, yolo.class_names)

    def rate(fn) -> float:
        return images_per_second(fn, len(images), repeats, yolo.device)

    boxes = sum(len(d) for d in detections) / len(images)
    return [(f"draw on the device only ({boxes:.1f} boxes/image)",
             rate(lambda: draw_on_tensors(images, detections, yolo.class_names))),
            ("JPEG encode on the device + copy back only", rate(lambda: encode_jpegs(drawn))),
            ("draw + encode on the device", rate(lambda: encode_jpegs(draw_on_tensors(images, detections,
                                                                                       yolo.class_names))))]


@contextmanager
def replaced(attributes: dict[tuple[object, str], object]):
    """Each (owner, name) attribute set to its new value for the block, the originals restored after it."""
    originals = {key: getattr(*key) for key in attributes}
    try:
        for (owner, name), value in attributes.items():
            setattr(owner, name, value)
        yield
    finally:
        for (owner, name), value in originals.items():
            setattr(owner, name, value)


def stage_times(yolo: YOLO, folder: Path, out: Path, batch: int) -> tuple[list[tuple[str, float, float, int, float]],
                                                                          list[float]]:
    """One saving pass of predict.py's device folder loop over `folder`, the stage functions wrapped with timers:
    per (thread: stage), its seconds, its thread's CPU seconds, calls, and the seconds of them during which a stage
    of another thread (waits excluded; the writer threads count as one) was running too; and the seconds of the
    pass during which 0, 1, 2, ... stage calls were running at once. The main thread's whole loop is one more row.
    A thread busy for most of the pass bounds it; a submit that blocks is a stage waiting for the next one;
    stages that mostly run alone take turns instead of overlapping. CPU seconds are the time a thread ran, not
    waited: for Python stages, about the time it held the interpreter lock, which all the threads share (their
    CPU seconds summing to near the pass's seconds say that lock bounds it)."""
    import utils.data.image_batches as image_batches  # noqa: PLC0415
    import utils.engine.predict_io as predict_io  # noqa: PLC0415
    import utils.engine.predict_pipeline as pipeline  # noqa: PLC0415

    waiting = "submit (blocked while the next stage is full)"
    spans: list[tuple[float, float, str, str, float]] = []          # start, end, thread, stage, CPU seconds
    lock = threading.Lock()

    def timed(label: str, fn):
        def wrapper(*args, **kwargs):
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                span = (start, time.perf_counter(), threading.current_thread().name.rsplit("_", 1)[0], label,
                        time.thread_time() - cpu)
                with lock:
                    spans.append(span)
        return wrapper

    wrapped = [(pipeline, "plan_drawing"), (pipeline, "paint"), (pipeline, "encode_jpegs"), (pipeline, "write_files"),
               (image_batches, "decode_chunk"), (YOLO, "predict_tensors"), (predict_io.BackgroundWrites, "submit")]
    with replaced({(owner, name): timed(waiting if name == "submit" else name, getattr(owner, name))
                   for owner, name in wrapped}):
        first, cpu = time.perf_counter(), time.thread_time()
        folder_run(yolo, folder, out, "device", batch, True)
        last, cpu = time.perf_counter(), time.thread_time() - cpu
    working = [span for span in spans if span[3] != waiting]
    # sweep over the working spans' starts and ends: how many run at each moment
    events = sorted([(span[0], 1) for span in working] + [(span[1], -1) for span in working])
    at_once, running, moment = [0.0] * (len(working) + 1), 0, first
    for when, step in events:
        at_once[running] += when - moment
        running, moment = running + step, when
    at_once[0] += last - moment
    while len(at_once) > 1 and at_once[-1] == 0:
        at_once.pop()

    def beside_others(span: tuple[float, float, str, str, float]) -> float:
        """Seconds of `span` during which a working span of another thread (group) was running too (their union)."""
        start, end, thread = span[:3]
        pieces = sorted((max(start, s), min(end, e)) for s, e, t, *_ in working if t != thread and s < end and e > start)
        covered, reach = 0.0, start
        for s, e in pieces:
            if e > reach:
                covered += e - max(s, reach)
                reach = e
        return covered

    totals: dict[tuple[str, str], list] = {}
    for span in spans:
        entry = totals.setdefault((span[2], span[3]), [0.0, 0.0, 0, 0.0])
        entry[0] += span[1] - span[0]
        entry[1] += span[4]
        entry[2] += 1
        entry[3] += beside_others(span) if span[3] != waiting else 0.0
    rows = [(f"{thread}: {label}", seconds, cpu_time, calls, overlapped)
            for (thread, label), (seconds, cpu_time, calls, overlapped) in sorted(totals.items())]
    rows.append((f"{threading.current_thread().name}: the whole loop", last - first, cpu, 1, 0.0))
    return rows, at_once


ABLATIONS = {    # variant -> predict_pipeline's functions replaced for its passes
    "everything": {},
    "no file writes": {"write_files": lambda folder, files: None},
    "no JPEG encoding (16-byte files written)": {"encode_jpegs": lambda images: [np.zeros(16, np.uint8)
                                                                                  for _ in images]},
    "no painting (the plan still made)": {"paint": lambda images, plan: images},
    "no planning (each batch size's first plan painted again)": {"plan_drawing": "first plan of the batch's sizes"},
    "no planning, no painting": {"plan_drawing": lambda sizes, detections, class_names: None,
                                 "paint": lambda images, plan: images},
}


def ablation(yolo: YOLO, folder: Path, out: Path, batch: int, rounds: int) -> dict[str, list[float]]:
    """Images/s of each ABLATIONS variant's saving passes of the device folder loop over `folder`, the variants
    alternating within each of `rounds` rounds."""
    import utils.engine.predict_pipeline as pipeline  # noqa: PLC0415

    files = sum(1 for _ in folder.iterdir())
    plans, plan_drawing = {}, pipeline.plan_drawing

    def first_plan(sizes, detections, class_names):
        """The plan made for the first batch of these sizes, painted again: painting's work without planning's."""
        key = tuple(sizes)
        if key not in plans:
            plans[key] = plan_drawing(sizes, detections, class_names)
        return plans[key]

    rates: dict[str, list[float]] = {variant: [] for variant in ABLATIONS}
    for _ in range(rounds):
        for variant, stand_ins in ABLATIONS.items():
            stand_ins = {name: first_plan if isinstance(stand_in, str) else stand_in
                         for name, stand_in in stand_ins.items()}
            with replaced({(pipeline, name): stand_in for name, stand_in in stand_ins.items()}):
                rates[variant].append(files / folder_run(yolo, folder, out, "device", batch, True))
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True)
    p.add_argument("--images", default="VOCdevkit/BCCD/JPEGImages", help="folder of JPEGs to replicate")
    p.add_argument("--count", type=int, default=3000, help="files in the timed folder")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--tmp", default=None, help="where the temporary folder goes (default the system's)")
    p.add_argument("--decodes", default="opencv,device", help="the paths timed end to end, comma-separated")
    p.add_argument("--saves", default="nothing,images,labels",
                   help="the end-to-end rows, comma-separated: saving nothing, drawn images, labels + JSON")
    p.add_argument("--passes", type=int, default=1,
                   help="timed passes of each end-to-end row (a host's rate drifts from pass to pass as it writes)")
    p.add_argument("--stage-times", action="store_true",
                   help="also time each thread's stages over one saving pass of the device path (what bounds it)")
    p.add_argument("--ablate", type=int, default=0, metavar="ROUNDS",
                   help="also ROUNDS rounds of device-path saving passes with one stage at a time replaced")
    args = p.parse_args()
    yolo = YOLO(args.weights, device=args.device)
    device = yolo.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    import torchvision  # noqa: PLC0415
    print(f"device {name}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"batch {args.batch}, {args.count} files")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        paths = replicate(Path(args.images), args.count, folder)
        warm = warm_up_folder(paths, args.batch, Path(tmp) / "warm")
        rows, passes = [], []
        for decode in args.decodes.split(","):
            for save in [SAVES[name] for name in args.saves.split(",")]:
                folder_run(yolo, warm, Path(tmp) / "out", decode, args.batch, save)          # warm-up
                timed = []
                for _ in range(args.passes):
                    cpu = cpu_seconds()
                    seconds = folder_run(yolo, folder, Path(tmp) / "out", decode, args.batch, save)
                    timed.append((args.count / seconds, (cpu_seconds() - cpu) / seconds))
                what = {False: "not saving", True: "saving images", "labels": "labels + JSON"}[save]
                passes.append((f"predict folder, --decode {decode}, {what}", timed))
        for decode in args.decodes.split(","):
            decode_only(paths[:2 * args.batch], args.batch, device, decode)
            rows.append((f"read + decode only, {decode}", args.count / decode_only(paths, args.batch, device, decode)))
        rows.append((f"model + NMS only, batch {args.batch}", model_only(yolo, paths, args.batch, 50)))
        rows += stage_split(yolo, paths, args.batch, 50)
        rows += device_saving_split(yolo, paths, args.batch, 20)
        if args.stage_times:
            start = time.perf_counter()
            stages, at_once = stage_times(yolo, folder, Path(tmp) / "out", args.batch)
            wall = time.perf_counter() - start
        if args.ablate:
            ablated = ablation(yolo, folder, Path(tmp) / "out", args.batch, args.ablate)
    width = max(len(label) for label, _ in rows + passes)
    print("end to end, each pass: img/s (CPU cores kept busy: user + kernel)")
    for label, timed in passes:
        print(f"{label.ljust(width)}  " + ", ".join(f"{rate:8,.0f} img/s ({user:.1f} + {kernel:.1f})"
                                                  for rate, (user, kernel) in timed))
    for label, rate in rows:
        print(f"{label.ljust(width)}  {rate:8,.0f} img/s")
    if args.stage_times:
        print(f"stages of one saving pass of the device path ({args.count} files in {wall:.2f} s, timers included;"
              " seconds, CPU seconds of the thread, calls, seconds while a stage of another thread ran too):")
        width = max(len(row[0]) for row in stages)
        for label, seconds, cpu_time, calls, overlapped in stages:
            beside = "" if label.endswith(("full)", "loop")) else f", {overlapped:6.2f} s beside another"
            print(f"  {label.ljust(width)}  {seconds:6.2f} s  CPU {cpu_time:6.2f} s  ({calls} calls{beside})")
        print("  seconds of the pass with N stage calls running at once (waits excluded): "
              + ", ".join(f"{n}: {seconds:.2f}" for n, seconds in enumerate(at_once)))
    if args.ablate:
        print(f"saving passes of the device path, {args.ablate} rounds, the variants alternating (img/s, in order):")
        width = max(len(variant) for variant in ablated)
        for variant, rates in ablated.items():
            print(f"  {variant.ljust(width)}  {', '.join(f'{rate:,.0f}' for rate in rates)}")


if __name__ == "__main__":
    main()
