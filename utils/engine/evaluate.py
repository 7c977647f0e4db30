"""Evaluation of a YOLO on dataset records: shared by get_map.py and the evaluation during training."""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from utils.ops.coco_map import coco_map
from utils.data.dataset import ImageReadError, Record, load_image
from utils.log import get_logger
from utils.ops.metrics import GroundTruth, evaluate, evaluate_voc

log = get_logger(__name__)


def ground_truth(record: Record) -> GroundTruth:
    """A record's objects as metrics.GroundTruth (difficult flags kept: ignored by VOC, crowd for COCO)."""
    return GroundTruth(record.boxes, record.labels, record.difficult, record.height, record.width, record.image_id,
                       record.file_name)


def quick_metrics(detections: list[np.ndarray], truths: list[GroundTruth], num_classes: int) -> dict:
    """COCO map50 / map50_95 (as pycocotools and get_map.py) and VOC map50_voc; NaN where no class has objects."""
    coco = coco_map(detections, truths, num_classes)
    voc = evaluate_voc(detections, truths, num_classes)
    map50_voc = float(np.nanmean(voc)) if np.isfinite(voc).any() else float("nan")
    return {"map50": coco["map50"], "map50_95": coco["map50_95"], "map50_voc": map50_voc}


def checkpoint_fitness(metrics: dict, map50_95_weight: float) -> float:
    """What best.pt maximises: (1 - w) mAP50 + w mAP50-95; a split without objects (NaN mAP) counts 0."""
    value = (1 - map50_95_weight) * metrics["map50"] + map50_95_weight * metrics["map50_95"]
    return value if value == value else 0.0


class Evaluator:
    """Runs a YOLO over records in batches; with `keep_batches` the letterboxed batches are kept for reuse."""

    def __init__(self, records: list[Record], class_names: list[str], batch_size: int = 32,
                 keep_batches: bool = False, workers: int = 4):
        self.records = records
        self.class_names = class_names
        self.batch_size = batch_size
        self.keep_batches = keep_batches
        self.workers = max(1, workers)
        self._batches: list[tuple[torch.Tensor, np.ndarray, list[int]]] | None = None
        self.skipped: list[str] = []

    def _load(self, record: Record) -> np.ndarray | None:
        try:
            return load_image(record.image_path)
        except ImageReadError:
            return None

    def _iter_batches(self, yolo, progress: bool):
        """(uint8 batch, metas, record indices) per batch; unreadable images are skipped and counted."""
        if self._batches is not None:
            yield from self._batches
            return
        kept = [] if self.keep_batches else None
        starts = range(0, len(self.records), self.batch_size)
        with ThreadPoolExecutor(self.workers) as pool:
            for start in tqdm(starts, desc="evaluate", disable=not progress, leave=False, file=sys.stdout):
                chunk = self.records[start:start + self.batch_size]
                images = list(pool.map(self._load, chunk))
                ok = [i for i, im in enumerate(images) if im is not None]
                self.skipped += [chunk[i].image_path for i in range(len(chunk)) if images[i] is None]
                if not ok:
                    continue
                batch, metas = yolo.preprocess([images[i] for i in ok])
                if yolo.device.type == "cuda":
                    batch = batch.to(yolo.device, non_blocking=True) if self.keep_batches else batch.pin_memory()
                item = (batch, metas, [start + i for i in ok])
                if kept is not None:
                    kept.append(item)
                yield item
        if kept is not None:
            self._batches = kept
        if self.skipped:
            log.warning("skipped %d unreadable images in evaluation (first: %s)", len(self.skipped), self.skipped[0])

    def detect(self, yolo, progress: bool = False) -> tuple[list[np.ndarray], list[Record]]:
        """Detections for every readable record, and those records, in the same order."""
        detections, used = [], []
        for batch, metas, indices in self._iter_batches(yolo, progress):
            detections += yolo.infer(batch, metas)
            used += [self.records[i] for i in indices]
        return detections, used

    def quick(self, yolo) -> dict:
        """map50, map50_95 (COCO, equal to full()'s) and map50_voc without pycocotools: for every epoch."""
        return self.scorer(yolo)()

    def scorer(self, yolo) -> Callable[[], dict]:
        """Detect now (the model's weights of this moment); the returned call computes quick()'s metrics from them,
        CPU work only, so it can run on another thread while the model trains on."""
        detections, used = self.detect(yolo)
        truths = [ground_truth(r) for r in used]
        return lambda: quick_metrics(detections, truths, len(self.class_names))

    def full(self, yolo, score_threshold: float = 0.5, progress: bool = True) -> tuple[dict, dict, list]:
        """VOC and COCO (pycocotools) metrics: (summary, COCO ground truth, COCO detections)."""
        detections, used = self.detect(yolo, progress)
        return evaluate(detections, [ground_truth(r) for r in used], self.class_names, score_threshold)
