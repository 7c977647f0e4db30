"""Do the stages of predict.py's saving device path overlap when they run on threads of their own?

  python bench/stage_overlap.py --weights /tmp/logs/a/best.pt --images VOCdevkit/BCCD/JPEGImages --seconds 1.5

Each stage is one batch's work of the folder loop's threads, on inputs made once beforehand (so no stage waits
for another's output): the reader's `decode_chunk`, the main loop's `predict_tensors` (model + NMS), painting's
`plan_drawing` and `paint`, encoding's `encode_jpegs` (nvJPEG + the copy back), a writer's `write_files` of the
batch's JPEG files, and a control that runs Python without pause. Each GPU stage runs on a stream of its own (as
in the folder loop; encoding on the legacy default stream) and waits for its own work before its next call.

Each stage is timed alone (calls/s), then every pair at once, each on its own thread, then all of them but the
control at once. For a pair, the sum of each stage's rate relative to its rate alone says how they share the
machine: 2.0 = each runs as fast as alone (they overlap fully), 1.0 = they take turns (one at a time). Against
the Python control, a stage's relative rate says how much it is slowed by a thread that wants the interpreter
(the GIL), and the control's how much of the interpreter the stage keeps.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from itertools import combinations
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from predict_speed import folder_run, replicate, warm_up_folder  # noqa: E402
from utils.data.image_batches import decode_chunk  # noqa: E402
from utils.engine.predict_io import encode_jpegs, write_files  # noqa: E402
from utils.ops.draw_tensors import paint, plan_drawing  # noqa: E402
from utils.ops.streams import on_stream, side_stream  # noqa: E402
from yolo import YOLO  # noqa: E402


def stages(yolo: YOLO, paths: list[Path], out: Path) -> dict[str, tuple]:
    """Stage name -> (one batch's work, whether it runs on a side stream), on inputs made here; the file writing
    stage's entry also carries its files."""
    device = yolo.device
    images = decode_chunk(paths, device).images
    detections = yolo.predict_tensors(images)
    sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
    plan = plan_drawing(sizes, detections, yolo.class_names)
    drawn = paint(images, plan)
    files = [(f"{i:03d}.jpg", data) for i, data in enumerate(encode_jpegs(drawn))]
    if device.type == "cuda":
        torch.cuda.synchronize(device)

    def finished() -> None:
        """Wait for this thread's queued GPU work (its stream's), as each stage's consumer would."""
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()

    def python() -> None:
        total = 0
        for i in range(20_000):
            total += i

    return {"decode": (lambda: (decode_chunk(paths, device), finished()), True),
            "model + NMS": (lambda: yolo.predict_tensors(images), True),
            "plan": (lambda: plan_drawing(sizes, detections, yolo.class_names), False),
            "paint": (lambda: (paint(images, plan), finished()), True),
            "encode + copy back": (lambda: encode_jpegs(drawn), False),
            "write files": (lambda: write_files(out, files), False, files),
            "Python control": (python, False)}


def rates(chosen: dict[str, tuple], seconds: float, device: torch.device) -> dict[str, float]:
    """Calls/s of each chosen stage, all running at once for `seconds`, each on a thread of its own."""
    start, stop = threading.Barrier(len(chosen) + 1), threading.Event()
    counts: dict[str, tuple[int, float]] = {}

    def loop(name: str, work, own_stream: bool) -> None:
        with on_stream(side_stream(device) if own_stream else None):
            try:
                work()                               # its stream's first use, untimed
            except BaseException:
                start.abort()                        # the others and the caller stop waiting (BrokenBarrierError)
                raise
            start.wait()
            calls, began = 0, time.perf_counter()
            while not stop.is_set():
                work()
                calls += 1
            counts[name] = (calls, time.perf_counter() - began)

    threads = [threading.Thread(target=loop, args=(name, *entry[:2]), name=name) for name, entry in chosen.items()]
    for thread in threads:
        thread.start()
    start.wait()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return {name: calls / elapsed for name, (calls, elapsed) in counts.items()}


def folder_rate_beside(yolo: YOLO, folder: Path, out: Path, batch: int, beside: list[tuple[object, bool]],
                       save: bool = False) -> float:
    """Images/s of predict.py's folder loop over `folder` while each `beside` stage runs without pause on a thread
    of its own."""
    stop = threading.Event()

    def loop(work, own_stream: bool) -> None:
        with on_stream(side_stream(yolo.device) if own_stream else None):
            while not stop.is_set():
                work()

    threads = [threading.Thread(target=loop, args=entry) for entry in beside]
    for thread in threads:
        thread.start()
    try:
        seconds = folder_run(yolo, folder, out, "device", batch, save)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return sum(1 for _ in folder.iterdir()) / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True)
    p.add_argument("--images", default="VOCdevkit/BCCD/JPEGImages", help="folder of JPEGs: a batch is read from it")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=1.5, help="how long each combination runs")
    p.add_argument("--device", default=None)
    p.add_argument("--tmp", default=None, help="where the written files go (default the system's temporary folder)")
    p.add_argument("--count", type=int, default=3000, help="files in the folder the loop is timed on")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the folder loop's variants")
    args = p.parse_args()
    yolo = YOLO(args.weights, device=args.device)
    device = yolo.device
    jpegs = sorted(q for q in Path(args.images).iterdir() if q.suffix.lower() in (".jpg", ".jpeg"))
    if not jpegs:
        raise SystemExit(f"--images: no JPEGs in {args.images}")
    paths = [jpegs[i % len(jpegs)] for i in range(args.batch)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, torch {torch.__version__}, batch {args.batch}, {args.seconds} s a combination")
    with tempfile.TemporaryDirectory(dir=args.tmp) as out:
        work = stages(yolo, paths, Path(out))
        alone = {}
        for stage in work:
            alone.update(rates({stage: work[stage]}, args.seconds, device))
        width = max(len(stage) for stage in work)
        print("alone (batches/s, images/s):")
        for stage, rate in alone.items():
            print(f"  {stage.ljust(width)}  {rate:8.1f}  {rate * args.batch:9,.0f}")
        print("pairs at once: each one's rate relative to alone, and their sum (2.0 overlap, 1.0 take turns):")
        for a, b in combinations(work, 2):
            both = rates({a: work[a], b: work[b]}, args.seconds, device)
            ra, rb = both[a] / alone[a], both[b] / alone[b]
            print(f"  {a.ljust(width)} + {b.ljust(width)}  {ra:5.2f} + {rb:5.2f} = {ra + rb:5.2f}")
        pipeline = {stage: entry for stage, entry in work.items() if stage != "Python control"}
        every = rates(pipeline, args.seconds, device)
        relative = {stage: every[stage] / alone[stage] for stage in pipeline}
        print(f"all {len(pipeline)} stages at once: relative rates "
              + ", ".join(f"{stage} {r:.2f}" for stage, r in relative.items())
              + f"; sum {sum(relative.values()):.2f} (of {len(pipeline)})")
        # a pipeline's rate is its slowest stage's: images/s if each stage ran at its rate here
        slowest = min(every, key=every.get)
        print(f"  slowest at once: {slowest}, {every[slowest] * args.batch:,.0f} img/s; the stages one after "
              f"another at their rates alone: {args.batch / sum(1 / alone[s] for s in pipeline):,.0f} img/s")

        folder = Path(out) / "folder"
        folder.mkdir()
        warm = warm_up_folder(replicate(Path(args.images), args.count, folder), args.batch, Path(out) / "warm")
        loop_out = Path(out) / "predicted"
        for save in (False, True):
            folder_run(yolo, warm, loop_out, "device", args.batch, save)                       # warm-up
        writers = []
        for i in range(8):
            (Path(out) / f"writer{i}").mkdir()
            files = [(f"{j:03d}.jpg", data) for j, (_, data) in enumerate(work["write files"][2])]
            writers.append((lambda folder=Path(out) / f"writer{i}", files=files: write_files(folder, files), False))
        variants = {"alone": [], **{f"beside {stage}": [work[stage][:2]] for stage in
                                    ("plan", "paint", "encode + copy back", "write files")},
                    "beside 8 threads writing files": writers}
        loop_rates: dict[str, list[float]] = {variant: [] for variant in [*variants, "saving images (reference)"]}
        for _ in range(args.rounds):
            for variant, beside in variants.items():
                loop_rates[variant].append(folder_rate_beside(yolo, folder, loop_out, args.batch, beside))
            loop_rates["saving images (reference)"].append(
                folder_rate_beside(yolo, folder, loop_out, args.batch, [], save=True))
        print(f"predict.py's folder loop, --decode device, {args.count} files, not saving but for the last row "
              "(img/s, in round order):")
        width = max(len(variant) for variant in loop_rates)
        for variant, rates_of in loop_rates.items():
            print(f"  {variant.ljust(width)}  {', '.join(f'{rate:,.0f}' for rate in rates_of)}")

if __name__ == "__main__":
    main()
