"""What the study measures of each finished run: test-split detections through yolo.YOLO, their mAP and its
bootstrap resamples, cost and latency.

A run's test evaluation runs in a process of its own, right after its training and on the same kind of device
(`python -m utils.tools.study_eval`, queued by the study as the training job's follow-up), so it overlaps the runs
still training and spreads over the GPUs. Its results are kept beside the run, tied to best.pt's size and time:
the detections (`test_detections.npz`, also to the test images), and the mAP with its resamples and the model's
cost (`test_eval.json`, also to the test images' labels and the number of resamples), each written whole;
the study reads them, and computes in its own process whatever is missing. Latency is measured by the study
once training is over, so it is timed on an idle GPU.
"""
from __future__ import annotations

import hashlib
import io
import json
import statistics
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nets.yolo import as_model_config, build_model
from utils.config import EVAL_DETECTION
from utils.data.dataset import Record, load_image
from utils.engine.checkpoint import load_checkpoint, write_bytes_atomic
from utils.engine.evaluate import Evaluator, ground_truth
from utils.ops.coco_map import CocoMatches, coco_matches
from utils.ops.cost import model_cost
from utils.study.stats import resample_weights, run_maps
from yolo import YOLO

DETECTIONS_FILE = "test_detections.npz"
EVALUATION_FILE = "test_eval.json"


def _stamp(path: Path) -> np.ndarray:
    st = path.stat()
    return np.array([st.st_size, st.st_mtime_ns], np.int64)


def test_detections(best: Path, records: list[Record], class_names: list[str], device: str | None) -> list[np.ndarray]:
    """Per test record [N,6] detections of best.pt at the evaluation thresholds (cached beside the run)."""
    cache = best.parent / DETECTIONS_FILE
    ids = np.array([r.image_id for r in records])
    try:
        with np.load(cache, allow_pickle=False) as saved:
            if np.array_equal(saved["stamp"], _stamp(best)) and np.array_equal(saved["ids"], ids):
                counts = saved["counts"]
                return np.split(saved["rows"], np.cumsum(counts)[:-1]) if len(counts) else []
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        pass                               # none yet, or torn by a stopped process: detect again
    yolo = YOLO(best, device=device, conf=EVAL_DETECTION.conf, nms_iou=EVAL_DETECTION.nms_iou,
                multi_label=EVAL_DETECTION.multi_label)
    detections, used = Evaluator(records, class_names).detect(yolo)
    if len(used) != len(records):
        raise ValueError(f"{len(records) - len(used)} test images cannot be read; fix or remove them so every "
                         "variant is compared on the same images")
    rows = np.concatenate(detections) if detections else np.zeros((0, 6), np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, rows=rows, counts=np.array([len(d) for d in detections], np.int64), ids=ids, stamp=_stamp(best))
    write_bytes_atomic(buffer.getvalue(), cache)
    return detections


def run_matches(best: Path, records: list[Record], class_names: list[str], device: str | None) -> CocoMatches:
    """COCO matching of best.pt's test detections, ready for the bootstrap."""
    detections = test_detections(best, records, class_names, device)
    return coco_matches(detections, [ground_truth(r) for r in records], len(class_names))


@dataclass
class RunEvaluation:
    """A run's test mAP, the same mAP on each bootstrap resample of the test images, and its model's cost."""

    map50: float
    map50_95: float
    resampled: np.ndarray      # [R, 2] (map50, map50_95) per resample (resample_weights(N, R), seed 0)
    cost: dict                 # what cost() below returns


def _test_set_digest(records: list[Record]) -> str:
    """What the mAP depends on besides best.pt: each image's id, size and objects (a label fixed changes it)."""
    digest = hashlib.sha1()
    for r in records:
        digest.update(f"{r.image_id}\0{r.height}\0{r.width}\0".encode())
        for array, dtype in ((r.boxes, np.float64), (r.labels, np.int64), (r.difficult, np.bool_)):
            digest.update(np.ascontiguousarray(array, dtype).tobytes())
    return digest.hexdigest()


def evaluate_run(best: Path, records: list[Record], class_names: list[str], device: str | None,
                 resamples: int) -> RunEvaluation:
    """best.pt's test mAP, its resamples and cost: from the run's test_eval.json when it is of this best.pt, these
    images and labels and this many resamples, else computed (detections from their own cache) and saved."""
    key = {"best": _stamp(best).tolist(), "test_set": _test_set_digest(records), "resamples": resamples}
    cache = best.parent / EVALUATION_FILE
    try:
        saved = json.loads(cache.read_text()) if cache.is_file() else {}
    except (OSError, ValueError):
        saved = {}
    if saved.get("key") == key:
        return RunEvaluation(saved["map50"], saved["map50_95"], np.array(saved["resampled"], np.float64).reshape(-1, 2),
                             saved["cost"])
    matches = run_matches(best, records, class_names, device)
    maps, resampled = run_maps(matches, resample_weights(len(records), resamples))
    evaluation = RunEvaluation(float(maps[0]), float(maps[1]), resampled, cost(best))
    write_bytes_atomic(json.dumps({"key": key, "map50": evaluation.map50, "map50_95": evaluation.map50_95,
                                   "resampled": resampled.tolist(), "cost": evaluation.cost}).encode(), cache)
    return evaluation


def cost(best: Path) -> dict:
    """Parameters and GFLOPs (every op; matmul/conv only; the attention blocks') of the checkpoint's model."""
    config = as_model_config(load_checkpoint(best)["config"])
    return model_cost(build_model(config), config.input_shape[0])


def latency(best: Path, image_path: str, device: str | None, repeats: int = 3) -> dict:
    """Batch-1 milliseconds through YOLO (fp16 on GPU, fp32 on CPU): model alone and end to end, median of repeats."""
    yolo = YOLO(best, device=device)
    image = load_image(image_path)
    on_gpu = yolo.device.type == "cuda"
    samples = [yolo.measure_fps(image, iterations=60 if on_gpu else 10, warmup=10 if on_gpu else 2)
               for _ in range(repeats)]
    result = {key: statistics.median(s[key] for s in samples) for key in ("model_ms", "e2e_ms")}
    result["precision"] = "fp16" if yolo.half else "fp32"
    result["device"] = torch.cuda.get_device_name(yolo.device) if on_gpu else "cpu"
    return result
