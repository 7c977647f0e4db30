"""Output folders: numbered run and prediction folders, safe names built from data, checked writes."""
from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path

# anything but letters, digits and -_. becomes "_": no separators, no drive letters, no control characters
_UNSAFE = re.compile(r"[^\w.-]+")
_MAX_BYTES = 200                          # file systems allow 255 bytes per name; leave room for suffixes
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


class OutputError(OSError):
    """A write that failed (full disk, read-only folder, a file where a folder should be): `cannot write <path>: <why>`."""

    def __init__(self, path: str | Path, reason: str, code: int = errno.EIO):
        super().__init__(code, reason, str(path))

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def numbered_dir(base: Path, exist_ok: bool = False) -> Path:
    """`base`, or base2, base3, ... the first that does not exist yet (or `base` itself with exist_ok)."""
    path, n = base, 2
    while path.exists() and not exist_ok:
        path, n = base.with_name(f"{base.name}{n}"), n + 1
    return path


def safe_component(text: object) -> str:
    """`text` as one harmless path component: letters, digits and -_. kept, anything else '_'; never '', '.', '..'."""
    name = _UNSAFE.sub("_", str(text))
    name = name.encode("utf-8")[:_MAX_BYTES].decode("utf-8", errors="ignore")
    if not name.strip("."):                      # '', '.', '..', '...': a folder reference, not a name
        name = "_" * max(1, len(name))
    if name.split(".")[0].lower() in _WINDOWS_RESERVED:
        name = f"_{name}"
    return name


def inside(root: str | Path, *parts: str) -> Path:
    """root/parts resolved; a result outside root (through '..', an absolute part or a symlink) is an error."""
    base = Path(root).resolve()
    target = base.joinpath(*parts).resolve()
    if target != base and not target.is_relative_to(base):
        raise ValueError(f"output path {Path(root).joinpath(*parts)} would lie outside the output folder {root}")
    return target


def make_dir(path: Path) -> Path:
    """mkdir -p; a failure (a file in the way, read-only parent) is an OutputError naming the folder."""
    if path.exists() and not path.is_dir():
        raise OutputError(path, "exists and is not a folder (give --out a folder)", errno.ENOTDIR)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(path, exc.strerror or str(exc), exc.errno or errno.EIO) from exc
    return path


def prepare_out(path: Path) -> Path:
    """Create the output folder and prove it takes a file, before any work is done."""
    make_dir(path)
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(path, exc.strerror or str(exc), exc.errno or errno.EIO) from exc
    return path


def write_text(path: Path, text: str) -> None:
    """path.write_text that reports a failure as `cannot write <path>: <why>`."""
    try:
        path.write_text(text)
    except OSError as exc:
        raise OutputError(path, exc.strerror or str(exc), exc.errno or errno.EIO) from exc
