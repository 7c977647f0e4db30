"""fp16 loss scaling on the device (utils/engine/loss_scale.py) and the optimiser step it can skip."""
from __future__ import annotations

import copy

import pytest
import torch

from test_train_step import batches, detector_setup
from utils.engine.loss_scale import LossScaler
from utils.engine.optim import NesterovSGD, step_optimizer, zero_unless
from utils.engine.train_step import TrainStep

CPU = torch.device("cpu")


def sgd_with_momentum(seed: int = 0):
    """Two parameters and an SGD whose momentum buffers are already non-zero (one step taken)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(4, 3, generator=g, requires_grad=True), torch.randn(5, generator=g, requires_grad=True)]
    opt = NesterovSGD(params[1:], lr=0.1, momentum=0.9)
    opt.add_param_group({"params": params[:1], "weight_decay": 0.01})
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    return params, opt


def snapshot(params, opt):
    return [p.detach().clone() for p in params] + [opt.state[p]["momentum_buffer"].clone() for p in params]


def test_overflowed_step_leaves_weights_and_momentum_and_halves_the_scale():
    params, opt = sgd_with_momentum()
    scaler = LossScaler(CPU, enabled=True, init_scale=1024.0)
    before = snapshot(params, opt)
    params[0].grad = torch.full((4, 3), 2.0)
    params[1].grad = torch.tensor([1.0, float("inf"), 3.0, float("nan"), -1.0])
    found_inf = scaler.unscale([p.grad for p in params])
    assert found_inf.item() == 1.0
    step_optimizer(opt, found_inf)
    scaler.update()
    for a, b in zip(before, snapshot(params, opt)):
        assert torch.equal(a, b)              # bit for bit: no NaN leaked in through inf * 0
    assert scaler.scale.item() == 512.0


def test_clean_step_is_the_plain_step_on_unscaled_gradients():
    params, opt = sgd_with_momentum()
    twin_params, twin = sgd_with_momentum()
    scaler = LossScaler(CPU, enabled=True, init_scale=256.0)
    for p, q in zip(params, twin_params):
        p.grad = torch.linspace(-1, 1, p.numel()).view(p.shape) * 256.0
        q.grad = torch.linspace(-1, 1, q.numel()).view(q.shape)
    found_inf = scaler.unscale([p.grad for p in params])
    assert found_inf.item() == 0.0
    step_optimizer(opt, found_inf)
    twin.step()
    for a, b in zip(snapshot(params, opt), snapshot(twin_params, twin)):
        torch.testing.assert_close(a, b)


def test_scale_grows_after_interval_clean_steps_and_round_trips_with_gradscaler():
    scaler = LossScaler(CPU, enabled=True, init_scale=8.0, interval=3)
    grads = [torch.ones(3)]
    for _ in range(3):
        scaler.unscale(grads)
        scaler.update()
    assert scaler.scale.item() == 16.0
    twin = LossScaler(CPU, enabled=True)
    twin.load_state_dict(scaler.state_dict())
    assert twin.scale.item() == 16.0 and twin.interval == 3
    torch_scaler = torch.amp.GradScaler("cpu", init_scale=64.0, growth_interval=7)
    twin.load_state_dict(torch_scaler.state_dict())      # checkpoints of runs before this scaler
    assert twin.scale.item() == 64.0 and twin.interval == 7
    assert LossScaler(CPU, enabled=False).state_dict() == {}


def test_zero_unless_gives_exact_zeros_for_inf_and_nan():
    values = [torch.tensor([1.5, float("inf"), float("nan"), -0.0]), torch.tensor([2.0, 3.0]).half()]
    kept = [v.clone() for v in values]
    zero_unless(kept, torch.tensor(True))
    assert all(torch.equal(a.nan_to_num(7), b.nan_to_num(7)) for a, b in zip(values, kept))
    zero_unless(values, torch.tensor(False))
    assert all(torch.equal(v, torch.zeros_like(v)) for v in values)


class Overflowing:
    """A loss whose first value is inf (an fp16 overflow, on any CPU), then the loss itself."""

    def __init__(self, loss_fn):
        self.loss_fn, self.factor = loss_fn, float("inf")

    def __call__(self, outputs, targets):
        loss, parts = self.loss_fn(outputs, targets)
        return loss * self.factor, parts


def test_training_step_skips_an_overflow_and_trains_after_it():
    """The whole step with scaling on: an overflowed loss leaves the weights as they were and halves the scale;
    the next step trains."""
    model, loss_fn, opt, ema, _ = detector_setup(CPU)
    start = copy.deepcopy(dict(model.named_parameters()))    # (BatchNorm's running statistics move in the forward)
    scaler = LossScaler(CPU, enabled=True, init_scale=1024.0)
    overflowing = Overflowing(loss_fn)
    step = TrainStep(model, overflowing, opt, scaler, ema, torch.bfloat16, CPU, 1, False)
    (images, targets), second = batches(CPU, 3, batch=2)[:2]
    step(images.float(), targets)
    assert scaler.scale.item() == 512.0
    for name, value in model.named_parameters():
        assert torch.equal(value, start[name]), name
    overflowing.factor = 1.0
    loss, _ = step(second[0].float(), second[1])
    assert torch.isfinite(loss) and scaler.scale.item() == 512.0
    assert any(not torch.equal(v, start[k]) for k, v in model.named_parameters())


def test_fused_adam_skips_an_overflowed_step_by_the_flag():
    """torch's fused Adam (what build_optimizer gives on CUDA; fused on the CPU here) reads the flag itself."""
    param = torch.nn.Parameter(torch.ones(3))
    try:
        opt = torch.optim.Adam([param], lr=0.1, fused=True)
    except RuntimeError:
        pytest.skip("this torch has no fused Adam on the CPU")
    param.grad = torch.tensor([1.0, float("inf"), 2.0])
    step_optimizer(opt, torch.tensor(1.0))
    assert torch.equal(param.detach(), torch.ones(3)) and float(opt.state[param]["step"]) == 0
    param.grad = torch.ones(3)
    step_optimizer(opt, torch.tensor(0.0))
    assert (param.detach() < 1).all() and float(opt.state[param]["step"]) == 1
