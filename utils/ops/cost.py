"""What a model costs: parameters, and forward FLOPs with every operation counted, not only matrix products.

torch.utils.flop_counter counts convolutions and matrix products alone, so an attention block made of pooling,
elementwise gates and a sigmoid (SE, CBAM, ECA, CA, ...) looks free. Here those operations are counted too,
by a custom mapping of aten operations, with these conventions (a multiply-add of a product counts 2, as in
torch's own counter):
  * elementwise arithmetic and activations (add, mul, sigmoid, ReLU, SiLU, ...): 1 per output element;
  * reductions (mean, sum, amax) and adaptive average pooling: 1 per input element; std: 3 per input element;
  * windowed pooling (max_pool2d): kernel area per output element;
  * softmax: 5 per element (max, subtract, exp, sum, divide);
  * batch normalisation (inference): 2 per element (the scale and shift it folds into); group norm: 5;
  * copies and shape changes (cat, view, upsample_nearest, transpose): 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry

aten = torch.ops.aten


def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def _out_elements(*args, out_shape=None, **kwargs) -> int:
    """1 per output element (the first output when there are several)."""
    shape = out_shape[0] if isinstance(out_shape, (tuple, list)) and out_shape and not isinstance(out_shape[0], int) \
        else out_shape
    return _numel(shape)


def _in_elements(x_shape, *args, out_shape=None, **kwargs) -> int:
    """1 per element of the first input."""
    return _numel(x_shape)


def _std(x_shape, *args, out_shape=None, **kwargs) -> int:
    return 3 * _numel(x_shape)


def _softmax(x_shape, *args, out_shape=None, **kwargs) -> int:
    return 5 * _numel(x_shape)


def _batch_norm(x_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(x_shape)


def _group_norm(x_shape, *args, out_shape=None, **kwargs) -> int:
    return 5 * _numel(x_shape)


def _max_pool(x_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    kernel = kernel_size if isinstance(kernel_size, (list, tuple)) else [kernel_size]
    area = math.prod(kernel) if len(kernel) > 1 else kernel[0] ** 2
    return area * _numel(out_shape[0] if isinstance(out_shape, (tuple, list)) else out_shape)


ELEMENTWISE = ("add", "sub", "mul", "div", "sigmoid", "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_",
               "hardtanh", "hardtanh_", "silu", "silu_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_",
               "tanh", "exp", "gelu", "clamp", "clamp_min", "masked_fill", "where", "add_", "mul_", "div_", "sub_",
               "rsqrt", "sqrt", "pow")
REDUCTIONS = ("mean", "sum", "amax", "amin", "_adaptive_avg_pool2d", "adaptive_max_pool2d")
EXTRA_OPS = {
    **{getattr(aten, name): _out_elements for name in ELEMENTWISE if hasattr(aten, name)},
    **{getattr(aten, name): _in_elements for name in REDUCTIONS if hasattr(aten, name)},
    aten.std: _std,
    aten._softmax: _softmax,
    aten.native_batch_norm: _batch_norm,
    aten._native_batch_norm_legit_no_training: _batch_norm,
    aten.native_group_norm: _group_norm,
    aten.max_pool2d_with_indices: _max_pool,
    aten.avg_pool2d: _max_pool,
}
MATMUL_OPS = frozenset(flop_registry)       # what torch.utils.flop_counter counts by itself


@dataclass
class FlopCount:
    """Forward FLOPs: every counted operation, the matrix-product part alone, and the total inside named modules."""

    total: int
    matmul: int
    by_part: dict[str, int] = field(default_factory=dict)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable and frozen)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, inputs: torch.Tensor, parts: dict[str, list[nn.Module]] | None = None) -> FlopCount:
    """FLOPs of model(inputs) in eval mode without gradients; `parts` names groups of submodules to total apart."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=EXTRA_OPS) as counter:
        model(inputs)
    counts = counter.get_flop_counts()
    every = counts.get("Global", {})
    total = sum(every.values())
    matmul = sum(v for op, v in every.items() if op in MATMUL_OPS)
    # the counter names modules <root class>.<name in named_modules()>
    names = {id(m): f"{type(model).__name__}.{n}" if n else type(model).__name__ for n, m in model.named_modules()}
    by_part = {part: sum(sum(counts.get(names.get(id(m), ""), {}).values()) for m in modules)
               for part, modules in (parts or {}).items()}
    return FlopCount(total, matmul, by_part)


def model_cost(model: nn.Module, img: int) -> dict:
    """Parameters and GFLOPs of one img x img image: every op, matmul/conv only, and the attention blocks' share."""
    device = next(model.parameters()).device
    blocks = list(getattr(model, "attention_points", dict)().values())
    flops = count_flops(model, torch.zeros(1, 3, img, img, device=device), {"attention": blocks})
    return {"parameters": count_parameters(model), "gflops": flops.total / 1e9, "gflops_matmul": flops.matmul / 1e9,
            "attention_gflops": flops.by_part["attention"] / 1e9}
