"""--cache auto: the choice between GPU memory, RAM and decoding on the fly, from header sizes and free memory."""
from __future__ import annotations

import numpy as np
import torch

from utils.data.cache_plan import GIB, decoded_bytes, plan_cache
from utils.data.dataset import Record
from utils.data.loader import decode_all, image_tensor
from utils.data.sample_data import ensure_sample_dataset
from utils.data.voc import load_voc

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


def record(h: int, w: int) -> Record:
    return Record("x.jpg", np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool), h, w, "x")


def test_decoded_bytes_are_what_the_caches_hold(tmp_path):
    root = ensure_sample_dataset(tmp_path / "sample")
    records, _ = load_voc(root, "train", None)
    records = records[:6]
    shape = (96, 64)
    sizes = decoded_bytes(records, 2, shape)
    images, failed = decode_all(records, shape, workers=1, progress=False)
    assert not failed
    assert sizes.fitted == sum(im.nbytes for im in images)             # what the CPU workers read
    assert sizes.padded == image_tensor(images, shape).numel()          # what the GPU augmenter holds
    assert sizes.val == 2 * 3 * 96 * 64


def test_auto_prefers_gpu_then_ram_then_none():
    sizes = decoded_bytes([record(480, 640)] * 1000, 100, (416, 416))   # 0.57 GiB padded train + val
    gpu = plan_cache("auto", sizes, CUDA, True, free_gpu=10 * GIB, free_ram=100 * GIB)
    assert gpu.choice == "gpu" and "GPU memory" in gpu.reason
    ram = plan_cache("auto", sizes, CUDA, True, free_gpu=1 * GIB, free_ram=100 * GIB)
    assert ram.choice == "ram" and "exceed 40%" in ram.reason and "RAM" in ram.reason
    none = plan_cache("auto", sizes, CUDA, True, free_gpu=1 * GIB, free_ram=2 * GIB)
    assert none.choice == "none" and "on the fly" in none.reason
    # 8 processes on the host each hold a copy in RAM
    assert plan_cache("auto", sizes, CUDA, True, free_gpu=1 * GIB, free_ram=10 * GIB).choice == "ram"
    assert plan_cache("auto", sizes, CUDA, True, 8, free_gpu=1 * GIB, free_ram=10 * GIB).choice == "none"


def test_auto_on_cpu_or_cpu_augmentation_never_picks_gpu():
    sizes = decoded_bytes([record(480, 640)] * 100, 10, (416, 416))
    assert plan_cache("auto", sizes, CPU, True, free_ram=10 * GIB).choice == "ram"
    assert plan_cache("auto", sizes, CUDA, False, free_gpu=100 * GIB, free_ram=10 * GIB).choice == "ram"
    assert plan_cache("auto", sizes, CPU, True, free_ram=sizes.fitted).choice == "none"


def test_explicit_choice_is_kept():
    sizes = decoded_bytes([record(10, 10)], 1, (32, 32))
    for choice in ("none", "ram", "gpu"):
        assert plan_cache(choice, sizes, CPU, True, free_ram=0).choice == choice
