"""Export a checkpoint to ONNX with its model config embedded, so `YOLO("model.onnx")` needs nothing else.

The graph's input `images` is [B,3,H,W] RGB in 0..1, letterboxed with gray (114) padding, as yolo.YOLO
prepares it; the backbone's mean/std normalisation is inside the graph. Outputs are the raw head maps
(`output0`.., coarsest first, as the PyTorch model returns them), or with `nms` the final detections of
utils/engine/onnx_graph.py. The TorchScript-based exporter (dynamo=False) is used: it needs no
onnxscript and handles every attention block and a dynamic batch and size on torch 2.3 to 2.14.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import io
import json
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from nets.common import fuse_conv_bn
from nets.yolo import as_model_config, build_model
from utils.config import ModelConfig
from utils.engine.checkpoint import load_checkpoint, write_bytes_atomic
from utils.engine.onnx_graph import DETECTION_COLUMNS, DetectionGraph
from utils.engine.onnx_runtime import FORMAT_VERSION, is_onnx
from utils.log import get_logger

log = get_logger(__name__)

DEFAULT_OPSET = 17
MIN_OPSET = 11                     # NonMaxSuppression's opset; the blocks are checked at the opset asked for
INPUT_DOC = ("images: [B,3,H,W] RGB 0..1, letterboxed (resized to fit, centred, gray 114 padding); "
             "input_mean/input_std are applied inside the graph")
SIMPLIFIERS = ("onnxslim", "onnxsim")


class ExportError(ValueError):
    """A model or option that cannot become an ONNX file: one line saying what and what to do."""


def require(module: str, purpose: str) -> object:
    """Import an optional package, or raise a one-line error saying how to install it."""
    if importlib.util.find_spec(module) is None:
        raise ExportError(f"{purpose} needs the '{module}' package: pip install {module}")
    return importlib.import_module(module)


@contextlib.contextmanager
def _quiet_output():
    """File descriptors 1 and 2 to /dev/null: on a failure the exporter's C++ side prints its whole graph, and
    the caller reports a one-line reason instead."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def _torch_export(module: nn.Module, args: tuple, opset: int, input_names: list[str], output_names: list[str],
                  dynamic_axes: dict | None) -> bytes:
    """torch.onnx.export with the TorchScript exporter, to bytes; torch's deprecation chatter silenced."""
    buffer = io.BytesIO()
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings(), _quiet_output():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buffer, opset_version=opset, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True, **legacy)
    return buffer.getvalue()


def failing_block(model: nn.Module, config: ModelConfig, opset: int) -> str | None:
    """'point (block)' of the first attention point whose block alone cannot export, with the reason; else None."""
    size = config.input_shape[0]
    layout = model.attention_layout(size)
    for point, block in model.attention_points().items():
        if isinstance(block, nn.Identity):
            continue
        c, h, w = layout[point]
        dtype = next(model.parameters()).dtype
        try:
            _torch_export(block, (torch.rand(1, c, max(h, 2), max(w, 2), dtype=dtype),), opset, ["x"], ["y"], None)
        except Exception as exc:  # noqa: BLE001 (any exporter failure is reported with the block's name)
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            return f"{point} ({config.block_at(point)['type']}): {reason}"
    return None


def metadata(config: ModelConfig, strides: list[float], nms: bool, dynamic: bool, half: bool, opset: int,
             max_det: int, train_data: str | None) -> dict[str, str]:
    """The strings stored in the file's metadata_props: the whole ModelConfig and the fields a reader needs first."""
    values = {
        "format_version": FORMAT_VERSION,
        "model_config": json.dumps(config.to_dict()),
        "family": config.family, "model": config.model, "head": config.head,
        "class_names": json.dumps(config.class_names), "input_shape": json.dumps(config.input_shape),
        "input_mean": json.dumps(config.input_mean), "input_std": json.dumps(config.input_std),
        "anchors": json.dumps(config.anchors), "anchors_mask": json.dumps(config.anchors_mask),
        "strides": json.dumps(strides), "input": INPUT_DOC,
        "outputs": (f"detections: [K,7] ({', '.join(DETECTION_COLUMNS)}) in input pixels; inputs score_threshold "
                    f"and iou_threshold [1] float32" if nms else "raw head maps, coarsest first"),
        "nms": json.dumps(nms), "max_det": str(max_det), "dynamic": json.dumps(dynamic), "half": json.dumps(half),
        "opset": str(opset),
    }
    if train_data:
        values["train_data"] = train_data
    return values


def simplifier() -> str:
    """The graph simplifier installed: onnxslim, else onnx-simplifier; neither is a one-line error."""
    for name in SIMPLIFIERS:
        if importlib.util.find_spec(name) is not None:
            return name
    raise ExportError("--simplify needs onnxslim or onnx-simplifier: pip install onnxslim (or pip install onnxsim)")


def simplify_model(model, name: str):
    """The ModelProto simplified by `name` (a SIMPLIFIERS entry)."""
    if name == "onnxslim":
        import onnxslim  # noqa: PLC0415
        return onnxslim.slim(model)
    import onnxsim  # noqa: PLC0415
    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise ExportError("--simplify: onnx-simplifier could not validate the simplified graph; export without "
                          "--simplify")
    return simplified


def check_runs(data: bytes, args: tuple) -> None:
    """Run the graph once in onnxruntime, when installed: an operator it lacks fails the export, not a later run."""
    if importlib.util.find_spec("onnxruntime") is None:
        return
    import onnxruntime  # noqa: PLC0415
    try:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
        session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})
    except Exception as exc:  # noqa: BLE001 (onnxruntime's exception types vary; its message names the node)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ExportError(f"the exported graph does not run in onnxruntime ({reason}); the node name says which "
                          f"layer or attention point") from None


def default_output(weights: str | Path) -> Path:
    """best.pt -> best.onnx beside it."""
    return Path(weights).with_suffix(".onnx")


def export_onnx(weights: str | Path, out: str | Path | None = None, *, img: int | None = None, dynamic: bool = False,
                half: bool = False, simplify: bool = False, nms: bool = False, opset: int = DEFAULT_OPSET,
                max_det: int = 300) -> Path:
    """Write `weights` (a checkpoint of ours) as an ONNX file; returns its path. Runs on CPU (fp16 too)."""
    onnx = require("onnx", "ONNX export")
    # loaded before tracing: its first import runs a torchvision operator the exporter would try to record
    import torchvision.ops  # noqa: F401, PLC0415
    if opset < MIN_OPSET:
        raise ExportError(f"--opset {opset}: must be at least {MIN_OPSET}")
    simplify_with = simplifier() if simplify else None       # a missing package fails before any work
    out = Path(out) if out else default_output(weights)
    if not is_onnx(out):
        raise ExportError(f"--out {out}: give a file name ending in .onnx")
    if out.resolve() == Path(weights).resolve():
        raise ExportError(f"--out {out}: would overwrite the checkpoint")
    if not out.parent.is_dir():
        raise ExportError(f"--out {out}: folder {out.parent} does not exist")
    ckpt = load_checkpoint(weights)
    config = as_model_config(ckpt["config"])
    if img is not None:
        config = dataclasses.replace(config, input_shape=[img, img]).validate()
    model = build_model(config)
    model.load_state_dict(ckpt["model"])
    model = fuse_conv_bn(model.eval())
    dtype = torch.float16 if half else torch.float32
    model.to(dtype)
    x = torch.rand(1, 3, *config.input_shape, dtype=dtype)
    with torch.no_grad():
        raw = model(x)
    strides = [config.input_shape[0] / r.shape[2] for r in raw]
    if nms:
        module = DetectionGraph(model, config, strides, max_det)
        args = (x, torch.tensor([0.25]), torch.tensor([0.45]))          # example thresholds: inputs of the graph
        inputs, outputs = ["images", "score_threshold", "iou_threshold"], ["detections"]
        axes = {"detections": {0: "detections"}}
    else:
        module, args = model, (x,)
        inputs, outputs = ["images"], [f"output{i}" for i in range(len(raw))]
        axes = {name: {0: "batch", 2: f"height{i}", 3: f"width{i}"} for i, name in enumerate(outputs)} if dynamic else {}
    if dynamic:
        axes["images"] = {0: "batch", 2: "height", 3: "width"}
    try:
        with torch.no_grad():
            data = _torch_export(module, args, opset, inputs, outputs, axes or None)
    except Exception as exc:
        block = failing_block(model, config, opset)
        if block:
            raise ExportError(f"attention block at {block}: cannot be exported to ONNX (opset {opset}); train with "
                              f"another block or give the block ONNX-friendly operations") from exc
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ExportError(f"ONNX export of {weights} failed (opset {opset}): {reason}") from exc
    proto = onnx.load_from_string(data)
    if simplify_with:
        proto = simplify_model(proto, simplify_with)
        log.info("simplified with %s", simplify_with)
    train_data = (ckpt.get("train_args") or {}).get("data")
    for key, value in metadata(config, strides, nms, dynamic, half, opset, max_det,
                               str(train_data) if train_data else None).items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"{config.model} ({config.attention}) for {len(config.class_names)} classes; {INPUT_DOC}"
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    check_runs(data, args)
    write_bytes_atomic(data, out)
    log.debug("exported %s -> %s", weights, out)
    return out
