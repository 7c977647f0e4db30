"""Fine-tuning: attention blocks that start near identity, and the frozen phase's BatchNorm, batch and lr."""
from __future__ import annotations

import csv

import pytest
import torch

import train
from nets.attention import ATTENTION_BLOCKS, build_attention, start_near_identity
from nets.attention.blocks import NEAR_IDENTITY_GATE as G
from nets.yolo import build_model
from utils.data.sample_data import make_sample_dataset
from utils.engine.torch_utils import seed_everything

# output / input at the start, per block (SA: up to its channel shuffle; PSA: x*0.5 + x*sigmoid(~1/hw))
EXPECTED_SCALE = {"se": G, "cbam": G, "ca": G, "sa": G, "sge": G, "bam": 1 / G, "psa": 1.0, "gam": G, "ccnet": 1.0}


def shuffled(x: torch.Tensor) -> torch.Tensor:
    """Shuffle Attention's closing channel shuffle (2 groups) applied to x."""
    b, c, h, w = x.shape
    return x.reshape(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)


@pytest.mark.parametrize("name", sorted(EXPECTED_SCALE))
def test_blocks_start_near_identity_and_stay_trainable(name):
    torch.manual_seed(0)
    block = build_attention(name, 64)
    x = torch.randn(2, 64, 8, 8)
    assert start_near_identity({"p": block}) == {"p": "near identity"}
    block.train()
    out = block(x)
    expected = EXPECTED_SCALE[name] * (shuffled(x) if name == "sa" else x)
    if name == "psa":   # x * (0.5 + sigmoid(softmax_hw)): the softmax sums to 1 over 64 pixels, so only a few move
        assert ((out - expected).norm() / expected.norm()).item() < 0.05
    else:
        assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5), name
    out.square().sum().backward()
    grads = [p.grad for p in block.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{name}: no parameter gets a gradient"


def test_blocks_without_a_near_identity_start_are_reported_not_changed():
    torch.manual_seed(0)
    points = {"a": build_attention("eca", 64), "b": build_attention("danet", 64), "c": build_attention(0, 64)}
    before = {k: v.clone() for k, v in points["a"].state_dict().items()}
    report = start_near_identity(points)
    assert set(report) == {"a", "b"} and all(v.startswith("paper init") for v in report.values())
    assert all(torch.equal(before[k], v) for k, v in points["a"].state_dict().items())


def test_every_builtin_block_is_covered():
    """A new built-in block must say here how it starts (near identity or not)."""
    assert set(ATTENTION_BLOCKS) >= set(EXPECTED_SCALE) | {"eca", "danet"}
    assert set(list(ATTENTION_BLOCKS)[:11]) == set(EXPECTED_SCALE) | {"eca", "danet"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_sample_dataset(tmp_path_factory.mktemp("data") / "voc", n_train=8, n_val=4, n_test=2, size=(64, 64))


def test_frozen_phase_keeps_backbone_and_its_bn_statistics_with_its_own_batch_and_lr(data, tmp_path):
    """Epoch 1 frozen at batch 2 and lr 0.002, epoch 2 trained at batch 4 and lr 0.01 (inside warm-up)."""
    run = train.main(["--data", str(data), "--epochs", "2", "--img", "64", "--batch", "4", "--workers", "0",
                      "--device", "cpu", "--phi", "se", "--save-dir", str(tmp_path), "--name", "f",
                      "--freeze-epochs", "1", "--freeze-batch", "2", "--freeze-lr", "0.002", "--save-period", "1",
                      "--attention-init", "identity"])
    frozen = torch.load(run / "epoch1.pt", map_location="cpu", weights_only=True)["model"]
    trained = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["raw_model"]
    seed_everything(0)   # the run's seed: the model train.py built before its first step
    fresh = build_model(torch.load(run / "last.pt", weights_only=True)["config"]).state_dict()
    backbone = [k for k in fresh if k.startswith("backbone.") and fresh[k].is_floating_point()]
    assert any(k.endswith("running_mean") for k in backbone)
    for k in backbone:   # parameters and BN running statistics untouched while frozen (EMA of equal tensors)
        assert torch.allclose(frozen[k], fresh[k], atol=1e-6), k
    assert any(not torch.allclose(trained[k], fresh[k]) for k in backbone if k.endswith("weight"))
    with open(run / "results.csv", newline="") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    # warm-up (100 steps) scales lr linearly from 0: epoch 1 ends after 4 steps of 2 images (step 3),
    # epoch 2 after 2 steps of 4 (step 5), at the cosine factor of epoch 1 of 2 with lrf 0.01
    assert lrs[0] == pytest.approx(3 / 100 * 0.002, abs=2e-6)
    assert lrs[1] == pytest.approx(5 / 100 * 0.01 * (0.5 * (0.01 - 1) + 1), abs=2e-6)

