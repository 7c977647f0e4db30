"""Checkpoints: plain dicts of tensors and Python values, written atomically, read with weights_only=True.

Keys: `model` (state dict used for inference: the EMA weights when EMA is on), `config`
(everything build_model needs, class names included), and for resuming `raw_model`
(the non-averaged weights), `ema` ({'updates': n}), `optimizer`, `scaler`, `epoch`,
`train_args`, `metrics`, `best_fitness`.
"""
from __future__ import annotations

import os
import re
import tempfile
import threading
from pathlib import Path

import torch

from nets.weights.report import tensors_of
from nets.weights.ultralytics import convert_ultralytics_yolov5
from nets.yolo import REQUIRED_KEYS, make_config
from utils.log import get_logger

log = get_logger(__name__)


class CheckpointError(ValueError):
    """A file that is not a checkpoint of this project (or is damaged)."""


class OutputWriteError(PermissionError):
    """A write the file system refused (no permission, disk full, a file where a folder should be): a one-line error."""


# torch.save reports a failed write as a RuntimeError ("[enforce fail at inline_container.cc:...] . unexpected pos")
TORCH_WRITE_FAILURES = ("inline_container", "unexpected pos", "file write failed", "PytorchStreamWriter")
STALE_TEMP = re.compile(r"^\..+\.pt\.[A-Za-z0-9_]+\.tmp$")   # what save_checkpoint's mkstemp names look like


def _process_umask() -> int:
    """The umask, read once at import (os.umask can only be read by setting it, which is not thread-safe)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_process_umask()     # what open() would give a new file: mkstemp's 0600 is for secrets


def write_error(exc: BaseException, path: str | Path) -> BaseException:
    """An OSError or torch's failed-write RuntimeError as OutputWriteError naming `path`; anything else unchanged."""
    if isinstance(exc, OutputWriteError):
        return exc
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
    elif isinstance(exc, RuntimeError) and any(s in str(exc) for s in TORCH_WRITE_FAILURES):
        first = str(exc).strip().splitlines()[0][:100]
        reason = f"the write failed, is the disk full? ({first})"
    else:
        return exc
    return OutputWriteError(f"cannot write {path}: {reason}")


def save_checkpoint(checkpoint: dict, path: str | Path) -> None:
    """Write to a temp file in the same folder, then rename: a crash never leaves half a file.

    A refused write raises OutputWriteError; the file previously at `path` is then left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(exc, path) from None
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        error = write_error(exc, path)
        if error is exc:
            raise
        raise error from None


def write_bytes_atomic(data: bytes, path: str | Path) -> None:
    """Write `data` to a temp file beside `path`, then rename (as save_checkpoint): a stopped process leaves the
    previous file or none, never half a file. A refused write raises OutputWriteError naming `path`."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, FILE_MODE)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise write_error(exc, path) from exc


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temp files of checkpoint writes a killed process left in `folder`; returns them."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if STALE_TEMP.match(entry.name) and entry.is_file():
            try:
                entry.unlink()
                removed.append(entry)
            except OSError as exc:
                raise write_error(exc, entry) from None
    return removed


def detached_copy(obj: object) -> object:
    """The same nested dict/list with every tensor copied to the CPU, so training can go on changing the originals."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: detached_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(detached_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints on a background thread, so the training loop never waits for the disk.

    A new job for a path replaces one still waiting for the same path (only the newest state of
    last.pt or best.pt matters); `wait()` returns once everything submitted is on disk.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: dict[Path, dict] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, jobs: list[tuple[dict, Path]]) -> None:
        """Queue (checkpoint, path) writes; the checkpoints must already be CPU copies (detached_copy)."""
        self._raise_error()
        with self._lock:
            for checkpoint, path in jobs:
                self._pending.pop(Path(path), None)     # re-inserted last: paths are written in submission order
                self._pending[Path(path)] = checkpoint
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, daemon=False)
                self._thread.start()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._pending or self._error is not None:
                    self._pending.clear()
                    self._thread = None
                    return
                path = next(iter(self._pending))
                checkpoint = self._pending.pop(path)
            try:
                save_checkpoint(checkpoint, path)
            except BaseException as exc:  # reported to the training loop by submit() / wait()
                self._error = write_error(exc, path)

    def wait(self) -> None:
        """Block until the queued writes are on disk; re-raise a failed write."""
        while True:
            with self._lock:
                thread = self._thread
            if thread is None:
                break
            thread.join()
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def read_torch_file(path: str | Path) -> object:
    """torch.load with weights_only=True; clear errors for missing or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors vary by torch version; the message is what matters
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} is not a loadable PyTorch weights file ({reason[:120]})") from None


def ultralytics_checkpoint(path: str | Path) -> dict | None:
    """An official ultralytics YOLOv5 `.pt` as a checkpoint of ours (read without running its pickle); None if not one.

    The config takes the file's classes and anchors and its training size (from its `opt`, else 640).
    """
    try:
        state, info = convert_ultralytics_yolov5(path)
    except ValueError:
        return None
    config = make_config(info["model"], 0, info["class_names"], input_shape=(info["input_size"],) * 2,
                         anchors=info["anchors"])
    if config["anchors_mask"] != info["anchors_mask"]:
        return None
    log.info("%s: an ultralytics %s file, read without running its pickle (%d classes)", path, info["model"],
             info["num_classes"])
    return {"model": state, "config": config, "source": {"ultralytics": str(path)}}


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint of this project (a dict with `model` weights and a complete `config`), or an ultralytics YOLOv5 .pt."""
    try:
        ckpt = read_torch_file(path)
    except CheckpointError:
        ckpt = ultralytics_checkpoint(path)
        if ckpt is None:
            raise
        return ckpt
    if not isinstance(ckpt, dict) or "model" not in ckpt or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path} is not a checkpoint of this project (no model config inside); "
                              "use a best.pt/last.pt written by train.py")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt["config"]]
    if missing:
        raise CheckpointError(f"{path}: its config lacks {', '.join(missing)}; re-save it with train.py")
    return ckpt


def state_dict_from_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights to initialise from: a checkpoint of ours, or a plain state dict (e.g. a tutorial .pth)."""
    try:
        state = tensors_of(read_torch_file(path))
    except CheckpointError:
        converted = ultralytics_checkpoint(path)
        if converted is None:
            raise
        state = converted["model"]
    if state is None:
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return state


def write_plain_checkpoint(weights: str | Path, out: str | Path | None = None) -> Path:
    """An inference checkpoint (model weights + config, `weights_only`-readable) from any checkpoint this project
    reads, an official ultralytics YOLOv5 `.pt` included: `<stem>_plain.pt` beside it unless `out` is given."""
    weights = Path(weights)
    out = Path(out) if out else weights.with_name(f"{weights.stem}_plain.pt")
    if out.suffix != ".pt":
        raise CheckpointError(f"--out {out}: give a file name ending in .pt")
    if out.resolve() == weights.resolve():
        raise CheckpointError(f"--out {out}: would overwrite {weights}")
    if not out.parent.is_dir():
        raise CheckpointError(f"--out {out}: folder {out.parent} does not exist")
    ckpt = load_checkpoint(weights)
    plain = {"model": ckpt["model"], "config": ckpt["config"], "source": ckpt.get("source", {"checkpoint": str(weights)})}
    for key in ("hyp", "epoch", "metrics", "train_args"):
        if key in ckpt:
            plain[key] = ckpt[key]
    save_checkpoint(plain, out)
    return out
