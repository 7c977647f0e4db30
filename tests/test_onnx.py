"""ONNX export and ONNX Runtime inference: every block and family exports, raw outputs and final boxes match
PyTorch, the in-graph NMS matches the Python one, and the scripts take an .onnx file."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import get_map
import predict
from nets.attention.registry import ATTENTION_BLOCKS, register_attention
from nets.yolo import build_model, model_config
from utils.cli import run_cli
from utils.config import PHI_NAMES
from utils.data.sample_data import SAMPLE_CLASSES, make_sample_dataset
from utils.engine.checkpoint import save_checkpoint
from utils.engine.export import ExportError, export_onnx
from utils.engine.onnx_runtime import providers_for
from yolo import YOLO

RNG = np.random.default_rng(0)
IMAGES = [RNG.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((70, 90), (96, 60))]


def lively(model: nn.Module) -> nn.Module:
    """Convs drawn so activations keep their scale through the network (the default init shrinks them towards
    zero) and biases zeroed: outputs of order 0.1-1, boxes and scores that vary from cell to cell."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0, 1.5 / module.weight[0].numel() ** 0.5)
                if module.bias is not None:
                    module.bias.zero_()
    return model


def make_weights(path: Path, model: str = "yolov4-tiny", phi: int | str = 0, size: int = 64, **kw) -> Path:
    torch.manual_seed(0)
    config = model_config(model, phi, SAMPLE_CLASSES, (size, size), **kw)
    save_checkpoint({"model": lively(build_model(config).eval()).state_dict(), "config": config.to_dict()}, path)
    return path


def matched(a: np.ndarray, b: np.ndarray, atol: float = 1e-3) -> bool:
    """The same detections [N,6] in any order (near-equal scores may swap places)."""
    if a.shape != b.shape:
        return False
    left = list(range(len(b)))
    for row in a:
        hit = next((j for j in left if np.allclose(row, b[j], atol=atol, rtol=0)), None)
        if hit is None:
            return False
        left.remove(hit)
    return True


@pytest.mark.parametrize("model", ["yolov4-tiny", "yolov5n"])
@pytest.mark.parametrize("phi", range(len(PHI_NAMES)), ids=PHI_NAMES)
def test_raw_outputs_match_pytorch(model, phi, tmp_path):
    weights = make_weights(tmp_path / "m.pt", model, phi)
    exported = export_onnx(weights, tmp_path / "m.onnx", dynamic=True)
    torch_yolo, onnx_yolo = YOLO(weights, device="cpu", img=96), YOLO(exported, img=96)
    batch, _ = torch_yolo.preprocess(IMAGES)                        # 2 images at 96 px: batch and size dynamic
    expected, got = torch_yolo.forward(batch), onnx_yolo.forward(batch)
    assert [tuple(o.shape) for o in got] == [tuple(o.shape) for o in expected]
    for e, g in zip(expected, got):
        # within 1e-4, and within 0.1% of the map's largest value (some blocks keep the maps small)
        assert e.std() > 1e-3
        np.testing.assert_allclose(g.numpy(), e.numpy(), atol=min(1e-4, 1e-3 * float(e.abs().max())), rtol=0)


@pytest.mark.parametrize("model,phi", [("yolov4-tiny", "ca"), ("yolov5n", "cbam")])
def test_final_boxes_match_python_path_raw_and_in_graph_nms(model, phi, tmp_path):
    weights = make_weights(tmp_path / "m.pt", model, phi, size=96)
    raw = export_onnx(weights, tmp_path / "raw.onnx")
    nms = export_onnx(weights, tmp_path / "nms.onnx", nms=True, dynamic=True)
    images = IMAGES + [RNG.integers(0, 256, (96, 96, 3), dtype=np.uint8)]
    # thresholds from the model's own scores: about half the boxes NMS keeps at a low threshold
    scores = np.concatenate(YOLO(weights, device="cpu", conf=0.01, nms_iou=0.45).predict(images))[:, 4]
    for conf, iou in ((float(np.quantile(scores, 0.5)), 0.45), (float(np.quantile(scores, 0.3)), 0.3)):
        expected = YOLO(weights, device="cpu", conf=conf, nms_iou=iou).predict(images)
        assert sum(len(d) for d in expected) >= 10 and len({len(d) for d in expected}) > 1
        for path in (raw, nms):
            got = YOLO(path, conf=conf, nms_iou=iou).predict(images)
            assert all(matched(g, e) for g, e in zip(got, expected)), path.name
            # boxes in the original pixels: inside each image
            assert all((g[:, [0, 2]] <= im.shape[1]).all() and (g[:, [1, 3]] <= im.shape[0]).all()
                       for g, im in zip(got, images))
    # the in-graph decode follows a dynamic input size (its grid comes from the traced output shapes)
    expected = YOLO(weights, device="cpu", conf=conf, nms_iou=iou, img=128).predict(images)
    got = YOLO(nms, conf=conf, nms_iou=iou, img=128).predict(images)
    assert sum(len(d) for d in expected) >= 10 and all(matched(g, e) for g, e in zip(got, expected))


def test_metadata_holds_the_config_and_a_fixed_batch_runs_image_by_image(tmp_path):
    weights = make_weights(tmp_path / "m.pt", "yolov5n", "se")
    exported = export_onnx(weights, tmp_path / "m.onnx")
    meta = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    config = json.loads(meta["model_config"])
    assert config == torch.load(weights, weights_only=True)["config"]
    assert json.loads(meta["class_names"]) == SAMPLE_CLASSES and json.loads(meta["input_shape"]) == [64, 64]
    assert meta["family"] == "yolov5" and json.loads(meta["anchors"]) == config["anchors"]
    assert json.loads(meta["strides"]) == [32, 16, 8] and json.loads(meta["input_mean"]) is None
    assert json.loads(meta["nms"]) is False and json.loads(meta["dynamic"]) is False
    assert onnx.load(str(exported)).opset_import[0].version == 17
    yolo = YOLO(exported)
    assert yolo.class_names == SAMPLE_CLASSES and yolo.input_shape == (64, 64) and yolo.runtime == "onnxruntime cpu"
    batch, _ = yolo.preprocess(IMAGES)
    together = yolo.forward(batch)
    alone = [yolo.forward(batch[i:i + 1]) for i in range(2)]
    for level, (a, b) in enumerate(zip(*alone)):
        np.testing.assert_allclose(together[level].numpy(), torch.cat([a, b]).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="without --dynamic"):
        YOLO(exported, img=96)


def test_backbone_normalisation_is_inside_the_graph(tmp_path):
    weights = make_weights(tmp_path / "m.pt", "yolov4-tiny", 0)
    ckpt = torch.load(weights, weights_only=True)
    ckpt["config"].update(input_mean=[0.4, 0.5, 0.6], input_std=[0.2, 0.25, 0.3])
    save_checkpoint(ckpt, weights)
    exported = export_onnx(weights, tmp_path / "m.onnx")
    torch_yolo, onnx_yolo = YOLO(weights, device="cpu"), YOLO(exported)
    assert onnx_yolo.model_config.input_std == [0.2, 0.25, 0.3]
    batch, _ = torch_yolo.preprocess(IMAGES[:1])
    for e, g in zip(torch_yolo.forward(batch), onnx_yolo.forward(batch)):
        np.testing.assert_allclose(g.numpy(), e.numpy(), atol=1e-4, rtol=0)


def test_half_export_runs_on_cpu_close_to_fp32(tmp_path):
    weights = make_weights(tmp_path / "m.pt", "yolov4-tiny", "cbam")
    half = export_onnx(weights, tmp_path / "h.onnx", half=True)
    yolo, reference = YOLO(half), YOLO(weights, device="cpu")
    assert yolo.half and yolo.onnx.session.get_inputs()[0].type == "tensor(float16)"
    batch, _ = reference.preprocess(IMAGES[:1])
    for e, g in zip(reference.forward(batch), yolo.forward(batch)):
        assert g.dtype == torch.float32
        np.testing.assert_allclose(g.numpy(), e.numpy(), atol=0.05 * float(e.abs().max()), rtol=0)
    assert onnx.load(str(half)).graph.initializer[0].data_type == onnx.TensorProto.FLOAT16
    with pytest.raises(ValueError, match="fp16 weights, fixed at export"):
        YOLO(half, half=False)


def test_scripts_take_an_onnx_file(tmp_path, capsys):
    data = make_sample_dataset(tmp_path / "voc", n_train=2, n_val=2, n_test=3, size=(64, 64))
    weights = make_weights(tmp_path / "m.pt", "yolov4-tiny", "eca")
    out = predict.main(["--weights", str(weights), "--mode", "export_onnx", "--dynamic", "--nms"])
    assert out == tmp_path / "m.onnx" and "decode + NMS in the graph" in capsys.readouterr().out
    raw = predict.main(["--weights", str(weights), "--mode", "export_onnx", "--out", str(tmp_path / "raw.onnx")])
    summaries = [get_map.main(["--weights", str(w), "--data", str(data), "--out", str(tmp_path / f"map_{w.stem}"),
                               "--device", "cpu", "--workers", "0"]) for w in (weights, raw, out)]
    assert summaries[0]["map50"] == pytest.approx(summaries[1]["map50"], abs=1e-6)
    assert summaries[0]["map50_95"] == pytest.approx(summaries[1]["map50_95"], abs=1e-6)
    # the in-graph NMS is single-label (get_map warns and evaluates it so): equal to the checkpoint evaluated so
    single = get_map.main(["--weights", str(weights), "--data", str(data), "--out", str(tmp_path / "map_single"),
                           "--device", "cpu", "--workers", "0", "--no-multi-label"])
    assert summaries[2]["map50"] == pytest.approx(single["map50"], abs=1e-6)
    capsys.readouterr()
    folder = predict.main(["--weights", str(raw), "--source", str(data / "JPEGImages"), "--conf", "0.2",
                           "--out", str(tmp_path / "pred"), "--save-txt"])
    assert len(list(folder.glob("*.jpg"))) == 7 and len(list((folder / "labels").glob("*.txt"))) == 7
    image = str(next((data / "JPEGImages").glob("*.jpg")))
    predict.main(["--weights", str(out), "--source", image, "--mode", "fps", "--fps-iters", "3"])
    assert "onnxruntime cpu" in capsys.readouterr().out


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(predict.main, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and "Traceback" not in err, err
    return err


def test_export_errors_are_one_line(tmp_path, capsys, monkeypatch):
    weights = str(make_weights(tmp_path / "m.pt"))
    assert "--nms applies to --mode export_onnx only" in one_line_error(
        capsys, ["--weights", weights, "--source", "x.jpg", "--nms"])
    assert "--out" in one_line_error(capsys, ["--weights", weights, "--mode", "export_onnx", "--out", "m.txt"])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("onnxslim", "onnxsim") else real_find_spec(name, *a))
    assert "pip install onnxslim" in one_line_error(capsys, ["--weights", weights, "--mode", "export_onnx",
                                                             "--simplify"])
    assert not (tmp_path / "m.onnx").exists()


def test_a_block_that_cannot_export_is_named(tmp_path):
    @register_attention("eigen_gate_test")
    class EigenGate(nn.Module):
        """Scales by the mean eigenvalue of the channel Gram matrix: no ONNX operator computes eigenvalues."""

        def __init__(self, channels: int):
            super().__init__()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = x.flatten(2)                                                  # B,C,HW
            return x * torch.linalg.eigvalsh(flat @ flat.transpose(1, 2)).mean().sigmoid()

    @register_attention("eye_mask_test")
    class EyeMask(nn.Module):
        """Zeroes the diagonal through a boolean torch.eye: exports, but onnxruntime has no boolean EyeLike."""

        def __init__(self, channels: int):
            super().__init__()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.masked_fill(torch.eye(x.shape[2], x.shape[3], dtype=torch.bool, device=x.device), 0.0)

    try:
        weights = make_weights(tmp_path / "m.pt", attention_points={"feat2": {"type": "eigen_gate_test"}})
        with pytest.raises(ExportError, match=r"^attention block at feat2 \(eigen_gate_test\): .*eigvalsh"):
            export_onnx(weights, tmp_path / "m.onnx")
        weights = make_weights(tmp_path / "m.pt", attention_points={"upsample": {"type": "eye_mask_test"}})
        with pytest.raises(ExportError, match=r"does not run in onnxruntime .*EyeLike.*upsample_att"):
            export_onnx(weights, tmp_path / "m.onnx")
    finally:
        del ATTENTION_BLOCKS["eigen_gate_test"], ATTENTION_BLOCKS["eye_mask_test"]
    assert not (tmp_path / "m.onnx").exists()


def test_foreign_onnx_file_and_missing_onnxruntime_are_clear_errors(tmp_path, monkeypatch):
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(nn.Conv2d(3, 4, 1), (torch.rand(1, 3, 8, 8),), str(foreign), dynamo=False)
    with pytest.raises(ValueError, match="without this project's metadata"):
        YOLO(foreign)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match="pip install onnxruntime"):
        YOLO(foreign)


def test_device_picks_the_execution_provider(monkeypatch):
    import onnxruntime
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert providers_for(None) == (["CPUExecutionProvider"], "onnxruntime cpu")
    assert providers_for("cpu")[1] == "onnxruntime cpu"
    with pytest.raises(ValueError, match="no CUDAExecutionProvider"):
        providers_for("cuda")
    with pytest.raises(ValueError, match="expected cpu, cuda"):
        providers_for("cuda:x")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers_for(None) == ([("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"],
                                   "onnxruntime cuda:0")
    assert providers_for("1")[0][0] == ("CUDAExecutionProvider", {"device_id": 1})
    assert providers_for(torch.device("cpu"))[1] == "onnxruntime cpu"
