"""The batched JPEG encoder (utils/ops/jpeg.py): its tables are the standard's as libjpeg writes them, and its
files decode (OpenCV and PIL) to what libjpeg's own encoding at the same settings decodes to."""
import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from utils.ops import jpeg

SAME_SETTINGS = [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]


def segments(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, payload) of every segment from SOI up to and including SOS."""
    assert data[:2] == b"\xff\xd8"
    found, i = [], 2
    while True:
        assert data[i] == 0xFF, f"no marker at byte {i}"
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        found.append((marker, data[i + 4:i + 2 + length]))
        i += 2 + length
        if marker == 0xDA:
            return found


def dqt_tables(data: bytes) -> dict[int, list[int]]:
    tables = {}
    for marker, payload in segments(data):
        while marker == 0xDB and payload:
            tables[payload[0] & 15], payload = list(payload[1:65]), payload[65:]
    return tables


def dht_tables(data: bytes) -> dict[int, tuple[list[int], list[int]]]:
    tables = {}
    for marker, payload in segments(data):
        while marker == 0xC4 and payload:
            counts = list(payload[1:17])
            tables[payload[0]], payload = (counts, list(payload[17:17 + sum(counts)])), payload[17 + sum(counts):]
    return tables


def libjpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, data = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality] + SAME_SETTINGS)
    assert ok
    return data.tobytes()


def ours(images: list[np.ndarray], quality: int = 95) -> list[bytes]:
    tensors = [torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))) for im in images]
    return [f.tobytes() for f in jpeg.encode_jpegs(tensors, quality)]


def decoded(data: bytes) -> np.ndarray:
    """RGB pixels by OpenCV, checked against PIL's decoding (a second decoder)."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None, "OpenCV could not decode the file"
    pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.abs(pil.astype(int) - bgr[:, :, ::-1]).max() <= 2, "PIL and OpenCV decode the file differently"
    return bgr[:, :, ::-1]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB, 99 for equal images."""
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return 99.0 if mse == 0 else min(99.0, 10 * np.log10(255 ** 2 / mse))


def test_tables_are_the_standards_as_libjpeg_writes_them():
    image = np.zeros((8, 8, 3), np.uint8)
    for quality in (10, 50, 95, 100):
        theirs, mine = libjpeg(image, quality), ours([image], quality)[0]
        assert dqt_tables(mine) == dqt_tables(theirs)
        assert dht_tables(mine) == dht_tables(theirs)
        sof = dict(segments(mine))[0xC0]
        assert sof == dict(segments(theirs))[0xC0]          # 8 bits, 8x8, Y Cb Cr 1x1 with tables 0 1 1


def smooth_and_noisy(h: int, w: int, noise: float, seed: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([(xx * 3) % 256, (yy * 5) % 256, ((xx + yy) * 2) % 256], -1).astype(np.float64)
    return np.clip(rgb + np.random.default_rng(seed).normal(0, noise, rgb.shape), 0, 255).astype(np.uint8)


def extremes() -> list[np.ndarray]:
    """Flat black and white, blocks alternating black and white (DC differences of the largest size), a one-pixel
    checkerboard (high frequencies), a single pixel."""
    blocks = ((np.indices((40, 48)) // 8).sum(0) % 2 * 255).astype(np.uint8)
    pixels = (np.indices((16, 24)).sum(0) % 2 * 255).astype(np.uint8)
    return [np.zeros((16, 16, 3), np.uint8), np.full((9, 17, 3), 255, np.uint8), np.repeat(blocks[..., None], 3, 2),
            np.repeat(pixels[..., None], 3, 2), np.array([[[200, 30, 90]]], np.uint8)]


def test_files_decode_as_well_as_libjpegs_at_the_same_settings():
    images = [smooth_and_noisy(h, w, noise, seed) for seed, (h, w, noise) in
              enumerate([(37, 53, 0), (37, 53, 10), (64, 80, 60), (8, 8, 5), (23, 9, 30)])] + extremes()
    for quality in (50, 95):
        files = ours(images, quality)                      # mixed sizes in one call: one chunk
        for image, data in zip(images, files):
            ours_back, theirs_back = decoded(data), decoded(libjpeg(image, quality))
            assert ours_back.shape == image.shape
            assert psnr(ours_back, image) > psnr(theirs_back, image) - 1.0     # a level here and there
            assert psnr(ours_back, theirs_back) > 30


def test_a_long_zero_run_is_coded():
    """A block whose only coefficient is the last in zigzag order: 62 zeros before it, three zero-run codes."""
    u = np.arange(8)
    dct = np.sqrt(np.where(u == 0, 1 / 8, 2 / 8))[:, None] * np.cos((2 * u[None] + 1) * u[:, None] * np.pi / 16)
    pattern = dct[7][:, None] * dct[7][None, :] * 600                       # the (7, 7) basis image
    luma = np.clip(np.round(128 + pattern), 0, 255).astype(np.uint8)
    image = np.repeat(luma[..., None], 3, 2)
    back = decoded(ours([image], 50)[0])
    assert np.abs(back.astype(int) - image).max() <= 16            # the pattern, not a smeared or broken block
    assert np.corrcoef(back[..., 0].ravel(), image[..., 0].ravel())[0, 1] > 0.95


def test_ff_bytes_are_stuffed_and_chunks_change_nothing(monkeypatch):
    images = [smooth_and_noisy(48, 64, 60, seed) for seed in range(3)]
    whole = ours(images)
    data = whole[0][len(jpeg.jpeg_header(48, 64, 95)):-2]
    assert b"\xff" in data and all(data[i + 1] == 0 for i in range(len(data) - 1) if data[i] == 0xFF)
    assert whole[0].endswith(b"\xff\xd9")
    monkeypatch.setattr(jpeg, "CHUNK_COEFFICIENTS", 3 * 48 * 64)            # one image a chunk
    assert ours(images) == whole


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="quality"):
        ours([np.zeros((8, 8, 3), np.uint8)], 0)
    with pytest.raises(ValueError, match="RGB uint8"):
        jpeg.encode_jpegs([torch.zeros(1, 8, 8, dtype=torch.uint8)])
    assert jpeg.encode_jpegs([]) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_files_decode_like_the_cpus():
    images = [smooth_and_noisy(480, 640, 10, seed) for seed in range(4)] + extremes()
    tensors = [torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))) for im in images]
    on_cuda = jpeg.encode_jpegs([t.cuda() for t in tensors])
    on_cpu = jpeg.encode_jpegs(tensors)
    for a, b in zip(on_cuda, on_cpu):
        assert np.abs(decoded(a.tobytes()).astype(int) - decoded(b.tobytes())).max() <= 2


def fixed_shape_coding(images: list[np.ndarray], capacity: int | None) -> tuple[bytes, list[int]]:
    batch = torch.stack([torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))) for im in images])
    tables = jpeg._tables(torch.device("cpu"), 95)
    h, w = images[0].shape[:2]
    data, meta = jpeg._entropy_coded(jpeg._quantised(batch, tables), [jpeg._image_blocks(h, w)] * len(images), tables,
                                     capacity)
    meta = meta.tolist()
    return data[:meta[-3]].numpy().tobytes(), meta


def test_room_for_a_fixed_number_of_coefficients_codes_the_same_and_counts_what_it_needed(monkeypatch):
    """The fixed-shape coding a CUDA graph holds (nonzero_static, padded tokens of no bits) gives the same data
    as the exact one whenever its room suffices, and reports the count that says when it did not."""
    images = [smooth_and_noisy(40, 56, 30, seed) for seed in range(3)]
    exact, meta = fixed_shape_coding(images, None)
    needed, bits = meta[-2:]
    roomy, roomy_meta = fixed_shape_coding(images, needed + 1000)
    assert roomy == exact and roomy_meta == meta
    room = 3 * jpeg._image_blocks(40, 56) * jpeg.MOST_BLOCK_BITS + (needed + 1000) * jpeg.ROOM_AC_BITS + 3 * 7
    assert jpeg.fits(roomy_meta, needed + 1000, room) and not jpeg.fits(roomy_meta, needed + 1000, bits - 1)
    _, short_meta = fixed_shape_coding(images, needed // 2)              # short of room: said, and nothing breaks
    assert short_meta[-2] == needed and not jpeg.fits(short_meta, needed // 2, room)
    monkeypatch.setattr(jpeg, "ROOM_AC_BITS", 2)                       # too few bits: said, and nothing breaks
    _, tight_meta = fixed_shape_coding(images, needed + 1000)
    tight_room = 3 * jpeg._image_blocks(40, 56) * jpeg.MOST_BLOCK_BITS + (needed + 1000) * 2 + 3 * 7
    assert tight_meta[-1] == bits > tight_room and not jpeg.fits(tight_meta, needed + 1000, tight_room)


def test_the_encoder_without_graphs_is_encode_jpegs():
    tensors = [torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))) for im in extremes()[:2]]
    encoder = jpeg.JpegEncoder(90)
    assert not encoder.wants_capture(tensors)                # not on CUDA
    assert [f.tobytes() for f in encoder(tensors)] == [f.tobytes() for f in jpeg.encode_jpegs(tensors, 90)]


@pytest.mark.skipif(not jpeg.graphs_supported(torch.device("cuda")) or not torch.cuda.is_available(),
                    reason="needs CUDA graphs with nonzero_static")
def test_graphed_encoding_is_the_same_and_falls_back_when_short_of_room(monkeypatch):
    tensors = [torch.from_numpy(np.ascontiguousarray(smooth_and_noisy(64, 80, 30, seed).transpose(2, 0, 1))).cuda()
               for seed in range(3)]
    eager = [f.tobytes() for f in jpeg.encode_jpegs(tensors)]
    monkeypatch.setattr(jpeg, "FIRST_ROOM", 1e-4)
    encoder = jpeg.JpegEncoder(95)
    assert encoder.wants_capture(tensors) and not encoder.wants_capture(tensors[:1] + [tensors[1][:, :32]])
    encoder.capture(tensors)
    assert not encoder.wants_capture(tensors)
    assert [f.tobytes() for f in encoder(tensors)] == eager          # short of room: encoded without the graph
    assert encoder.wants_capture(tensors)                             # and to be captured again, with more room
    encoder._room[(3, 64, 80)] = 1.0
    encoder.capture(tensors)
    for _ in range(2):
        assert [f.tobytes() for f in encoder(tensors)] == eager
    assert not encoder.wants_capture(tensors)
