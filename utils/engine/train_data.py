"""From --data/--cache/--augment flags to a stream of training batches and the validation records."""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from utils.config import DataConfig
from utils.data.dataset import DatasetError, load_voc, read_class_names
from utils.data.gpu_augment import GpuAugmenter
from utils.data.loader import (AugmentSampler, TrainDataset, cpu_loader, decode_all, image_tensor, loaded_sizes,
                          padded_boxes, to_training_batch)
from utils.log import get_logger
from utils.data.sample_data import DEFAULT_ROOT, ensure_sample_dataset

log = get_logger(__name__)
# keep the GPU image cache under this share of free GPU memory; the rest is for training
GPU_CACHE_SHARE = 0.4


def resolve_data_root(data: str) -> Path:
    """`sample` -> the generated sample set; otherwise a VOC folder that must hold annotations."""
    if data == "sample":
        return ensure_sample_dataset(DEFAULT_ROOT)
    root = Path(data)
    if not (root / "Annotations").is_dir() or not any((root / "Annotations").iterdir()):
        hint = (" put Pascal VOC there (Annotations/, JPEGImages/, ImageSets/Main/: see VOCdevkit/README.md),"
                " or pass --data sample to train on the built-in sample set")
        raise DatasetError(f"--data {data}: no annotations in {root / 'Annotations'};{hint}")
    return root


def load_splits(data: DataConfig) -> tuple[list, list, list[str]]:
    """Train and validation records with one class list (the train split's)."""
    root = resolve_data_root(data.data)
    names = read_class_names(data.classes) if data.classes else None
    train, names = load_voc(root, data.train_split, names, fallback="trainval")
    val, _ = load_voc(root, data.val_split, names, fallback="test")
    return train, val, names


class TrainData:
    """Training batches for each epoch (CPU workers or batched GPU augmentation) plus the validation records."""

    def __init__(self, data: DataConfig, input_shape: tuple[int, int], batch_size: int, seed: int, hyp: dict,
                 device: torch.device, rank: int = 0, world: int = 1, progress: bool = True):
        """batch_size: this process's share of the global batch."""
        self.config, self.hyp, self.device, self.seed = data, hyp, device, seed
        self.rank, self.batch_size = rank, batch_size
        self.input_shape = tuple(input_shape)
        self.train_records, self.val_records, self.class_names = load_splits(data)
        images = None
        if data.cache != "none":
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
            dataset = TrainDataset(self.train_records, self.input_shape, hyp, images)
            self.loader = cpu_loader(dataset, self.sampler, self.batch_size, data.workers, device.type == "cuda")

    def _gpu_augmenter(self, images: list[np.ndarray]) -> GpuAugmenter:
        tensor = image_tensor(images, self.input_shape)
        where = "RAM"
        if self.config.cache == "gpu" and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if tensor.numel() < GPU_CACHE_SHARE * free:
                tensor, where = tensor.to(self.device), "GPU memory"
            else:
                log.warning("%.1f GiB of images do not fit in %.0f%% of free GPU memory; caching them in RAM instead",
                            tensor.numel() / 2**30, GPU_CACHE_SHARE * 100)
        if tensor.device.type == "cpu" and self.device.type == "cuda":
            tensor, where = tensor.pin_memory(), "pinned RAM"
        log.info("cached %d images (%.0f MiB) in %s; augmenting on %s", len(images), tensor.numel() / 2**20, where,
                 self.device)
        sizes = loaded_sizes(self.train_records, self.input_shape)
        boxes, labels, counts = padded_boxes(self.train_records, sizes)
        return GpuAugmenter(tensor, sizes, boxes, labels, counts, self.input_shape, self.hyp, self.device)

    def _rng(self, epoch: int, step: int) -> np.random.Generator:
        """The random draws of one GPU batch: fixed by seed, epoch, rank and step."""
        return np.random.default_rng([self.seed, epoch, self.rank, step])

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

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
    device = side.device
    pending = None
    while True:
        with torch.cuda.stream(side):
            made = next(batches, None)
            ready = torch.cuda.Event()
            ready.record(side)
        if pending is not None:
            images, targets, done = pending
            consumer = torch.cuda.current_stream(device)
            consumer.wait_event(done)
            images.record_stream(consumer)    # the allocator must not reuse them while the step reads them
            targets.record_stream(consumer)
            yield images, targets
        if made is None:
            return
        pending = (*made, ready)
