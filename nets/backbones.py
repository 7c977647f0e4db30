"""Backbones by name: the built-in CSPDarknets, any torchvision classifier, any timm model (when installed).

A backbone returns its feature maps finest first at the strides the body asks for and says their
channels in `out_channels`. Foreign models are built with `weights=None` (nothing is downloaded); their
feature nodes are found by tracing the stride of every graph node on a dummy input, and their channels
by running it once, so no model needs a table entry here.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
from torch import nn

# name -> the family whose own backbone it is ("cspdarknet-v5": the name checkpoints stored before --backbone)
BUILTIN = {"cspdarknet53-tiny": "yolov4-tiny", "cspdarknet": "yolov5", "cspdarknet-v5": "yolov5"}
FAMILY_STRIDES = {"yolov4-tiny": (16, 32), "yolov5": (8, 16, 32)}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
TIMM_PREFIX = "timm:"
# shown in --backbone list and in errors; every torchvision classifier with the strides works, not only these
TESTED = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
          "convnext_tiny", "regnet_y_400mf")
# a non-square dummy input (multiples of 32) so channels-last maps cannot pass for feature maps
TRACE_SIZE = (128, 160)


def is_builtin(name: str | None) -> bool:
    """True for the family's own backbone (None or a CSPDarknet name)."""
    return name is None or name in BUILTIN


def timm_available() -> bool:
    """Whether the optional timm package is importable."""
    return importlib.util.find_spec("timm") is not None


def torchvision_classifiers() -> list[str]:
    """The names of torchvision's classification models (detection, segmentation, video... left out)."""
    import torchvision  # noqa: PLC0415 (kept lazy: built-in runs never need it)
    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_backbone(name: str, family: str) -> str:
    """`name` checked for `family` (the canonical spelling); an unknown or unusable name raises ValueError."""
    if name in BUILTIN:
        if BUILTIN[name] != family:
            raise ValueError(f"--backbone {name}: that is {BUILTIN[name]}'s own backbone; for {family} use "
                             f"{own_backbone(family)} or a torchvision/timm model")
        return name
    if name.startswith(TIMM_PREFIX):
        model = name[len(TIMM_PREFIX):]
        if not timm_available():
            raise ValueError(f"--backbone {name} needs timm (pip install timm)")
        import timm  # noqa: PLC0415
        if not model or not timm.is_model(model):
            raise ValueError(f"--backbone {name}: timm has no model {model!r} (e.g. timm:resnet18)")
        return name
    if name not in torchvision_classifiers():
        raise ValueError(f"unknown --backbone {name!r}: give {own_backbone(family)} (the model's own), a torchvision "
                         f"classifier (e.g. {', '.join(TESTED[:5])}), timm:NAME, or 'list' to see them all")
    return name


def own_backbone(family: str) -> str:
    """The command-line name of a family's built-in backbone."""
    return "cspdarknet53-tiny" if family == "yolov4-tiny" else "cspdarknet"


def backbone_normalisation(name: str | None) -> tuple[list[float] | None, list[float] | None]:
    """(mean, std) the backbone expects of 0..1 RGB input; (None, None) for the built-ins (0..1 as is)."""
    if is_builtin(name):
        return None, None
    if name.startswith(TIMM_PREFIX):
        import timm  # noqa: PLC0415
        try:
            cfg = timm.models.get_pretrained_cfg(name[len(TIMM_PREFIX):])
            return [float(v) for v in cfg.mean], [float(v) for v in cfg.std]
        except Exception:  # noqa: BLE001 (older timm or no pretrained cfg: ImageNet's statistics)
            pass
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


def backbone_listing() -> str:
    """What `--backbone list` prints: the built-ins, the torchvision classifiers, whether timm is installed."""
    names = torchvision_classifiers()
    lines = ["built-in: cspdarknet53-tiny (YOLOv4-tiny's own), cspdarknet (YOLOv5's own; alias cspdarknet-v5)",
             f"torchvision classifiers ({len(names)}; any with feature maps at strides 16/32 for YOLOv4-tiny, "
             f"8/16/32 for YOLOv5 works, checked when the model is built; tested: {', '.join(TESTED)}):"]
    lines += [f"  {' '.join(names[i:i + 8])}" for i in range(0, len(names), 8)]
    lines.append("timm: installed, any timm:NAME with features_only=True" if timm_available()
                 else "timm: not installed (pip install timm for timm:NAME backbones)")
    return "\n".join(lines)


@functools.lru_cache(maxsize=32)
def feature_nodes(name: str, strides: tuple[int, ...]) -> tuple[str, ...]:
    """The graph nodes of torchvision model `name` whose outputs are its stage outputs at `strides`.

    A node's module path names the modules it runs in; the last node under a path is that module's output.
    Per stride, the shallowest module whose output has that stride wins, the last of them when several do
    (so a stage's output, not a layer inside a block that happens to keep the stride).
    """
    from torchvision.models import get_model  # noqa: PLC0415
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names  # noqa: PLC0415
    model = get_model(name, weights=None).eval()
    nodes = get_graph_node_names(model)[1]
    with torch.no_grad():
        outputs = create_feature_extractor(model, nodes)(torch.zeros(1, 3, *TRACE_SIZE))
    last_under: dict[str, int] = {}           # module path -> index of its last node
    for i, node in enumerate(nodes):
        parts = node.split(".")
        for depth in range(1, len(parts) + 1):
            last_under[".".join(parts[:depth])] = i
    chosen = []
    for stride in strides:
        want = (TRACE_SIZE[0] // stride, TRACE_SIZE[1] // stride)
        found = [(path.count("."), -i, nodes[i]) for path, i in last_under.items()
                 if _is_map(outputs.get(nodes[i]), want)]
        if not found:
            raise ValueError(f"--backbone {name}: has no feature map at stride {stride} (the neck needs strides "
                             f"{'/'.join(map(str, strides))}); choose another model")
        chosen.append(min(found)[2])
    return tuple(chosen)


def _is_map(value: object, size: tuple[int, int]) -> bool:
    """A [1, C, H, W] tensor of the given spatial size."""
    return torch.is_tensor(value) and value.dim() == 4 and tuple(value.shape[2:]) == size


class FeatureBackbone(nn.Module):
    """A torchvision or timm model cut to its feature maps at `strides`, returned finest first.

    `body` is the torchvision feature extractor (its state-dict names are the classifier's own) or the
    timm features_only model; `out_channels` is measured on a dummy input.
    """

    def __init__(self, name: str, strides: tuple[int, ...]):
        super().__init__()
        self.name, self.strides = name, tuple(sorted(strides))
        if name.startswith(TIMM_PREFIX):
            self.body, self.nodes = _timm_body(name, self.strides), None
        else:
            from torchvision.models import get_model  # noqa: PLC0415
            from torchvision.models.feature_extraction import create_feature_extractor  # noqa: PLC0415
            self.nodes = feature_nodes(name, self.strides)
            self.body = create_feature_extractor(get_model(name, weights=None), list(self.nodes))
        self.out_channels = tuple(int(f.shape[1]) for f in self._probe())

    def _probe(self) -> list[torch.Tensor]:
        """One eval-mode run on a dummy input (BatchNorm statistics untouched)."""
        training = self.training
        self.eval()
        with torch.no_grad():
            features = self(torch.zeros(1, 3, *TRACE_SIZE))
        self.train(training)
        return features

    def inner(self) -> nn.Module:
        """The module whose state-dict names are the torchvision/timm model's own."""
        return self.body

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.body(x)
        return list(out) if self.nodes is None else [out[n] for n in self.nodes]


def _timm_body(name: str, strides: tuple[int, ...]) -> nn.Module:
    """timm's features_only model with the out_indices at `strides` (from its feature_info)."""
    import timm  # noqa: PLC0415
    model_name = name[len(TIMM_PREFIX):]
    probe = timm.create_model(model_name, pretrained=False, features_only=True)
    reductions = list(probe.feature_info.reduction())
    missing = [s for s in strides if s not in reductions]
    if missing:
        raise ValueError(f"--backbone {name}: has no feature map at stride {'/'.join(map(str, missing))} "
                         f"(it has {reductions}); choose another model")
    indices = tuple(len(reductions) - 1 - reductions[::-1].index(s) for s in strides)   # the last at each stride
    return timm.create_model(model_name, pretrained=False, features_only=True, out_indices=indices)


def build_backbone(name: str | None, strides: tuple[int, ...], builtin: type, *args: object) -> nn.Module:
    """The built-in `builtin(*args)` for the family's own name, else a FeatureBackbone at `strides`."""
    return builtin(*args) if is_builtin(name) else FeatureBackbone(name, strides)


def register_normalisation(module: nn.Module, mean: list[float] | None, std: list[float] | None) -> None:
    """Non-persistent `input_mean`/`input_std` buffers ([1, 3, 1, 1], or None for 0..1 input as is)."""
    for name, values in (("input_mean", mean), ("input_std", std)):
        module.register_buffer(name, None if values is None else torch.tensor(values).view(1, 3, 1, 1),
                               persistent=False)


def normalise(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """0..1 input in the scale the backbone expects (the body's first operation)."""
    if module.input_mean is None:
        return x
    return (x - module.input_mean.to(x.dtype)) / module.input_std.to(x.dtype)


def load_backbone_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state dict"):
    """A torchvision/timm classifier's state dict into `model.backbone` (by its own names); the load's report."""
    from nets.weights.report import load_state  # noqa: PLC0415
    backbone = model.backbone
    target = backbone.inner() if isinstance(backbone, FeatureBackbone) else backbone
    state = {k.removeprefix("module."): v for k, v in state.items()}   # saved from DataParallel/DDP
    return load_state(target, state, source)
