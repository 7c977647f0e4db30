"""Lines of text for many rows at once, made by NumPy: integers, fixed-point decimals and strings from a table,
character for character as Python's str.format writes them ('{}', '{:.Nf}').

Formatting one number costs the interpreter ~0.3 us, and predict.py's label files and JSON objects hold ~100
numbers an image: at thousands of images a second that is most of what their writer threads do, and they hold
the interpreter lock meanwhile. Here a batch's lines take a few dozen array operations.

A field is (chars [N, W] uint8, keep [N, W] bool): row i's text is chars[i][keep[i]]. Fields side by side are
joined row by row (`join`). `fixed` writes only what it can write exactly (float32 values, finite, not negative:
each value times 10**decimals is then exact in float64, so rounding it half to even is Python's correctly rounded
'{:.Nf}'); it returns None otherwise, and the caller formats those rows the interpreter's way.
"""
from __future__ import annotations

import numpy as np

Field = tuple[np.ndarray, np.ndarray]

LARGEST = 10 ** 12           # integer parts at or above this take the interpreter's way


def text(value: str, rows: int) -> Field:
    """The same ASCII text on every row."""
    chars = np.frombuffer(value.encode("ascii"), np.uint8)[None].repeat(rows, 0)
    return chars, np.ones(chars.shape, bool)


# '0000'..'9999' as the uint32 whose bytes in memory are those four characters
FOUR_DIGITS = np.frombuffer("".join(f"{i:04d}" for i in range(10000)).encode(), np.uint32)


def _digits(values: np.ndarray, width: int, zero_padded: bool) -> Field:
    """Non-negative int64 [N] (under 10**width) as `width` decimal digits: zero-padded, or with the leading zeros
    dropped (a zero keeps its one digit). Four characters at a time from a table: NumPy's int64 division is slow,
    and whole uint32 words move faster than single bytes."""
    groups = -(-width // 4)
    words = np.empty((len(values), groups), np.uint32)
    rest = values
    for group in range(groups - 1, 0, -1):
        rest, low = np.divmod(rest, 10000)
        words[:, group] = np.take(FOUR_DIGITS, low)
    words[:, 0] = np.take(FOUR_DIGITS, rest)
    chars = words.view(np.uint8)[:, 4 * groups - width:]
    if zero_padded:
        return chars, np.ones(chars.shape, bool)
    shown = np.searchsorted(10 ** np.arange(1, width, dtype=np.int64), values, side="right") + 1   # [N] digits
    return chars, np.arange(width - 1, -1, -1) < shown[:, None]


def integers(values: np.ndarray) -> Field | None:
    """Non-negative integers [N] as '{}' writes them; None if one is negative or too large."""
    values = np.asarray(values, np.int64)
    if len(values) and (values.min() < 0 or values.max() >= LARGEST):
        return None
    return _digits(values, len(str(int(values.max()))) if len(values) else 1, zero_padded=False)


def fixed(values: np.ndarray, decimals: int) -> Field | None:
    """float32 values [N] as '{:.<decimals>f}' writes them; None where that cannot be done exactly here (another
    dtype, a value negative, -0.0, not finite, or too large)."""
    values = np.asarray(values)
    if values.dtype != np.float32 or not 0 < decimals <= 6:
        return None
    if len(values) and (not np.isfinite(values).all() or np.signbit(values).any() or values.max() >= LARGEST):
        return None
    scale = 10 ** decimals
    scaled = np.rint(values.astype(np.float64) * scale).astype(np.int64)    # exact product; half to even
    width = len(str(int(scaled.max()) // scale)) if len(values) else 1       # of the integer part
    digits, keep = _digits(scaled, width + decimals, zero_padded=False)
    chars = np.empty((len(values), width + 1 + decimals), np.uint8)
    chars[:, :width], chars[:, width], chars[:, width + 1:] = digits[:, :width], ord("."), digits[:, width:]
    shown = np.ones(chars.shape, bool)
    shown[:, :width - 1] = keep[:, :width - 1]      # the integer part's leading zeros; its last digit always shows
    return chars, shown


def strings(table: list[str], index: np.ndarray) -> Field:
    """Row i's text is table[index[i]] (ASCII)."""
    encoded = [s.encode("ascii") for s in table]
    width = max((len(s) for s in encoded), default=0)
    padded = np.zeros((len(encoded), width), np.uint8)
    for i, s in enumerate(encoded):
        padded[i, :len(s)] = np.frombuffer(s, np.uint8)
    lengths = np.array([len(s) for s in encoded], np.int64)
    return padded[index], np.arange(width) < lengths[index][:, None]


def join(fields: list[Field]) -> tuple[bytes, np.ndarray]:
    """The fields side by side, the rows' texts one after another; and each row's length in bytes."""
    chars, keep = np.concatenate([f[0] for f in fields], 1), np.concatenate([f[1] for f in fields], 1)
    return chars[keep].tobytes(), keep.sum(1)
