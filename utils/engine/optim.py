"""Optimiser, learning-rate schedule and warm-up (YOLOv5's recipe).

Each group's `lr` (and SGD's `momentum`) is a Python float, or a 0-dim tensor on the parameters'
device once `hyper_on_device` has run: a training step captured as a CUDA graph reads the tensor,
so the host can keep changing the value (warm-up, schedule) with `set_hyper` between replays.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

HYPER_KEYS = ("lr", "momentum")
DECAY_GROUP, BIAS_GROUP = 1, 2     # build_optimizer's groups: 0 norm weights, 1 weights with decay, 2 biases


class NesterovSGD(torch.optim.Optimizer):
    """SGD with Nesterov momentum, the maths of torch.optim.SGD(nesterov=True, dampening=0).

    Our own because warm-up changes the momentum every step and torch's fused SGD takes the
    momentum as a Python float, which a captured graph would freeze; here lr and momentum may be
    device tensors. Multi-tensor (foreach) arithmetic: a few kernels per group.
    """

    def __init__(self, params, lr: float, momentum: float, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = [self._momentum_buffer(p) for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            momentum = group["momentum"]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads)                      # buf = momentum * buf + g (buf starts at 0)
            update = torch._foreach_mul(bufs, momentum)
            torch._foreach_add_(update, grads)                    # Nesterov: g + momentum * buf
            torch._foreach_mul_(update, group["lr"])
            torch._foreach_sub_(params, update)

    def _momentum_buffer(self, param: torch.Tensor) -> torch.Tensor:
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state["momentum_buffer"]


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
    if name == "sgd":
        opt = NesterovSGD(no_decay, lr=lr, momentum=momentum)
    elif name == "adam":
        # fused kernels on CUDA: one launch per group instead of several per tensor
        fused = {"fused": True} if next(model.parameters()).is_cuda else {}
        opt = torch.optim.Adam(no_decay, lr=lr, betas=(momentum, 0.999), **fused)
    else:
        raise ValueError(f"--optimizer {name!r}: choose sgd or adam")
    opt.add_param_group({"params": decay, "weight_decay": weight_decay})
    opt.add_param_group({"params": biases, "weight_decay": 0.0})
    for group in opt.param_groups:
        group["initial_lr"] = lr
    return opt


def set_hyper(group: dict, key: str, value: float) -> None:
    """Set a group's lr/momentum: in place when it is a device tensor (a captured step reads it there)."""
    if isinstance(group[key], torch.Tensor):
        group[key].fill_(value)
    else:
        group[key] = value


def hyper_value(group: dict, key: str) -> float:
    """A group's lr/momentum as a float (reading a device tensor waits for the GPU)."""
    return float(group[key])


def hyper_on_device(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Make lr/momentum 0-dim device tensors (and torch's Adam capturable), so optimizer.step() can be captured."""
    for group in optimizer.param_groups:
        for key in HYPER_KEYS:
            if key in group and not isinstance(group[key], torch.Tensor):
                group[key] = torch.tensor(float(group[key]), device=device)
        if "capturable" in group:
            group["capturable"] = True


def hyper_as_floats(optimizer: torch.optim.Optimizer) -> None:
    """Back to plain floats (after loading a state saved from a graphed run, which holds tensors)."""
    for group in optimizer.param_groups:
        for key in HYPER_KEYS:
            if key in group:
                group[key] = float(group[key])
        if "capturable" in group:
            group["capturable"] = False


def lr_lambda(schedule: str, epochs: int, lrf: float):
    """Multiplier of the initial lr at each epoch: cosine or linear from 1 to lrf, or steps of 0.1 at 70% and 90%."""
    if schedule == "cos":
        return lambda e: ((1 - math.cos(e * math.pi / max(epochs, 1))) / 2) * (lrf - 1) + 1
    if schedule == "linear":
        return lambda e: (1 - e / max(epochs, 1)) * (1 - lrf) + lrf
    if schedule == "step":
        return lambda e: 0.1 ** ((e >= 0.7 * epochs) + (e >= 0.9 * epochs))
    raise ValueError(f"--lr-schedule {schedule!r}: choose cos, linear or step")


def set_initial_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """A new base lr for every group (a resume given --lr): the schedule and warm-up scale from it."""
    for group in optimizer.param_groups:
        scale = float(group["lr"]) / group["initial_lr"] if group["initial_lr"] else 1.0
        group["initial_lr"] = lr
        set_hyper(group, "lr", lr * scale)


def scheduled_lr(optimizer: torch.optim.Optimizer, epoch_factor: float) -> None:
    """Every group's lr = its initial lr x the schedule's factor for this epoch."""
    for group in optimizer.param_groups:
        set_hyper(group, "lr", group["initial_lr"] * epoch_factor)


def warmup(optimizer: torch.optim.Optimizer, step: int, warmup_steps: int, epoch_factor: float, hyp: dict,
           sgd: bool) -> None:
    """Linear warm-up: weight lrs rise from 0, the bias lr falls from warmup_bias_lr, momentum rises."""
    span = [0, warmup_steps]
    for j, group in enumerate(optimizer.param_groups):
        start = hyp["warmup_bias_lr"] if j == BIAS_GROUP else 0.0
        set_hyper(group, "lr", float(np.interp(step, span, [start, group["initial_lr"] * epoch_factor])))
        if sgd:
            set_hyper(group, "momentum", float(np.interp(step, span, [hyp["warmup_momentum"], hyp["momentum"]])))


def accumulation_steps(batch_size: int, nominal_batch: int) -> int:
    """Batches per optimiser step so each step sees about `nominal_batch` images."""
    return max(round(nominal_batch / batch_size), 1)
