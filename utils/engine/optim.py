"""Optimiser, learning-rate schedule and warm-up (YOLOv5's recipe).

Each group's `lr` (and SGD's `momentum`) is a Python float, or a 0-dim tensor on the parameters'
device once `hyper_on_device` has run: a training step captured as a CUDA graph reads the tensor,
so the host can keep changing the value (warm-up, schedule) with `set_hyper` between replays.
"""
from __future__ import annotations

import math
from typing import Union

import numpy as np
import torch
from torch import nn

HYPER_KEYS = ("lr", "momentum")
DECAY_GROUP, BIAS_GROUP = 1, 2     # build_optimizer's groups: 0 norm weights, 1 weights with decay, 2 biases


class NesterovSGD:
    """SGD with Nesterov momentum, the maths of torch.optim.SGD(nesterov=True, dampening=0).

    Our own because warm-up changes the momentum every step and torch's fused SGD takes the
    momentum as a Python float, which a captured graph would freeze; here lr and momentum may be
    device tensors. Multi-tensor (foreach) arithmetic: a few kernels per group.

    Not a torch.optim.Optimizer subclass: that base class wraps its methods so that the first call imports
    torch._dynamo (and with it sympy), seconds of start-up a training run without --compile never uses.
    What the trainer and torch.amp.GradScaler use is here, with torch's state-dict layout, so checkpoints
    load either way: `param_groups`, `state`, `add_param_group`, `zero_grad`, `step`, `state_dict`,
    `load_state_dict`.
    """

    def __init__(self, params, lr: float, momentum: float, weight_decay: float = 0.0):
        self.defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        self.param_groups: list[dict] = []
        self.state: dict[torch.Tensor, dict] = {}
        self.add_param_group({"params": params})

    def add_param_group(self, group: dict) -> None:
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params):
            raise ValueError("a parameter appears in more than one parameter group")
        self.param_groups.append({**self.defaults, **group, "params": params})

    def zero_grad(self, set_to_none: bool = True) -> None:
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if set_to_none:
            for p in params:
                p.grad = None
        elif params:
            torch._foreach_zero_([p.grad for p in params])

    @torch.no_grad()
    def step(self, found_inf: torch.Tensor | None = None):
        """One update. found_inf: a 0-dim device flag (fp16 loss scaling, utils/engine/loss_scale.py): where it
        is 1 the parameters and momentum stay as they were, decided on the device (a graph can capture it)."""
        keep = None if found_inf is None else found_inf == 0
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = [self._momentum_buffer(p) for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            lr, momentum = group["lr"], group["momentum"]
            if keep is not None:   # a skipped step: zero gradients, momentum 1 and lr 0 leave buf and params
                zero_unless(grads, keep)
                lr, momentum = lr * keep, torch.where(keep, momentum, 1.0)
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads)                      # buf = momentum * buf + g (buf starts at 0)
            update = torch._foreach_mul(bufs, momentum)
            torch._foreach_add_(update, grads)                    # Nesterov: g + momentum * buf
            torch._foreach_mul_(update, lr)
            torch._foreach_sub_(params, update)

    def _momentum_buffer(self, param: torch.Tensor) -> torch.Tensor:
        state = self.state.setdefault(param, {})
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state["momentum_buffer"]

    def _indexed_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        """torch.optim's layout: parameters numbered in group order, state keyed by those numbers."""
        index = {id(p): i for i, p in enumerate(self._indexed_params())}
        groups, first = [], 0
        for g in self.param_groups:
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": list(range(first, first + len(g["params"])))})
            first += len(g["params"])
        return {"state": {index[id(p)]: dict(s) for p, s in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state written by state_dict() (or by torch.optim.SGD on the same groups)."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(saved, self.param_groups)):
            raise ValueError("the saved optimizer state has other parameter groups than this model's optimizer")
        by_index = dict(zip((i for g in saved for i in g["params"]), self._indexed_params()))
        self.state = {}
        for key, values in state_dict["state"].items():
            param = by_index[int(key)]
            self.state[param] = {k: v.to(device=param.device, dtype=param.dtype) if torch.is_tensor(v) and
                                 v.is_floating_point() else v for k, v in values.items()}
        self.param_groups = [{**{k: v for k, v in s.items() if k != "params"}, "params": g["params"]}
                             for s, g in zip(saved, self.param_groups)]


Optimizer = Union[torch.optim.Optimizer, NesterovSGD]

_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def zero_unless(tensors: list[torch.Tensor], keep: torch.Tensor) -> None:
    """Zero every tensor in place unless the 0-dim device bool `keep` is set, with one multi-tensor kernel.

    Multiplying the values by 0 would leave inf * 0 = NaN (an overflowed gradient); multiplying their bit
    patterns, viewed as integers of the same width, by 0 or 1 gives exactly +0.0 or the tensor unchanged.
    """
    bits = [t.view(_SAME_WIDTH_INT[t.element_size()]) for t in tensors]
    torch._foreach_mul_(bits, keep.to(bits[0].dtype))


def step_optimizer(optimizer: Optimizer, found_inf: torch.Tensor | None) -> None:
    """optimizer.step(), skipped on the device where the fp16 overflow flag `found_inf` is 1 (None: no scaling)."""
    if found_inf is None:
        optimizer.step()
    elif isinstance(optimizer, NesterovSGD):
        optimizer.step(found_inf)
    else:   # torch's fused Adam (CUDA) reads the flag itself and skips in its kernel
        optimizer.found_inf = found_inf
        optimizer.step()


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float) -> Optimizer:
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


def hyper_on_device(optimizer: Optimizer, device: torch.device) -> None:
    """Make lr/momentum 0-dim device tensors (and torch's Adam capturable), so optimizer.step() can be captured."""
    for group in optimizer.param_groups:
        for key in HYPER_KEYS:
            if key in group and not isinstance(group[key], torch.Tensor):
                group[key] = torch.tensor(float(group[key]), device=device)
        if "capturable" in group:
            group["capturable"] = True


def hyper_as_floats(optimizer: Optimizer) -> None:
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


def set_initial_lr(optimizer: Optimizer, lr: float) -> None:
    """A new base lr for every group (a resume given --lr): the schedule and warm-up scale from it."""
    for group in optimizer.param_groups:
        scale = float(group["lr"]) / group["initial_lr"] if group["initial_lr"] else 1.0
        group["initial_lr"] = lr
        set_hyper(group, "lr", lr * scale)


def scheduled_lr(optimizer: Optimizer, epoch_factor: float) -> None:
    """Every group's lr = its initial lr x the schedule's factor for this epoch."""
    for group in optimizer.param_groups:
        set_hyper(group, "lr", group["initial_lr"] * epoch_factor)


def warmup(optimizer: Optimizer, step: int, warmup_steps: int, epoch_factor: float, hyp: dict,
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
