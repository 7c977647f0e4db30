"""Each attention block's own maps at each point, drawn over the image: what every block does to this image."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from utils.engine.explain.capture import model_input, torch_model
from utils.ops.images import map_to_image
from utils.ops.overlay import Panel, panels_figure

if TYPE_CHECKING:
    from yolo import YOLO


def check_has_attention(yolo: YOLO) -> None:
    """--mode attention on a model without blocks (or without a PyTorch model) is an error."""
    points = torch_model(yolo, "--mode attention").attention_points()
    if all(isinstance(b, nn.Identity) for b in points.values()):
        raise ValueError(f"--mode attention: {yolo.weights} has no attention block at any point "
                         f"({', '.join(points)}); train with --phi or --attention")


@torch.no_grad()
def point_maps(yolo: YOLO, image_bgr: np.ndarray) -> tuple[dict[str, dict | None], dict[str, tuple], np.ndarray]:
    """({point: block.explain(its input), or None for a block without explain}, {point: input C,H,W}, meta).

    The maps are computed inside a pre-hook, on the very tensor the block receives, during one forward pass.
    """
    model = torch_model(yolo, "--mode attention")
    blocks = {p: b for p, b in model.attention_points().items() if not isinstance(b, nn.Identity)}
    maps: dict[str, dict | None] = {}
    shapes: dict[str, tuple] = {}

    def hook(point: str):
        def read(module: nn.Module, args: tuple) -> None:
            shapes[point] = tuple(args[0].shape[1:])
            maps[point] = module.explain(args[0]) if callable(getattr(module, "explain", None)) else None
        return read

    handles = [b.register_forward_pre_hook(hook(p)) for p, b in blocks.items()]
    try:
        x, meta = model_input(yolo, image_bgr)
        model(x)
    finally:
        for h in handles:
            h.remove()
    return maps, shapes, meta


def map_panel(name: str, value: torch.Tensor, size: tuple[int, int], meta: np.ndarray,
              input_shape: tuple[int, int], spatial_block: bool) -> Panel:
    """One map [1,C|1,H|1,W|1] -> a panel: a scalar as text, a per-channel gate as bars, else the
    channel mean over the image."""
    v = value[0].detach().float().cpu()
    if v.shape[1:] == (1, 1):
        if v.shape[0] == 1:
            note = " (residual gain: output = x + gamma * attended x)" if name.endswith("gamma") else ""
            return Panel("text", name, f"{name} = {v.item():.4g}{note}")
        suffix = "" if spatial_block else " (this block has no spatial map)"
        return Panel("channel", name + suffix, v.flatten().numpy())
    mean = v.mean(0).expand(*size).numpy()                                  # H|1,W|1 -> H,W
    title = f"{name}, mean of {v.shape[0]} channels" if v.shape[0] > 1 else name
    return Panel("spatial", title, map_to_image(mean, meta, input_shape))


def attention_picture(yolo: YOLO, image_bgr: np.ndarray) -> np.ndarray:
    """One row per point with a block: each of its maps over the image (colours per map min-max, values on
    the bar), channel gates as sorted bars, scalars as text."""
    maps, shapes, meta = point_maps(yolo, image_bgr)
    rows, titles = [], []
    for point, named in maps.items():
        c, h, w = shapes[point]
        titles.append(f"{point} ({yolo.model_config.block_at(point)['type']}, {c}x{h}x{w})")
        if named is None:
            rows.append([Panel("text", "no maps", "this block has no explain(x) method: nothing to show")])
            continue
        spatial = any(t[0].shape[1:] != (1, 1) for t in named.values())
        rows.append([map_panel(n, t, (h, w), meta, yolo.input_shape, spatial) for n, t in named.items()])
    return panels_figure(image_bgr, rows, titles)
