"""Optimiser, learning-rate schedule and warm-up (YOLOv5's recipe)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """Three parameter groups: weights with decay, normalisation weights and biases without."""
    decay, no_decay, biases = [], [], []
    for module in model.modules():
        for pname, param in module.named_parameters(recurse=False):
            if pname == "bias":
                biases.append(param)
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm)) or param.ndim <= 1:
                no_decay.append(param)   # norm weights, attention gains (gamma, SA/SGE weights)
            else:
                decay.append(param)
    # fused kernels on CUDA: one launch per group instead of several per tensor
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    if name == "sgd":
        opt = torch.optim.SGD(no_decay, lr=lr, momentum=momentum, nesterov=True, **fused)
    elif name == "adam":
        opt = torch.optim.Adam(no_decay, lr=lr, betas=(momentum, 0.999), **fused)
    else:
        raise ValueError(f"--optimizer {name!r}: choose sgd or adam")
    opt.add_param_group({"params": decay, "weight_decay": weight_decay})
    opt.add_param_group({"params": biases, "weight_decay": 0.0})
    return opt


BIAS_GROUP = 2


def lr_lambda(schedule: str, epochs: int, lrf: float):
    """Multiplier of the initial lr at each epoch: cosine to lrf, or steps of 0.1 at 70% and 90%."""
    if schedule == "cos":
        return lambda e: ((1 - math.cos(e * math.pi / max(epochs, 1))) / 2) * (lrf - 1) + 1
    if schedule == "step":
        return lambda e: 0.1 ** ((e >= 0.7 * epochs) + (e >= 0.9 * epochs))
    raise ValueError(f"--lr-schedule {schedule!r}: choose cos or step")


def warmup(optimizer: torch.optim.Optimizer, step: int, warmup_steps: int, epoch_factor: float, hyp: dict,
           sgd: bool) -> None:
    """Linear warm-up: weight lrs rise from 0, the bias lr falls from warmup_bias_lr, momentum rises."""
    span = [0, warmup_steps]
    for j, group in enumerate(optimizer.param_groups):
        start = hyp["warmup_bias_lr"] if j == BIAS_GROUP else 0.0
        group["lr"] = float(np.interp(step, span, [start, group["initial_lr"] * epoch_factor]))
        if sgd:
            group["momentum"] = float(np.interp(step, span, [hyp["warmup_momentum"], hyp["momentum"]]))


def accumulation_steps(batch_size: int, nominal_batch: int) -> int:
    """Batches per optimiser step so each step sees about `nominal_batch` images."""
    return max(round(nominal_batch / batch_size), 1)
