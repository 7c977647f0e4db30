"""--backbone: built-ins, torchvision classifiers cut at traced strides, normalisation, checkpoints, state-dict loads."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torchvision

import summary
import train
from nets.backbones import IMAGENET_MEAN, IMAGENET_STD, FeatureBackbone, load_backbone_state, timm_available
from nets.yolo import YoloBody, build_model, complete_model_config
from utils.cli import run_cli
from utils.config import ModelConfig
from utils.data.sample_data import make_sample_dataset
from yolo import YOLO

TINY = ["--img", "64", "--batch", "4", "--workers", "0", "--device", "cpu", "--eval-period", "1"]
# the real stage-output channels (strides 8, 16, 32), read off torchvision's own modules
REAL_CHANNELS = {
    "resnet18": lambda m: (m.layer2[-1].bn2.num_features, m.layer3[-1].bn2.num_features,
                           m.layer4[-1].bn2.num_features),
    "mobilenet_v3_small": lambda m: (m.features[3].out_channels, m.features[8].out_channels,
                                     m.features[12].out_channels),
    "efficientnet_b0": lambda m: (m.features[3][-1].out_channels, m.features[5][-1].out_channels,
                                  m.features[8].out_channels),
}
# a per-point spec beside --phi, per family
POINT_SPEC = {"yolov4-tiny": {"feat1": {"type": "cbam"}}, "yolov5n": {"p3": {"type": "ca"}}}


def config(model: str, backbone: str | None, phi: str = "none", points: dict | None = None) -> ModelConfig:
    return complete_model_config(ModelConfig(model=model, backbone=backbone, attention=phi, class_names=["a", "b"],
                                             attention_points=points or {}, input_shape=[64, 64]))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_sample_dataset(tmp_path_factory.mktemp("data") / "voc", n_train=4, n_val=2, n_test=2, size=(64, 64))


@pytest.mark.parametrize("name", sorted(REAL_CHANNELS))
@pytest.mark.parametrize("model", ["yolov4-tiny", "yolov5n"])
def test_torchvision_backbones_feed_the_neck_with_attention_everywhere(name, model):
    """Output shapes for batch 2; discovered channels are torchvision's; --phi plus a per-point spec at every point."""
    cfg = config(model, name, "se", POINT_SPEC[model])
    net = build_model(cfg).eval()
    real = REAL_CHANNELS[name](torchvision.models.get_model(name, weights=None))
    assert isinstance(net.backbone, FeatureBackbone)
    layout = net.attention_layout(64)
    if model == "yolov4-tiny":
        assert net.backbone.out_channels == real[1:]
        assert (layout["feat1"], layout["feat2"]) == ((real[1], 4, 4), (real[2], 2, 2))
        expected = [(2, 21, 2, 2), (2, 21, 4, 4)]
    else:
        assert net.backbone.out_channels == real
        assert [layout[p] for p in ("p3", "p4", "p5")] == [(real[0], 8, 8), (real[1], 4, 4), (real[2], 2, 2)]
        expected = [(2, 21, 2, 2), (2, 21, 4, 4), (2, 21, 8, 8)]
    blocks = {p: type(b).__name__ for p, b in net.attention_points().items()}
    assert len(set(blocks.values())) == 2 and "Identity" not in blocks.values()
    with torch.no_grad():
        assert [tuple(o.shape) for o in net(torch.rand(2, 3, 64, 64))] == expected
    assert cfg.input_mean == IMAGENET_MEAN and cfg.input_std == IMAGENET_STD


@pytest.mark.parametrize("body", [YoloBody])       # YoloV5Body calls the same nets.backbones.normalise first
def test_normalisation_is_the_first_operation_of_the_body(body):
    """A model with mean/std on 0..1 input = the same weights without normalisation fed normalised input."""
    args = ([[3, 4, 5], [1, 2, 3]], 2) if body is YoloBody else ("n", [[6, 7, 8], [3, 4, 5], [0, 1, 2]], 2)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    normed = body(*args, 0, "resnet18", mean, std).eval()
    plain = body(*args, 0, "resnet18").eval()
    plain.load_state_dict(normed.state_dict())          # the buffers are not in the state dict
    assert "input_mean" not in normed.state_dict()
    x = torch.rand(2, 3, 64, 64)
    shifted = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        for a, b in zip(normed(x), plain(shifted)):
            torch.testing.assert_close(a, b)
        assert not torch.allclose(normed(x)[0], plain(x)[0])


def test_builtin_names_keep_todays_model_and_bad_names_are_clear():
    """cspdarknet / cspdarknet-v5 / None build the same YOLOv5; unknown, wrong-family, timm-missing, bad std raise."""
    default = build_model(config("yolov5n", None))
    for name in ("cspdarknet", "cspdarknet-v5"):
        other = build_model(config("yolov5n", name))
        assert other.state_dict().keys() == default.state_dict().keys()
        assert sum(p.numel() for p in other.parameters()) == sum(p.numel() for p in default.parameters())
    assert config("yolov4-tiny", None).input_mean is None
    with pytest.raises(ValueError, match=r"unknown --backbone 'resnet9000'.*resnet18"):
        config("yolov4-tiny", "resnet9000")
    with pytest.raises(ValueError, match="YOLOv4-tiny|yolov4-tiny's own backbone"):
        config("yolov5s", "cspdarknet53-tiny")
    if not timm_available():
        with pytest.raises(ValueError, match=r"--backbone timm:resnet18 needs timm \(pip install timm\)"):
            config("yolov4-tiny", "timm:resnet18")
    with pytest.raises(ValueError, match="input_std.*positive"):
        dataclasses.replace(config("yolov4-tiny", None), input_mean=[0.0] * 3, input_std=[1.0, 0.0, 1.0]).validate()
    with pytest.raises(ValueError, match="both or neither"):
        ModelConfig.from_dict({**config("yolov4-tiny", None).to_dict(), "input_mean": [0.5] * 3})


def test_a_checkpoint_rebuilds_the_backbone_model_from_its_config(tmp_path):
    cfg = config("yolov5n", "mobilenet_v3_small", "eca")
    net = build_model(cfg).eval()
    path = tmp_path / "m.pt"
    torch.save({"model": net.state_dict(), "config": cfg.to_dict()}, path)
    det = YOLO(path, device="cpu")
    assert det.model.backbone.out_channels == net.backbone.out_channels
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(det.model(x), net(x)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_a_torchvision_state_dict_loads_into_the_adapter(tmp_path):
    net = build_model(config("yolov4-tiny", "resnet18"))
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    report = load_backbone_state(net, state, str(path)).check()
    assert sorted(report.unexpected) == ["fc.bias", "fc.weight"] and not report.mismatched and not report.missing
    own = net.backbone.inner().state_dict()
    assert len(report.loaded) == len(own) and all(torch.equal(own[k], state[k]) for k in report.loaded)


def test_backbone_list_prints_and_exits_cleanly(capsys, tmp_path):
    run_cli(train.main, ["--backbone", "list", "--save-dir", str(tmp_path)])
    summary.main(["--backbone", "list"])
    out = capsys.readouterr().out
    assert out.count("resnet18") >= 2 and "cspdarknet53-tiny" in out and "timm" in out
    assert not any(tmp_path.iterdir())


def test_unknown_backbone_stops_train_before_any_folder(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(train.main, ["--data", str(data), "--backbone", "nosuchnet", "--save-dir", str(tmp_path), *TINY])
    assert info.value.code == 2 and "--backbone 'nosuchnet'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_training_with_a_resnet18_backbone_end_to_end(data, tmp_path):
    """1 epoch: the checkpoint's config has the backbone and mean/std, YOLO predicts from it; the backbone that
    --freeze-epochs freezes is the whole torchvision part."""
    out = train.main(["--data", str(data), "--epochs", "1", "--save-dir", str(tmp_path), "--name", "r",
                      "--backbone", "resnet18", *TINY])
    ckpt = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["config"]["backbone"] == "resnet18"
    assert ckpt["config"]["input_mean"] == IMAGENET_MEAN and ckpt["config"]["input_std"] == IMAGENET_STD
    boxes = YOLO(out / "best.pt", device="cpu").predict(np.zeros((64, 64, 3), np.uint8))
    assert len(boxes) == 1
    # --freeze-epochs freezes model.backbone: the adapter must hold every torchvision parameter
    net = build_model(ModelConfig.from_dict(ckpt["config"]))
    assert {id(p) for p in net.backbone.parameters()} == {id(p) for p in net.backbone.inner().parameters()}
    assert sum(p.numel() for p in net.backbone.parameters()) == sum(
        p.numel() for n, p in torchvision.models.resnet18(weights=None).named_parameters() if not n.startswith("fc."))


@pytest.mark.skipif(not timm_available(), reason="timm is an optional dependency (installed on the GPU machine)")
@pytest.mark.parametrize("model", ["yolov4-tiny", "yolov5n"])
def test_a_timm_backbone_feeds_the_neck(model):
    """timm:NAME with features_only: channels from its feature_info, its own mean/std, outputs at every level."""
    import timm
    cfg = config(model, "timm:resnet18", phi="se")
    net = build_model(cfg).eval()
    probe = timm.create_model("resnet18", pretrained=False, features_only=True)
    strides = (16, 32) if model == "yolov4-tiny" else (8, 16, 32)
    expected = [c for c, r in zip(probe.feature_info.channels(), probe.feature_info.reduction()) if r in strides]
    assert list(net.backbone.out_channels) == expected
    with torch.no_grad():
        out = net(torch.rand(2, 3, 64, 64))
    assert [o.shape[-1] for o in out] == [64 // s for s in sorted(strides, reverse=True)]
    assert cfg.input_mean is not None and len(cfg.input_std) == 3
