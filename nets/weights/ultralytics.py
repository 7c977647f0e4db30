"""Official ultralytics YOLOv5 (v6/v7, P5) `.pt` files onto our parameter-exact YOLOv5, without running their pickle.

Safety: an ultralytics `.pt` is a pickled `DetectionModel` object, and loading it the ordinary way executes
whatever its pickle says. Here the pickle is read by `SafeUnpickler`, which trusts only `SAFE_GLOBALS`:
our own re-implementations of torch's tensor/parameter rebuild functions, `collections.OrderedDict`,
`torch.Size`, `set`/`frozenset`, and the storage-type names (read as dtypes, nothing imported). Every
other global, class or function (their model classes, `os.system`, `builtins.eval`, `subprocess.Popen`,
...) becomes an inert `Stub`: nothing is imported, nothing of theirs is ever called; calling a stub (a
`__reduce__` payload) only records the call and returns another stub. Storages are read as raw bytes
from the zip's `data/<key>` entries. The tensors are then found by walking the stubs' recorded
`_parameters`, `_buffers` and `_modules`.
"""
from __future__ import annotations

import collections
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from nets.CSPdarknet import scale_depth, scale_width
from nets.weights.report import WeightLoadReport, load_state
from nets.yolov5 import SIZES
from utils.log import get_logger

log = get_logger(__name__)

# the storage types a torch zip file names in its persistent ids, and the dtype of their bytes
STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}
BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
STRIDES = (8, 16, 32)          # P3, P4, P5: the order of ultralytics' Detect levels


class Stub:
    """Stands in for any class or function not on the allow-list: records, never runs anything."""

    stub_module = ""
    stub_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Stub:
        inst = object.__new__(cls)
        object.__setattr__(inst, "stub_args", args)
        object.__setattr__(inst, "stub_kwargs", kwargs)
        object.__setattr__(inst, "stub_state", None)
        object.__setattr__(inst, "stub_items", [])
        return inst

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "stub_state", state)

    def __call__(self, *args: Any, **kwargs: Any) -> Stub:
        # a payload that calls what a stub returned gets one more inert stub
        return type(self)(*args, **kwargs)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.stub_items.append((key, value))

    def append(self, value: Any) -> None:
        self.stub_items.append(value)

    def extend(self, values: Any) -> None:
        self.stub_items.extend(values)

    def __repr__(self) -> str:
        return f"<stub {self.stub_module}.{self.stub_name}>"

    def recorded(self, key: str) -> Any:
        """An entry of the state pickle gave this object (a module's `_parameters`, ...), or None."""
        state = self.stub_state
        if isinstance(state, tuple) and state and isinstance(state[0], dict):    # (dict, slot state)
            state = state[0]
        return state.get(key) if isinstance(state, dict) else None


def _storage(raw: bytes, dtype: torch.dtype) -> torch.Tensor:
    """A storage's raw bytes as a flat tensor of `dtype`."""
    return torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)


def _rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any, *_ignored: Any) -> torch.Tensor:
    """torch._utils._rebuild_tensor(_v2) without hooks or metadata: a strided view of the storage, copied."""
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError(f"a tensor built from {storage!r}, not from a storage of the file")
    return storage.as_strided(tuple(size), tuple(stride), int(offset)).clone()


def _rebuild_parameter(data: Any, *_ignored: Any) -> Any:
    """torch._utils._rebuild_parameter(_with_state): the data tensor itself (hooks and state dropped)."""
    return data


def _rebuild_from_type(func: Any, _type: Any, args: Any, _state: Any) -> Any:
    """torch._tensor._rebuild_from_type_v2: `func` is itself allow-listed or a stub, so calling it is safe."""
    return func(*args)


class _StorageType:
    """A storage type named in a persistent id: only its dtype is used."""

    def __init__(self, name: str):
        self.dtype = STORAGE_DTYPES[name]


SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): torch.Size,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage"),
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles a torch zip file's data.pkl: allow-listed globals are real, everything else a `Stub`."""

    def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, torch.Tensor] = {}
        self.refused: set[str] = set()
        self._stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[module, name]
        self.refused.add(f"{module}.{name}")
        if (module, name) not in self._stubs:
            self._stubs[module, name] = type(re.sub(r"\W", "_", name) or "Stub", (Stub,),
                                             {"stub_module": module, "stub_name": name})
        return self._stubs[module, name]

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        key, dtype = pid[2], pid[1].dtype
        if key not in self.storages:
            try:
                self.storages[key] = _storage(self.archive.read(f"{self.prefix}data/{key}"), dtype)
            except KeyError as e:
                raise pickle.UnpicklingError(f"storage {key!r} is not in the archive") from e
        return self.storages[key]


def safe_torch_load(path: str | Path) -> Any:
    """The object pickled in a torch zip file, rebuilt by `SafeUnpickler` (nothing of the file's is run)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise ValueError(f"{path}: not a torch zip file (no <archive>/data.pkl entry)")
            prefix = pickles[0][: -len("data.pkl")]
            if prefix + "byteorder" in archive.namelist() and archive.read(prefix + "byteorder").strip() != b"little":
                raise ValueError(f"{path}: a big-endian torch file; re-save it on a little-endian machine")
            if sys.byteorder != "little":
                raise ValueError(f"{path}: reading torch files needs a little-endian machine")
            with archive.open(pickles[0]) as data:
                unpickler = SafeUnpickler(data, archive, prefix)
                obj = unpickler.load()
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path}: not a torch zip file ({e}); is it a checkpoint saved by torch.save?") from e
    except (pickle.UnpicklingError, EOFError, zipfile.LargeZipFile, RuntimeError, TypeError,
            AttributeError, IndexError, KeyError, OSError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        raise ValueError(f"{path}: unreadable torch file ({type(e).__name__}: {e})") from e
    if unpickler.refused:
        log.debug("%s: %d names stubbed, not imported: %s", path, len(unpickler.refused),
                  ", ".join(sorted(unpickler.refused)))
    return obj


def _module_tensors(module: Stub, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    """The dotted names of a stubbed nn.Module tree's parameters and buffers, as a state dict would hold them."""
    if id(module) in seen:
        return
    seen.add(id(module))
    for kind in ("_parameters", "_buffers"):
        for name, tensor in (module.recorded(kind) or {}).items():
            if isinstance(tensor, torch.Tensor):
                out[prefix + str(name)] = tensor.float() if tensor.is_floating_point() else tensor
    for name, child in (module.recorded("_modules") or {}).items():
        if isinstance(child, Stub):
            _module_tensors(child, f"{prefix}{name}.", out, seen)


def read_ultralytics_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an ultralytics `.pt` (its EMA model when present, else "model"), floats as float32."""
    return _read_model(path)[0]


def _class_names(root: Stub) -> list[str] | None:
    """The model object's `names` (a list, or a dict index -> name), as strings in index order; None when absent."""
    names = root.recorded("names")
    if isinstance(names, dict) and all(isinstance(k, int) for k in names):
        names = [names[k] for k in sorted(names)]
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, (str, int)) for n in names):
        return [str(n) for n in names]
    return None


def _training_size(obj: dict) -> int | None:
    """The square training size an ultralytics `.pt` records in its `opt` (the train.py arguments), or None."""
    opt = obj.get("opt")
    size = opt.get("imgsz", opt.get("img_size")) if isinstance(opt, dict) else None
    if isinstance(size, (list, tuple)) and size:
        size = max(size)
    return size if isinstance(size, int) and not isinstance(size, bool) and 32 <= size <= 4096 and size % 32 == 0 \
        else None


def _read_model(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str] | None, int | None]:
    """(tensors, class names or None, training size or None) of an ultralytics `.pt`'s EMA model when present,
    else its "model"."""
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or not any(isinstance(obj.get(k), Stub) for k in ("ema", "model")):
        kind = "a plain state dict" if isinstance(obj, dict) and obj and all(
            isinstance(v, torch.Tensor) for v in obj.values()) else f"a {type(obj).__name__}"
        raise ValueError(f"{path}: {kind}, not an ultralytics checkpoint (a dict whose 'model' is a pickled model)")
    root = obj["ema"] if isinstance(obj.get("ema"), Stub) else obj["model"]
    tensors: dict[str, torch.Tensor] = {}
    _module_tensors(root, "", tensors, set())
    if not tensors:
        raise ValueError(f"{path}: its model object holds no tensors")
    return tensors, _class_names(root), _training_size(obj)


# ultralytics' layer index -> (our module, kind, repeats of the 3-repeat base for C3) for YOLOv5 v6/v7 P5
YOLOV5_LAYERS: dict[int, tuple[str, str, int]] = {
    0: ("backbone.stem", "conv", 0),
    1: ("backbone.dark2.0", "conv", 0),
    2: ("backbone.dark2.1", "c3", 3),
    3: ("backbone.dark3.0", "conv", 0),
    4: ("backbone.dark3.1", "c3", 6),
    5: ("backbone.dark4.0", "conv", 0),
    6: ("backbone.dark4.1", "c3", 9),
    7: ("backbone.dark5.0", "conv", 0),
    8: ("backbone.dark5.1", "c3", 3),
    9: ("backbone.dark5.2", "sppf", 0),
    10: ("lateral5", "conv", 0),          # 11 Upsample, 12 Concat: no tensors
    13: ("c3_p4", "c3", 3),
    14: ("lateral4", "conv", 0),          # 15 Upsample, 16 Concat
    17: ("c3_p3", "c3", 3),
    18: ("down3", "conv", 0),             # 19 Concat
    20: ("c3_n4", "c3", 3),
    21: ("down4", "conv", 0),             # 22 Concat
    23: ("c3_n5", "c3", 3),
}
DETECT_LAYER = 24
# Detect's m.0 (P3), m.1 (P4), m.2 (P5) -> our heads, coarsest first
DETECT_HEADS = {0: "head.2", 1: "head.1", 2: "head.0"}


def _conv_names(theirs: str, ours: str) -> dict[str, str]:
    """Conv (conv + bn) tensors; our ConvBNAct uses the same two names."""
    names = {f"{theirs}.conv.weight": f"{ours}.conv.weight"}
    names.update({f"{theirs}.bn.{t}": f"{ours}.bn.{t}" for t in BN_TENSORS})
    return names


def _c3_names(theirs: str, ours: str, repeats: int) -> dict[str, str]:
    """C3: cv1, cv2, cv3 and `repeats` bottlenecks of cv1, cv2 (named alike on both sides)."""
    names: dict[str, str] = {}
    for conv in ("cv1", "cv2", "cv3"):
        names.update(_conv_names(f"{theirs}.{conv}", f"{ours}.{conv}"))
    for i in range(repeats):
        for conv in ("cv1", "cv2"):
            names.update(_conv_names(f"{theirs}.m.{i}.{conv}", f"{ours}.m.{i}.{conv}"))
    return names


def yolov5_name_map(size: str) -> dict[str, str]:
    """Ultralytics YOLOv5 v6/v7 state-dict names -> ours, for size n/s/m/l/x (Detect's anchors excluded)."""
    if size not in SIZES:
        raise ValueError(f"unknown YOLOv5 size {size!r}; choose one of {', '.join(SIZES)}")
    depth = SIZES[size][0]
    names: dict[str, str] = {}
    for index, (ours, kind, base_repeats) in YOLOV5_LAYERS.items():
        theirs = f"model.{index}"
        if kind == "conv":
            names.update(_conv_names(theirs, ours))
        elif kind == "c3":
            names.update(_c3_names(theirs, ours, scale_depth(base_repeats, depth)))
        else:   # sppf
            for conv in ("cv1", "cv2"):
                names.update(_conv_names(f"{theirs}.{conv}", f"{ours}.{conv}"))
    for level, ours in DETECT_HEADS.items():
        for t in ("weight", "bias"):
            names[f"model.{DETECT_LAYER}.m.{level}.{t}"] = f"{ours}.{t}"
    return names


def _bottlenecks(tensors: dict[str, torch.Tensor], layer: int) -> int:
    """How many bottlenecks a C3 layer of the file holds."""
    found = {int(m.group(1)) for k in tensors if (m := re.match(rf"model\.{layer}\.m\.(\d+)\.", k))}
    return len(found)


def infer_yolov5_size(tensors: dict[str, torch.Tensor], source: str) -> str:
    """n/s/m/l/x from the stem's width, checked against the bottleneck counts of layers 2 and 6."""
    if "model.0.conv.conv.weight" in tensors:
        raise ValueError(f"{source}: a YOLOv5 before v6.0 (Focus stem); only v6/v7 files are supported")
    stem = tensors.get("model.0.conv.weight")
    if stem is None or stem.dim() != 4 or tuple(stem.shape[1:]) != (3, 6, 6):
        raise ValueError(f"{source}: no 6x6 YOLOv5 v6/v7 stem conv (model.0.conv.weight); not a YOLOv5 v6/v7 file")
    for size, (depth, width) in SIZES.items():
        if stem.shape[0] == scale_width(64, width):
            expected = (scale_depth(3, depth), scale_depth(9, depth))
            found = (_bottlenecks(tensors, 2), _bottlenecks(tensors, 6))
            if found != expected:
                raise ValueError(f"{source}: stem width {stem.shape[0]} is YOLOv5{size}, but layers 2 and 6 hold "
                                 f"{found} bottlenecks, not {expected}: a custom depth this model cannot take")
            return size
    raise ValueError(f"{source}: stem width {stem.shape[0]} matches no YOLOv5 size "
                     f"({', '.join(f'{s}: {scale_width(64, w)}' for s, (_, w) in SIZES.items())})")


def _anchors(tensors: dict[str, torch.Tensor], source: str) -> tuple[list[list[float]], list[list[int]]]:
    """Detect's anchors (stride units per level, P3 first) -> our pixel anchors finest first, and the mask."""
    grid = tensors.get(f"model.{DETECT_LAYER}.anchors")
    if grid is None or grid.dim() != 3 or grid.shape[0] != len(STRIDES) or grid.shape[2] != 2:
        raise ValueError(f"{source}: no Detect anchors of shape (3, anchors, 2) (model.{DETECT_LAYER}.anchors)")
    stride = torch.tensor(STRIDES, dtype=torch.float32).view(-1, 1, 1)
    pixels = (grid.float() * stride).reshape(-1, 2)
    anchors = [[round(float(w), 4), round(float(h), 4)] for w, h in pixels]
    na = grid.shape[1]
    # our heads are coarsest first: P5 takes the last `na` anchors
    mask = [list(range(level * na, (level + 1) * na)) for level in reversed(range(len(STRIDES)))]
    return anchors, mask


def convert_ultralytics_yolov5(path: str | Path, size: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """An ultralytics YOLOv5 v6/v7 `.pt` -> (state dict in our names, info: model, size, class names, anchors, ...)."""
    tensors, class_names, input_size = _read_model(path)
    inferred = infer_yolov5_size(tensors, str(path))
    if size is not None and size != inferred:
        raise ValueError(f"{path}: a YOLOv5{inferred} file, not YOLOv5{size}")
    anchors, mask = _anchors(tensors, str(path))
    head = tensors.get(f"model.{DETECT_LAYER}.m.0.weight")
    na = len(mask[0])
    if head is None or head.shape[0] % na or head.shape[0] // na <= 5:
        raise ValueError(f"{path}: no Detect conv with {na} x (5 + classes) outputs (model.{DETECT_LAYER}.m.0)")
    names = yolov5_name_map(inferred)
    state = {ours: tensors[theirs] for theirs, ours in names.items() if theirs in tensors}
    num_classes = head.shape[0] // na - 5
    if class_names is None or len(class_names) != num_classes:
        class_names = [f"class{i}" for i in range(num_classes)]
    info = {"model": f"yolov5{inferred}", "size": inferred, "num_classes": num_classes,
            "class_names": class_names, "anchors": anchors, "anchors_mask": mask, "source": str(path),
            "input_size": input_size or 640,
            "missing": sorted(set(names) - set(tensors)),
            "unexpected": sorted(set(tensors) - set(names) - {f"model.{DETECT_LAYER}.anchors"})}
    return state, info


def load_ultralytics_yolov5(model: torch.nn.Module, path: str | Path) -> WeightLoadReport:
    """Load what fits of an ultralytics YOLOv5 `.pt` into our YOLOv5; ValueError when almost nothing does."""
    state, info = convert_ultralytics_yolov5(path)
    # checked first: the scalar BN batch counters of another size would otherwise "fit"
    theirs, own = state.get("backbone.stem.conv.weight"), model.state_dict().get("backbone.stem.conv.weight")
    if theirs is None or own is None or theirs.shape != own.shape:
        found = "no YOLOv5 stem" if own is None else f"stem {tuple(own.shape)}"
        raise ValueError(f"{path}: a {info['model']} file (stem {tuple(theirs.shape) if theirs is not None else None})"
                         f" does not fit the model ({found}); build --model {info['model']}")
    report = load_state(model, state, str(path)).check()
    log.info("%s (ultralytics %s, %d classes)", report.summary(), info["model"], info["num_classes"])
    return report
