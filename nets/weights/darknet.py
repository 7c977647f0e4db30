"""Darknet (AlexeyAB) `.weights` files <-> our YOLOv4-tiny (nets/yolo.py YoloBody).

The format: an int32 header (major, minor, revision), then `seen` - int64 when
(major*10 + minor) >= 2 and major, minor < 1000, else int32 - then every convolutional layer
of the cfg in order, as float32: with batch_normalize, BN bias (beta), scale (gamma),
rolling mean, rolling variance, then the conv weights in [out, in, k, k] order (PyTorch's);
without BN, the conv bias then the weights. In yolov4-tiny.cfg only the 21 convolutional
layers carry numbers (route, maxpool, upsample and yolo layers carry none).

Files this reads, told apart by their number of floats:
- `yolov4-tiny.conv.29` (Darknet's pretrained backbone, `darknet partial ... 29`): layers
  0..28 of the cfg, i.e. the 15 backbone convs plus conv_for_P5 and yolo_headP5.0 (17 convs);
- a backbone cut after layer 26 (`darknet partial ... 27`): the 15 backbone convs;
- a full file (`yolov4-tiny.weights`, or a custom one trained with `classes=C`): all 21 convs,
  the class count read from the size; prediction convs of another class count than the model's
  are reported as shape-mismatched and left as they are.

Our YoloBody's forward is the cfg's graph: Darknet's `route groups=2 group_id=1` takes the
second half of the channels (our `x.chunk(2, dim=1)[1]`), and every concat keeps the cfg's
order, so the numbers map one to one. BatchNorm epsilon differs: Darknet uses 1e-5, our
nets/common.py BN_EPS is 1e-3; the numbers load as they are (the difference is below the noise
of a running variance, and fine-tuning absorbs it), our BN settings are not changed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nets.weights.report import WeightLoadReport, load_state
from utils.log import get_logger

log = get_logger(__name__)

# the anchors per prediction conv in yolov4-tiny.cfg (mask = 3,4,5 and 1,2,3)
ANCHORS_PER_LEVEL = 3
COCO_CLASSES = 80
# what we write: the AlexeyAB version whose header has a 64-bit `seen`
WRITE_VERSION = (0, 2, 5)
# headers beyond these are not Darknet's (their transpose flag is major or minor > 1000)
MAX_VERSION_FIELD = 2000


@dataclass(frozen=True)
class ConvSpec:
    """One convolutional layer of yolov4-tiny.cfg: our module prefix, channels, kernel, BN or bias."""

    prefix: str
    c_in: int
    c_out: int      # 0: the prediction conv, 3 * (5 + classes)
    k: int
    bn: bool = True

    def out(self, num_classes: int) -> int:
        """Output channels for a file of `num_classes` classes."""
        return self.c_out or ANCHORS_PER_LEVEL * (5 + num_classes)

    def floats(self, num_classes: int) -> int:
        """How many float32 this layer takes in the file."""
        out = self.out(num_classes)
        return out * (4 if self.bn else 1) + out * self.c_in * self.k * self.k


def _resblock(i: int, c: int) -> list[ConvSpec]:
    """A CSP block's four convs in cfg order: 3x3 c->c, 3x3 c/2 (the second half), 3x3 c/2, 1x1 c->c."""
    name = f"backbone.resblock_body{i}"
    return [ConvSpec(f"{name}.conv1", c, c, 3), ConvSpec(f"{name}.conv2", c // 2, c // 2, 3),
            ConvSpec(f"{name}.conv3", c // 2, c // 2, 3), ConvSpec(f"{name}.conv4", c, c, 1)]


# yolov4-tiny.cfg's convolutional layers in file order (cfg layer index in the comments)
CONVS: tuple[ConvSpec, ...] = (
    ConvSpec("backbone.conv1", 3, 32, 3),                                     # 0 (stride 2)
    ConvSpec("backbone.conv2", 32, 64, 3),                                    # 1 (stride 2)
    *_resblock(1, 64),                                                        # 2, 4, 5, 7
    *_resblock(2, 128),                                                       # 10, 12, 13, 15
    *_resblock(3, 256),                                                       # 18, 20, 21, 23
    ConvSpec("backbone.conv3", 512, 512, 3),                                  # 26
    ConvSpec("conv_for_P5", 512, 256, 1),                                     # 27
    ConvSpec("yolo_headP5.0", 256, 512, 3),                                   # 28
    ConvSpec("yolo_headP5.1", 512, 0, 1, bn=False),                           # 29, then yolo 30, route -4
    ConvSpec("upsample.upsample.0", 256, 128, 1),                             # 32, upsample, route -1,23
    ConvSpec("yolo_headP4.0", 384, 256, 3),                                   # 35
    ConvSpec("yolo_headP4.1", 256, 0, 1, bn=False),                           # 36, then yolo 37
)
BACKBONE_CONVS = 15         # cfg layers 0..26
CONV29_CONVS = 17           # cfg layers 0..28: yolov4-tiny.conv.29
PREFIX_CONVS = (BACKBONE_CONVS, CONV29_CONVS)


def prefix_floats(n_convs: int) -> int:
    """Floats of the first `n_convs` convolutional layers (class-independent for n <= 17)."""
    return sum(spec.floats(COCO_CLASSES) for spec in CONVS[:n_convs])


def full_floats(num_classes: int) -> int:
    """Floats of a full yolov4-tiny file trained with `num_classes` classes."""
    return sum(spec.floats(num_classes) for spec in CONVS)


def read_darknet_weights(path: str | Path) -> tuple[dict, np.ndarray]:
    """The header {major, minor, revision, seen} and the float32 payload of a Darknet `.weights` file."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 16:
        raise ValueError(f"{path}: too short for a Darknet .weights file ({len(data)} bytes, header needs 16+)")
    major, minor, revision = (int(v) for v in np.frombuffer(data, "<i4", 3))
    if not all(0 <= v < MAX_VERSION_FIELD for v in (major, minor, revision)):
        raise ValueError(f"{path}: not a Darknet .weights file (header version {major}.{minor}.{revision})")
    wide_seen = (major * 10 + minor) >= 2 and major < 1000 and minor < 1000
    start = 20 if wide_seen else 16
    if len(data) < start:
        raise ValueError(f"{path}: too short for a Darknet .weights file ({len(data)} bytes, "
                         f"header {major}.{minor}.{revision} needs {start})")
    seen = int(np.frombuffer(data, "<i8" if wide_seen else "<i4", 1, 12)[0])
    if (len(data) - start) % 4:
        raise ValueError(f"{path}: {len(data) - start} bytes after the header, not a whole number of float32 "
                         "(a truncated or foreign file)")
    floats = np.frombuffer(data, "<f4", offset=start).astype(np.float32)
    header = {"major": major, "minor": minor, "revision": revision, "seen": seen}
    return header, floats


def _expected_sizes() -> str:
    """The payload sizes a yolov4-tiny file can have, for error messages."""
    return (f"{prefix_floats(BACKBONE_CONVS)} (backbone, 15 convs), {prefix_floats(CONV29_CONVS)} "
            f"(yolov4-tiny.conv.29, 17 convs), or {full_floats(COCO_CLASSES)} (full yolov4-tiny.weights, "
            f"80 classes; {full_floats(1) - full_floats(0)} more or fewer per class)")


def detect_layout(n_floats: int, source: str = "file") -> tuple[int, int]:
    """(convs in the file, the file's class count) from its number of floats; ValueError when it fits none."""
    for n in PREFIX_CONVS:
        if n_floats == prefix_floats(n):
            return n, COCO_CLASSES
    per_class = full_floats(1) - full_floats(0)
    classes, rest = divmod(n_floats - full_floats(0), per_class)
    if rest == 0 and classes >= 1:
        return len(CONVS), classes
    raise ValueError(f"{source}: {n_floats} floats after the header fit no yolov4-tiny layout; expected "
                     f"{_expected_sizes()} - a file for another cfg, or truncated")


def _split(floats: np.ndarray, n_convs: int, num_classes: int) -> dict[str, torch.Tensor]:
    """The file's tensors under our state-dict names, in the file's shapes."""
    state, pos = {}, 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal pos
        size = int(np.prod(shape))
        out = torch.from_numpy(floats[pos:pos + size].copy()).reshape(shape)
        pos += size
        return out

    for spec in CONVS[:n_convs]:
        out = spec.out(num_classes)
        if spec.bn:
            # file order: beta, gamma, mean, variance, then weights
            for field in ("bias", "weight", "running_mean", "running_var"):
                state[f"{spec.prefix}.bn.{field}"] = take(out)
            state[f"{spec.prefix}.conv.weight"] = take(out, spec.c_in, spec.k, spec.k)
        else:
            state[f"{spec.prefix}.bias"] = take(out)
            state[f"{spec.prefix}.weight"] = take(out, spec.c_in, spec.k, spec.k)
    assert pos == floats.size, (pos, floats.size)       # detect_layout chose n_convs from the size
    return state


def load_darknet_yolov4_tiny(model: nn.Module, path: str | Path,
                             backbone_only: bool | None = None) -> WeightLoadReport:
    """Load a yolov4-tiny `.weights` file into `model` (a YoloBody); the report says what loaded.

    `backbone_only`: None takes what the file holds; True loads only `backbone.*` (from any file);
    False requires a full file. Tensors the file lacks (the head of a backbone file, attention
    blocks) are reported missing; prediction convs of another class count, shape-mismatched.
    """
    header, floats = read_darknet_weights(path)
    n_convs, num_classes = detect_layout(floats.size, str(path))
    if backbone_only is False and n_convs < len(CONVS):
        raise ValueError(f"{path}: a backbone-only file ({n_convs} convs), a full yolov4-tiny file was asked for")
    state = _split(floats, n_convs, num_classes)
    if backbone_only:
        state = {k: v for k, v in state.items() if k.startswith("backbone.")}
    own = model.state_dict()
    # Darknet keeps no BN batch counter: a loaded BN keeps the model's own
    for name in [k for k in state if k.endswith(".bn.running_var")]:
        counter = name.replace("running_var", "num_batches_tracked")
        if counter in own:
            state[counter] = own[counter]
    report = load_state(model, state, str(path))
    log.info("%s (Darknet %d.%d.%d, seen %d, %d convs, %d classes)", report.summary(), header["major"],
             header["minor"], header["revision"], header["seen"], n_convs, num_classes)
    return report.check()


def _conv_floats(model: nn.Module, spec: ConvSpec) -> list[np.ndarray]:
    """One conv's arrays in file order, from `model`."""
    own = model.state_dict()
    names = ([f"{spec.prefix}.bn.{f}" for f in ("bias", "weight", "running_mean", "running_var")]
             + [f"{spec.prefix}.conv.weight"]) if spec.bn else [f"{spec.prefix}.bias", f"{spec.prefix}.weight"]
    missing = [n for n in names if n not in own]
    if missing:
        raise ValueError(f"the model is not our YOLOv4-tiny: it has no {missing[0]}")
    return [own[n].detach().cpu().float().numpy().ravel() for n in names]


def write_darknet_weights(model: nn.Module, path: str | Path, backbone_only: bool = False,
                          n_convs: int | None = None, seen: int = 0) -> int:
    """Write `model` (a YoloBody) as a Darknet yolov4-tiny `.weights` file; returns the floats written.

    `backbone_only` writes the yolov4-tiny.conv.29 layout (17 convs); `n_convs` any cfg-order prefix.
    """
    n = n_convs if n_convs is not None else (CONV29_CONVS if backbone_only else len(CONVS))
    if not 1 <= n <= len(CONVS):
        raise ValueError(f"n_convs must be 1..{len(CONVS)}, got {n}")
    arrays = [a for spec in CONVS[:n] for a in _conv_floats(model, spec)]
    payload = np.concatenate(arrays).astype("<f4")
    header = np.array(WRITE_VERSION, "<i4").tobytes() + np.array([seen], "<i8").tobytes()
    path = Path(path)
    try:
        with open(path, "wb") as f:
            f.write(header)
            f.write(payload.tobytes())
    except OSError as e:
        raise ValueError(f"{path}: cannot write the Darknet weights ({e.strerror or e})") from e
    return int(payload.size)
