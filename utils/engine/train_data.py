"""From --data/--cache/--augment flags to a stream of training batches and the validation records."""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from utils.config import DataConfig
from utils.data.cache_plan import GPU_SHARE, CachePlan, decoded_bytes, plan_cache
from utils.data.dataset import DatasetError, LoadReport, Record, default_fallback, read_class_names
from utils.data.formats import DataSource, open_data
from utils.data.gpu_augment import GpuAugmenter, paint_and_shift_colours
from utils.data.loader import (AugmentSampler, TrainDataset, cpu_loader, decode_all, image_tensor, loaded_sizes,
                          padded_boxes, to_training_batch)
from utils.engine.torch_utils import compile_fixed
from utils.log import get_logger
from utils.ops.streams import adopt, made_event, on_stream

log = get_logger(__name__)


# Keys the hash that picks the held-out validation images: fixed, not --seed, so every run of a study
# validates on the same images (and a resumed run on the ones it started with).
VAL_CARVE_KEY = b"val-carve-v1"


@dataclass
class Splits:
    """Training and validation records, their class names, and where the validation records came from."""

    train: list[Record]
    val: list[Record]
    class_names: list[str]
    val_source: str  # "val", "test (no val split)", "10% of trainval (29 images)"
    source: DataSource


def carve_validation(records: list[Record], fraction: float) -> tuple[list[Record], list[Record]]:
    """(train, held out): max(1, round(fraction * N)) records chosen by a keyed hash of their ids.

    Ranking by hash, not by position, keeps the choice independent of the split file's order; the
    records keep their order.
    """
    n = len(records)
    k = min(n - 1, max(1, round(fraction * n)))
    rank = sorted(range(n), key=lambda i: hashlib.blake2b(records[i].image_id.encode(), key=VAL_CARVE_KEY,
                                                            digest_size=8).digest())
    held = set(rank[:k])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def _check_train_objects(records: list[Record], report: LoadReport) -> None:
    if not any(len(r.boxes) for r in records):
        unknown = f" ({sum(report.unknown.values())} objects of classes not in the class list were skipped)" \
            if report.unknown else ""
        raise DatasetError(f"no objects in any of the {len(records)} training images of {report.split_file}"
                           f"{unknown}; annotate the images or pass --train-split naming an annotated split")


def _validation(source: DataSource, data: DataConfig, train: list[Record], train_report: LoadReport,
                names: list[str]) -> tuple[list[Record], list[Record], str]:
    """(train, val, source): the val split asked for, else `val`, else a share carved out of train."""
    split = data.val_split or ("val" if source.has_split("val") else None)
    if split is not None:
        report = LoadReport()
        val, _ = source.load(split, names, fallback=default_fallback(split), report=report)
        if report.split == "test" and split != "test":      # asked for by name, it is the user's choice
            log.warning("evaluating on the test split after each epoch: best.pt is chosen on it, so its test "
                        "numbers are optimistic; leave --val-split out to hold out a share of %s instead",
                        train_report.split)
        return train, val, report.split + (f" (no {report.fallback_from} split)" if report.fallback_from else "")
    main = source.split_place
    if data.val_fraction <= 0 or len(train) < 2:
        why = "--val-fraction is 0" if data.val_fraction <= 0 else f"{train_report.split} has only {len(train)} image"
        raise DatasetError(f"no val split in {main} and {why}; pass --val-split NAME (a split of {main}) "
                           f"or --val-fraction above 0 with at least 2 training images")
    train, val = carve_validation(train, data.val_fraction)
    source = f"{data.val_fraction * 100:g}% of {train_report.split} ({len(val)} images)"
    log.info("no val split in %s: validating on %s, left out of training", main, source)
    return train, val, source


def load_splits(data: DataConfig) -> Splits:
    """Train and validation records with one class list (the train split's)."""
    data_source = open_data(data.data)
    names = read_class_names(data.classes) if data.classes else None
    report = LoadReport()
    train, names = data_source.load(data.train_split, names, fallback=default_fallback(data.train_split),
                                    report=report)
    _check_train_objects(train, report)
    train, val, source = _validation(data_source, data, train, report, names)
    shared = {r.image_id for r in train} & {r.image_id for r in val}
    if shared:      # e.g. training on trainval (train + val) while validating on val
        log.warning("%d of the %d validation images (%s) are also in the training split %s: their mAP is "
                    "optimistic; validate on a split that does not overlap it", len(shared), len(val), source,
                    report.split)
    if not any(len(r.boxes) for r in val):
        # without a mAP the trainer cannot rank the epochs
        log.warning("the validation split %s has no objects: mAP cannot be measured, so best.pt follows the last "
                    "evaluated epoch; pass --val-split naming an annotated split to choose by mAP", source)
    return Splits(train, val, names, source, data_source)


class TrainData:
    """Training batches for each epoch (CPU workers or batched GPU augmentation) plus the validation records."""

    def __init__(self, data: DataConfig, input_shape: tuple[int, int], batch_size: int, seed: int, hyp: dict,
                 device: torch.device, rank: int = 0, world: int = 1, progress: bool = True, compiled: bool = False):
        """batch_size: this process's share of the global batch; compiled: torch.compile the GPU augmenter's
        pixel work when the images are cached on the device (--compile; fixed shapes, so not from RAM)."""
        self.config, self.hyp, self.device, self.seed, self.compiled = data, hyp, device, seed, compiled
        self.rank, self.batch_size = rank, batch_size
        self.input_shape = tuple(input_shape)
        splits = load_splits(data)
        self.train_records, self.val_records, self.class_names = splits.train, splits.val, splits.class_names
        self.val_source = splits.val_source  # which split (or share of the training split) validates
        self.source = splits.source          # the dataset and its format
        self.cache_plan: CachePlan = plan_cache(
            data.cache, decoded_bytes(self.train_records, len(self.val_records), self.input_shape), device,
            gpu_possible=data.augment != "cpu", processes=world)
        self.cache = self.cache_plan.choice      # none, ram or gpu: --cache auto resolved
        images = None
        if self.cache != "none":
            images, failed = decode_all(self.train_records, self.input_shape, max(data.workers, 1), progress)
            if failed:
                log.warning("skipped %d training images that cannot be decoded (first: %s)", len(failed),
                            self.train_records[failed[0]].image_path)
                keep = [i for i in range(len(images)) if images[i] is not None]
                self.train_records = [self.train_records[i] for i in keep]
                images = [images[i] for i in keep]
        self.sampler = AugmentSampler(len(self.train_records), seed, rank, world)
        self.on_gpu = data.augment == "gpu" or (data.augment == "auto" and device.type == "cuda" and images is not None)
        if self.on_gpu and images is None:
            raise ValueError("--augment gpu needs the images in memory: add --cache ram or --cache gpu")
        self._side_stream = None
        # half precision halves the bytes the renderer and HSV move; measured against fp32: render error
        # mean 0.04, max 0.36 gray levels; HSV mean under 0.2, max under 2.5 (tests/test_augment.py).
        # CPU batches are converted to it too, so both paths hand the step the same batch
        self.render_dtype = torch.float16 if device.type == "cuda" else torch.float32
        if self.on_gpu:
            self.gpu = self._gpu_augmenter(images)
            if device.type == "cuda":
                self._side_stream = torch.cuda.Stream(device)
        else:
            self._dataset = TrainDataset(self.train_records, self.input_shape, hyp, images)
            self.loader = self._cpu_loader()

    def _cpu_loader(self):
        return cpu_loader(self._dataset, self.sampler, self.batch_size, self.config.workers, self.device.type == "cuda")

    def set_batch_size(self, batch_size: int) -> None:
        """This process's batch from now on (a fine-tuning phase's own batch); the CPU loader is rebuilt."""
        if batch_size != self.batch_size:
            self.batch_size = batch_size
            if not self.on_gpu:
                self.loader = self._cpu_loader()

    def _gpu_augmenter(self, images: list[np.ndarray]) -> GpuAugmenter:
        tensor = image_tensor(images, self.input_shape)
        where = "RAM"
        if self.cache == "gpu" and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if tensor.numel() < GPU_SHARE * free:
                tensor, where = tensor.to(self.device), "GPU memory"
            else:
                log.warning("%.1f GiB of images do not fit in %.0f%% of free GPU memory; caching them in RAM instead",
                            tensor.numel() / 2**30, GPU_SHARE * 100)
        if tensor.device.type == "cpu" and self.device.type == "cuda":
            tensor, where = tensor.pin_memory(), "pinned RAM"
        log.info("cached %d images (%.0f MiB) in %s; augmenting on %s", len(images), tensor.numel() / 2**20, where,
                 self.device)
        sizes = loaded_sizes(self.train_records, self.input_shape)
        boxes, labels, counts = padded_boxes(self.train_records, sizes)
        pixels = compile_fixed(paint_and_shift_colours) if self.compiled and tensor.device == self.device else None
        return GpuAugmenter(tensor, sizes, boxes, labels, counts, self.input_shape, self.hyp, self.device, pixels)

    def _rng(self, epoch: int, step: int) -> np.random.Generator:
        """The random draws of one GPU batch: fixed by seed, epoch, rank and step."""
        return np.random.default_rng([self.seed, epoch, self.rank, step])

    @property
    def batches_per_epoch(self) -> int:
        return self.batches_at(self.batch_size)

    def batches_at(self, batch_size: int) -> int:
        """Batches in one epoch at this process's `batch_size`."""
        return math.ceil(len(self.sampler) / batch_size)

    def batches(self, epoch: int, mosaic: bool):
        """(images, targets) batches of one epoch on the device: images 0..1 in render_dtype, targets [B,K,6]."""
        self.sampler.set_epoch(epoch, mosaic)
        if not self.on_gpu:
            yield from (to_training_batch(*batch, self.device, self.render_dtype) for batch in self.loader)
            return
        order = self.sampler.indices()
        made = (self.gpu(order[start:start + self.batch_size], self._rng(epoch, i), mosaic, self.render_dtype)
                for i, start in enumerate(range(0, len(order), self.batch_size)))
        yield from prefetched(made, self._side_stream) if self._side_stream is not None else made


def prefetched(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], side: torch.cuda.Stream):
    """Make each batch on a side CUDA stream while the one before it trains: augmentation overlaps the step."""
    pending = None
    while True:
        with on_stream(side):
            made = next(batches, None)
            ready = made_event(side.device)
        if pending is not None:
            images, targets, done = pending
            adopt((images, targets), done)    # the step waits for them; their memory is kept while it reads
            yield images, targets
        if made is None:
            return
        pending = (*made, ready)
