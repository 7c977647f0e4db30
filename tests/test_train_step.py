"""The training step's parts: our Nesterov SGD, device-held hyperparameters, EMA, and the CUDA-graph step.

The CUDA tests run where a GPU is present (the device machine); on CPU they are skipped.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn

from nets.yolo import build_model, make_config
from nets.yolo_training import YoloLoss, load_hyp
from torch.utils._python_dispatch import TorchDispatchMode

from import_probe import loaded_after
from utils.ops.boxes import ciou_loss
from utils.engine.optim import (NesterovSGD, build_optimizer, hyper_as_floats, hyper_on_device, hyper_value, set_hyper,
                         warmup)
from utils.engine.loss_scale import LossScaler
from utils.engine.torch_utils import ModelEMA
from utils.engine.train_step import TrainStep, graph_blocker

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_net(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))


def train_with(make_opt, steps=6, schedule=None):
    """Parameters after `steps` steps of a fixed regression problem; schedule(opt, i) may change hypers."""
    net = tiny_net()
    opt = make_opt(net)
    torch.manual_seed(1)
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    for i in range(steps):
        if schedule:
            schedule(opt, i)
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def test_nesterov_sgd_matches_torch_sgd():
    ours = train_with(lambda n: NesterovSGD(n.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3))
    ref = train_with(lambda n: torch.optim.SGD(n.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                               weight_decay=1e-3))
    torch.testing.assert_close(ours, ref)


def test_nesterov_sgd_state_dict_is_torch_sgds_layout():
    """A state saved by torch.optim.SGD resumes in ours and the other way round (old checkpoints keep loading)."""
    def groups(net):
        params = list(net.parameters())
        return [{"params": params[:2]}, {"params": params[2:], "weight_decay": 1e-3}]

    def step_twice(opt, net):
        torch.manual_seed(1)
        x, y = torch.randn(16, 5), torch.randn(16, 3)
        for _ in range(2):
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()

    torch_net, our_net = tiny_net(), tiny_net()
    torch_opt = torch.optim.SGD(groups(torch_net), lr=0.05, momentum=0.9, nesterov=True)
    ours = NesterovSGD(groups(our_net)[0]["params"], lr=0.05, momentum=0.9)
    ours.add_param_group(groups(our_net)[1])
    step_twice(torch_opt, torch_net)
    step_twice(ours, our_net)
    theirs, mine = torch_opt.state_dict(), ours.state_dict()
    assert sorted(theirs["state"]) == sorted(mine["state"])
    for key in theirs["state"]:
        torch.testing.assert_close(mine["state"][key]["momentum_buffer"], theirs["state"][key]["momentum_buffer"])
    assert [g["params"] for g in mine["param_groups"]] == [g["params"] for g in theirs["param_groups"]]
    assert [g["weight_decay"] for g in mine["param_groups"]] == [0.0, 1e-3]

    resumed_net = tiny_net()
    resumed = NesterovSGD(groups(resumed_net)[0]["params"], lr=0.05, momentum=0.9)
    resumed.add_param_group(groups(resumed_net)[1])
    resumed_net.load_state_dict(torch_net.state_dict())
    resumed.load_state_dict(copy.deepcopy(theirs))
    step_twice(resumed, resumed_net)
    step_twice(torch_opt, torch_net)
    for a, b in zip(resumed_net.parameters(), torch_net.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="other parameter groups"):
        NesterovSGD(resumed_net.parameters(), lr=0.1, momentum=0.9).load_state_dict(theirs)


def test_sgd_training_does_not_import_dynamo():
    """torch.optim.Optimizer's methods import torch._dynamo (and sympy) on first use: seconds of start-up."""
    loaded = loaded_after("import torch\n"
                          "from torch import nn\n"
                          "from utils.engine.optim import build_optimizer\n"
                          "net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))\n"
                          "opt = build_optimizer(net, 'sgd', 0.01, 0.9, 5e-4)\n"
                          "net(torch.randn(2, 3, 8, 8)).sum().backward()\n"
                          "opt.step(); opt.zero_grad(set_to_none=False); opt.load_state_dict(opt.state_dict())\n",
                          ["torch._dynamo"])
    assert loaded == {"torch._dynamo": False}


def test_tensor_hyperparameters_follow_host_changes():
    """lr/momentum as device tensors changed in place give the same training as plain floats."""
    def schedule(opt, i):
        for group in opt.param_groups:
            set_hyper(group, "lr", 0.01 * (i + 1))
            set_hyper(group, "momentum", 0.8 + 0.02 * i)

    def on_device(net):
        opt = NesterovSGD(net.parameters(), lr=0.1, momentum=0.5)
        hyper_on_device(opt, torch.device("cpu"))
        assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
        return opt

    floats = train_with(lambda n: NesterovSGD(n.parameters(), lr=0.1, momentum=0.5), schedule=schedule)
    tensors = train_with(on_device, schedule=schedule)
    torch.testing.assert_close(tensors, floats)
    unchanged = train_with(lambda n: NesterovSGD(n.parameters(), lr=0.1, momentum=0.5))
    assert not torch.allclose(unchanged, floats)


def test_saved_tensor_hyperparameters_load_as_floats():
    net = tiny_net()
    opt = build_optimizer(net, "sgd", 0.01, 0.937, 5e-4)
    hyper_on_device(opt, torch.device("cpu"))
    warmup(opt, 5, 100, 1.0, {"warmup_bias_lr": 0.1, "warmup_momentum": 0.8, "momentum": 0.937}, sgd=True)
    state = copy.deepcopy(opt.state_dict())
    fresh = build_optimizer(tiny_net(), "sgd", 0.01, 0.937, 5e-4)
    fresh.load_state_dict(state)
    hyper_as_floats(fresh)
    for old, new in zip(opt.param_groups, fresh.param_groups):
        assert type(new["lr"]) is float and new["lr"] == pytest.approx(hyper_value(old, "lr"))
        assert type(new["momentum"]) is float and new["momentum"] == pytest.approx(0.8 + 0.137 * 5 / 100)
        assert new["initial_lr"] == 0.01


def test_ema_blends_with_the_ramped_decay():
    net = tiny_net()
    ema = ModelEMA(net, decay=0.9, tau=2.0)
    before = [p.clone() for p in ema.ema.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)
    d = 0.9 * (1 - math.exp(-1 / 2.0))
    for b, e, p in zip(before, ema.ema.parameters(), net.parameters()):
        torch.testing.assert_close(e, d * b + (1 - d) * p)
    assert ema.updates == 1


def test_graph_blocker_names_the_reason():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert graph_blocker(gpu, True, 1, False) is None                 # fp16 loss scaling too (on the device)
    assert "CUDA" in graph_blocker(cpu, True, 1, False)
    assert "CPU augmentation" in graph_blocker(gpu, False, 1, False)
    assert graph_blocker(gpu, True, 4, False) is None                 # accumulation is captured too
    assert "--nbs" in graph_blocker(gpu, True, 4, False, world=2)
    assert "--sync-bn" in graph_blocker(gpu, True, 1, True)
    assert graph_blocker(gpu, True, 1, False, compiled=True) is None       # one process: compiled and captured
    assert "--compile across 2 processes" in graph_blocker(gpu, True, 1, False, world=2, compiled=True)


def detector_setup(device, optimizer="sgd"):
    torch.manual_seed(0)
    config = make_config("yolov4-tiny", "se", ["a", "b", "c"], (128, 128))
    model = build_model(config).to(device).to(memory_format=torch.channels_last)
    hyp = load_hyp("yolov4-tiny")
    opt = build_optimizer(model, optimizer, 0.01, hyp["momentum"], hyp["weight_decay"])
    return model, YoloLoss(config, hyp), opt, ModelEMA(model), hyp


def batches(device, n, batch=4, rows=12, seed=0):
    """Fixed-shape random batches with per-image targets [B,rows,6] (some rows padding), as the GPU
    augmenter makes them; the last batch is shorter."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        b = batch if i < n - 1 else batch - 1
        images = torch.rand(b, 3, 128, 128, generator=g).half()
        targets = torch.rand(b, rows, 6, generator=g) * 0.5 + 0.25
        targets[..., 0] = torch.arange(b)[:, None]
        targets[..., 1] = torch.randint(0, 3, (b, rows), generator=g)
        targets[:, ::3, 0] = -1                                          # padding rows
        out.append((images.to(device), targets.to(device)))
    return out


def run_steps(device, graphs, optimizer="sgd", epochs=3, accumulate=1, amp=torch.bfloat16, capture=None):
    """Losses, weights, EMA weights and the TrainStep after `epochs` passes over 3 batches (the last short);
    the optimiser applies every `accumulate` batches and after each epoch's last, as the trainer does."""
    model, loss_fn, opt, ema, hyp = detector_setup(device, optimizer)
    scaler = LossScaler(device, enabled=False)
    extra = {"capture": capture} if capture is not None else {}
    step = TrainStep(model, loss_fn, opt, scaler, ema, amp, device, 1, graphs, **extra)
    data = batches(device, 3)
    losses, k = [], 0
    for _ in range(epochs):
        for i, (images, targets) in enumerate(data):
            warmup(opt, k, 20, 1.0, hyp, sgd=optimizer == "sgd")   # host changes lr/momentum every step
            loss, parts = step(images, targets, last=(i + 1) % accumulate == 0 or i + 1 == len(data))
            losses.append(torch.stack([loss, parts["box"], parts["obj"], parts["cls"]]).float().clone())
            k += 1
    weights = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    averaged = torch.cat([p.detach().float().flatten() for p in ema.ema.parameters()])
    return torch.stack(losses), weights, averaged, step


def replay_eagerly(work, pool):
    """A stand-in for CUDA-graph capture on the CPU: records nothing, each replay runs `work` itself."""
    return work


@pytest.mark.parametrize("accumulate", [1, 2])
def test_graph_bookkeeping_trains_like_eager_steps_on_cpu(accumulate):
    """The graphed path (static inputs and outputs, one graph per shape and apply-or-not, EMA advanced on the
    host, gradients zeroed in place) gives exactly the eager path's training when the captured work is rerun."""
    cpu = torch.device("cpu")
    eager = run_steps(cpu, graphs=False, epochs=5, accumulate=accumulate, amp=None)
    graphed = run_steps(cpu, graphs=True, epochs=5, accumulate=accumulate, amp=None, capture=replay_eagerly)
    # full batch: apply or not (accumulate 2), short last batch: apply; each seen once per epoch, captured at the 4th
    assert graphed[3].captured == (3 if accumulate == 2 else 2)
    for a, b in zip(eager[:3], graphed[:3]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    if accumulate == 2:                  # accumulating is not the same training as applying every batch
        assert not torch.allclose(eager[1], run_steps(cpu, graphs=False, epochs=5, amp=None)[1])


def test_accumulated_step_applies_the_sum_of_the_batches_gradients():
    """Three batches then the optimiser (eager path) = the summed per-batch gradients, clipped, one step, one EMA."""
    cpu = torch.device("cpu")
    model, loss_fn, opt, ema, hyp = detector_setup(cpu)
    ref_model = copy.deepcopy(model)
    ref_opt = build_optimizer(ref_model, "sgd", 0.01, hyp["momentum"], hyp["weight_decay"])
    ref_ema = ModelEMA(ref_model)
    step = TrainStep(model, loss_fn, opt, LossScaler(cpu, enabled=False), ema, None, cpu, 1, False)
    data = [(im.float(), t) for im, t in batches(cpu, 3, batch=2)[:2]]
    for _ in range(2):                                   # two optimiser steps of 2 batches each
        for i, (images, targets) in enumerate(data):
            step(images, targets, last=i == 1)
    params = [p for p in ref_model.parameters() if p.requires_grad]
    for _ in range(2):
        total = [torch.zeros_like(p) for p in params]
        for images, targets in data:
            loss, _ = loss_fn(ref_model(images), targets)
            total = [t + g for t, g in zip(total, torch.autograd.grad(loss, params))]
        for p, g in zip(params, total):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(params, max_norm=10.0)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        ref_ema.update(ref_model)
    for mine, ref in ((model, ref_model), (ema.ema, ref_ema.ema)):
        torch.testing.assert_close(torch.cat([p.detach().flatten() for p in mine.parameters()]),
                                   torch.cat([p.detach().flatten() for p in ref.parameters()]), rtol=1e-4, atol=1e-6)
    assert ema.updates == 2
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())   # zeroed in place after the step


@cuda
@pytest.mark.parametrize("optimizer,accumulate", [("sgd", 1), ("adam", 1), ("sgd", 2), ("adam", 2)])
def test_graphed_steps_train_like_eager_steps(optimizer, accumulate):
    device = torch.device("cuda", torch.cuda.current_device())
    eager_losses, eager_w, eager_ema, _ = run_steps(device, graphs=False, optimizer=optimizer, epochs=6,
                                                    accumulate=accumulate)
    graph_losses, graph_w, graph_ema, step = run_steps(device, graphs=True, optimizer=optimizer, epochs=6,
                                                       accumulate=accumulate)
    # the full and the short batch shape; with accumulation the full one also without the optimiser
    assert step.captured == (2 if accumulate == 1 else 3)
    torch.testing.assert_close(graph_losses, eager_losses, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(graph_w, eager_w, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(graph_ema, eager_ema, rtol=2e-3, atol=2e-3)


def test_ciou_loss_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    a = torch.cat([torch.rand(200, 2, generator=g) * 10, torch.rand(200, 2, generator=g) * 4 + 0.01], 1)
    b = torch.cat([a[:, :2] + torch.randn(200, 2, generator=g), torch.rand(200, 2, generator=g) * 4 + 0.01], 1)
    b[:20] = a[:20]                                                      # identical boxes: loss 0
    xyxy = lambda t: torchvision.ops.box_convert(t, "cxcywh", "xyxy")   # noqa: E731
    ref = torchvision.ops.complete_box_iou_loss(xyxy(a), xyxy(b), reduction="none")
    torch.testing.assert_close(ciou_loss(a, b), ref, rtol=1e-4, atol=1e-5)
    assert ciou_loss(a[:20], b[:20]).abs().max() < 1e-5


class HostReads(TorchDispatchMode):
    """Records the ops whose result size depends on tensor values (they make the host wait for the GPU)."""

    VALUE_SHAPED = {"nonzero", "_local_scalar_dense", "masked_select", "_unique2", "unique_dim",
                    "unique_consecutive", "masked_scatter"}
    INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        masks = name in self.INDEXING and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                              for i in (args[1] or []))
        if name in self.VALUE_SHAPED or masks:
            self.found.append(name + (" with a boolean mask" if masks else ""))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("model_name", ["yolov4-tiny", "yolov5n"])
def test_training_step_never_reads_values_back(model_name):
    """What a CUDA graph cannot capture, checked on the CPU: no op of the step sizes its output by tensor values."""
    device = torch.device("cpu")
    torch.manual_seed(0)
    config = make_config(model_name, "cbam", ["a", "b", "c"], (128, 128))
    model = build_model(config)
    hyp = load_hyp(model_name)
    opt = build_optimizer(model, "sgd", 0.01, hyp["momentum"], hyp["weight_decay"])
    hyper_on_device(opt, device)
    # fp16's loss scaling on: its overflow check and skip must not read values back either
    step = TrainStep(model, YoloLoss(config, hyp), opt, LossScaler(device, enabled=True), ModelEMA(model),
                     None, device, 1, graphs=False)
    images, targets = batches(device, 2)[0]
    step(images.float(), targets)              # first step: lazily built constants may read values
    recorder = HostReads()
    with recorder:
        loss, parts = step(images.float(), targets)
    assert recorder.found == []
    assert torch.isfinite(loss)


def test_compiled_step_traces_the_same_model_and_loss(monkeypatch):
    """--compile: the step runs torch.compile'd forward and loss (traced here with the eager backend, which needs
    no C compiler), and two steps give the eager path's losses and weights."""
    import utils.engine.torch_utils as torch_utils
    monkeypatch.setattr(torch_utils, "COMPILE_BACKEND", "eager")
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model, loss_fn, opt, ema, hyp = detector_setup(cpu)
    twin = copy.deepcopy(model)
    twin_opt = build_optimizer(twin, "sgd", 0.01, hyp["momentum"], hyp["weight_decay"])
    scaler = LossScaler(cpu, enabled=False)
    compiled = TrainStep(model, loss_fn, opt, scaler, ema, None, cpu, 1, False, compiled=True)
    eager = TrainStep(twin, loss_fn, twin_opt, scaler, ModelEMA(twin), None, cpu, 1, False)
    assert compiled.forward is not model and eager.forward is twin
    for images, targets in [(im.float(), t) for im, t in batches(cpu, 3, batch=2)[:2]]:
        a, _ = compiled(images, targets)
        b, _ = eager(images, targets)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6)
