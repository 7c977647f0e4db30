"""What the study measures of each finished run: test-split detections through yolo.YOLO, cost and latency.

Detections are kept beside the run (`test_detections.npz`, tied to best.pt's size and time) so a re-run of the
study only recomputes the statistics.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import torch

from nets.yolo import as_model_config, build_model
from utils.config import EVAL_DETECTION
from utils.data.dataset import Record, load_image
from utils.engine.checkpoint import load_checkpoint
from utils.engine.evaluate import Evaluator, ground_truth
from utils.ops.coco_map import CocoMatches, coco_matches
from utils.ops.cost import model_cost
from yolo import YOLO

DETECTIONS_FILE = "test_detections.npz"


def _stamp(path: Path) -> np.ndarray:
    st = path.stat()
    return np.array([st.st_size, st.st_mtime_ns], np.int64)


def test_detections(best: Path, records: list[Record], class_names: list[str], device: str | None) -> list[np.ndarray]:
    """Per test record [N,6] detections of best.pt at the evaluation thresholds (cached beside the run)."""
    cache = best.parent / DETECTIONS_FILE
    ids = np.array([r.image_id for r in records])
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as saved:
            if np.array_equal(saved["stamp"], _stamp(best)) and np.array_equal(saved["ids"], ids):
                counts = saved["counts"]
                return np.split(saved["rows"], np.cumsum(counts)[:-1]) if len(counts) else []
    yolo = YOLO(best, device=device, conf=EVAL_DETECTION.conf, nms_iou=EVAL_DETECTION.nms_iou,
                multi_label=EVAL_DETECTION.multi_label)
    detections, used = Evaluator(records, class_names).detect(yolo)
    if len(used) != len(records):
        raise ValueError(f"{len(records) - len(used)} test images cannot be read; fix or remove them so every "
                         "variant is compared on the same images")
    rows = np.concatenate(detections) if detections else np.zeros((0, 6), np.float32)
    np.savez(cache, rows=rows, counts=np.array([len(d) for d in detections], np.int64), ids=ids, stamp=_stamp(best))
    return detections


def run_matches(best: Path, records: list[Record], class_names: list[str], device: str | None) -> CocoMatches:
    """COCO matching of best.pt's test detections, ready for the bootstrap."""
    detections = test_detections(best, records, class_names, device)
    return coco_matches(detections, [ground_truth(r) for r in records], len(class_names))


def cost(best: Path) -> dict:
    """Parameters and GFLOPs (every op; matmul/conv only; the attention blocks') of the checkpoint's model."""
    config = as_model_config(load_checkpoint(best)["config"])
    return model_cost(build_model(config), config.input_shape[0])


def latency(best: Path, image_path: str, device: str | None, repeats: int = 5) -> dict:
    """Batch-1 milliseconds through YOLO (fp16 on GPU, fp32 on CPU): model alone and end to end, median of repeats."""
    yolo = YOLO(best, device=device)
    image = load_image(image_path)
    on_gpu = yolo.device.type == "cuda"
    samples = [yolo.measure_fps(image, iterations=100 if on_gpu else 10, warmup=10 if on_gpu else 2)
               for _ in range(repeats)]
    result = {key: statistics.median(s[key] for s in samples) for key in ("model_ms", "e2e_ms")}
    result["precision"] = "fp16" if yolo.half else "fp32"
    result["device"] = torch.cuda.get_device_name(yolo.device) if on_gpu else "cpu"
    return result
