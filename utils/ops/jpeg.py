"""Baseline JPEG files of many RGB images at once, encoded with torch ops where the images are (the GPU after
predict.py's device decoding), so that a batch costs a few dozen kernels and a few host waits, not two per image.

The format is the JPEG standard's baseline sequential mode (ITU T.81): JFIF YCbCr, 8x8 blocks, 4:4:4 (no chroma
subsampling, as torchvision's nvJPEG encoder writes), the standard's example quantisation tables (Annex K.1, K.2)
scaled by the IJG quality rule, and its typical Huffman tables (Annex K.3) -- what libjpeg writes by default, so
any decoder reads the files. Every step is batched over all blocks of all images:

  RGB -> YCbCr - 128 -> 8x8 blocks (MCU order: Y, Cb, Cr) -> DCT and zigzag (one 64x64 matrix, float64) ->
  quantise -> DC differences -> one token per coded item (DC, each non-zero AC with the zero-run codes before it,
  EOB, the image's final 1-bit padding): its bits and its bit offset in the batch (prefix sums) ->
  tokens OR-ed into 32-bit words (scatter-add: their bits never overlap) -> bytes -> 0x00 stuffed after each 0xFF.

The headers are made on the host, once per image size. A DCT in floating point rounds a coefficient now and then
differently from libjpeg's integer one, so the bytes are not libjpeg's; the decoded pixels agree with libjpeg's
encoding at the same quality to within a few levels (tests/test_jpeg.py).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

# Annex K.1 and K.2: the luminance and chrominance quantisation tables, natural (row-major) order
LUMA_QUANT = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
              14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
              49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]
CHROMA_QUANT = ([17, 18, 24, 47] + [99] * 4 + [18, 21, 26, 66] + [99] * 4 + [24, 26, 56] + [99] * 5
                + [47, 66] + [99] * 6 + [99] * 32)

# Annex K.3: the typical Huffman tables as (codes of each length 1..16, symbols in code order). The AC tables'
# symbols are (zero run << 4) | size; the symbols not listed before their 16-bit codes all take 16 bits, in
# ascending order.
DC_LUMA = ([0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0], list(range(12)))
DC_CHROMA = ([0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0], list(range(12)))
_AC_LUMA_SHORT = [0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61, 0x07,
                  0x22, 0x71, 0x14, 0x32, 0x81, 0x91, 0xA1, 0x08, 0x23, 0x42, 0xB1, 0xC1, 0x15, 0x52, 0xD1, 0xF0,
                  0x24, 0x33, 0x62, 0x72, 0x82]
_AC_CHROMA_SHORT = [0x00, 0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07, 0x61, 0x71,
                    0x13, 0x22, 0x32, 0x81, 0x08, 0x14, 0x42, 0x91, 0xA1, 0xB1, 0xC1, 0x09, 0x23, 0x33, 0x52, 0xF0,
                    0x15, 0x62, 0x72, 0xD1, 0x0A, 0x16, 0x24, 0x34, 0xE1, 0x25, 0xF1]
_AC_SYMBOLS = [0x00, 0xF0] + [(run << 4) | size for run in range(16) for size in range(1, 11)]


def _with_long_codes(short: list[int]) -> list[int]:
    return short + sorted(set(_AC_SYMBOLS) - set(short))


AC_LUMA = ([0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 125], _with_long_codes(_AC_LUMA_SHORT))
AC_CHROMA = ([0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 119], _with_long_codes(_AC_CHROMA_SHORT))

EOB, ZRL = 0x00, 0xF0           # end of block; a run of 16 zeros
MAX_AC_SIZE, MAX_DC_SIZE = 10, 11
# images are encoded in chunks of at most this many coefficients (a float64 array of them is 512 MiB)
CHUNK_COEFFICIENTS = 64 * 2 ** 20
# JFIF's YCbCr from RGB (rows Y, Cb, Cr), without Cb's and Cr's +128
YCBCR = [[0.299, 0.587, 0.114], [-0.168735892, -0.331264108, 0.5], [0.5, -0.418687589, -0.081312411]]


def zigzag() -> np.ndarray:
    """The natural (row * 8 + column) index of each of the 64 coefficients in zigzag order."""
    cells = sorted(((r, c) for r in range(8) for c in range(8)),
                   key=lambda rc: (rc[0] + rc[1], rc[0] if (rc[0] + rc[1]) % 2 else -rc[0]))
    return np.asarray([r * 8 + c for r, c in cells])


@lru_cache(maxsize=8)
def quant_tables(quality: int) -> np.ndarray:
    """[2, 64] luminance and chrominance quantisers in natural order for a quality 1-100 (the IJG scaling)."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be 1-100, got {quality}")
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    base = np.asarray([LUMA_QUANT, CHROMA_QUANT], np.int64)
    return np.clip((base * scale + 50) // 100, 1, 255)


def huffman_codes(table: tuple[list[int], list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Canonical codes of a (counts per length, symbols) table: code and length per symbol 0-255 (length 0: none)."""
    counts, symbols = table
    codes, lengths = np.zeros(256, np.int64), np.zeros(256, np.int64)
    code, k = 0, 0
    for length, count in enumerate(counts, start=1):
        for _ in range(count):
            codes[symbols[k]], lengths[symbols[k]] = code, length
            code, k = code + 1, k + 1
        code <<= 1
    return codes, lengths


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


@lru_cache(maxsize=64)
def jpeg_header(height: int, width: int, quality: int) -> bytes:
    """Everything of a file before its entropy-coded data: SOI, JFIF APP0, DQT, SOF0 (3 components, 4:4:4),
    DHT (the four tables), SOS."""
    if not (1 <= height <= 65535 and 1 <= width <= 65535):
        raise ValueError(f"a JPEG image is 1-65535 pixels a side, got {width}x{height}")
    order = zigzag()
    tables = quant_tables(quality)
    dqt = b"".join(bytes([t]) + bytes(tables[t][order].tolist()) for t in range(2))
    sof = bytes([8]) + height.to_bytes(2, "big") + width.to_bytes(2, "big") + bytes([3, 1, 0x11, 0, 2, 0x11, 1, 3,
                                                                                      0x11, 1])
    dht = b"".join(bytes([kind]) + bytes(counts) + bytes(symbols)
                   for kind, (counts, symbols) in ((0x00, DC_LUMA), (0x10, AC_LUMA), (0x01, DC_CHROMA),
                                                   (0x11, AC_CHROMA)))
    return (b"\xff\xd8" + _segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00") + _segment(0xDB, dqt)
            + _segment(0xC0, sof) + _segment(0xC4, dht) + _segment(0xDA, bytes([3, 1, 0x00, 2, 0x11, 3, 0x11, 0, 63, 0])))


END_OF_IMAGE = np.frombuffer(b"\xff\xd9", np.uint8)


class _Tables:
    """The encoder's constants as tensors on one device (made once per device and quality)."""

    def __init__(self, device: torch.device, quality: int):
        u = np.arange(8)
        dct = np.sqrt(np.where(u == 0, 1 / 8, 2 / 8))[:, None] * np.cos((2 * u[None] + 1) * u[:, None] * math.pi / 16)
        # [64 coefficients in zigzag order, 64 pixels row by row]: the 2-D DCT of a block
        dct_zigzag = np.kron(dct, dct)[zigzag()]
        quant = quant_tables(quality)[:, zigzag()][[0, 1, 1]].astype(np.float64)             # [3, 64]
        # one matrix from an MCU's RGB pixels [3 x 64] to its quantised Y, Cb, Cr coefficients [3 x 64]:
        # colour conversion, DCT and the division by the quantisers at once
        matrix = np.einsum("oc,kp,ok->cpok", np.asarray(YCBCR), dct_zigzag, 1 / quant).reshape(192, 192)
        self.matrix = torch.from_numpy(matrix.astype(np.float32)).to(device)
        # Y's level shift by 128 moves only its DC coefficient, by 8 * 128; Cb's and Cr's +128 and -128 cancel
        self.y_dc_shift = float(8 * 128 / quant[0, 0])
        dc = [huffman_codes(t) for t in (DC_LUMA, DC_CHROMA)]
        ac = [huffman_codes(t) for t in (AC_LUMA, AC_CHROMA)]
        self.dc_code, self.dc_len = (torch.from_numpy(np.stack([t[i] for t in dc])).to(device) for i in (0, 1))
        self.ac_code, self.ac_len = (torch.from_numpy(np.stack([t[i] for t in ac])).to(device) for i in (0, 1))
        # up to three zero-run codes before an AC coefficient (a run of 48-62 zeros): their bits joined
        zrl = [[(sum(int(ac[t][0][ZRL]) << (int(ac[t][1][ZRL]) * i) for i in range(n)), n * int(ac[t][1][ZRL]))
                for n in range(4)] for t in range(2)]
        self.zrl_code = torch.tensor([[c for c, _ in row] for row in zrl], dtype=torch.int64, device=device)
        self.zrl_len = torch.tensor([[n for _, n in row] for row in zrl], dtype=torch.int64, device=device)
        self.eob_code = torch.tensor([int(ac[t][0][EOB]) for t in range(2)], dtype=torch.int64, device=device)
        self.eob_len = torch.tensor([int(ac[t][1][EOB]) for t in range(2)], dtype=torch.int64, device=device)
        self.component_table = torch.tensor([0, 1, 1], dtype=torch.int64, device=device)   # Y luma, Cb Cr chroma
        self._constants: dict[tuple[int, ...], torch.Tensor] = {}

    def constant(self, values: np.ndarray, device: torch.device) -> torch.Tensor:
        """An int64 index tensor of these values on the device, made once (none is copied while a graph is
        captured)."""
        key = tuple(np.asarray(values, np.int64).tolist())
        if key not in self._constants:
            if len(self._constants) > 64:
                self._constants.clear()
            self._constants[key] = torch.tensor(key, dtype=torch.int64, device=device)
        return self._constants[key]


@lru_cache(maxsize=8)
def _tables(device: torch.device, quality: int) -> _Tables:
    return _Tables(device, quality)


def _quantised(images: torch.Tensor, tables: _Tables) -> torch.Tensor:
    """[n, 3, H, W] uint8 RGB -> [n * MCUs * 3, 64] int16 quantised coefficients in zigzag order: each image's
    MCUs row by row, each MCU's Y, Cb, Cr block (edges padded by repeating the last row and column). The float32
    product is exact enough (unless the caller has let matrix products use TF32)."""
    n, _, h, w = images.shape
    if h % 8 or w % 8:
        rows = torch.arange(h + -h % 8, device=images.device).clamp_(max=h - 1)
        columns = torch.arange(w + -w % 8, device=images.device).clamp_(max=w - 1)
        images = images[:, :, rows][:, :, :, columns]
    by, bx = images.shape[2] // 8, images.shape[3] // 8
    mcus = images.view(n, 3, by, 8, bx, 8).permute(0, 2, 4, 1, 3, 5).reshape(-1, 192)  # [n*by*bx, RGB x 64]
    coefficients = mcus.to(torch.float32) @ tables.matrix                                # [n*by*bx, YCbCr x 64]
    coefficients[:, 0] -= tables.y_dc_shift
    q = coefficients.round_().view(-1, 64).to(torch.int16)
    q[:, 1:].clamp_(-(2 ** MAX_AC_SIZE - 1), 2 ** MAX_AC_SIZE - 1)                     # reached only near q=100
    return q


def _bits(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """JPEG's size category of each int (the bit length of its magnitude, 0 for 0) and its value bits: the value
    itself when positive, its magnitude's ones' complement in `size` bits when negative."""
    size = torch.frexp(values.abs().to(torch.float32)).exponent.to(torch.int64)     # exact below 2 ** 24
    return size, torch.where(values < 0, values + (1 << size) - 1, values)


def _pack(offset: torch.Tensor, value: torch.Tensor, length: torch.Tensor, bits: int) -> torch.Tensor:
    """Tokens of `length` <= 64 bits (`value`'s low bits, most significant first) at bit `offset` of one stream
    of room for `bits` -> the stream's bytes (zeros after its end). Each token touches at most three 32-bit words;
    tokens never share a bit, so adding their pieces into the words is OR-ing them. A token past the room lands
    on its last words (the caller knows the stream's length and does not use such a stream)."""
    words = torch.zeros(bits // 32 + 3, dtype=torch.int64, device=offset.device)
    word, start = (offset >> 5).clamp_(max=len(words) - 3), offset & 31
    end = start + length                                    # the token's bits are [start, end) from `word`'s top
    for j in range(3):
        low, high = torch.clamp(start, min=32 * j), torch.clamp(end, max=32 * j + 32)
        width = (high - low).clamp_(min=0)
        piece = (value >> (end - high).clamp_(min=0)) & ((1 << width) - 1)
        words.index_add_(0, word + j, piece << (32 * j + 32 - high).clamp_(min=0, max=32))
    # each word's low 32 bits, most significant byte first (the int32 view's bytes are in memory order)
    return words.to(torch.int32).view(torch.uint8).view(-1, 4).flip(1).reshape(-1)


# the most bits of a block's DC token and EOB together (an 11-bit code and 11 value bits; a 4-bit EOB), of an AC
# token (three 11-bit zero-run codes, a 16-bit code, 10 value bits), of an image's final padding
MOST_BLOCK_BITS, MOST_AC_BITS, MOST_PAD_BITS = 22 + 4, 3 * 11 + 16 + 10, 7
# the room a graph's stream has per AC token (BCCD's photos at quality 95 take 8 on average); a batch that
# needs more is encoded without the graph
ROOM_AC_BITS = 24


def _entropy_coded(q: torch.Tensor, image_blocks: list[int], tables: _Tables,
                   capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantised blocks [N, 64] of several images (image_blocks: each one's count, a multiple of 3) -> a buffer
    holding every image's entropy-coded data, byte-stuffed, one after another, and [images + 2] int64: where each
    image's data ends in it, how many AC coefficients are not zero, and the data's bits before stuffing.

    With a capacity, the buffers' sizes follow from the shapes alone and nothing waits for the device (a CUDA
    graph can hold it all): room for `capacity` non-zero AC coefficients and ROOM_AC_BITS bits each. The data is
    whole only when the count and the bits fit (`fits`). Without one, it waits for the count and always fits."""
    device = q.device
    n = q.shape[0]
    table = tables.component_table.repeat(n // 3)                                    # [N] 0 luma, 1 chroma
    # DC: the difference from the previous block of the same component, 0 before an image's first
    dc = q[:, 0].view(-1, 3).to(torch.int64)                                            # [MCUs, 3]
    previous = torch.roll(dc, 1, 0)
    previous.index_fill_(0, tables.constant(np.cumsum([0] + [b // 3 for b in image_blocks[:-1]]), device), 0)
    dc_size, dc_bits = _bits((dc - previous).reshape(-1))
    dc_len = tables.dc_len[table, dc_size] + dc_size
    dc_value = (tables.dc_code[table, dc_size] << dc_size) | dc_bits
    # AC: one token per non-zero coefficient, its zero run's codes first (rows in block order, then position)
    nonzero = q[:, 1:] != 0
    count = nonzero.sum().reshape(1)
    if capacity is None:
        block, k = nonzero.nonzero(as_tuple=True)                                      # [T] each; host wait
        capacity, real = len(block), None
    else:
        block, k = torch.nonzero_static(nonzero, size=capacity, fill_value=0).unbind(1)
        real = torch.arange(capacity, device=device) < count                          # the rest is filling
    k = k + 1
    same_block = torch.zeros_like(block, dtype=torch.bool)
    same_block[1:] = block[1:] == block[:-1]
    run = (k - torch.where(same_block, torch.roll(k, 1), 0) - 1).clamp_(min=0)
    size, bits = _bits(q[block, k].to(torch.int64))
    t = table[block]
    symbol = ((run & 15) << 4) | size
    zrl = run >> 4
    code_len = tables.ac_len[t, symbol]
    ac_len = tables.zrl_len[t, zrl] + code_len + size
    if real is not None:
        ac_len = ac_len * real
    ac_value = (((tables.zrl_code[t, zrl] << code_len) | tables.ac_code[t, symbol]) << size) | bits
    # EOB after the last non-zero coefficient unless that is the 63rd
    eob_len = torch.where(q[:, 63] == 0, tables.eob_len[table], 0)
    ac_total = torch.zeros(n, dtype=torch.int64, device=device).index_add_(0, block, ac_len)
    block_bits = dc_len + ac_total + eob_len
    # each image's data ends on a byte boundary: 1-bits after its last block
    last_block = tables.constant(np.cumsum(image_blocks) - 1, device)
    ends = torch.cumsum(block_bits, 0)[last_block]
    pad = -(ends - torch.cat([ends.new_zeros(1), ends[:-1]])) % 8
    block_bits.index_add_(0, last_block, pad)
    block_start = torch.cumsum(block_bits, 0) - block_bits
    ac_before = torch.cumsum(ac_len, 0) - ac_len - (torch.cumsum(ac_total, 0) - ac_total)[block]
    ac_offset = block_start[block] + dc_len[block] + ac_before
    most_bits = n * MOST_BLOCK_BITS + capacity * MOST_AC_BITS + len(image_blocks) * MOST_PAD_BITS
    if real is not None:
        # the filling tokens (no bits) spread over the words: all on one word, their atomic adds would queue
        most_bits = n * MOST_BLOCK_BITS + capacity * ROOM_AC_BITS + len(image_blocks) * MOST_PAD_BITS
        ac_offset = torch.where(real, ac_offset, torch.arange(capacity, device=device) * 32 % most_bits)
    offset = torch.cat([block_start, ac_offset,
                        block_start + dc_len + ac_total, block_start[last_block] + block_bits[last_block] - pad])
    value = torch.cat([dc_value, ac_value, tables.eob_code[table], (1 << pad) - 1])
    length = torch.cat([dc_len, ac_len, eob_len, pad])
    data = _pack(offset, value, length, most_bits)
    # a 0x00 after every 0xFF byte, so that no data byte reads as a marker: byte i moves right by the 0xFF bytes
    # before it (ff_before[i]); the stuffed data is at most twice as long
    ff_before = torch.cumsum(torch.cat([data.new_zeros(1, dtype=torch.int32), (data == 255).to(torch.int32)]), 0)
    stuffed = torch.zeros(2 * len(data), dtype=torch.uint8, device=device)
    stuffed[torch.arange(len(data), device=device) + ff_before[:-1]] = data
    total_bits = (block_start[-1] + block_bits[-1]).reshape(1)
    image_ends = torch.cat([block_start[tables.constant(np.cumsum(image_blocks)[:-1], device)], total_bits]) // 8
    image_ends.clamp_(max=len(data))                                           # (a stream past its room)
    return stuffed, torch.cat([image_ends + ff_before[image_ends], count, total_bits])


def fits(meta: list[int], capacity: int, bits: int) -> bool:
    """Whether _entropy_coded's data with this meta is whole in buffers of that capacity and room of bits."""
    return meta[-2] <= capacity and meta[-1] <= bits


def _files(data: torch.Tensor, ends: list[int], headers: list[bytes]) -> list[np.ndarray]:
    """Each image's file: its header, its part of the data (copied back at once), the end-of-image marker."""
    host = data[:ends[-1]].cpu().numpy()
    return [np.concatenate([np.frombuffer(header, np.uint8), host[start:end], END_OF_IMAGE])
            for header, start, end in zip(headers, [0] + ends[:-1], ends)]


def _checked(images: list[torch.Tensor]) -> None:
    for im in images:
        if im.dtype != torch.uint8 or im.dim() != 3 or im.shape[0] != 3 or im.numel() == 0:
            raise ValueError(f"encode_jpegs takes RGB uint8 [3,H,W] tensors, got {im.dtype} {tuple(im.shape)}")


def _image_blocks(h: int, w: int) -> int:
    return 3 * -(-h // 8) * -(-w // 8)


def encode_jpegs(images: list[torch.Tensor], quality: int = 95) -> list[np.ndarray]:
    """RGB uint8 [3,H,W] tensors (all on one device) -> each one's JPEG file bytes (baseline, 4:4:4), encoded
    where the images are and copied back to the host once per chunk of CHUNK_COEFFICIENTS."""
    if not images:
        return []
    _checked(images)
    tables = _tables(images[0].device, quality)
    files: list[np.ndarray | None] = [None] * len(images)
    for chunk in _chunks(images):
        # images of one size are stacked and cut into blocks together
        by_size: dict[tuple[int, int], list[int]] = {}
        for i in chunk:
            by_size.setdefault(tuple(images[i].shape[1:]), []).append(i)
        order = [i for group in by_size.values() for i in group]
        q = torch.cat([_quantised(torch.stack([images[i] for i in group]), tables) for group in by_size.values()])
        sizes = [(int(images[i].shape[1]), int(images[i].shape[2])) for i in order]
        data, ends = _entropy_coded(q, [_image_blocks(h, w) for h, w in sizes], tables)
        for i, file in zip(order, _files(data, ends.tolist()[:-2], [jpeg_header(h, w, quality) for h, w in sizes])):
            files[i] = file
    return files


def _chunks(images: list[torch.Tensor]) -> list[list[int]]:
    """The images' indices in runs of at most CHUNK_COEFFICIENTS coefficients (one image at least)."""
    chunks, current, count = [], [], 0
    for i, im in enumerate(images):
        size = 64 * _image_blocks(int(im.shape[1]), int(im.shape[2]))
        if current and count + size > CHUNK_COEFFICIENTS:
            chunks.append(current)
            current, count = [], 0
        current.append(i)
        count += size
    return chunks + [current]


# a batch shape's graph first has room for this share of its AC coefficients not being zero (BCCD's photos at
# quality 95: 5 %), and twice as much after a batch needed more
FIRST_ROOM = 1 / 12
MAX_GRAPHS = 4           # batch shapes with a graph (each holds its buffers: ~1 GiB for 64 images of 640 x 480)


def graphs_supported(device: torch.device) -> bool:
    """CUDA, and a torch whose nonzero_static runs there (2.6 on) without waiting for the device."""
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return device.type == "cuda" and (major, minor) >= (2, 6)


class _GraphedEncoding:
    """The encoding of n images of one size, captured as a CUDA graph with room for `capacity` non-zero AC
    coefficients: replaying it is a copy and a launch instead of some 200 kernels."""

    def __init__(self, n: int, height: int, width: int, device: torch.device, tables: _Tables, capacity: int):
        self.input = torch.zeros((n, 3, height, width), dtype=torch.uint8, device=device)
        self.capacity = capacity
        blocks = [_image_blocks(height, width)] * n
        self.bits = sum(blocks) * MOST_BLOCK_BITS + capacity * ROOM_AC_BITS + n * MOST_PAD_BITS
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):           # once outside the graph: index constants made, kernels loaded
            _entropy_coded(_quantised(self.input, tables), blocks, tables, capacity)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.data, self.meta = _entropy_coded(_quantised(self.input, tables), blocks, tables, capacity)

    def __call__(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The data and ends of these images (valid until the next call), on the current stream."""
        torch.stack(images, out=self.input)
        self.graph.replay()
        return self.data, self.meta


class JpegEncoder:
    """encode_jpegs for batches of images on CUDA, each batch shape's encoding replayed from a CUDA graph.

    A shape is n images of one size, within one chunk. `capture(images)` records its encoding; the caller keeps
    other threads' CUDA work away meanwhile (CaptureGuard.capturing), as for any capture. Calls replay it: the
    host issues three operations and waits twice instead of issuing some 200 kernels, each a turn at the
    interpreter lock for the thread that encodes. A batch with more non-zero coefficients than its graph has room
    for is encoded without it, and its shape's graph dropped, to be captured again with twice the room. Every
    other batch (mixed sizes, other devices, graphs not supported, MAX_GRAPHS shapes held) is encoded as
    encode_jpegs does. Calls and captures may come from different threads.
    """

    def __init__(self, quality: int = 95):
        quant_tables(quality)                                   # checks the quality
        self.quality = quality
        self._graphs: dict[tuple[int, int, int], _GraphedEncoding] = {}
        self._room: dict[tuple[int, int, int], float] = {}

    @staticmethod
    def _shape(images: list[torch.Tensor]) -> tuple[int, int, int] | None:
        if not images or not graphs_supported(images[0].device):
            return None
        first = images[0].shape
        if any(im.shape != first for im in images) or len(images) * 64 * _image_blocks(first[1], first[2]) \
                > CHUNK_COEFFICIENTS:
            return None
        return len(images), int(first[1]), int(first[2])

    def wants_capture(self, images: list[torch.Tensor]) -> bool:
        """Whether these images' shape should be captured before they are encoded."""
        shape = self._shape(images)
        return shape is not None and shape not in self._graphs and len(self._graphs) < MAX_GRAPHS

    def capture(self, images: list[torch.Tensor]) -> None:
        """Record the encoding of images of this shape (no other thread may use CUDA meanwhile)."""
        _checked(images)
        n, h, w = shape = self._shape(images)
        room = self._room.setdefault(shape, FIRST_ROOM)
        self._graphs[shape] = _GraphedEncoding(n, h, w, images[0].device, _tables(images[0].device, self.quality),
                                               max(1, int(room * n * _image_blocks(h, w) * 63)))

    def __call__(self, images: list[torch.Tensor]) -> list[np.ndarray]:
        """Each image's JPEG file bytes, as encode_jpegs makes them."""
        shape = self._shape(images)
        graph = self._graphs.get(shape) if shape is not None else None
        if graph is None:
            return encode_jpegs(images, self.quality)
        _checked(images)
        data, meta = graph(images)
        meta = meta.tolist()                                                      # host wait
        if not fits(meta, graph.capacity, graph.bits):
            self._graphs.pop(shape, None)
            self._room[shape] = min(1.0, 2 * self._room[shape])
            return encode_jpegs(images, self.quality)
        return _files(data, meta[:-2], [jpeg_header(shape[1], shape[2], self.quality)] * len(images))
