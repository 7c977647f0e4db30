"""The run configuration: every setting with its default, help text and valid range, written once.

`ModelConfig` describes the network (a checkpoint stores it as a plain dict, `build_model` rebuilds
the network from it alone); `DataConfig` says where the images come from; `TrainConfig` how to
train. train.py's flags are generated from these fields (`utils/settings.py`), so a default or a range
lives in exactly one place. This module is a leaf: it imports nothing from the project, and names
that need a registry (attention blocks, plugins) are checked where they become modules.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, fields
from typing import Any

from utils.settings import copy_nested, add_flags, check_ranges, setting

MODEL_NAMES = ("yolov4-tiny", "yolov5n", "yolov5s", "yolov5m", "yolov5l", "yolov5x")
HEADS = ("yolov4", "yolov5")
LR_SCHEDULES = ("cos", "linear", "step")
MAX_INPUT_SIZE = 4096          # larger inputs are a typo, not a detector setting
# the default evaluation schedule: the best epochs (by fitness) come at the end of the learning-rate decay,
# so early epochs are evaluated only every AUTO_EVAL_PERIOD, the last AUTO_EVAL_TAIL of the run every epoch
AUTO_EVAL_PERIOD = 10
AUTO_EVAL_TAIL = 0.3


def is_eval_epoch(number: int, epochs: int, period: int | None) -> bool:
    """Whether epoch `number` (1-based) of `epochs` is evaluated: every `period` epochs and the last, or with no
    period the default schedule (every AUTO_EVAL_PERIOD epochs, every epoch of the last AUTO_EVAL_TAIL)."""
    if number == epochs:
        return True
    if period is not None:
        return number % period == 0
    return number % AUTO_EVAL_PERIOD == 0 or number > epochs - math.ceil(AUTO_EVAL_TAIL * epochs)
MODEL_CONFIG_VERSION = 2       # 1: the flat dict of the first checkpoints (attention by name only)
# the built-in blocks in phi order: part of the public interface (1-4 keep the tutorials' meaning)
PHI_NAMES = ("none", "se", "cbam", "eca", "ca", "sa", "sge", "bam", "psa", "gam", "danet", "ccnet")


@dataclass
class ModelConfig:
    """The network: family and size, attention per point, head style, classes, anchors, input size."""

    model: str = setting("yolov4-tiny", "detector", choices=MODEL_NAMES)
    attention: str = setting("none", "attention block at every point: a phi 0-11 or a block name", flag="phi",
                             shown="0 = none", metavar="PHI")
    attention_points: dict = setting({}, "blocks placed per point, with options, e.g. "
                                         "'feat1=ca,feat2=cbam:reduction=8,upsample=none' (YOLOv4-tiny points: feat1 "
                                         "feat2 upsample; YOLOv5: p3 p4 p5 up5 up4); points not named get --phi",
                                     flag="attention", type=str, shown="none",
                                     metavar="SPEC")
    head: str | None = setting(None, "box decoding and target assignment: yolov4 (best anchor in the centre cell, "
                                     "exp sizes) or yolov5 (ratio-matched anchors in 3 cells, bounded sizes)",
                               choices=HEADS, type=str, shown="the model's own")
    input_shape: list = setting([416, 416], "input size, a multiple of 32", flag="img", type=lambda s: square(s),
                                low=32, high=MAX_INPUT_SIZE, multiple=32, shown="416", metavar="SIZE")
    backbone: str | None = setting(None, "feature extractor: cspdarknet53-tiny (YOLOv4-tiny), cspdarknet (YOLOv5), a "
                                         "torchvision classifier (resnet18, mobilenet_v3_small, ...), timm:NAME, or "
                                         "'list' to print them", type=str, shown="the model's own", metavar="NAME")
    input_mean: list | None = setting(None, "per-channel RGB mean the backbone expects of 0..1 input (None: 0..1 as "
                                            "is)", cli=False)
    input_std: list | None = setting(None, "per-channel RGB std the backbone expects (None: 0..1 as is)", cli=False)
    class_names: list = setting([], "class names, in label order", cli=False)
    anchors: list | None = setting(None, "anchor sizes [[w, h], ...] in input pixels", cli=False)
    anchors_mask: list | None = setting(None, "anchor indices of each level, coarsest first", cli=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def family(self) -> str:
        """'yolov4-tiny' or 'yolov5'."""
        return "yolov4-tiny" if self.model == "yolov4-tiny" else "yolov5"

    def block_at(self, point: str) -> dict:
        """The block spec {"type": name, **options} placed at `point`."""
        return dict(self.attention_points.get(point) or {"type": self.attention})

    def uniform_attention(self) -> str | None:
        """The block name when every point has the same block without options, else None."""
        if all(spec == {"type": self.attention} for spec in self.attention_points.values()):
            return self.attention
        return None

    def validate(self) -> ModelConfig:
        """Types, ranges and consistency; raises ValueError naming the field."""
        check_ranges(self)
        if not self.class_names or not all(isinstance(n, str) and n.strip() for n in self.class_names):
            raise ValueError("class_names: the model needs at least one class, each a non-empty name")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names: duplicate names in {self.class_names}")
        if len(self.input_shape) != 2:
            raise ValueError(f"input_shape {self.input_shape}: expected [height, width]")
        if self.anchors is not None:
            if not self.anchors or not all(len(a) == 2 and all(isinstance(v, (int, float)) and v > 0 for v in a)
                                           for a in self.anchors):
                raise ValueError(f"anchors: expected a list of positive [w, h] pairs, got {self.anchors}")
        if self.anchors_mask is not None and self.anchors is not None:
            flat = [i for level in self.anchors_mask for i in level]
            if not flat or not all(isinstance(i, int) and 0 <= i < len(self.anchors) for i in flat):
                raise ValueError(f"anchors_mask {self.anchors_mask}: indices must lie in 0..{len(self.anchors) - 1}")
        _check_normalisation(self.input_mean, self.input_std)
        for point, spec in self.attention_points.items():
            if not isinstance(point, str) or not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
                raise ValueError(f"attention_points: {point!r} needs a spec {{'type': name, ...}}, got {spec!r}")
        return self

    def to_dict(self) -> dict:
        """The plain dict a checkpoint stores (readable with torch.load(weights_only=True))."""
        d = dataclasses.asdict(self)
        d["num_classes"] = self.num_classes        # for readers of the file; from_dict checks it
        uniform = self.uniform_attention()
        d["phi"] = PHI_NAMES.index(uniform) if uniform in PHI_NAMES else None   # informative only
        d["version"] = MODEL_CONFIG_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """A checkpoint's config dict (any version) -> a validated ModelConfig; bad fields raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"model config: expected a dict, got {type(d).__name__}")
        d = upgrade_model_dict(d)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"num_classes", "version", "phi"}
        if unknown:
            raise ValueError(f"model config: unknown fields {', '.join(sorted(unknown))}")
        expected_types = {"model": str, "attention": str, "attention_points": dict, "input_shape": list,
                          "class_names": list}
        for key, kind in expected_types.items():
            if key in d and not isinstance(d[key], kind):
                raise ValueError(f"model config: {key} must be a {kind.__name__}, got {type(d[key]).__name__}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in d.get("input_shape", [0])):
            raise ValueError(f"model config: input_shape {d.get('input_shape')} must hold integers")
        config = cls(**{k: copy_nested(v) for k, v in d.items() if k in known}).validate()
        if "num_classes" in d and d["num_classes"] != config.num_classes:
            raise ValueError(f"model config: num_classes {d['num_classes']} != {config.num_classes} class names")
        return config


def _check_normalisation(mean: list | None, std: list | None) -> None:
    """input_mean / input_std: both None, or 3 numbers each, std positive; raises ValueError."""
    if (mean is None) != (std is None):
        raise ValueError(f"input_mean {mean} / input_std {std}: give both or neither")
    for name, values, positive in (("input_mean", mean, False), ("input_std", std, True)):
        if values is None:
            continue
        if (not isinstance(values, list) or len(values) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
                or positive and not all(v > 0 for v in values)):
            raise ValueError(f"{name} {values}: expected 3 {'positive ' if positive else ''}numbers (R, G, B)")


def upgrade_model_dict(d: dict) -> dict:
    """A version-1 config (attention by name, 'phi' beside it, no per-point placement) in today's fields."""
    if d.get("version", 1) >= MODEL_CONFIG_VERSION:
        return d
    d = dict(d)
    d.pop("phi", None)
    d.setdefault("attention", "none")
    d.setdefault("attention_points", {})
    d["version"] = MODEL_CONFIG_VERSION
    return d


def parse_attention_spec(spec: str) -> dict[str, dict]:
    """'feat1=ca,feat2=cbam:reduction=8' -> {'feat1': {'type': 'ca'}, 'feat2': {'type': 'cbam', 'reduction': 8}}."""
    placed: dict[str, dict] = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        point, sep, block = item.partition("=")
        if not sep or not point.strip() or not block.strip():
            raise ValueError(f"--attention {spec!r}: expected POINT=BLOCK[:OPTION=VALUE...] items, got {item!r}")
        name, *options = block.split(":")
        entry: dict[str, Any] = {"type": name.strip().lower()}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--attention {spec!r}: block options are KEY=VALUE, got {option!r}")
            entry[key.strip()] = _literal(value.strip())
        if point.strip() in placed:
            raise ValueError(f"--attention {spec!r}: point {point.strip()!r} is named twice")
        placed[point.strip()] = entry
    return placed


def square(text: str) -> list[int]:
    """--img 416 -> [416, 416]."""
    return [int(text)] * 2


def _literal(text: str) -> int | float | bool | str:
    """An option value: int, float, true/false, else the string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


@dataclass
class DataConfig:
    """Where the training and validation images come from and how they are loaded."""

    data: str = setting("VOCdevkit/VOC2007", "dataset: a VOC folder (Annotations/, JPEGImages/, ImageSets/Main/), a "
                                             "YOLO data.yaml, a COCO instances json or a folder with "
                                             "annotations/instances_*.json, or 'sample' (the built-in sample set)",
                        resume=True)
    classes: str | None = setting(None, "class-names file, one per line", type=str,
                                  shown="DATA/classes.txt, else the names found")
    train_split: str = setting("train", "split to train on (VOC ImageSets/Main name, data.yaml key, COCO "
                                        "instances_<split>)", shown="train, else trainval")
    val_split: str | None = setting(None, "split to evaluate on after each epoch and choose best.pt by", type=str,
                                    shown="val, else a share of the training split")
    val_fraction: float = setting(0.1, "share of the training split held out for validation when the data has no "
                                       "val split", low=0.0, high=0.5)
    cache: str = setting("auto", "keep decoded images in memory; auto = gpu when they fit 40%% of free GPU memory, "
                                 "else ram when they fit half the available RAM, else none",
                         choices=("auto", "none", "ram", "gpu"))
    augment: str = setting("auto", "where augmentation runs; auto = gpu when on CUDA with --cache, else cpu workers",
                           choices=("auto", "cpu", "gpu"))
    workers: int = setting(4, "data-loading processes per GPU", low=0, resume=True)


@dataclass
class TrainConfig:
    """How to train: schedule, optimiser, augmentation strengths, precision, saving, devices."""

    epochs: int = setting(100, "total epochs; with --resume, extends a finished run", low=1, resume=True)
    batch: int | None = setting(None, "global batch size, split over GPUs with torchrun", type=int, low=1,
                                shown="auto: --nbs on a GPU where it fits (measured at start-up), 16 on the CPU")
    nbs: int = setting(64, "nominal batch: gradients are accumulated to about this many images per step, and "
                           "weight decay scaled to it", low=1)
    optimizer: str = setting("sgd", "optimiser", choices=("sgd", "adam"))
    lr: float | None = setting(None, "initial learning rate; with --resume, continues at this rate", type=float,
                               above=0.0, shown="from the hyp file: 0.01 sgd, 0.001 adam", resume=True)
    lr_schedule: str | None = setting(None, "lr from lr0 to lr0*lrf: cosine, linear, or x0.1 at 70%% and 90%% (step)",
                                      choices=LR_SCHEDULES, type=str,
                                      shown="from the hyp file: linear for YOLOv5, cos for YOLOv4-tiny")
    label_smoothing: float | None = setting(None, "class label smoothing eps", type=float, low=0.0, high=0.5,
                                            shown="from the hyp file: 0")
    mosaic: float | None = setting(None, "mosaic probability", type=float, low=0.0, high=1.0,
                                   shown="from the hyp file: 1.0")
    mixup: float | None = setting(None, "mixup probability", type=float, low=0.0, high=1.0,
                                  shown="from the hyp file: 0.0")
    special_aug_ratio: float | None = setting(None, "mosaic only in this first share of epochs", type=float,
                                              low=0.0, high=1.0,
                                              shown="from the hyp file: 1.0 for YOLOv5, 0.7 for YOLOv4-tiny")
    fitness_map50_95: float | None = setting(None, "weight W of mAP50-95 in the fitness that picks best.pt: "
                                                   "(1 - W) mAP50 + W mAP50-95", type=float, low=0.0, high=1.0,
                                             shown="from the hyp file: 0.9 (as ultralytics)",
                                             metavar="W")
    freeze_epochs: int = setting(0, "epochs with the backbone frozen (its BatchNorm in eval mode) before it is "
                                    "trained", low=0)
    freeze_batch: int | None = setting(None, "global batch size while the backbone is frozen", type=int, low=1,
                                       shown="--batch")
    freeze_lr: float | None = setting(None, "initial learning rate while the backbone is frozen (the schedule "
                                            "scales it as it does --lr)", type=float, above=0.0, shown="--lr")
    attention_init: str = setting("auto", "how attention blocks start: paper (their papers' init) or identity "
                                          "(gates near 1, so a pretrained detector's function is kept at step 0); "
                                          "auto = identity when --weights or --backbone-weights loads weights",
                                  choices=("auto", "paper", "identity"))
    weights: str | None = setting(None, "initialise from a checkpoint or state dict where names and shapes match",
                                  type=str, shown="none")
    backbone_weights: str | None = setting(None, "pretrained weights from a local file: a torchvision/timm state dict "
                                                 "(.pth/.safetensors) for --backbone, a checkpoint of ours (its "
                                                 "backbone), Darknet .weights (YOLOv4-tiny) or an ultralytics "
                                                 "YOLOv5 .pt (read without running its pickle)", type=str,
                                           shown="none", metavar="FILE")
    hyp: str | None = setting(None, "hyperparameter YAML", type=str, shown="model_data/hyp.<family>.yaml")
    anchor_fit: str | None = setting(None, "'auto': fit the anchors to the training boxes at --img (IoU k-means, then "
                                           "evolution), or a FILE of w,h pairs (model_data/ format); best possible "
                                           "recall is checked either way", flag="anchors", type=str,
                                     shown="the model's own, with a recall check", metavar="auto|FILE")
    amp: bool | None = setting(None, "mixed precision", type=bool, shown="on with CUDA")
    amp_dtype: str = setting("fp16", "mixed precision's type on CUDA: fp16 (cuDNN's fused BatchNorm, the loss scaled "
                                     "on the GPU) or bf16 (float32's range, no scaling, slower BatchNorm); the CPU "
                                     "uses bf16", choices=("fp16", "bf16"))
    ema: bool = setting(True, "exponential moving average of weights")
    sync_bn: bool = setting(False, "synchronised BatchNorm across GPUs")
    cuda_graph: bool = setting(True, "replay each training step as one CUDA graph where possible (needs GPU "
                                     "augmentation; with --batch below --nbs one GPU)", resume=True)
    compile: bool = setting(False, "torch.compile the model and the loss inside the training step (fused Triton "
                                   "kernels: faster steps after tens of seconds of compilation; for long runs on "
                                   "CUDA)", resume=True)
    eval_period: int | None = setting(None, "evaluate on the val split every N epochs (and after the last)", type=int,
                                      low=1, shown=f"every {AUTO_EVAL_PERIOD} epochs, and every epoch in the "
                                                   f"last {AUTO_EVAL_TAIL * 100:.0f} percent", metavar="N")
    save_period: int = setting(0, "also keep epochN.pt every N epochs (0 = off)", low=0)
    seed: int = setting(0, "random seed", low=0, high=2**31 - 1)
    device: str | None = setting(None, "cuda, cuda:N, N or cpu", type=str, shown="cuda when present", resume=True)
    save_dir: str = setting("logs", "parent folder of runs; with --resume, continue in <save-dir>/<run name>",
                            resume=True)
    name: str | None = setting(None, "run folder name", type=str, shown="<model>_<attention>, numbered if taken")
    exist_ok: bool = setting(False, "reuse --name's folder instead of numbering a new one")
    resume: str | None = setting(None, "continue a run from its last.pt", type=str, shown="none")
    plugin: list = setting([], "Python file(s) of your own attention blocks (@register_attention); give them "
                               "again to resume or predict", type=str, resume=True, metavar="FILE")

    def validate(self) -> TrainConfig:
        """Ranges of each field and the rules between them."""
        check_ranges(self)
        if self.freeze_epochs > self.epochs:
            raise ValueError(f"--freeze-epochs {self.freeze_epochs}: must not exceed --epochs {self.epochs}")
        for flag, value in (("--freeze-batch", self.freeze_batch), ("--freeze-lr", self.freeze_lr)):
            if value is not None and not self.freeze_epochs:
                raise ValueError(f"{flag} {value}: sets the frozen phase, which needs --freeze-epochs N")
        if self.anchor_fit not in (None, "auto") and not os.path.isfile(self.anchor_fit):
            raise ValueError(f"--anchors {self.anchor_fit}: no such file; pass auto or a file of w,h pairs")
        return self


@dataclass
class DetectConfig:
    """Which detections are kept: score threshold and NMS overlap."""

    conf: float = setting(0.25, "score threshold", low=0.0, high=1.0)
    nms_iou: float = setting(0.3, "NMS IoU threshold", low=0.0, high=1.0)
    multi_label: bool = setting(False, "keep every class scoring above --conf for a box, not only its best")


# prediction: ultralytics' 0.25 (the YOLOv4-tiny tutorials' 0.5 is --conf 0.5)
PREDICT_DETECTION = DetectConfig()
# mAP counts every detection: get_map.py and the evaluation after each epoch. IoU 0.6 and multi-label are
# the COCO-style protocol of ultralytics' val.py, so numbers compare with theirs; crowded objects (blood
# cells) also lose true neighbours to NMS at 0.5
EVAL_DETECTION = DetectConfig(conf=0.001, nms_iou=0.6, multi_label=True)


@dataclass
class RunConfig:
    """One training run: the three parts together."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig

    def flat(self) -> dict:
        """Data and training settings as one flat dict (a checkpoint's `train_args`)."""
        return {**dataclasses.asdict(self.data), **dataclasses.asdict(self.train)}


RUN_PARTS = (ModelConfig, DataConfig, TrainConfig)


def train_parser(description: str | None = None) -> argparse.ArgumentParser:
    """train.py's flags, generated from the configuration dataclasses (no torch needed: --help stays instant)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, *RUN_PARTS)
    return parser


def parse_train_flags(argv: list[str] | None, parser: argparse.ArgumentParser | None = None) -> dict:
    """The flags given on the command line (absent ones are left out), by field name."""
    return vars((parser or train_parser()).parse_args(argv))


@dataclass
class StudyConfig:
    """The attention study: variants x seeds, where they run and how they are compared (study.py's own flags)."""

    phi: str | None = setting(None, "variants: comma list of phis or block names, e.g. 0,1,2,3,4", type=str,
                              metavar="LIST")
    model: str | None = setting(None, "variants: comma list of models, e.g. yolov4-tiny,yolov5n", type=str,
                                metavar="LIST")
    backbone: str | None = setting(None, "variants: comma list of backbones, e.g. cspdarknet53-tiny,resnet18",
                                   type=str, metavar="LIST")
    attention: list = setting([], "a variant per spec (repeatable; the --attention syntax of train.py), e.g. "
                                  "--attention feat1=ca --attention feat1=ca,feat2=cbam", type=str, metavar="SPEC")
    variant: list = setting([], "a named variant of any train flags (repeatable), e.g. "
                                "--variant 'ca_lr=--phi ca --lr 0.02'", type=str, metavar="NAME=FLAGS")
    seeds: str = setting("3", "number of seeds (0..N-1) or a list, e.g. 0,1,2", metavar="N|LIST")
    baseline: str | None = setting(None, "the variant deltas are measured against", type=str,
                                   shown="the first variant", metavar="NAME")
    name: str = setting("study", "study folder name under --save-dir; run the same command again to resume it")
    save_dir: str = setting("logs", "parent folder of the study folder")
    test_split: str = setting("test", "ImageSets/Main split the table is computed on (never used for best.pt)")
    jobs: int | None = setting(None, "training runs at once per device", type=int, low=1,
                               shown="1 on CPU; on GPU by free memory and CPU cores")
    devices: str | None = setting(None, "GPU indices to spread the runs over, e.g. 0,1, or cpu", type=str,
                                  shown="every visible GPU, else cpu", metavar="LIST")
    mps: str = setting("auto", "CUDA MPS for concurrent runs, started and stopped by the study (auto: when "
                               "available, on CUDA, with --jobs > 1)", choices=("auto", "on", "off"))
    bootstrap: int = setting(1000, "paired bootstrap resamples of the test images", low=10)
    retry_failed: bool = setting(False, "run again the runs an earlier call recorded as failed")
