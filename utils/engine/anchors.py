"""Anchors for a run: the recall check at train start, --anchors auto (fitted to the training boxes) or FILE."""
from __future__ import annotations

import dataclasses

import numpy as np

from nets.yolo import FAMILY_DEFAULTS, MODEL_DATA, model_family, read_anchors
from utils.config import ModelConfig
from utils.data.dataset import Record
from utils.log import get_logger
from utils.ops.anchors import best_possible_recall, fit_anchors, fitness, place_in_used, used_anchor_indices

log = get_logger(__name__)
# below this best possible recall the anchors fit the data badly (YOLOv5's autoanchor threshold)
MIN_BPR = 0.98
# anchor_t of the ratio rule when the hyp file has none (the YOLOv4 head matches by IoU; 4.0 is YOLOv5's value)
DEFAULT_THR = 4.0


def training_wh(records: list[Record], input_shape: tuple[int, int] | list[int]) -> np.ndarray:
    """Box widths and heights [N,2] in input pixels: each image letterboxed to input_shape (height, width)."""
    parts = []
    for r in records:
        scale = min(input_shape[0] / r.height, input_shape[1] / r.width)
        parts.append((r.boxes[:, 2:4] - r.boxes[:, :2]).astype(np.float64) * scale)
    return np.concatenate(parts) if parts else np.zeros((0, 2))


def anchor_count(model: str) -> int:
    """How many anchors the family's masks index (YOLOv4-tiny 6, YOLOv5 9)."""
    return len(read_anchors(MODEL_DATA / FAMILY_DEFAULTS[model_family(model)][0]))


def anchors_text(anchors: np.ndarray | list) -> str:
    """The anchors-file format model_data/ uses: 'w,h, w,h, ...' on one line."""
    return ", ".join(f"{w:.1f},{h:.1f}" for w, h in np.asarray(anchors, np.float64)) + "\n"


def read_anchors_file(path: str, model: str) -> list[list[float]]:
    """--anchors FILE: w,h pairs, as many as the model's masks index; otherwise an error naming the file."""
    try:
        anchors = read_anchors(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--anchors {path}: cannot read it ({exc}); pass auto or a file of w,h pairs") from None
    except ValueError as exc:
        raise ValueError(f"--anchors {exc}") from None
    need = anchor_count(model)
    if len(anchors) != need or not all(w > 0 and h > 0 for w, h in anchors):
        raise ValueError(f"--anchors {path}: {model} needs {need} positive w,h pairs, the file has {len(anchors)}")
    return anchors


def choose_anchors(config: ModelConfig, records: list[Record], mode: str | None, thr: float | None) -> ModelConfig:
    """The run's anchors: mode None keeps them and warns when they fit badly, 'auto' fits them, else a file.

    Only the anchors some level's mask uses can take a box, so recall and fitness are judged on those, and
    'auto' fits exactly that many (YOLOv4-tiny: 5 of its 6; a sixth fitted anchor would take the smallest
    boxes into the slot no level reads, and they would never be trained).
    """
    thr = thr or DEFAULT_THR
    wh = training_wh(records, config.input_shape)
    if mode not in (None, "auto"):
        config = dataclasses.replace(config, anchors=read_anchors_file(mode, config.model))
    used = used_anchor_indices(config.anchors_mask)
    full = np.asarray(config.anchors, np.float64)
    current = full[used]
    bpr = best_possible_recall(wh, current, thr)
    if mode != "auto":
        what = f"anchors from {mode}" if mode else "default anchors"
        if bpr < MIN_BPR:
            log.warning("the %s fit the training boxes badly: best possible recall %.4f < %.2f at %s px; pass "
                        "--anchors auto to fit them to the data", what, bpr, MIN_BPR, config.input_shape[0])
        else:
            log.info("%s: best possible recall %.4f on %d training boxes", what, bpr, len(wh))
        return config
    try:
        fitted = fit_anchors(wh, len(current), thr, seed=0)
    except ValueError as exc:          # too few boxes for the family's anchors
        raise ValueError(f"--anchors auto: {exc}") from None
    new_bpr = best_possible_recall(wh, fitted, thr)
    if fitness(wh, fitted, thr) <= fitness(wh, current, thr):
        log.info("--anchors auto: best possible recall %.4f before, %.4f fitted; the fitted anchors are no better, "
                 "keeping the defaults", bpr, new_bpr)
        return config
    placed = place_in_used(full, used, fitted)
    log.info("--anchors auto: best possible recall %.4f before, %.4f after; anchors %s", bpr, new_bpr,
             anchors_text(placed).strip())
    return dataclasses.replace(config, anchors=[[round(float(w), 2), round(float(h), 2)] for w, h in placed])
