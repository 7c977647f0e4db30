"""Class-activation maps of a detector at a named layer: EigenCAM, Grad-CAM, LayerCAM, per image or per box.

The target of Grad-CAM / LayerCAM is a detection's score (objectness x class probability, the number
its label shows) at the very prediction that NMS kept: the sum over the detections for one map of the
image, or each box's own score for a map per box. EigenCAM takes no target.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from utils.engine.explain.capture import capture, model_input, resolve_layer, torch_model
from utils.ops.boxes import cxcywh_to_xyxy, non_max_suppression
from utils.ops.cam import eigen_cam, grad_cam, layer_cam, renormalise_in_boxes
from utils.ops.images import map_to_image
from utils.ops.overlay import Panel, heatmap_figure
from utils.ops.plots import draw_detections

if TYPE_CHECKING:
    from yolo import YOLO

CAM_METHODS = ("eigen", "grad", "layer")
TITLES = {"eigen": "EigenCAM (first principal component, no gradient)", "grad": "Grad-CAM", "layer": "LayerCAM"}


def default_layer(model: torch.nn.Module, input_size: int) -> str:
    """The coarsest attention point (the deepest backbone output: feat2, p5): its map reaches every head."""
    layout = model.attention_layout(input_size)
    return min(layout, key=lambda p: layout[p][1])


def detection_scores(yolo: YOLO, outputs: list[torch.Tensor], wanted: set[int] | None
                     ) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """(scores [N] differentiable, which of the NMS detections they are [M] bool, best candidate score).

    Each detection NMS keeps (of the `wanted` classes) is matched to the prediction it came from: the
    same box and score.
    """
    pred = yolo.head.decode_outputs(outputs, yolo.cells(outputs))[0]              # N,5+C
    scores = pred[:, 5:] * pred[:, 4:5]                                          # N,C
    boxes = cxcywh_to_xyxy(pred[:, :4].detach())
    dets = non_max_suppression(pred.detach()[None], yolo.conf, yolo.nms_iou, yolo.max_det, yolo.multi_label)[0]
    keep = np.array([wanted is None or int(c) in wanted for c in dets[:, 5].tolist()], dtype=bool)
    picked = []
    for det in dets[torch.from_numpy(keep).to(dets.device)]:
        cls = int(det[5])
        gap = (boxes - det[:4]).abs().sum(1) + (scores[:, cls].detach() - det[4]).abs()
        picked.append(scores[int(gap.argmin()), cls])
    return (torch.stack(picked) if picked else scores.new_zeros(0)), keep, scores.amax()


def cam_maps(yolo: YOLO, image_bgr: np.ndarray, method: str, layer: str, per_box: bool,
             wanted: set[int] | None = None) -> tuple[np.ndarray, np.ndarray, str, tuple[int, ...]]:
    """(maps [K,h0,w0] over the image, detections [N,6] in its pixels, the target in words, the layer's C,H,W).

    K is 1, or N with `per_box` for the gradient methods (one backward pass per box).
    """
    if method not in CAM_METHODS:
        raise ValueError(f"--cam {method!r}: choose one of {', '.join(CAM_METHODS)}")
    model = torch_model(yolo, "--cam")
    module, use_input = resolve_layer(model, layer)
    x, meta = model_input(yolo, image_bgr)
    gradients = method != "eigen"
    with capture(module, use_input) as store, torch.set_grad_enabled(gradients):
        x.requires_grad_(gradients)                 # gradients reach the layer even if its weights are frozen
        outputs = model(x)
    if not store or not isinstance(store[0], torch.Tensor) or store[0].dim() != 4:
        raise ValueError(f"--cam-layer {layer!r}: its output is not one B,C,H,W feature map")
    acts = store[0]
    scores, keep, best = detection_scores(yolo, outputs, wanted)
    if method == "eigen":
        cams = [eigen_cam(acts)[0]]
        target = "none (gradient-free)"
    else:
        cam_of = grad_cam if method == "grad" else layer_cam
        if len(scores) == 0:
            targets, target = [best], f"no detection above --conf {yolo.conf:g}: the best candidate's score"
        elif per_box:
            targets, target = list(scores), "each box's own score (objectness x class)"
        else:
            targets, target = [scores.sum()], f"the sum of the {len(scores)} detection scores (objectness x class)"
        cams = [cam_of(acts, torch.autograd.grad(t, acts, retain_graph=True)[0])[0] for t in targets]
    maps = np.stack([map_to_image(c.detach().float().cpu().numpy(), meta, yolo.input_shape) for c in cams])
    dets = yolo.postprocess([o.detach() for o in outputs], meta[None])[0][keep]     # the same NMS, image pixels
    return maps, dets, target, tuple(acts.shape[1:])


def cam_picture(yolo: YOLO, image_bgr: np.ndarray, method: str, layer: str, per_box: bool = False,
                wanted: set[int] | None = None) -> np.ndarray:
    """The image with its detections, the class-activation map in colour over it, a colour bar and a legend."""
    maps, dets, target, (c, h, w) = cam_maps(yolo, image_bgr, method, layer, per_box, wanted)
    drawn = draw_detections(image_bgr, dets, yolo.class_names)
    title = f"{TITLES[method]} at {layer} ({c}x{h}x{w}); target: {target}; "
    if per_box and len(dets):
        values = renormalise_in_boxes(maps if len(maps) == len(dets) else maps[0], dets[:, :4])
        return heatmap_figure(drawn, Panel("spatial", title + "colours: 0-1 within each box, 0 outside", values,
                                           scaled=True))
    return heatmap_figure(drawn, Panel("spatial", title + "colours: this map's min-max, values on the bar", maps[0]))
