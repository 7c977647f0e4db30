"""An exported .onnx file run by ONNX Runtime, in place of the PyTorch network inside yolo.YOLO.

The model config comes from the file's metadata (utils/engine/export.py writes it), so YOLO's own
letterbox, decode, NMS and rescale run unchanged around the session. onnxruntime is optional: only
ONNX files need it. CUDAExecutionProvider (the onnxruntime-gpu package) is used when the device asks
for CUDA, or by default when present.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from nets.yolo import as_model_config
from utils.config import ModelConfig

ONNX_SUFFIX = ".onnx"
FORMAT_VERSION = "1"


def is_onnx(path: str | Path) -> bool:
    """Whether a weights path names an ONNX file (by its suffix)."""
    return Path(path).suffix.lower() == ONNX_SUFFIX


def _ort():
    if importlib.util.find_spec("onnxruntime") is None:
        raise ValueError("running an .onnx model needs onnxruntime: pip install onnxruntime "
                         "(onnxruntime-gpu for CUDA)")
    return importlib.import_module("onnxruntime")


def providers_for(device: str | torch.device | None) -> tuple[list, str]:
    """Execution providers for a --device value (None: CUDA when onnxruntime has it) and a short label."""
    available = _ort().get_available_providers()
    name = ("" if device is None else str(device)).strip().lower()
    if name.isdigit():
        name = f"cuda:{name}"
    if name in ("", "cuda") or name.startswith("cuda:"):
        index = name.partition(":")[2] or "0"
        if not index.isdigit():
            raise ValueError(f"--device {device!r}: expected cpu, cuda, cuda:N or a GPU index")
        if "CUDAExecutionProvider" in available:
            index = int(index)
            return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], f"onnxruntime cuda:{index}"
        if name:
            raise ValueError(f"--device {device}: this onnxruntime has no CUDAExecutionProvider (install "
                             f"onnxruntime-gpu); use --device cpu")
    elif name != "cpu":
        raise ValueError(f"--device {device!r}: expected cpu, cuda, cuda:N or a GPU index")
    return ["CPUExecutionProvider"], "onnxruntime cpu"


def _session(path: Path, providers: list, threads: int | None = None):
    ort = _ort()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    options = ort.SessionOptions()
    options.log_severity_level = 3          # no per-node placement chatter
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # noqa: BLE001 (onnxruntime raises its own exception types per failure)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ValueError(f"{path}: onnxruntime cannot load it ({reason})") from None


def read_metadata(session, path: Path) -> dict[str, str]:
    """The file's metadata as written by the exporter; a file without it is a one-line error."""
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if "model_config" not in meta:
        raise ValueError(f"{path}: an ONNX file without this project's metadata; export it with "
                         f"predict.py --mode export_onnx --weights best.pt")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: metadata format {meta.get('format_version')!r} is not {FORMAT_VERSION!r}; "
                         f"re-export it with this version of predict.py --mode export_onnx")
    return meta


class OnnxModel:
    """An ONNX Runtime session called like the network: 0..1 batch -> raw maps, or with in-graph NMS -> [K,7]."""

    def __init__(self, path: str | Path, device: str | torch.device | None = None, threads: int | None = None):
        """`threads`: CPU threads per operator (default onnxruntime's: one per physical core)."""
        self.path = Path(path)
        providers, self.label = providers_for(device)
        self.session = _session(self.path, providers, threads)
        self.meta = read_metadata(self.session, self.path)
        self.config: ModelConfig = as_model_config(json.loads(self.meta["model_config"]))
        self.nms = json.loads(self.meta.get("nms", "false"))
        self.dynamic = json.loads(self.meta.get("dynamic", "false"))
        self.max_det = int(self.meta.get("max_det", 300))
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.half = first.type == "tensor(float16)"
        self.output_names = [o.name for o in self.session.get_outputs()]

        # a file exported without --dynamic takes one image at a time: batches run image by image
        self.fixed_batch = first.shape[0] if isinstance(first.shape[0], int) else None

    def _feed(self, x: torch.Tensor) -> dict:
        return {self.input_name: x.detach().cpu().numpy().astype(np.float16 if self.half else np.float32, copy=False)}

    def _chunks(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x] if self.fixed_batch is None else list(x.split(self.fixed_batch))

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """0..1 RGB batch [B,3,H,W] -> the raw head maps, coarsest first, float32 on the CPU."""
        runs = [self.session.run(self.output_names, self._feed(chunk)) for chunk in self._chunks(x)]
        return [torch.from_numpy(np.concatenate(level)).float() for level in zip(*runs)]

    def detect(self, x: torch.Tensor, conf: float, iou: float) -> torch.Tensor:
        """In-graph decode + NMS: 0..1 batch -> [K,7] (image, x1, y1, x2, y2, score, class) in input pixels."""
        found, start = [], 0
        for chunk in self._chunks(x):
            feed = self._feed(chunk)
            feed["score_threshold"] = np.array([conf], np.float32)
            feed["iou_threshold"] = np.array([iou], np.float32)
            dets = torch.from_numpy(self.session.run(self.output_names, feed)[0]).float()
            dets[:, 0] += start
            found.append(dets)
            start += len(chunk)
        return torch.cat(found)

def onnx_checkpoint_view(path: str | Path) -> dict:
    """The parts of a checkpoint an exported file keeps: {'config': model config dict, 'train_args': {'data'}}."""
    path = Path(path)
    meta = read_metadata(_session(path, ["CPUExecutionProvider"]), path)
    view = {"config": as_model_config(json.loads(meta["model_config"])).to_dict(), "train_args": {}}
    if meta.get("train_data"):
        view["train_args"]["data"] = meta["train_data"]
    return view
