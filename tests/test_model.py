"""YoloBody (YOLOv4-tiny + attention): parameter counts, output shapes, gradients, names, config round trip."""
import math

import pytest
import torch
from torch import nn

from nets.attention import ATTENTION_NAMES, CBAM, CoordAttention
from nets.yolo import MODEL_NAMES, YoloBody, build_model, make_config
from nets.yolo_training import YoloLoss, load_hyp
from utils.data.loader import per_image_targets

MASK = [[3, 4, 5], [1, 2, 3]]
CLASSES20 = [f"c{i}" for i in range(20)]
# total parameters at 20 classes (VOC), per phi
PARAMS_20 = {0: 5_918_006, 1: 5_961_966, 2: 5_962_266, 3: 5_918_021, 4: 5_953_686}


def nparams(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def body(phi, num_classes=20, seed=0):
    torch.manual_seed(seed)
    return YoloBody(MASK, num_classes, phi)


@pytest.mark.parametrize("phi", sorted(PARAMS_20))
def test_parameter_count_voc(phi):
    assert nparams(body(phi)) == PARAMS_20[phi]


def test_parameter_count_coco_and_by_name():
    assert nparams(body(0, num_classes=80)) == 6_056_606
    # a name builds the same network as its phi
    assert nparams(body("ca")) == PARAMS_20[4]
    assert nparams(body("CBAM")) == PARAMS_20[2]
    # only the two prediction convs depend on the class count: 2 heads x 3 anchors x (512|256 + 1)
    assert nparams(body(0, num_classes=21)) - nparams(body(0, num_classes=20)) == 3 * (512 + 1) + 3 * (256 + 1)


def test_output_shapes_all_phi_416_and_320():
    x416 = torch.rand(1, 3, 416, 416, generator=torch.Generator().manual_seed(0))
    x320 = x416[:, :, :320, :320].contiguous()
    c = 3 * (5 + 20)
    for phi in range(len(ATTENTION_NAMES)):
        model = body(phi).eval()
        with torch.no_grad():
            out416 = model(x416)
            out320 = model(x320)
        assert isinstance(out416, list) and len(out416) == 2
        assert [tuple(o.shape) for o in out416] == [(1, c, 13, 13), (1, c, 26, 26)], phi
        assert [tuple(o.shape) for o in out320] == [(1, c, 10, 10), (1, c, 20, 20)], phi
        assert all(torch.isfinite(o).all() for o in out416 + out320), phi


def test_attention_points_see_the_documented_maps():
    model = body(4).eval()
    points = model.attention_points()
    assert list(points) == ["feat1", "feat2", "upsample"]
    for name, channels in [("feat1", 256), ("feat2", 512), ("upsample", 128)]:
        block = points[name]
        assert isinstance(block, CoordAttention)
        assert block.conv_h.out_channels == channels and block.conv_w.out_channels == channels
        assert block.conv1.in_channels == channels
    assert points["feat1"] is model.feat1_att and points["upsample"] is model.upsample_att
    # the maps that actually flow through each point at 416
    seen = {}
    hooks = [blk.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (tuple(i[0].shape), tuple(o.shape))))
             for n, blk in points.items()]
    with torch.no_grad():
        model(torch.zeros(1, 3, 416, 416))
    for h in hooks:
        h.remove()
    assert seen == {"feat1": ((1, 256, 26, 26),) * 2, "feat2": ((1, 512, 13, 13),) * 2,
                    "upsample": ((1, 128, 26, 26),) * 2}
    # phi 0: the points exist and are identities
    assert all(type(b) is nn.Identity for b in body(0).attention_points().values())


def test_attention_changes_the_output():
    # same seed for the shared layers is impossible across phi, so compare with the block bypassed
    model = body(2).eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
        model.feat2_att = nn.Identity()
        bypassed = model(x)
    assert not torch.allclose(out[0], bypassed[0], atol=1e-4)


def _targets():
    # (batch, class, cx, cy, w, h), normalised; sizes hit anchors of both levels at 64 px
    return torch.tensor([[0, 0, 0.30, 0.35, 0.50, 0.60],
                         [0, 5, 0.70, 0.60, 0.35, 0.40],
                         [1, 19, 0.50, 0.50, 0.80, 0.70],
                         [1, 7, 0.20, 0.80, 0.30, 0.25]])


@pytest.mark.parametrize("phi", range(len(ATTENTION_NAMES)))
def test_backward_reaches_every_parameter(phi):
    model = body(phi).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # zero-initialised scales legitimately block gradients at init: DANet/CCNet gamma
            # (to q/k/v), Shuffle Attention's sweight (to its GroupNorm)
            if name.endswith(("gamma", "sweight", "cweight")):
                assert not p.any(), name
                p.fill_(0.5)
    config = make_config("yolov4-tiny", phi, CLASSES20, input_shape=(64, 64))
    criterion = YoloLoss(config, load_hyp("yolov4-tiny"))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(phi))
    loss, parts = criterion(model(x), per_image_targets(_targets(), 2))
    assert torch.isfinite(loss) and loss > 0
    assert all(float(v) > 0 for v in parts.values()), parts
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    zero = [n for n, p in model.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0]
    assert not zero, zero
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_build_model_round_trip():
    config = make_config("yolov4-tiny", "cbam", ["cat", "dog", "bird"], input_shape=(320, 320))
    assert config["attention"] == "cbam" and config["phi"] == 2
    assert config["num_classes"] == 3 and config["class_names"] == ["cat", "dog", "bird"]
    assert config["anchors_mask"] == MASK
    assert config["anchors"][4] == [135.0, 169.0] and len(config["anchors"]) == 6
    assert config["input_shape"] == [320, 320]
    torch.manual_seed(0)
    model = build_model(config)
    assert isinstance(model, YoloBody) and isinstance(model.feat1_att, CBAM)
    torch.manual_seed(1)
    other = YoloBody(MASK, 3, 2)
    result = other.load_state_dict(model.state_dict())  # strict: every key and shape must match
    assert not result.missing_keys and not result.unexpected_keys
    model.eval(), other.eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a, b in zip(model(x), other(x)):
            assert torch.equal(a, b)
    # a config survives a save/load of plain python types (the checkpoint contract)
    assert build_model(dict(config)).state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("size", [(100, 100), (416, 400), (33, 64)])
def test_make_config_rejects_sizes_not_multiple_of_32(size):
    with pytest.raises(ValueError, match="32"):
        make_config("yolov4-tiny", 0, ["a"], input_shape=size)


def test_make_config_rejects_empty_classes_and_unknown_names():
    with pytest.raises(ValueError):
        make_config("yolov4-tiny", 0, [])
    with pytest.raises(ValueError) as info:
        make_config("yolov9", 0, ["a"])
    for name in ("yolov4-tiny", "yolov5s"):
        assert name in str(info.value)
    with pytest.raises(ValueError) as info:
        make_config("yolov4-tiny", "foo", ["a"])
    assert "cbam" in str(info.value)
    config = make_config("yolov4-tiny", 0, ["a"])
    with pytest.raises(ValueError) as info:
        build_model({**config, "model": "yolov9"})
    assert "yolov5s" in str(info.value)
    with pytest.raises(ValueError, match="anchors_mask"):
        build_model({k: v for k, v in config.items() if k != "anchors_mask"})
    assert set(MODEL_NAMES) >= {"yolov4-tiny", "yolov5n", "yolov5s", "yolov5m", "yolov5l", "yolov5x"}


TUTORIAL_KEYS = {
    # key: shape at 20 classes
    "backbone.conv1.conv.weight": (32, 3, 3, 3),
    "backbone.conv1.bn.weight": (32,),
    "backbone.conv2.conv.weight": (64, 32, 3, 3),
    "backbone.resblock_body1.conv1.conv.weight": (64, 64, 3, 3),
    "backbone.resblock_body1.conv2.conv.weight": (32, 32, 3, 3),
    "backbone.resblock_body3.conv4.conv.weight": (256, 256, 1, 1),
    "backbone.resblock_body3.conv4.bn.num_batches_tracked": (),
    "backbone.conv3.conv.weight": (512, 512, 3, 3),
    "conv_for_P5.conv.weight": (256, 512, 1, 1),
    "conv_for_P5.bn.running_mean": (256,),
    "yolo_headP5.0.conv.weight": (512, 256, 3, 3),
    "yolo_headP5.1.weight": (75, 512, 1, 1),
    "yolo_headP5.1.bias": (75,),
    "upsample.upsample.0.conv.weight": (128, 256, 1, 1),
    "yolo_headP4.0.conv.weight": (256, 384, 3, 3),
    "yolo_headP4.1.weight": (75, 256, 1, 1),
}


def test_state_dict_names_match_the_tutorials():
    sd = body(0).state_dict()
    for key, shape in TUTORIAL_KEYS.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith(("feat1_att", "feat2_att", "upsample_att")) for k in sd)
    # every key is either a tutorial key family or an attention point
    prefixes = ("backbone.", "conv_for_P5.", "yolo_headP5.", "upsample.", "yolo_headP4.")
    assert all(k.startswith(prefixes) for k in sd)


@pytest.mark.parametrize("phi,key", [(1, "feat1_att.fc.1.weight"), (3, "feat2_att.conv.weight"),
                                     (4, "upsample_att.conv_h.weight"), (11, "feat1_att.cca.gamma")])
def test_state_dict_attention_keys(phi, key):
    sd = body(phi).state_dict()
    assert key in sd
    for point in ("feat1_att.", "feat2_att.", "upsample_att."):
        assert any(k.startswith(point) for k in sd), point
    # the base network's keys are those of phi 0: tutorial weights load into any phi
    base = set(body(0).state_dict())
    assert base <= set(sd)
    assert all(k.startswith(("feat1_att.", "feat2_att.", "upsample_att.")) for k in set(sd) - base)


@pytest.mark.parametrize("model_name, phi", [("yolov4-tiny", 0), ("yolov4-tiny", "cbam"), ("yolov5n", "ca")])
def test_fused_batchnorm_gives_the_same_outputs(model_name, phi):
    from nets.common import ConvBNAct, fuse_conv_bn
    torch.manual_seed(0)
    model = build_model(make_config(model_name, phi, ["a", "b"], (96, 96)))
    with torch.no_grad():
        for _ in range(2):                      # non-trivial running statistics
            model(torch.rand(4, 3, 96, 96))
    model.eval()
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        before = model(x)
        fuse_conv_bn(model)
        after = model(x)
    assert not any(isinstance(m, ConvBNAct) and isinstance(m.bn, torch.nn.BatchNorm2d) for m in model.modules())
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model, strides", [("yolov5n", (32, 16, 8)), ("yolov4-tiny", (32, 16))])
def test_detection_biases_start_at_the_yolov5_priors(model, strides):
    """Objectness log(8 / (640/s)^2) per stride s, classes log(0.6 / (nc - 0.99)), on top of PyTorch's default
    bias init (uniform within 1/sqrt(fan_in))."""
    torch.manual_seed(0)
    net = build_model(make_config(model, 0, ["a", "b", "c"], (416, 416)))
    convs = list(net.head) if model != "yolov4-tiny" else [net.yolo_headP5[1], net.yolo_headP4[1]]
    for conv, stride in zip(convs, strides):
        bias = conv.bias.detach().view(3, 8)                          # anchors x (4 box, obj, 3 classes)
        bound = conv.in_channels ** -0.5
        assert (bias[:, 4] - math.log(8 / (640 / stride) ** 2)).abs().max() <= bound
        assert (bias[:, 5:] - math.log(0.6 / 2.01)).abs().max() <= bound
        assert bias[:, :4].abs().max() <= bound                       # box logits untouched
    assert math.log(8 / (640 / 8) ** 2) == pytest.approx(-6.6846, abs=1e-4)


def test_image_conv_pads_channels_to_the_same_sums(monkeypatch):
    """ImageConv2d on a padding device: zero channels up to 8 in input and weight give the plain convolution's
    output and gradients; its state dict is nn.Conv2d's."""
    import nets.common as common
    torch.manual_seed(0)
    padded = common.ImageConv2d(3, 16, 6, 2, 2, bias=False)
    plain = torch.nn.Conv2d(3, 16, 6, 2, 2, bias=False)
    plain.load_state_dict(padded.state_dict())
    x = torch.rand(2, 3, 32, 24).contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(common, "PADDED_ON", ("cpu",))
    a, b = padded(x), plain(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    torch.testing.assert_close(padded.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-5)
    assert padded.weight.shape == (16, 3, 6, 6)
    assert isinstance(build_model(make_config("yolov5n", None, ["a"], (64, 64))).backbone.stem.conv, common.ImageConv2d)
