"""Heatmaps that explain: CAM maths on constructed activations, attention blocks' own maps against hand-computed
gates, per-box renormalisation, per-image normalisation, label and FPS placement, and the predict.py modes."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import predict
from nets.attention import ATTENTION_NAMES, CBAM, CoordAttention, build_attention
from nets.yolo import build_model, make_config
from utils.cli import run_cli
from utils.config import PREDICT_DETECTION
from utils.engine.checkpoint import save_checkpoint
from utils.engine.explain.attention import point_maps
from utils.engine.explain.cam import cam_maps, default_layer, detection_scores
from utils.engine.explain.capture import capture, resolve_layer
from utils.engine.predict_io import draw_fps
from utils.ops.cam import eigen_cam, grad_cam, layer_cam, renormalise_in_boxes
from utils.ops.images import map_to_image
from utils.ops.draw_tensors import draw_on_tensors
from utils.ops.overlay import normalise_map, tick_labels
from utils.ops.plots import (_distinct_rows, _label_patch, _labelled, _style, class_color, detection_rects,
                             draw_detections, free_corner, label_origin, overlap, score_cents)
from yolo import YOLO


def test_eigen_cam_is_the_first_principal_component_projection():
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(2, 6, 5, 4)) + rng.normal(size=(2, 6, 1, 1)) * 3
    cam = eigen_cam(torch.tensor(acts, dtype=torch.float64)).numpy()
    for b in range(2):
        samples = acts[b].reshape(6, -1).T                     # positions x channels
        centred = samples - samples.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        proj = centred @ vt[0]
        ref = samples.mean(1) - samples.mean()
        proj = proj if proj @ ref >= 0 else -proj               # the documented sign rule
        np.testing.assert_allclose(cam[b].ravel(), proj, rtol=1e-4, atol=1e-5)
    # rank one: the map is exactly the spatial pattern (up to scale and offset), and the sign follows the mean
    pattern = rng.normal(size=(5, 4))
    direction = np.abs(rng.normal(size=6)) + 0.1
    rank_one = direction[:, None, None] * pattern[None]
    cam = eigen_cam(torch.tensor(rank_one[None])).numpy()[0]
    expected = (pattern - pattern.mean()) * np.linalg.norm(direction)
    np.testing.assert_allclose(cam, expected, rtol=1e-4, atol=1e-5)


def test_grad_cam_and_layer_cam_on_a_linear_target_equal_the_hand_computed_sums():
    torch.manual_seed(0)
    acts = torch.randn(1, 4, 3, 5, requires_grad=True)
    weights = torch.randn(1, 4, 3, 5)
    target = (weights * acts).sum()                           # dY/dA = weights
    grads = torch.autograd.grad(target, acts)[0]
    a, w = acts.detach()[0].numpy(), weights[0].numpy()
    alpha = w.mean((1, 2))
    expected_grad = np.maximum((alpha[:, None, None] * a).sum(0), 0)
    expected_layer = np.maximum((np.maximum(w, 0) * a).sum(0), 0)
    np.testing.assert_allclose(grad_cam(acts.detach(), grads)[0].numpy(), expected_grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer_cam(acts.detach(), grads)[0].numpy(), expected_layer, rtol=1e-5, atol=1e-6)
    assert expected_grad.max() > 0 and expected_layer.max() > 0 and (expected_grad == 0).any()


def test_renormalise_in_boxes_bounds():
    rng = np.random.default_rng(1)
    cam = rng.random((40, 60)).astype(np.float32) * 7 + 3
    boxes = np.array([[2.3, 4.0, 20.0, 30.7], [35.0, 10.0, 59.0, 25.0], [50, 30, 80, 60]])   # the last leaves the image
    out = renormalise_in_boxes(cam, boxes)
    inside = np.zeros_like(out, dtype=bool)
    for x1, y1, x2, y2 in ((2, 4, 20, 31), (35, 10, 59, 25), (50, 30, 60, 40)):
        patch = out[y1:y2, x1:x2]
        assert patch.min() == 0.0 and patch.max() == pytest.approx(1.0)
        raw = cam[y1:y2, x1:x2]
        np.testing.assert_allclose(patch, (raw - raw.min()) / (raw.max() - raw.min()), rtol=1e-5, atol=1e-6)
        inside[y1:y2, x1:x2] = True
    assert (out[~inside] == 0).all() and out.min() >= 0 and out.max() <= 1
    # one map per box; overlapping boxes keep the larger value; a flat box is 0
    maps = np.stack([np.tile(np.arange(60.0), (40, 1)), np.full((40, 60), 5.0)])
    out = renormalise_in_boxes(maps, np.array([[0, 0, 30, 20], [20, 0, 40, 20]]))
    np.testing.assert_allclose(out[0, :30], np.arange(30) / 29, rtol=1e-6)
    assert (out[:20, 30:40] == 0).all() and (out[20:] == 0).all()


def test_normalise_map_is_min_max_of_that_map():
    values = np.array([[0.010, 0.015], [0.020, 0.0125]])
    scaled, lo, hi = normalise_map(values)
    assert (lo, hi) == (0.010, 0.020)
    np.testing.assert_allclose(scaled, [[0.0, 0.5], [1.0, 0.25]], atol=1e-6)
    flat, lo, hi = normalise_map(np.full((3, 3), 0.3))
    assert (flat == 0).all() and lo == hi == 0.3
    # the colour bar tells a small range apart
    labels = tick_labels(0.0202, 0.02024, (0.0, 0.5, 1.0))
    assert len(set(labels)) == 3 and float(labels[0]) == pytest.approx(0.0202) and float(labels[2]) == pytest.approx(0.02024)


def test_map_to_image_cuts_the_letterbox_padding():
    # a 64x32 (w x h) image in a 64x64 input: 16 rows of padding above and below
    meta = np.array([1.0, 1.0, 0.0, 16.0, 64.0, 32.0])
    values = np.ones((64, 64), np.float32)
    values[16:48] = np.linspace(0, 1, 64)[None]
    out = map_to_image(values, meta, (64, 64))
    assert out.shape == (32, 64)
    np.testing.assert_allclose(out, np.tile(np.linspace(0, 1, 64), (32, 1)), atol=1e-6)
    coarse = map_to_image(np.full((4, 4), 0.7, np.float32), meta, (64, 64))
    np.testing.assert_allclose(coarse, 0.7, atol=1e-6)


def test_coord_attention_maps_equal_the_gates_by_hand():
    torch.manual_seed(0)
    block = CoordAttention(32).eval()
    with torch.no_grad():
        block.bn1.running_mean.uniform_(-0.2, 0.2)
        block.bn1.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 32, 5, 7)
    with torch.no_grad():
        maps = block.explain(x)
        pooled = torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)], dim=2)    # b,c,h+w,1
        y = F.conv2d(pooled, block.conv1.weight, block.conv1.bias)
        bn = block.bn1
        y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        y = y * bn.weight[:, None, None] + bn.bias[:, None, None]
        y = y * (y + 3).clamp(0, 6) / 6
        a_h = torch.sigmoid(F.conv2d(y[:, :, :5], block.conv_h.weight, block.conv_h.bias))             # b,c,h,1
        a_w = torch.sigmoid(F.conv2d(y[:, :, 5:], block.conv_w.weight, block.conv_w.bias)).transpose(2, 3)
        out = block(x)
    assert maps["height gate"].shape == (2, 32, 5, 1) and maps["width gate"].shape == (2, 32, 1, 7)
    torch.testing.assert_close(maps["height gate"], a_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps["width gate"], a_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps["height x width gate"] * x, out, rtol=1e-5, atol=1e-6)


def test_cbam_maps_equal_the_gates_by_hand():
    torch.manual_seed(1)
    block = CBAM(32, reduction=4).eval()
    x = torch.randn(2, 32, 6, 5)
    with torch.no_grad():
        maps = block.explain(x)
        l1, l2 = block.mlp[0], block.mlp[2]
        mlp = lambda v: F.linear(F.relu(F.linear(v, l1.weight, l1.bias)), l2.weight, l2.bias)   # noqa: E731
        channel = torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))[:, :, None, None]
        gated = x * channel
        conv, bn = block.spatial
        s = F.conv2d(torch.cat([gated.amax(1, keepdim=True), gated.mean(1, keepdim=True)], 1), conv.weight, padding=3)
        s = (s - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        spatial = torch.sigmoid(s)
        out = block(x)
    torch.testing.assert_close(maps["channel gate"], channel, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps["spatial gate"], spatial, rtol=1e-5, atol=1e-6)
    assert maps["spatial gate"].shape == (2, 1, 6, 5)
    torch.testing.assert_close(gated * spatial, out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ATTENTION_NAMES[1:])
def test_every_block_explains_itself_without_keeping_state(name):
    torch.manual_seed(2)
    block = build_attention(name, 32).eval()
    for p in block.parameters():                  # gamma starts at 0: give every parameter a value
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 32, 6, 5)
    before = (dict(block.state_dict()), set(vars(block)))
    with torch.no_grad():
        out = block(x)
        maps = block.explain(x)
        again = block(x)
    assert maps and all(t.shape[0] == 2 and t.dim() == 4 for t in maps.values())
    for t in maps.values():                       # every map broadcasts against the block's input
        assert all(s in (1, d) for s, d in zip(t.shape[1:], (32, 6, 5))) or t.shape[1] == 16, t.shape
    torch.testing.assert_close(out, again, rtol=0, atol=0)
    assert set(vars(block)) == before[1] and all(torch.equal(v, block.state_dict()[k]) for k, v in before[0].items())
    assert not block._forward_hooks and not block._forward_pre_hooks
    for key, t in maps.items():
        if key.endswith("attention received") and t.shape[2:] != (1, 1):
            # each query pixel's attention sums to 1, so the attention received sums to H*W
            torch.testing.assert_close(t.sum((1, 2, 3)), torch.full((2,), 30.0), rtol=1e-4, atol=1e-4)
        elif key.endswith("gamma"):
            assert (t == t.flatten()[0]).all()
    if name in ("se", "eca"):
        torch.testing.assert_close(x * maps["channel gate"], out, rtol=1e-5, atol=1e-6)


def test_label_rectangles_stay_inside_the_image():
    rng = np.random.default_rng(3)
    w, h = 120, 80
    for _ in range(500):
        x1, x2 = np.sort(rng.uniform(-10, w + 10, 2))
        y1, y2 = np.sort(rng.uniform(-10, h + 10, 2))
        lw, lh = rng.uniform(5, w), rng.uniform(5, h)
        lx, ly = label_origin((x1, y1, x2, y2), (lw, lh), (w, h))
        assert 0 <= lx and lx + lw <= w + 1e-9 and 0 <= ly and ly + lh <= h + 1e-9
    # at the top edge: inside the box's top; with room: just above; at the right edge: shifted left
    assert label_origin((10, 0, 50, 40), (30, 12), (w, h)) == (10, 0)
    assert label_origin((10, 30, 50, 60), (30, 12), (w, h)) == (10, 18)
    assert label_origin((100, 30, 119, 60), (30, 12), (w, h)) == (90, 18)
    # drawn detections: every label rectangle inside the image
    dets = np.array([[0, 0, 40, 30, 0.9, 0], [90, 2, 120, 50, 0.8, 1], [5, 60, 119, 80, 0.7, 1]], np.float32)
    rects = detection_rects(dets, ["person", "a long class name"], (h, w, 3))[len(dets):]
    assert len(rects) == 3 and all(0 <= r[0] and r[2] <= w and 0 <= r[1] and r[3] <= h for r in rects)


def test_drawn_detections_outline_the_box_and_fill_the_label_in_the_class_colour():
    image = np.full((100, 160, 3), 200, np.uint8)
    dets = np.array([[40, 50, 120, 90, 0.9, 1], [-5, 60, 30, 99, 0.4, 0]], np.float32)
    names = ["a", "b"]
    drawn = draw_detections(image, dets, names)
    assert (image == 200).all()                                          # the input is left as it was
    blue, green, red = drawn[50, 80]                                     # the first box's top edge
    assert (red, green, blue) == class_color(1, 2)
    assert (drawn[70, 80] == 200).all() and (drawn[5, 5] == 200).all()   # inside the box, far from any: untouched
    # its label sits above the box: the class colour with dark text ink, all inside the label rectangle
    x1, y1, x2, y2 = (round(v) for v in detection_rects(dets, names, image.shape)[2])
    label = drawn[y1:y2, x1:x2].reshape(-1, 3)[:, ::-1]
    colour = np.array(class_color(1, 2))
    assert (label == colour).all(1).mean() > 0.5 and (label.sum(1) < 60).any()
    assert (drawn[y1:y2, x1:x2] != 200).any(2).all()                     # the whole rectangle is painted
    assert (drawn[60:100, 150:] == 200).all()          # the box beyond the left edge does not wrap to the right
    assert (drawn[61:99, 0] == 200).all() and (drawn[99, 0:30] != 200).any(1).all()   # no left edge; bottom kept
    assert draw_detections(image, dets[:0], names).tolist() == image.tolist()


def test_drawing_on_tensors_is_draw_detections_pixel_for_pixel():
    """The batched scatter (predict.py's drawing on the GPU) against the NumPy drawing, in one batch: overlapping
    boxes (the later one on top), boxes past every edge, a class past the palette, thick lines on a large image,
    an image with nothing to draw."""
    rng = np.random.default_rng(3)
    names = ["RBC", "WBC", "a long class name"]
    images, dets = [], []
    for h, w, n in [(120, 160, 25), (37, 50, 3), (1080, 1400, 12), (64, 64, 0), (90, 30, 4)]:
        images.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        xy = rng.uniform(-0.2, 1.0, (n, 2)) * (w, h)
        wh = rng.uniform(0.05, 0.8, (n, 2)) * (w, h)
        dets.append(np.concatenate([xy, xy + wh, rng.uniform(0, 1, (n, 1)), rng.integers(0, 4, (n, 1))], 1))
    tensors = [torch.from_numpy(np.ascontiguousarray(im[:, :, ::-1].transpose(2, 0, 1))) for im in images]
    before = [t.clone() for t in tensors]
    drawn = draw_on_tensors(tensors, dets, names)
    painted = 0
    for image, det, out in zip(images, dets, drawn):
        expected = draw_detections(image, det, names)
        assert out.shape == (3, *image.shape[:2])
        assert np.array_equal(out.numpy().transpose(1, 2, 0)[:, :, ::-1], expected)
        painted += (expected != image).any(2).sum()
    assert painted > 10_000 and np.array_equal(drawn[3].numpy(), before[3].numpy())
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))       # the inputs are left as they were
    assert draw_on_tensors([], [], names) == []
    assert torch.equal(draw_on_tensors([tensors[3]], [dets[3]], names)[0], tensors[3])    # a batch with no boxes


def test_score_cents_round_as_python_formats_and_labels_are_made_once_per_text():
    rng = np.random.default_rng(4)
    scores = np.concatenate([rng.uniform(0, 1, 20_000), np.arange(201) / 200, [0.125, 0.285, 1.005, 99.995]])
    for values in (scores, scores.astype(np.float32).astype(np.float64)):
        cents = score_cents(values)
        plain = cents >= 0
        assert plain.mean() > 0.95                   # ties and near-ties take Python's formatting, the rest not
        assert [f"{c // 100}.{c % 100:02d}" for c in cents[plain].tolist()] == [f"{v:.2f}" for v in values[plain]]
    assert score_cents(np.array([np.nan, -0.5, np.inf, 1e12, -0.0, 1e308])).tolist() == [-1] * 6   # -0.0: "-0.00"
    # every box's label is the cached patch of its own text, ties and unknown classes included
    names = ["RBC", "WBC"]
    dets = np.array([[0, 0, 9, 9, s, c] for s, c in [(0.125, 0), (0.285, 1), (0.12500001, 0), (0.9, 5), (0.9, 0),
                                                      (0.9, 0), (0.2, -1)]], np.float64)
    found = _labelled([dets[:4], dets[4:]], names, [(100, 200), (640, 480)])
    font = _style(np.array([100, 100, 100, 100, 640, 640, 640]), np.array([200, 200, 200, 200, 480, 480, 480]))[0]
    for (*_, score, cls), size, patch in zip(dets.tolist(), font.tolist(), found.patch.tolist()):
        cls = int(cls)
        text = f"{names[cls] if 0 <= cls < 2 else cls} {score:.2f}"
        assert found.label_patches[patch] is _label_patch(text, size, class_color(cls, 2)[::-1])
    assert len(found.label_patches) == 6             # the two 0.9 RBC labels of the 640 px image are one


def test_distinct_rows_whether_packed_or_sorted_as_rows():
    rng = np.random.default_rng(6)
    extreme = np.iinfo(np.int64)
    extremes = np.array([[extreme.max, 0, 1], [extreme.min, 5, 1], [extreme.max, 0, 1]])
    float_rounded = np.array([[0, 0], [1, 0], [0, 2 ** 53]])        # a span float64 would round
    for keys in (rng.integers(-5, 5, (500, 3)), extremes, float_rounded, np.zeros((0, 3), np.int64)):
        first, which = _distinct_rows(keys)
        assert np.array_equal(keys[first][which], keys)
        assert len(first) == len({tuple(row) for row in keys.tolist()})
    # a class column of NaN or 1e30 (cast to extreme int64s) still draws
    dets = np.array([[1, 1, 20, 20, 0.5, np.nan], [5, 5, 30, 30, 0.9, 1], [2, 2, 9, 9, 0.3, 1e30]], np.float32)
    with np.errstate(invalid="ignore"):
        assert (draw_detections(np.zeros((50, 60, 3), np.uint8), dets, ["a", "b"]) > 0).any()


def test_fps_text_goes_to_a_corner_free_of_boxes():
    corners = {"tl": (4, 4), "tr": (96 - 30 - 4, 4), "bl": (4, 64 - 10 - 4), "br": (96 - 30 - 4, 64 - 10 - 4)}
    assert free_corner((30, 10), (96, 64), []) == corners["tl"]
    assert free_corner((30, 10), (96, 64), [(0, 0, 40, 20)]) == corners["tr"]
    assert free_corner((30, 10), (96, 64), [(0, 0, 96, 20)]) == corners["bl"]
    # everything covered: the corner with the least overlap
    spot = free_corner((30, 10), (96, 64), [(0, 0, 96, 64), (0, 0, 96, 64), (60, 40, 96, 64), (0, 0, 48, 64)])
    assert spot == corners["tr"]
    assert overlap((0, 0, 10, 10), (5, 5, 20, 20)) == 25
    image = np.full((64, 96, 3), 200, np.uint8)
    draw_fps(image, 12.5, avoid=[(0, 0, 60, 30)])
    assert (image[:30, :60] == 200).all() and (image != 200).any()


def test_prediction_keeps_scores_from_0_25_by_default():
    assert PREDICT_DETECTION.conf == 0.25
    assert predict.parse_args(["--weights", "w.pt", "--source", "x.jpg"]).detect.conf == 0.25


# ---- the pipeline: a tiny untrained checkpoint, built without training ----

CONF = "0.335"


def checkpoint(tmp_path, phi) -> str:
    config = make_config("yolov4-tiny", phi, ["a", "b"], input_shape=(64, 64))
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():                         # objectness 0.88: a few boxes score 0.337 (CONF), attention acts
        for head in (model.yolo_headP5[1], model.yolo_headP4[1]):
            head.bias.view(3, 7)[:, 4] = 2.0
        for module in model.modules():
            if hasattr(module, "gamma"):
                module.gamma.fill_(0.5)
    path = tmp_path / f"phi{phi}.pt"
    save_checkpoint({"model": model.state_dict(), "config": config}, path)
    return str(path)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(2):
        image = rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)
        cv2.rectangle(image, (10 + 20 * i, 8), (40 + 20 * i, 40), (255, 255, 255), -1)
        cv2.imwrite(str(folder / f"im{i}.jpg"), image)
    return folder


def test_cam_targets_are_the_kept_detections_scores(tmp_path, image_dir):
    yolo = YOLO(checkpoint(tmp_path, "ca"), device="cpu", conf=float(CONF))
    image = cv2.imread(str(image_dir / "im0.jpg"))
    expected = yolo.predict(image)[0]
    x, _ = yolo.preprocess([image])
    scores, keep, best = detection_scores(yolo, yolo.forward(x), None)
    assert keep.all() and len(scores) == len(expected) >= 3
    np.testing.assert_allclose(scores.detach().numpy(), expected[:, 4], rtol=1e-5)
    assert float(best) == pytest.approx(float(expected[:, 4].max()), rel=1e-5)
    maps, dets, _, shape = cam_maps(yolo, image, "grad", "feat2", per_box=True)
    assert maps.shape == (len(expected), 48, 80) and shape == (512, 2, 2)
    np.testing.assert_allclose(dets, expected, rtol=1e-5, atol=1e-4)
    layer = default_layer(yolo.model, 64)
    assert layer == "feat2"
    module, use_input = resolve_layer(yolo.model, "feat1:in")
    with capture(module, use_input) as store:
        yolo.forward(x)
    assert store[0].shape == (1, 256, 4, 4) and not module._forward_pre_hooks     # the hook is gone afterwards


def test_attention_maps_of_a_model_point_by_point(tmp_path, image_dir):
    yolo = YOLO(checkpoint(tmp_path, "cbam"), device="cpu")
    image = cv2.imread(str(image_dir / "im1.jpg"))
    maps, shapes, _ = point_maps(yolo, image)
    assert set(maps) == {"feat1", "feat2", "upsample"} and shapes["feat1"] == (256, 4, 4)
    assert maps["upsample"]["spatial gate"].shape == (1, 1, 4, 4)
    assert all(not b._forward_pre_hooks for b in yolo.model.attention_points().values())


def test_predict_heatmap_cam_and_attention_modes(tmp_path, image_dir, capsys):
    weights = checkpoint(tmp_path, "danet")
    base = ["--weights", weights, "--device", "cpu", "--conf", CONF]
    out = predict.main([*base, "--source", str(image_dir), "--mode", "heatmap", "--out", str(tmp_path / "heat")])
    assert sorted(p.name for p in out.iterdir()) == ["im0_heatmap.jpg", "im1_heatmap.jpg"]
    assert cv2.imread(str(out / "im0_heatmap.jpg")).shape[0] > 48                 # a figure with legend and bar
    runs = {"gradcam": ["--mode", "heatmap", "--cam", "grad", "--cam-layer", "feat1"],
            "eigencam": ["--mode", "heatmap", "--cam", "eigen", "--cam-layer", "feat2:in", "--cam-per-box"],
            "layercam": ["--mode", "heatmap", "--cam", "layer", "--cam-layer", "yolo_headP4.0", "--cam-per-box"],
            "attention": ["--mode", "attention"]}
    for suffix, extra in runs.items():
        out = predict.main([*base, "--source", str(image_dir / "im0.jpg"), *extra, "--out", str(tmp_path / suffix)])
        assert [p.name for p in out.iterdir()] == [f"im0_{suffix}.jpg"]
    assert "1 attention images" in capsys.readouterr().out


@pytest.mark.parametrize("argv,expected", [
    (["--mode", "heatmap", "--cam", "grad", "--cam-layer", "nowhere"], "--cam-layer 'nowhere': no such layer"),
    (["--mode", "heatmap", "--cam-layer", "feat1"], "--cam-layer needs --cam"),
    (["--mode", "heatmap", "--cam-per-box"], "--cam-per-box needs --cam"),
    (["--cam", "grad"], "--cam draws in --mode heatmap"),
    (["--mode", "attention"], "has no attention block at any point"),
])
def test_explain_flag_errors_come_before_any_folder(tmp_path, image_dir, capsys, monkeypatch, argv, expected):
    weights = checkpoint(tmp_path, 0)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_cli(predict.main, ["--weights", weights, "--source", str(image_dir), "--device", "cpu", *argv])
    err = capsys.readouterr().err.strip()
    assert exc.value.code != 0 and err.startswith("error: ") and expected in err and "\n" not in err, err
    assert not (tmp_path / "img_out").exists()
