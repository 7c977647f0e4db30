"""--batch auto: the nominal batch on a GPU where it fits (halved where not), 16 on the CPU, stored for resume."""
from __future__ import annotations

import pytest
import torch

import train
from nets.yolo import model_config
from utils.data.sample_data import make_sample_dataset
from utils.engine import autobatch
from utils.engine.autobatch import CPU_BATCH, auto_batch

MIB = 2**20


def test_cpu_takes_the_tutorials_batch_never_above_the_nominal_one():
    config = model_config("yolov4-tiny", 0, ["a"], (64, 64))
    cpu = torch.device("cpu")
    assert auto_batch(config, cpu, None, 64).batch == CPU_BATCH
    assert auto_batch(config, cpu, None, 8).batch == 8
    assert auto_batch(config, cpu, None, 64, world=3).batch == 15      # divisible by the processes


@pytest.mark.parametrize("free_mib, world, expected", [
    (10_000, 1, 64),      # 64 x 20 MiB = 1,280 MiB fits half of 10,000
    (2_000, 1, 32),       # 1,280 > 1,000: halved once (640 fits)
    (300, 1, 4),          # 16 x 20 = 320 > 150, 8 x 20 = 160 > 150, 4 x 20 = 80 fits
    (10, 1, 1),           # nothing fits: one image a step, the least there is
    (2_000, 2, 64),       # each of 2 processes holds 32 x 20 = 640 MiB <= 1,000
])
def test_gpu_halves_until_each_process_share_fits(monkeypatch, free_mib, world, expected):
    """The probe's measurement and the free memory stand in for a GPU: the choice is the arithmetic on them."""
    monkeypatch.setattr(autobatch, "activation_bytes", lambda *a: 20 * MIB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free_mib * MIB, 80_000 * MIB))
    choice = auto_batch(model_config("yolov4-tiny", 0, ["a"], (64, 64)), torch.device("cuda"), torch.bfloat16, 64,
                        world)
    assert choice.batch == expected
    assert "20 MiB of activations an image" in choice.reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_probe_measures_more_memory_for_larger_inputs():
    small = autobatch.activation_bytes(model_config("yolov4-tiny", 0, ["a"], (128, 128)), torch.device("cuda"), None)
    large = autobatch.activation_bytes(model_config("yolov4-tiny", 0, ["a"], (256, 256)), torch.device("cuda"), None)
    assert 2.5 < large / small < 5.5          # activations grow with the pixels (4x), plus a fixed share


def test_a_run_without_batch_stores_the_chosen_batch_and_resumes_with_it(tmp_path):
    data = make_sample_dataset(tmp_path / "voc", n_train=6, n_val=2, n_test=1, size=(64, 64))
    common = ["--data", str(data), "--img", "64", "--workers", "0", "--device", "cpu", "--save-dir", str(tmp_path)]
    run = train.main([*common, "--epochs", "1", "--name", "auto"])
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["train_args"]["batch"] == CPU_BATCH
    resumed = train.main(["--resume", str(run / "last.pt"), "--epochs", "2"])
    assert torch.load(resumed / "last.pt", map_location="cpu", weights_only=True)["train_args"]["batch"] == CPU_BATCH
