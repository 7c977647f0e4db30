"""Target assignment and loss for both head styles, vectorised over the batch's targets [B, K, 6].

What differs between styles - decode, which anchors and cells a box goes to, the objectness
target, the ignore rule - is the head's (nets/heads.py). Shared here: CIoU box loss, BCE
objectness and classes, label smoothing, per-level balance, gains scaled by levels, classes and image size.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from nets.heads import build_head
from nets.yolo import MODEL_DATA, as_model_config, model_family
from utils.ops.boxes import CellCache, Cells, ciou_loss, flatten_levels
from utils.config import LR_SCHEDULES, ModelConfig

HYP_FILES = {"yolov4-tiny": "hyp.yolov4-tiny.yaml", "yolov5": "hyp.scratch-low.yaml"}
# keys the loss (box, cls, obj, balance) and the optimiser, schedule and warm-up read without a default
REQUIRED_HYP = ("lr0", "lrf", "momentum", "weight_decay", "warmup_epochs", "warmup_momentum", "warmup_bias_lr",
                "box", "cls", "obj", "balance")
# training-recipe keys a hyp file may leave out, and what their absence means: the behaviour from before
# they existed, so the hyp stored in an older checkpoint resumes as it started
RECIPE_DEFAULTS = {"lr_schedule": "cos", "special_aug_ratio": 0.7, "fitness_map50_95": 0.0}
# optional keys that are shares in [0, 1]
UNIT_HYP = ("special_aug_ratio", "fitness_map50_95", "obj_iou_ratio")
# smallest predicted box side (cell units) the CIoU sees: see YoloLoss.__call__
MIN_BOX_CELLS = 1e-3


def load_hyp(model: str, path: str | Path | None = None) -> dict:
    """Hyperparameters for a model: `path` if given, else the family's YAML in model_data/; checked for REQUIRED_HYP."""
    path = Path(path) if path else MODEL_DATA / HYP_FILES[model_family(model)]
    if not path.is_file():
        raise FileNotFoundError(f"hyperparameter file {path} not found")
    try:
        hyp = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ValueError(f"--hyp {path}: not valid YAML{at} ({getattr(exc, 'problem', None) or type(exc).__name__}); "
                         f"fix it or start from {MODEL_DATA / HYP_FILES[model_family(model)]}") from None
    if not isinstance(hyp, dict):
        raise ValueError(f"--hyp {path}: expected a mapping of hyperparameters (key: value lines)")
    missing = [k for k in REQUIRED_HYP if k not in hyp]
    if missing:
        raise ValueError(f"--hyp {path}: missing {', '.join(missing)}, which the loss or optimiser needs; "
                         f"copy them from {MODEL_DATA / HYP_FILES[model_family(model)]}")
    wrong = [k for k in REQUIRED_HYP if k != "balance" and not _is_number(hyp[k])]
    balance = hyp["balance"]
    if not isinstance(balance, dict) or not balance or not all(_is_number(v) for v in balance.values()) \
            or not all(isinstance(k, int) or str(k).isdigit() for k in balance):
        wrong.append("balance (a mapping stride: weight, e.g. {16: 1.0, 32: 0.4})")
    if wrong:
        raise ValueError(f"--hyp {path}: {', '.join(wrong)} must be numbers")
    check_recipe(hyp, f"--hyp {path}")
    return {**RECIPE_DEFAULTS, **hyp}


def check_recipe(hyp: dict, where: str) -> None:
    """The optional recipe keys, where present: a known lr schedule and shares in [0, 1]; raises ValueError."""
    if "lr_schedule" in hyp and hyp["lr_schedule"] not in LR_SCHEDULES:
        raise ValueError(f"{where}: lr_schedule {hyp['lr_schedule']!r}: choose one of {', '.join(LR_SCHEDULES)}")
    bad = [k for k in UNIT_HYP if k in hyp and not (_is_number(hyp[k]) and 0 <= hyp[k] <= 1)]
    if bad:
        raise ValueError(f"{where}: {', '.join(bad)} must be numbers between 0 and 1")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def smooth_targets(label_smoothing: float) -> tuple[float, float]:
    """BCE targets (positive, negative) with label smoothing eps: 1 - eps/2 and eps/2."""
    return 1.0 - 0.5 * label_smoothing, 0.5 * label_smoothing


class YoloLoss:
    """Callable: (raw outputs coarsest first, targets [B, K, 6]) -> (loss, parts).

    All levels are handled as one flattened tensor [B, N, 5+C] (utils.ops.boxes.flatten_levels), and
    the assignment is dense (fixed shapes): a training step issues few kernels and never waits
    for the GPU. Row group b of `targets` holds image b's boxes; rows with image index -1 are padding.
    """

    def __init__(self, config: ModelConfig | dict, hyp: dict):
        config = as_model_config(config)
        self.head = build_head(config, hyp)
        self.anchors = torch.tensor(config.anchors, dtype=torch.float32)          # nA,2 input pixels
        self.anchors_mask = config.anchors_mask
        self.num_classes = config.num_classes
        self.input_shape = config.input_shape                                      # h, w
        num_levels = len(self.anchors_mask)
        self.box_gain = hyp["box"] * 3 / num_levels
        self.cls_gain = hyp["cls"] * self.num_classes / 80 * 3 / num_levels
        self.obj_gain = hyp["obj"] * (max(self.input_shape) / 640) ** 2 * 3 / num_levels
        self.balance_by_stride = {int(k): float(v) for k, v in hyp["balance"].items()}
        self.cls_pos, self.cls_neg = smooth_targets(hyp.get("label_smoothing", 0.0))
        self.cells = CellCache([self.anchors[m] for m in self.anchors_mask], self.input_shape[0])
        self._cache: dict = {}

    def _const(self, key: tuple, make) -> torch.Tensor:
        """Small tensors made once per device: building them from Python data each step would stall on a copy."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def __call__(self, outputs: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """targets: [B,K,6] rows (image, class, cx, cy, w, h) per image, padded with image index -1."""
        device = outputs[0].device
        batch, levels = outputs[0].shape[0], len(outputs)
        check_targets(targets, batch)
        cells = self.cells(outputs)
        preds = flatten_levels(outputs, cells.anchors_per_level)                     # B,N,5+C
        targets = targets.to(device).float().reshape(-1, 6)                         # B*K,6
        valid = targets[:, 0] >= 0                                                   # rows of image -1 are padding
        # padding rows get a harmless box so no NaN reaches the (masked) arithmetic
        pad = self._const(("pad", device), lambda: torch.tensor([0, 0, 0.5, 0.5, 0.1, 0.1], device=device))
        targets = torch.where(valid[:, None], targets, pad)
        b, slot, tbox, tcls, weight, lvl = self._assign(targets, valid, cells)

        # boxes: CIoU of every candidate, averaged over each level's positives, summed over levels
        # index_select on the flat view: its backward is a plain index_add (no sort, unlike advanced indexing)
        ps = preds.view(-1, preds.shape[2]).index_select(0, b * preds.shape[1] + slot)   # K,5+C
        anchor_grid = cells.anchors[slot] / cells.stride[slot]
        # a box narrower than float32 can resolve after centre +- half size has x2 == x1, and CIoU's w / h
        # then has a 0/0 gradient: sizes are kept above MIN_BOX_CELLS (cell units)
        pwh = self.head.decode_wh(ps[:, 2:4], anchor_grid).clamp(min=MIN_BOX_CELLS)
        pbox = torch.cat([self.head.decode_xy(ps[:, :2]), pwh], 1)
        box_loss = ciou_loss(pbox, tbox)
        positives = torch.zeros(levels, device=device).index_add_(0, lvl, weight)   # L
        lbox = (torch.zeros(levels, device=device).index_add_(0, lvl, box_loss * weight)
                / positives.clamp(min=1)).sum()

        # classes: BCE with (smoothed) one-hot targets, per level over positives x classes
        lcls = torch.zeros((), device=device)
        if self.num_classes > 1 or self.cls_neg > 0:
            tc = torch.full_like(ps[:, 5:], self.cls_neg).scatter_(1, tcls[:, None], self.cls_pos)
            bce = F.binary_cross_entropy_with_logits(ps[:, 5:], tc, reduction="none").sum(1)
            lcls = (torch.zeros(levels, device=device).index_add_(0, lvl, bce * weight)
                    / (positives * self.num_classes).clamp(min=1)).sum()

        # objectness: the head's target at positives; several boxes may claim one slot, so keep the
        # best whatever their order
        obj_target = self.head.objectness_target(box_loss)
        tobj = torch.zeros(preds.shape[:2], device=device)
        tobj.view(-1).scatter_reduce_(0, b * preds.shape[1] + slot, obj_target * weight, reduce="amax")
        obj_bce = F.binary_cross_entropy_with_logits(preds[..., 4], tobj, reduction="none")   # B,N
        counted = self.head.counted(preds, cells, targets.view(batch, -1, 6), valid.view(batch, -1), tobj,
                                    self.input_shape)                                # B,N
        per_level = torch.zeros(levels, device=device).index_add_(0, cells.level, (obj_bce * counted).sum(0))
        counts = torch.zeros(levels, device=device).index_add_(0, cells.level, counted.sum(0))
        lobj = (per_level / counts.clamp(min=1) * self._balance(cells, device)).sum()

        lbox, lobj, lcls = lbox * self.box_gain, lobj * self.obj_gain, lcls * self.cls_gain
        loss = (lbox + lobj + lcls) * batch
        return loss, {"box": lbox.detach(), "obj": lobj.detach(), "cls": lcls.detach()}

    def _balance(self, cells: Cells, device: torch.device) -> torch.Tensor:
        """Objectness weight of each level, from its stride."""
        strides = [round(self.input_shape[0] / h) for h, _ in cells.shapes]
        return self._const(("balance", tuple(strides), device),
                           lambda: torch.tensor([self.balance_by_stride[s] for s in strides], device=device))

    def positives(self, outputs: list[torch.Tensor], targets: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Per level, the positive samples compacted: (batch, anchor, row, col, target box in cell units, class).

        `targets` [B,K,6] as for the loss. For inspection and tests; the loss itself uses the dense form of `_assign`.
        """
        check_targets(targets, outputs[0].shape[0])
        cells = self.cells(outputs)
        targets = targets.float().reshape(-1, 6)
        b, slot, tbox, tcls, weight, lvl = self._assign(targets, targets[:, 0] >= 0, cells)
        result = []
        for level, ((h, w), start) in enumerate(zip(cells.shapes, cells.offsets)):
            keep = (weight > 0) & (lvl == level)
            local = slot[keep] - start
            result.append((b[keep], local // (h * w), local % (h * w) // w, local % w, tbox[keep], tcls[keep]))
        return result

    def _assign(self, targets: torch.Tensor, valid: torch.Tensor, cells: Cells):
        """Every (level, offset, anchor, target) candidate, with weight 1 where it is a positive.

        Dense on purpose: no data-dependent shapes, so the step never waits for the GPU.
        Returns per candidate: image, slot in the flattened outputs, target box (cell units), class,
        weight and level; each [K].
        """
        device = targets.device
        anchors = self._const(("anchors", device), lambda: self.anchors.to(device))
        columns = []
        for level, (mask, (h, w), start) in enumerate(zip(self.anchors_mask, cells.shapes, cells.offsets)):
            stride = self.input_shape[0] / h
            scale = self._const(("scale", w, h, device), lambda: torch.tensor([w, h], device=device, dtype=torch.float32))
            gxy = targets[:, 2:4] * scale                                           # M,2 grid units
            gwh = targets[:, 4:6] * scale
            # A,M matched anchors; O,2 cell offsets; O,M usable
            match, offsets, usable = self.head.candidates(gxy, gwh, valid, scale, stride, mask, anchors)
            num_o, num_a, num_m = len(offsets), len(mask), len(gxy)
            weight = (usable[:, None] & match[None] & valid[None, None]).float()     # O,A,M
            cell = (gxy[None] - offsets[:, None]).long()                             # O,M,2
            gi, gj = cell[..., 0].clamp(0, w - 1), cell[..., 1].clamp(0, h - 1)
            tbox = torch.cat([gxy[None] - torch.stack([gi, gj], -1), gwh[None].expand(num_o, -1, -1)], -1)
            a = torch.arange(num_a, device=device)[None, :, None]
            slot = start + (a * h + gj[:, None]) * w + gi[:, None]                   # O,A,M

            def spread(x: torch.Tensor) -> torch.Tensor:                             # [O or 1],M,... -> O*A*M,...
                return x[:, None].expand(num_o, num_a, *x.shape[1:]).reshape(num_o * num_a * num_m, *x.shape[2:])

            columns.append((spread(targets[None, :, 0].long()), slot.reshape(-1), spread(tbox),
                            spread(targets[None, :, 1].long().clamp(0, self.num_classes - 1)), weight.reshape(-1),
                            torch.full((num_o * num_a * num_m,), level, device=device)))
        return tuple(torch.cat(parts) for parts in zip(*columns))


def check_targets(targets: torch.Tensor, batch: int) -> None:
    """Refuse anything but per-image targets [B,K,6] for a batch of B images (shapes only: no device sync)."""
    if targets.dim() != 3 or targets.shape[0] != batch or targets.shape[2] != 6:
        raise ValueError(f"targets must be per image [B={batch}, K, 6] (image, class, cx, cy, w, h; padding rows "
                         f"image -1), got {list(targets.shape)}; utils.data.loader.per_image_targets converts flat rows")
