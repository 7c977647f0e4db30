"""--backbone-weights: one entry point recognises the file's format, loads what fits and reports it."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

import train
from nets.weights.darknet import write_darknet_weights
from nets.weights.pretrained import load_pretrained
from nets.yolo import build_model, model_config
from utils.data.sample_data import make_sample_dataset
from utils.engine.checkpoint import save_checkpoint

TINY = ["--img", "64", "--batch", "4", "--workers", "0", "--device", "cpu", "--epochs", "1"]


def model(name="yolov4-tiny", classes=3, phi=0, backbone=None):
    torch.manual_seed(len(name) + classes)
    return build_model(model_config(name, phi, [f"c{i}" for i in range(classes)], (64, 64)) if backbone is None
                       else _with_backbone(name, classes, backbone))


def _with_backbone(name, classes, backbone):
    import dataclasses
    from nets.yolo import complete_model_config
    config = model_config(name, 0, [f"c{i}" for i in range(classes)], (64, 64))
    return complete_model_config(dataclasses.replace(config, backbone=backbone, input_mean=None, input_std=None))


def same_backbone(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.backbone.state_dict().values(), b.backbone.state_dict().values()))


def test_a_checkpoint_of_ours_gives_its_backbone(tmp_path):
    source = model(classes=3, phi="cbam")
    path = tmp_path / "bccd.pt"
    save_checkpoint({"model": source.state_dict(), "config": {}}, path)
    target = model(classes=1, phi="ca")                     # another dataset, another block: the backbone fits
    report = load_pretrained(target, "yolov4-tiny", path)
    assert same_backbone(source, target)
    assert len(report.loaded) == len(target.backbone.state_dict()) and not report.mismatched


def test_a_torchvision_state_dict_fills_a_torchvision_backbone(tmp_path):
    classifier = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(classifier.state_dict(), path)
    target = model("yolov5n", backbone="resnet18")
    report = load_pretrained(target, "yolov5", path)
    assert sorted(report.unexpected) == ["fc.bias", "fc.weight"] and not report.missing
    inner = dict(target.backbone.inner().state_dict())
    assert torch.equal(inner["layer4.1.bn2.running_var"], classifier.state_dict()["layer4.1.bn2.running_var"])


def test_darknet_files_go_to_the_darknet_reader(tmp_path):
    source = model()
    path = tmp_path / "yolov4-tiny.conv.29"
    write_darknet_weights(source, path, backbone_only=True)
    target = model()
    load_pretrained(target, "yolov4-tiny", path)
    assert same_backbone(source, target)
    with pytest.raises(ValueError, match="Darknet file fits YOLOv4-tiny"):
        load_pretrained(model("yolov5n"), "yolov5", path)


class Pickled(nn.Module):
    """A model object pickled whole, as ultralytics saves its checkpoints."""


def test_a_pickled_model_object_is_never_unpickled_normally(tmp_path):
    path = tmp_path / "yolov5s.pt"
    torch.save({"model": Pickled()}, path)
    with pytest.raises(ValueError, match="ultralytics YOLOv5 file fits --model yolov5"):
        load_pretrained(model(), "yolov4-tiny", path)          # routed to the ultralytics reader's family check


@pytest.mark.parametrize("content, words", [(b"\x00garbage" * 10, "not a"), (None, "no such file")])
def test_unreadable_files_are_named(tmp_path, content, words):
    path = tmp_path / "w.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        load_pretrained(model(), "yolov4-tiny", path)
    assert words in str(info.value) and "w.pth" in str(info.value)


def test_a_foreign_state_dict_that_fits_nothing_is_an_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match="does not fit the model"):
        load_pretrained(model(), "yolov4-tiny", path)


def test_train_loads_and_reports_backbone_weights(tmp_path):
    data = make_sample_dataset(tmp_path / "voc", n_train=4, n_val=2, n_test=2, size=(64, 64))
    first = train.main(["--data", str(data), "--save-dir", str(tmp_path), "--name", "a", *TINY])
    second = train.main(["--data", str(data), "--save-dir", str(tmp_path), "--name", "b", "--phi", "se",
                         "--backbone-weights", str(first / "best.pt"), *TINY])
    report = json.loads((second / "backbone_weights_report.json").read_text())
    assert report["source"].endswith("best.pt") and len(report["loaded"]) > 50 and not report["mismatched"]
