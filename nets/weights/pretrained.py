"""--backbone-weights FILE: the one entry point that recognises a weight file's format and loads what fits.

Formats, from local files only (nothing is downloaded):
  - Darknet `.weights` (AlexeyAB: `yolov4-tiny.conv.29`, `yolov4-tiny.weights`) -> our YOLOv4-tiny
  - official ultralytics YOLOv5 `.pt` (pickled model objects, read without running their pickle) -> our YOLOv5
  - a checkpoint of ours (its `backbone.*` tensors) or a state dict in our names (its `backbone.*` tensors)
  - a torchvision / timm classifier's state dict (`.pth`, `.pt`, `.safetensors`) -> a torchvision / timm backbone
Every load returns a WeightLoadReport and raises when almost nothing matched.
"""
from __future__ import annotations

import importlib.util
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from nets.backbones import FeatureBackbone, load_backbone_state
from nets.weights.darknet import load_darknet_yolov4_tiny
from nets.weights.report import WeightLoadReport, load_state, tensors_of
from nets.weights.ultralytics import load_ultralytics_yolov5
from utils.log import get_logger

log = get_logger(__name__)


def load_pretrained(model: nn.Module, family: str, path: str | Path) -> WeightLoadReport:
    """Load `path` into `model` (of `family`, 'yolov4-tiny' or 'yolov5'); the report of what matched."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--backbone-weights {path}: no such file")
    if path.suffix == ".weights" or ".conv." in path.name:
        _require(family == "yolov4-tiny" and not isinstance(model.backbone, FeatureBackbone), path,
                 "a Darknet file fits YOLOv4-tiny with its own backbone (--model yolov4-tiny)")
        return load_darknet_yolov4_tiny(model, path)
    state = _read_state(path)
    if state is None:                        # a pickle of model objects: the ultralytics YOLOv5 format
        _require(family == "yolov5" and not isinstance(model.backbone, FeatureBackbone), path,
                 "an ultralytics YOLOv5 file fits --model yolov5n/s/m/l/x with its own backbone")
        return load_ultralytics_yolov5(model, path)
    ours = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    if ours:                                 # our checkpoint or state dict: its backbone
        report = load_state(model.backbone, ours, str(path))
    else:                                    # a classifier's own names: torchvision / timm
        report = load_backbone_state(model, state, str(path))
    report.check()
    log.info("%s", report.summary())
    return report


def _read_state(path: Path) -> dict[str, torch.Tensor] | None:
    """A file's tensors by name, or None for a torch file that pickles model objects (never unpickled here)."""
    if path.suffix == ".safetensors":
        if importlib.util.find_spec("safetensors") is None:
            raise ValueError(f"--backbone-weights {path}: reading .safetensors needs the safetensors package "
                             "(pip install safetensors)")
        from safetensors.torch import load_file  # noqa: PLC0415 (optional dependency)
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:           # weights_only refused a class: a pickled model, not a state dict
        if zipfile.is_zipfile(path):
            return None
        raise ValueError(f"--backbone-weights {path}: not a weight file this project reads") from None
    except Exception as exc:  # noqa: BLE001 (torch's errors for foreign files vary by version)
        raise ValueError(f"--backbone-weights {path}: not a loadable weight file ({str(exc).splitlines()[0][:120]})"
                         ) from None
    state = tensors_of(obj)
    if state is None:
        raise ValueError(f"--backbone-weights {path}: holds no state dict of tensors")
    return state


def _require(ok: bool, path: Path, what: str) -> None:
    if not ok:
        raise ValueError(f"--backbone-weights {path}: {what}")
