"""Training batches: the CPU path (DataLoader workers, OpenCV) and the GPU path (images held in memory).

Both draw plans from utils/data/augment.py, so they produce the same statistics of images and boxes.
The sampler yields (index, seed, mosaic) items: every sample's randomness depends only on
(--seed, epoch, position), whatever the number of workers or processes.
"""
from __future__ import annotations

import math
import sys
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from utils.data.augment import hsv_cpu, plan_targets, render_cpu, sample_plans
from utils.data.dataset import ImageReadError, Record, load_image
from utils.log import get_logger
from utils.ops.images import GRAY, fitted_size, load_resized

log = get_logger(__name__)


def loaded_sizes(records: list[Record], input_shape: tuple[int, int]) -> np.ndarray:
    """[N,2] (h, w) of each image once resized to fit the input (what load_resized produces)."""
    return np.array([fitted_size(r.height, r.width, input_shape) for r in records], dtype=np.int64).reshape(-1, 2)


def padded_boxes(records: list[Record], sizes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every record's boxes in loaded pixels, padded: boxes [N,K,4], labels [N,K], counts [N]."""
    counts = torch.tensor([len(r.labels) for r in records], dtype=torch.long)
    k = max(1, int(counts.max()) if len(records) else 1)
    boxes = torch.zeros(len(records), k, 4)
    labels = torch.zeros(len(records), k, dtype=torch.long)
    for i, r in enumerate(records):
        if len(r.labels):
            scale = np.array([sizes[i, 1] / r.width, sizes[i, 0] / r.height] * 2, dtype=np.float32)
            boxes[i, :len(r.labels)] = torch.from_numpy(r.boxes * scale)
            labels[i, :len(r.labels)] = torch.from_numpy(r.labels)
    return boxes, labels, counts


class AugmentSampler(Sampler):
    """Shuffled (index, seed, mosaic) items of this process's shard; call set_epoch before each epoch."""

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch, self.mosaic = 0, True

    def set_epoch(self, epoch: int, mosaic: bool) -> None:
        self.epoch, self.mosaic = epoch, mosaic

    def indices(self) -> np.ndarray:
        """This rank's record indices for the epoch (padded so every rank gets as many)."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        total = math.ceil(self.size / self.world_size) * self.world_size
        order = np.concatenate([order, order[:total - self.size]])
        return order[self.rank::self.world_size]

    def __iter__(self):
        for position, index in enumerate(self.indices()):
            yield int(index), (self.seed, self.epoch, self.rank, position), self.mosaic

    def __len__(self) -> int:
        return math.ceil(self.size / self.world_size)


class TrainDataset(Dataset):
    """CPU path: renders one augmented sample per (index, seed, mosaic) item with OpenCV."""

    def __init__(self, records: list[Record], input_shape: tuple[int, int], hyp: dict,
                 images: list[np.ndarray] | None = None):
        self.records, self.input_shape, self.hyp = records, input_shape, hyp
        self.sizes = loaded_sizes(records, input_shape)
        self.boxes, self.labels, self.counts = padded_boxes(records, self.sizes)
        self.images = images           # loaded BGR images when cached in RAM
        self.failed: set[str] = set()  # per worker process

    def __len__(self) -> int:
        return len(self.records)

    def _source(self, index: int) -> np.ndarray | None:
        if self.images is not None:
            return self.images[index]
        path = self.records[index].image_path
        try:
            return load_resized(load_image(path), self.input_shape)
        except ImageReadError:
            if path not in self.failed:
                self.failed.add(path)
                log.warning("cannot decode %s; it is left blank (%d such images so far in this worker)", path,
                            len(self.failed))
            return None

    def _render(self, plans) -> tuple[np.ndarray, torch.Tensor]:
        sources = [self._source(i) if i >= 0 else None for i in plans.src[0]]
        plans.src[0] = [i if s is not None else -1 for i, s in zip(plans.src[0], sources)]
        image = hsv_cpu(render_cpu(sources, plans.affine[0], plans.rect[0], self.input_shape), plans.hsv[0])
        targets = plan_targets(plans, self.boxes, self.labels, self.counts, self.input_shape)
        return image, targets[targets[:, 0] >= 0]

    def __getitem__(self, item: tuple[int, tuple, bool]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed, mosaic = item
        rng = np.random.default_rng(list(seed))
        plans = sample_plans(rng, [index], self.sizes, self.input_shape, self.hyp, mosaic)
        image, targets = self._render(plans)
        if plans.mixup[0]:
            partner = sample_plans(rng, [rng.integers(len(self))], self.sizes, self.input_shape,
                                   {**self.hyp, "mixup": 0.0}, mosaic)
            image2, targets2 = self._render(partner)
            lam = plans.lam[0]
            image = (image.astype(np.float32) * lam + image2.astype(np.float32) * (1 - lam)).round().astype(np.uint8)
            targets = torch.cat([targets, targets2], 0)
        # BGR HWC -> RGB CHW; targets without the image column (collate adds it)
        return torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1))), targets[:, 1:]


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [B,3,H,W] and per-image targets [B,K,6] float32 (K = most boxes of an image, at least 1).

    Row group b holds image b's boxes (image index first), then padding rows of image index -1:
    the layout of the GPU batches. Images stay uint8 so workers pin and copy 4x fewer bytes.
    """
    images = torch.stack([b[0] for b in batch])
    k = max([1, *(len(t) for _, t in batch)])
    targets = torch.zeros(len(batch), k, 6)
    targets[..., 0] = -1
    for i, (_, t) in enumerate(batch):
        targets[i, :len(t), 0] = i
        targets[i, :len(t), 1:] = t
    return images, targets


def per_image_targets(flat: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Flat rows [M,6] (image index first; rows of image -1 dropped) -> per image [B,K,6] as `collate` lays them out.

    A host-side helper (for tests and tools): sizing K reads the values.
    """
    flat = flat[flat[:, 0] >= 0].float()
    image = flat[:, 0].long()
    if len(image) and int(image.max()) >= batch_size:
        raise ValueError(f"targets name image {int(image.max())} but the batch has {batch_size} images")
    counts = torch.bincount(image, minlength=batch_size)                                  # B
    order = torch.argsort(image, stable=True)                                             # keeps each image's order
    image = image[order]
    rank = torch.arange(len(image)) - (counts.cumsum(0) - counts)[image]                  # position inside its image
    targets = torch.zeros(batch_size, max(1, int(counts.max()) if batch_size else 1), 6)
    targets[..., 0] = -1
    targets[image, rank] = flat[order]
    return targets


def flat_targets(targets: torch.Tensor) -> torch.Tensor:
    """Per-image targets [B,K,6] -> the rows that are boxes [M,6] (padding dropped; reads values, host-side)."""
    rows = targets.reshape(-1, 6)
    return rows[rows[:, 0] >= 0]


def to_training_batch(images: torch.Tensor, targets: torch.Tensor, device: torch.device,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A CPU batch (uint8 images, targets [B,K,6]) -> on `device`: images 0..1 in `dtype`, targets float32.

    The same batch the GPU renderer makes; uint8 is copied (a quarter of the bytes) and converted there.
    """
    images = images.to(device, non_blocking=True).to(dtype).div_(255)                    # B,3,H,W
    return images, targets.to(device, non_blocking=True).float()


def _init_worker(_: int) -> None:
    # one thread per worker: OpenCV's own pool in every worker would oversubscribe the cores
    cv2.setNumThreads(0)


def cpu_loader(dataset: TrainDataset, sampler: AugmentSampler, batch_size: int, workers: int,
               pin_memory: bool) -> DataLoader:
    """DataLoader over the CPU path: workers, pinned memory, persistent workers."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, persistent_workers=workers > 0, drop_last=False,
                      prefetch_factor=4 if workers > 0 else None, worker_init_fn=_init_worker)


def decode_all(records: list[Record], input_shape: tuple[int, int], workers: int = 8,
               progress: bool = True) -> tuple[list[np.ndarray], list[int]]:
    """Decode and resize every image once (for --cache); returns the images and the indices that failed."""
    def load(record: Record) -> np.ndarray | None:
        try:
            return load_resized(load_image(record.image_path), input_shape)
        except ImageReadError:
            return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        images = list(tqdm(pool.map(load, records), total=len(records), desc="cache images",
                           disable=not progress, file=sys.stdout))
    failed = [i for i, im in enumerate(images) if im is None]
    return images, failed


def image_tensor(images: list[np.ndarray], input_shape: tuple[int, int]) -> torch.Tensor:
    """Loaded BGR images -> one uint8 tensor [N,H,3,W] (RGB, top-left aligned, gray-padded).

    Rows x channels x columns: the layout the GPU renderer's row pass reads, so a batch's tiles are one
    contiguous gather (utils/data/gpu_augment.py).
    """
    out = torch.full((len(images), input_shape[0], 3, input_shape[1]), GRAY, dtype=torch.uint8)
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        out[i, :h, :, :w] = torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1].transpose(0, 2, 1)))
    return out
