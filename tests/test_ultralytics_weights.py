"""Ultralytics YOLOv5 `.pt` files: read without running their pickle, names mapped onto our YOLOv5."""
from __future__ import annotations

import importlib
import sys
import textwrap
import zipfile

import pytest
import torch

from nets.weights.ultralytics import (Stub, convert_ultralytics_yolov5, load_ultralytics_yolov5,
                                      _training_size, read_ultralytics_checkpoint, safe_torch_load,
                                      yolov5_name_map)
from nets.yolo import build_model, make_config, read_anchors, MODEL_DATA
from utils.engine.checkpoint import load_checkpoint, state_dict_from_file
from yolo import YOLO

# a throwaway copy of ultralytics' class names; written to tmp_path, imported only while saving
FAKE_COMMON = '''
import os
from torch import nn

class Conv(nn.Module): pass
class C3(nn.Module): pass
class Bottleneck(nn.Module): pass
class SPPF(nn.Module): pass
class Concat(nn.Module): pass
class Leaf(nn.Module): pass

class Payload:
    """What a hostile file hides: unpickling it the ordinary way runs a shell command."""
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, ("touch " + self.marker,))

class OpenPayload:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (open, (self.marker, "w"))
'''
FAKE_YOLO = '''
from torch import nn

class DetectionModel(nn.Module): pass
class Detect(nn.Module): pass
'''
LAYER_KINDS = {2: "C3", 4: "C3", 6: "C3", 8: "C3", 13: "C3", 17: "C3", 20: "C3", 23: "C3", 9: "SPPF",
               11: "Upsample", 15: "Upsample", 12: "Concat", 16: "Concat", 19: "Concat", 22: "Concat"}


def names(n: int) -> list[str]:
    return [f"c{i}" for i in range(n)]


def _child(parent: torch.nn.Module, name: str, depth: int, fake) -> torch.nn.Module:
    """The submodule `name` of `parent`, made with ultralytics' class for that place when new."""
    if name in parent._modules:
        return parent._modules[name]
    if depth == 1:          # model.<i>
        index = int(name)
        cls = fake.yolo.Detect if index == 24 else getattr(fake.common, LAYER_KINDS.get(index, "Conv"))
    elif name in ("cv1", "cv2", "cv3"):
        cls = fake.common.Conv
    elif name == "m":
        cls = torch.nn.Sequential if isinstance(parent, fake.common.C3) else torch.nn.ModuleList
    elif isinstance(parent, torch.nn.Sequential):
        cls = fake.common.Bottleneck
    else:
        cls = fake.common.Leaf
    child = cls()
    parent.add_module(name, child)
    return child


def _fake_model(ours: torch.nn.Module, size: str, fake, anchors_px: list[list[float]]) -> torch.nn.Module:
    """An ultralytics-named module tree holding our model's tensors (half, as released) via the inverse map."""
    root = fake.yolo.DetectionModel()
    root.add_module("model", torch.nn.Sequential(*(
        (fake.common.Concat() if LAYER_KINDS.get(i) == "Concat" else torch.nn.Upsample(scale_factor=2.0))
        if LAYER_KINDS.get(i) in ("Concat", "Upsample") else torch.nn.Identity() for i in range(25))))
    for i in range(25):     # placeholders replaced as tensors arrive
        if LAYER_KINDS.get(i) not in ("Concat", "Upsample"):
            del root.model._modules[str(i)]
    own = ours.state_dict()
    for theirs, name in yolov5_name_map(size).items():
        *path, leaf = theirs.split(".")
        module = root
        for depth, part in enumerate(path):
            module = _child(module, part, depth, fake)
        tensor = own[name].clone()
        tensor = tensor.half() if tensor.is_floating_point() else tensor
        if leaf in ("weight", "bias"):
            module.register_parameter(leaf, torch.nn.Parameter(tensor))
        else:
            module.register_buffer(leaf, tensor)
    detect = root.model._modules["24"]
    strides = torch.tensor([8.0, 16.0, 32.0]).view(-1, 1, 1)
    detect.register_buffer("anchors", (torch.tensor(anchors_px).view(3, 3, 2) / strides).half())
    detect.stride = strides.flatten()
    root.names = names(80)
    root.yaml = {"nc": 80, "depth_multiple": 0.33}
    return root


@pytest.fixture
def fake_modules(tmp_path):
    """Imports ultralytics-like `models.common` / `models.yolo` from tmp_path; removes them all afterwards."""
    pkg = tmp_path / "fake_src" / "models"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "common.py").write_text(textwrap.dedent(FAKE_COMMON))
    (pkg / "yolo.py").write_text(textwrap.dedent(FAKE_YOLO))
    assert "models" not in sys.modules
    sys.path.insert(0, str(pkg.parent))
    importlib.invalidate_caches()

    class Fake:
        common = importlib.import_module("models.common")
        yolo = importlib.import_module("models.yolo")

    def forget() -> None:
        for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
            del sys.modules[name]
        if str(pkg.parent) in sys.path:
            sys.path.remove(str(pkg.parent))

    yield Fake, forget
    forget()


def _write_fake(tmp_path, fake_modules, size: str = "n", classes: int = 80, ema_in_model: bool = True,
                opt: dict | None = None):
    """Save an ultralytics-style checkpoint of a random YOLOv5 `size`; return (path, our model, marker paths).
    `opt` (train.py's arguments) replaces the default, a payload that must never run."""
    fake, forget = fake_modules
    torch.manual_seed(0)
    ours = build_model(make_config(f"yolov5{size}", 0, names(classes)))
    with torch.no_grad():      # non-trivial BN statistics, so a swapped buffer would show
        for name, t in ours.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t))
            else:
                t.fill_(7)
    anchors = read_anchors(MODEL_DATA / "yolov5_anchors.txt")
    markers = tmp_path / "pwned_system", tmp_path / "pwned_open"
    model = _fake_model(ours, size, fake, anchors)
    model.model._modules["24"].hook = fake.common.OpenPayload(str(markers[1]))
    ckpt = {"epoch": -1, "best_fitness": None, "model": model if ema_in_model else None,
            "ema": None if ema_in_model else model, "updates": None, "optimizer": None,
            "opt": fake.common.Payload(str(markers[0])) if opt is None else opt, "git": {"tag": "v7.0"}, "date": "2022-11-22"}
    path = tmp_path / f"yolov5{size}.pt"
    torch.save(ckpt, path)
    forget()
    return path, ours, markers


def test_fake_file_reads_without_running_anything(tmp_path, fake_modules):
    path, ours, markers = _write_fake(tmp_path, fake_modules)
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("models.yolo")              # their classes do not exist here
    obj = safe_torch_load(path)
    assert not any(m.exists() for m in markers)
    payload = obj["opt"]                                     # the os.system call, recorded not run
    assert isinstance(payload, Stub) and payload.stub_name == "system"
    assert payload.stub_args == (f"touch {markers[0]}",)
    assert isinstance(obj["model"], Stub) and (obj["model"].stub_module, obj["model"].stub_name) == \
        ("models.yolo", "DetectionModel")
    hook = obj["model"].recorded("_modules")["model"].recorded("_modules")["24"].recorded("hook")
    assert isinstance(hook, Stub) and hook.stub_name == "open" and hook.stub_args == (str(markers[1]), "w")
    state, info = convert_ultralytics_yolov5(path)
    assert not any(m.exists() for m in markers)
    assert info["size"] == "n" and info["num_classes"] == 80 and info["model"] == "yolov5n"
    assert info["anchors"] == read_anchors(MODEL_DATA / "yolov5_anchors.txt")
    assert info["anchors_mask"] == make_config("yolov5n", 0, names(3))["anchors_mask"]
    assert info["missing"] == [] and info["unexpected"] == []
    fresh = build_model(make_config("yolov5n", 0, names(80)))
    report = load_ultralytics_yolov5(fresh, path)
    assert len(report.loaded) == report.total and not (report.mismatched or report.missing or report.unexpected)
    for name, tensor in ours.state_dict().items():
        expected = tensor.half().float() if tensor.is_floating_point() else tensor
        assert torch.equal(fresh.state_dict()[name], expected), name
        assert state[name].dtype == (torch.float32 if tensor.is_floating_point() else tensor.dtype)


def test_ema_preferred_and_size_inferred_for_s(tmp_path, fake_modules):
    path, _, _ = _write_fake(tmp_path, fake_modules, size="s", classes=20, ema_in_model=False)
    tensors = read_ultralytics_checkpoint(path)
    assert tensors["model.0.conv.weight"].shape[0] == 32
    _, info = convert_ultralytics_yolov5(path)
    assert info["size"] == "s" and info["num_classes"] == 20
    with pytest.raises(ValueError, match=r"yolov5s\.pt: a YOLOv5s file, not YOLOv5m"):
        convert_ultralytics_yolov5(path, size="m")


def test_80_class_file_into_3_class_model_loads_all_but_detect(tmp_path, fake_modules):
    path, _, _ = _write_fake(tmp_path, fake_modules)
    model = build_model(make_config("yolov5n", 0, names(3)))
    report = load_ultralytics_yolov5(model, path)
    heads = {f"head.{i}.{t}" for i in range(3) for t in ("weight", "bias")}
    assert {m.split(":")[0] for m in report.mismatched} == heads
    assert set(report.loaded) == set(model.state_dict()) - heads and not report.unexpected
    wrong_size = build_model(make_config("yolov5s", 0, names(80)))
    with pytest.raises(ValueError, match=r"yolov5n\.pt: a yolov5n file .* does not fit the model \(stem \(32, 3, 6, 6\)\)"):
        load_ultralytics_yolov5(wrong_size, path)


def test_bad_files_give_value_errors_naming_the_file(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save(build_model(make_config("yolov5n", 0, names(3))).state_dict(), plain)
    with pytest.raises(ValueError, match=r"plain\.pt: a plain state dict, not an ultralytics checkpoint"):
        read_ultralytics_checkpoint(plain)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1),
                                    dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ValueError, match=r"noise\.pt: not a torch zip file"):
        read_ultralytics_checkpoint(noise)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(plain.read_bytes()[: plain.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated\.pt: "):
        read_ultralytics_checkpoint(truncated)
    missing_storage = tmp_path / "missing_storage.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(missing_storage, "w") as dst:
        for item in src.namelist():
            if "/data/" not in item:
                dst.writestr(item, src.read(item))
    with pytest.raises(ValueError, match=r"missing_storage\.pt: unreadable torch file.*not in the archive"):
        read_ultralytics_checkpoint(missing_storage)


@pytest.mark.parametrize("size", ["n", "s", "m", "l", "x"])
def test_name_map_covers_exactly_our_model(size):
    mapped = yolov5_name_map(size)
    ours = set(build_model(make_config(f"yolov5{size}", 0, names(80))).state_dict())
    assert set(mapped.values()) == ours and len(mapped) == len(ours)     # one-to-one, batch counters included
    assert all(k.startswith("model.") and int(k.split(".")[1]) <= 24 for k in mapped)


def test_hand_written_eval_and_popen_payloads_are_recorded_not_run(tmp_path):
    marker = tmp_path / "pwned_eval"
    code = f"__import__('os').system('touch {marker}')"
    # protocol-0 pickle: {'a': eval(code), 'b': subprocess.Popen(['touch', marker])(), 'c': os.system}
    payload = (f"(dp0\nS'a'\ncbuiltins\neval\n(S\"{code}\"\ntRsS'b'\ncsubprocess\nPopen\n"
               f"((lp1\nS'touch'\naS'{marker}'\natR)RsS'c'\ncos\nsystem\ns.").encode()
    path = tmp_path / "hostile.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", "little")
    obj = safe_torch_load(path)
    assert not marker.exists()
    assert (obj["a"].stub_module, obj["a"].stub_name, obj["a"].stub_args) == ("builtins", "eval", (code,))
    assert isinstance(obj["b"], Stub) and obj["b"].stub_name == "Popen" and obj["b"].stub_args == ()
    assert isinstance(obj["c"], type) and issubclass(obj["c"], Stub) and obj["c"].stub_name == "system"
    with pytest.raises(ValueError, match=r"hostile\.pt: a dict, not an ultralytics checkpoint"):
        read_ultralytics_checkpoint(path)


def test_yolo_predicts_from_an_official_file_as_from_our_model(tmp_path, fake_modules):
    """YOLO(yolov5n.pt) (and so predict.py / get_map.py) rebuilds the model from the file's own classes, anchors
    and tensors, read safely: our model with the file's (half-precision) weights."""
    path, ours, markers = _write_fake(tmp_path, fake_modules, classes=80)
    yolo = YOLO(path, device="cpu")
    assert not any(m.exists() for m in markers)
    assert yolo.config["class_names"] == names(80) and yolo.input_shape == (640, 640)
    assert yolo.config["anchors"] == read_anchors(MODEL_DATA / "yolov5_anchors.txt")
    loaded = load_checkpoint(path)["model"]     # what YOLO built its (then fused) model from
    assert set(loaded) == set(ours.state_dict())
    for name, tensor in ours.state_dict().items():
        expected = tensor.half().float() if tensor.is_floating_point() else tensor
        assert torch.equal(loaded[name].cpu(), expected), name
    state = state_dict_from_file(path)    # --weights yolov5n.pt: the same tensors in our names
    assert set(state) == set(ours.state_dict())


def test_training_size_comes_from_the_files_opt_and_img_overrides_it(tmp_path, fake_modules):
    """A peer best.pt trained at --img 416 is evaluated at 416 (its `opt`), not at the 640 of the released files;
    get_map.py --img picks another size."""
    import get_map
    path, _, _ = _write_fake(tmp_path, fake_modules, classes=3, opt={"imgsz": 416, "epochs": 100})
    assert load_checkpoint(path)["config"]["input_shape"] == [416, 416]
    assert YOLO(path, device="cpu").input_shape == (416, 416)
    assert YOLO(path, device="cpu", img=320).input_shape == (320, 320)
    for opt, size in [({"imgsz": [480, 640]}, 640), ({"imgsz": 417}, None), ({"imgsz": True}, None),
                      ({"img_size": 320}, 320), ({}, None), (None, None)]:
        assert _training_size({"opt": opt}) == size, opt        # a size that is no input size: the default 640
    with pytest.raises(ValueError, match="--img 100: must be a multiple of 32"):
        get_map.parse_args(["--weights", str(path), "--img", "100"])


def test_export_pt_writes_a_plain_checkpoint_of_an_official_file(tmp_path, fake_modules):
    """predict.py --mode export_pt: the converted model as a weights_only checkpoint of ours (no pickle of theirs
    left), which YOLO loads like any best.pt; a second export refuses to overwrite its source."""
    import predict
    path, ours, markers = _write_fake(tmp_path, fake_modules, classes=80)
    out = predict.main(["--weights", str(path), "--mode", "export_pt", "--out", str(tmp_path / "plain.pt")])
    assert not any(m.exists() for m in markers)
    plain = torch.load(out, map_location="cpu", weights_only=True)
    assert plain["config"]["model"] == "yolov5n" and plain["config"]["class_names"] == names(80)
    assert plain["source"] == {"ultralytics": str(path)}
    for name, tensor in ours.state_dict().items():
        expected = tensor.half().float() if tensor.is_floating_point() else tensor
        assert torch.equal(plain["model"][name], expected), name
    assert YOLO(out, device="cpu").class_names == names(80)
    with pytest.raises(ValueError, match="would overwrite"):
        predict.main(["--weights", str(out), "--mode", "export_pt", "--out", str(out)])
