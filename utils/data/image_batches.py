"""Image files -> batches of decoded RGB tensors on a device, read and decoded on a background thread.

JPEGs are decoded in one batched call of torchvision's decode_jpeg on the target device (nvJPEG
on CUDA, libjpeg-turbo on the CPU); other formats, and JPEGs that call refuses, are decoded by
OpenCV (`load_image`, the project's one decoder) and counted. Pixels are as stored (no EXIF
rotation), as `load_image` gives them. While the caller runs a batch, the next ones are read.

The reading thread's CUDA calls (nvJPEG, copies) would break a CUDA graph captured meanwhile on
another thread, so it decodes inside `CaptureGuard.using()`; a caller about to capture enters
`capturing()`, which waits for every such user and holds new ones back. On CUDA the thread decodes on
a stream of its own (utils/ops/streams.py): a batch's `made` event says when its images are ready, and
whoever uses them calls `adopt()` first. (torchvision's decoder allocates its outputs on the caller's
stream but writes them on a stream of its own: on a stream shared with other threads' queued kernels it
could overwrite memory those kernels have yet to read, which once failed an index assert.) With
`host_copies` the thread also copies each image back as a BGR array, so that writer threads never touch
CUDA.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from utils.data.dataset import ImageReadError, load_image
from utils.data.prefetch import prefetched
from utils.ops.capture_guard import CaptureGuard
from utils.ops.streams import adopt, made_event, on_stream, side_stream

JPEG_MAGIC = b"\xff\xd8\xff"
QUEUE_DEPTH = 3            # batches decoded ahead of the consumer


def device_decode_available() -> bool:
    """torchvision still has decode_jpeg (deprecated from 0.29 in favour of TorchCodec)."""
    import torchvision.io  # noqa: PLC0415 (torchvision loads only where images are decoded with it)
    return hasattr(torchvision.io, "decode_jpeg")


@dataclass
class DecodedBatch:
    """The readable images of one chunk of paths: their paths and RGB uint8 [3,H,W] tensors on the device."""

    paths: list[Path]
    images: list[torch.Tensor]
    host: list[np.ndarray] | None = None                  # the same images as BGR arrays (host_copies)
    skipped: list[Path] = field(default_factory=list)    # unreadable by any decoder
    on_host: int = 0                                      # decoded by OpenCV instead of decode_jpeg
    made: torch.cuda.Event | None = None                  # recorded on the reader's stream after the images

    def adopt(self) -> None:
        """Make the images safe to use on the current stream (call on every stream that uses them)."""
        adopt(self.images, self.made)


def _rgb_tensor(bgr: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1))).to(device)


def bgr_arrays(images: list[torch.Tensor]) -> list[np.ndarray]:
    """RGB uint8 [3,H,W] tensors, all on one device -> BGR [H,W,3] arrays: reordered where the tensors are, then
    copied back to the host in one transfer."""
    if not images:
        return []
    flat = torch.cat([im.flip(0).permute(1, 2, 0).reshape(-1) for im in images]).cpu().numpy()
    ends = np.cumsum([im.numel() for im in images]).tolist()
    return [flat[end - im.numel():end].reshape(im.shape[1], im.shape[2], 3) for im, end in zip(images, ends)]


def file_bytes(path: Path) -> bytearray:
    """A file's bytes in a writable buffer that torch.frombuffer can share: read straight into it (the read
    lets other threads run; copying a bytes object into one would hold the interpreter for the whole copy), with
    fewer system calls than pathlib's read_bytes, each a turn at the interpreter for a reading thread."""
    with open(path, "rb", buffering=0) as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        view, got = memoryview(data), 0
        while got < len(data):
            n = f.readinto(view[got:])
            if not n:                       # the file shrank since its size was read
                break
            got += n
    return data if got == len(data) else data[:got]


def decode_chunk(paths: list[Path], device: torch.device, host_copies: bool = False) -> DecodedBatch:
    """Decode a chunk: its JPEGs in one decode_jpeg call on `device`, the rest (and any it refuses) by OpenCV.

    host_copies: also return every image as a BGR array (copied back from the device where decoded there).
    """
    from torchvision.io import ImageReadMode, decode_jpeg  # noqa: PLC0415 (imported by the thread that decodes)

    raw: list[bytearray | None] = []
    for path in paths:
        try:
            raw.append(file_bytes(path))
        except OSError:
            raw.append(None)                # load_image below names the failure the same way as the CPU path
    images: list[torch.Tensor | None] = [None] * len(paths)
    jpegs = [i for i, data in enumerate(raw) if data is not None and data[:3] == JPEG_MAGIC]
    if jpegs:
        tensors = [torch.frombuffer(raw[i], dtype=torch.uint8) for i in jpegs]
        try:
            decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        except (RuntimeError, ValueError):  # one bad file fails the batch: find which, one by one
            decoded = []
            for tensor in tensors:
                try:
                    decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
                except (RuntimeError, ValueError):
                    decoded.append(None)
        for i, image in zip(jpegs, decoded):
            images[i] = image
    batch = DecodedBatch([], [])
    host: list[np.ndarray | None] = []           # OpenCV's arrays, None where decode_jpeg decoded the image
    for path, image in zip(paths, images):
        bgr = None
        if image is None:
            try:
                bgr = load_image(path)
            except ImageReadError:
                batch.skipped.append(path)
                continue
            image = _rgb_tensor(bgr, device)
            batch.on_host += 1
        batch.paths.append(path)
        batch.images.append(image)
        host.append(bgr)
    if host_copies:
        copies = iter(bgr_arrays([im for im, bgr in zip(batch.images, host) if bgr is None]))
        batch.host = [bgr if bgr is not None else next(copies) for bgr in host]
    return batch


class ImageBatches:
    """Iterate DecodedBatch of `batch` paths each, decoded on a background thread up to QUEUE_DEPTH ahead."""

    def __init__(self, paths: list[Path], batch: int, device: torch.device, host_copies: bool = False,
                 guard: CaptureGuard | None = None):
        self.paths, self.batch, self.device, self.host_copies = list(paths), batch, device, host_copies
        self.guard = guard or CaptureGuard()     # the thread decodes using it; a caller capturing a graph waits

    def __len__(self) -> int:
        return -(-len(self.paths) // self.batch)

    def __iter__(self) -> Iterator[DecodedBatch]:
        return prefetched(self._decoded(), QUEUE_DEPTH, name="image-batches")

    def _decoded(self) -> Iterator[DecodedBatch]:
        """The batches, decoded one after another (on prefetched's thread)."""
        # off the legacy default stream: the model does not queue behind it. Made before the first batch, while
        # the caller waits for that batch (so it is not capturing a CUDA graph)
        stream = side_stream(self.device)
        for start in range(0, len(self.paths), self.batch):
            with self.guard.using(), on_stream(stream):
                item = decode_chunk(self.paths[start:start + self.batch], self.device, self.host_copies)
                item.made = made_event(self.device)
            yield item
