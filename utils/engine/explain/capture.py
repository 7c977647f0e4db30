"""Named layers of a detector and a one-pass capture of their tensors through forward hooks."""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from yolo import YOLO

INPUT_SUFFIX = ":in"


def torch_model(yolo: YOLO, what: str) -> nn.Module:
    """The detector's PyTorch module; a model without one (an exported file) is refused, naming `what`."""
    model = getattr(yolo, "model", None)
    if not isinstance(model, nn.Module) or not hasattr(model, "attention_points"):
        raise ValueError(f"{what} needs a PyTorch checkpoint (.pt) of this project; {yolo.weights} is not one")
    return model


def resolve_layer(model: nn.Module, name: str) -> tuple[nn.Module, bool]:
    """A layer name -> (module, read its input instead of its output).

    An attention point ('feat2', 'p4', ...) is the block's output; 'POINT:in' the map entering the block
    (the backbone output at feat1/feat2 or p3/p4/p5); any other name a submodule ('yolo_headP5.0').
    """
    points = model.attention_points()
    if name in points:
        return points[name], False
    if name.endswith(INPUT_SUFFIX) and name[:-len(INPUT_SUFFIX)] in points:
        return points[name[:-len(INPUT_SUFFIX)]], True
    try:
        if name and INPUT_SUFFIX not in name:
            return model.get_submodule(name), False
    except AttributeError:
        pass
    raise ValueError(f"--cam-layer {name!r}: no such layer; choose an attention point ({', '.join(points)}), "
                     f"POINT{INPUT_SUFFIX} for the map entering it (e.g. {next(iter(points))}{INPUT_SUFFIX}), or a "
                     f"submodule name as model.named_modules() lists it")


@contextmanager
def capture(module: nn.Module, use_input: bool = False) -> Iterator[list[torch.Tensor]]:
    """While open, every call of `module` appends its output (or first input) to the yielded list."""
    store: list[torch.Tensor] = []
    if use_input:
        handle = module.register_forward_pre_hook(lambda m, args: store.append(args[0]))
    else:
        handle = module.register_forward_hook(lambda m, args, out: store.append(out))
    try:
        yield store
    finally:
        handle.remove()


def model_input(yolo: YOLO, image_bgr: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """One image -> the model's input [1,3,H,W] (0..1, the model's dtype and device) and its letterbox meta."""
    batch, metas = yolo.preprocess([image_bgr])
    x = batch.to(yolo.device).float().div_(255)
    return x.to(next(yolo.model.parameters()).dtype), metas[0]
