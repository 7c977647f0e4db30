"""What a weight load did: tensors loaded, shape-mismatched, missing from the file, unexpected in it."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

# a load that fills less than this share of the model's tensors is almost certainly the wrong file
MIN_LOADED_SHARE = 0.1


@dataclass
class WeightLoadReport:
    """Names per outcome; `source` is the file, `total` the number of tensors in the model's state dict."""

    source: str
    total: int
    loaded: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)     # name in both, shapes differ ("name: file vs model")
    missing: list[str] = field(default_factory=list)        # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)     # in the file, not in the model

    def summary(self) -> str:
        """One line: how many tensors of each kind."""
        return (f"{self.source}: loaded {len(self.loaded)}/{self.total} tensors, {len(self.mismatched)} "
                f"shape-mismatched, {len(self.missing)} missing, {len(self.unexpected)} unexpected")

    def check(self, min_share: float = MIN_LOADED_SHARE) -> WeightLoadReport:
        """Raise ValueError when almost nothing matched (the wrong file or the wrong model)."""
        if len(self.loaded) < max(1, min_share * self.total):
            sample = ", ".join((self.mismatched or self.unexpected)[:3]) or "nothing"
            raise ValueError(f"{self.summary()}: this file does not fit the model (e.g. {sample})")
        return self

    def save(self, path: str | Path) -> None:
        """The full report as JSON."""
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")


def tensors_of(obj: object) -> dict[str, torch.Tensor] | None:
    """The state dict inside a loaded file (a checkpoint's `model`, a `state_dict` entry, or the dict itself),
    with DataParallel's `module.` prefix removed; None when it holds no dict of tensors."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        return None
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> WeightLoadReport:
    """Copy tensors whose name and shape match into `model`; report every other name."""
    own = model.state_dict()
    report = WeightLoadReport(source=source, total=len(own))
    matched = {}
    for name, tensor in state.items():
        if name not in own:
            report.unexpected.append(name)
        elif tuple(own[name].shape) != tuple(tensor.shape):
            report.mismatched.append(f"{name}: {tuple(tensor.shape)} vs {tuple(own[name].shape)}")
        else:
            matched[name] = tensor
    report.loaded = sorted(matched)
    report.missing = sorted(set(own) - set(state))
    model.load_state_dict(matched, strict=False)
    return report
