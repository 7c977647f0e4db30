"""Darknet .weights <-> YOLOv4-tiny: round trip, backbone and conv.29 files, other class counts, headers, bad files."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nets.weights.darknet import (BACKBONE_CONVS, CONV29_CONVS, CONVS, full_floats, load_darknet_yolov4_tiny,
                                  prefix_floats, read_darknet_weights, write_darknet_weights)
from nets.yolo import YoloBody

MASK = [[3, 4, 5], [1, 2, 3]]
HEADER_BYTES = 20


def random_model(num_classes: int = 80, seed: int = 0, attention: int = 0) -> YoloBody:
    """A YOLOv4-tiny with random weights and non-trivial BN statistics."""
    torch.manual_seed(seed)
    model = YoloBody(MASK, num_classes, attention)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand_like(tensor) + 0.5)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor) * 0.05)
    return model.eval()


def test_round_trip_every_tensor_and_output_equal(tmp_path):
    source, target = random_model(seed=1), random_model(seed=2)
    path = tmp_path / "yolov4-tiny.weights"
    written = write_darknet_weights(source, path)
    assert written == full_floats(80) and path.stat().st_size == HEADER_BYTES + 4 * written
    report = load_darknet_yolov4_tiny(target, path)
    assert (report.mismatched, report.missing, report.unexpected) == ([], [], [])
    assert len(report.loaded) == report.total
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, target.state_dict()[name]), name
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(source(x), target(x)):
            assert torch.equal(a, b)


def test_conv_order_in_the_float_stream(tmp_path):
    model = random_model()
    with torch.no_grad():
        for i, spec in enumerate(CONVS):
            conv = model.get_submodule(spec.prefix)
            if spec.bn:
                conv.conv.weight.fill_(i)
                for p in (conv.bn.bias, conv.bn.weight, conv.bn.running_mean, conv.bn.running_var):
                    p.fill_(i + 0.5)
            else:
                conv.weight.fill_(i)
                conv.bias.fill_(i + 0.5)
    path = tmp_path / "order.weights"
    write_darknet_weights(model, path)
    _, floats = read_darknet_weights(path)
    pos = 0
    for i, spec in enumerate(CONVS):
        out = spec.out(80)
        head = out * (4 if spec.bn else 1)
        size = out * spec.c_in * spec.k * spec.k
        assert (floats[pos:pos + head] == i + 0.5).all(), spec.prefix
        assert (floats[pos + head:pos + head + size] == i).all(), spec.prefix
        pos += head + size
    assert pos == floats.size


def test_backbone_file_loads_only_the_backbone(tmp_path):
    source, target = random_model(seed=1), random_model(seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    path = tmp_path / "backbone.weights"
    write_darknet_weights(source, path, n_convs=BACKBONE_CONVS)
    assert prefix_floats(BACKBONE_CONVS) == 3_633_632
    assert path.stat().st_size == HEADER_BYTES + 4 * prefix_floats(BACKBONE_CONVS)
    report = load_darknet_yolov4_tiny(target, path)
    own = target.state_dict()
    assert report.loaded == sorted(k for k in own if k.startswith("backbone."))
    assert report.missing == sorted(k for k in own if not k.startswith("backbone."))
    assert report.mismatched == [] and report.unexpected == []
    for name, tensor in own.items():
        expected = source.state_dict()[name] if name.startswith("backbone.") else before[name]
        assert torch.equal(tensor, expected), name


def test_conv29_file_has_the_real_size_and_loads_its_17_convs(tmp_path):
    source, target = random_model(seed=1), random_model(seed=2)
    path = tmp_path / "yolov4-tiny.conv.29"
    write_darknet_weights(source, path, backbone_only=True)
    # the size of AlexeyAB's released yolov4-tiny.conv.29 (cfg layers 0..28)
    assert path.stat().st_size == 19_789_716
    report = load_darknet_yolov4_tiny(target, path)
    loaded_prefixes = {spec.prefix for spec in CONVS[:CONV29_CONVS]}
    assert {k.rsplit(".", 2)[0] if ".bn." in k or ".conv." in k else k for k in report.loaded} == loaded_prefixes
    assert all(k.startswith(("yolo_headP5.1", "upsample", "yolo_headP4")) for k in report.missing)
    only_backbone = load_darknet_yolov4_tiny(random_model(seed=3), path, backbone_only=True)
    assert all(k.startswith("backbone.") for k in only_backbone.loaded)
    assert "conv_for_P5.conv.weight" in only_backbone.missing
    with pytest.raises(ValueError, match="yolov4-tiny.conv.29.*backbone-only"):
        load_darknet_yolov4_tiny(random_model(), path, backbone_only=False)


def test_80_class_file_into_3_class_model(tmp_path):
    source, target = random_model(80, seed=1), random_model(3, seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    path = tmp_path / "yolov4-tiny.weights"
    write_darknet_weights(source, path)
    report = load_darknet_yolov4_tiny(target, path)
    preds = {f"yolo_headP{p}.1.{t}" for p in (5, 4) for t in ("weight", "bias")}
    assert {m.split(":")[0] for m in report.mismatched} == preds
    assert "yolo_headP5.1.weight: (255, 512, 1, 1) vs (24, 512, 1, 1)" in report.mismatched
    assert report.missing == [] and report.unexpected == []     # mismatched, not missing
    assert len(report.loaded) == report.total - 4
    for name, tensor in target.state_dict().items():
        assert torch.equal(tensor, before[name] if name in preds else source.state_dict()[name]), name


def test_custom_class_count_read_from_the_size(tmp_path):
    source, target = random_model(3, seed=1), random_model(3, seed=2, attention=1)
    path = tmp_path / "custom.weights"
    write_darknet_weights(source, path)
    report = load_darknet_yolov4_tiny(target, path)
    assert report.mismatched == [] and report.missing and all("_att." in k for k in report.missing)
    assert torch.equal(target.yolo_headP4[1].weight, source.yolo_headP4[1].weight)


@pytest.mark.parametrize("minor, seen_type", [(1, "<i4"), (2, "<i8")])
def test_header_versions(tmp_path, minor, seen_type):
    payload = np.arange(prefix_floats(BACKBONE_CONVS), dtype="<f4")
    path = tmp_path / f"v0{minor}.weights"
    path.write_bytes(np.array([0, minor, 0], "<i4").tobytes() + np.array([1234], seen_type).tobytes()
                     + payload.tobytes())
    header, floats = read_darknet_weights(path)
    assert header == {"major": 0, "minor": minor, "revision": 0, "seen": 1234}
    assert np.array_equal(floats, payload)
    load_darknet_yolov4_tiny(random_model(), path)


def test_bad_files_give_clear_errors(tmp_path):
    good = tmp_path / "good.weights"
    write_darknet_weights(random_model(), good, n_convs=BACKBONE_CONVS)
    data = good.read_bytes()
    n = prefix_floats(BACKBONE_CONVS)
    cases = {
        "short.weights": (data[:10], "too short"),
        "truncated.weights": (data[:-400], f"{n - 100} floats after the header fit no yolov4-tiny layout"),
        "extra.weights": (data + bytes(12), f"{n + 3} floats .*expected {n} \\(backbone"),
        "ragged.weights": (data[:-2], "not a whole number of float32"),
        "random.weights": (np.random.default_rng(0).bytes(5000), "not a Darknet .weights file|fit no"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=message) as err:
            load_darknet_yolov4_tiny(random_model(), path)
        assert name in str(err.value)
    with pytest.raises(FileNotFoundError):
        read_darknet_weights(tmp_path / "absent.weights")
