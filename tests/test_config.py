"""The typed configuration: generated flags and their checks, attention placed per point, plugins, old checkpoints."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import train
from nets.attention import CBAM, CoordAttention
from nets.yolo import build_model, make_config, model_config
from utils.engine.checkpoint import save_checkpoint
from utils.config import DataConfig, ModelConfig, TrainConfig, is_eval_epoch, parse_attention_spec
from utils.settings import flag_name
from utils.config import parse_train_flags, train_parser
from utils.engine.run import resolve_run
from utils.data.sample_data import make_sample_dataset
from yolo import YOLO

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--img", "64", "--batch", "4", "--workers", "0", "--device", "cpu", "--eval-period", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_sample_dataset(tmp_path_factory.mktemp("data") / "voc", n_train=4, n_val=2, n_test=2, size=(64, 64))


def test_every_field_has_one_flag_with_its_default_in_the_help():
    parser = train_parser()
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    for cls in (ModelConfig, DataConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True):
                assert f.name in flags, f.name
                assert flag_name(f) in flags[f.name].option_strings
                assert "(default " in flags[f.name].help
    assert len(flags) == len(set(flags))                     # no field name repeats across the three parts
    assert "(default 416)" in flags["input_shape"].help and "(default 100)" in flags["epochs"].help


def test_only_given_flags_are_returned():
    given = parse_train_flags(["--epochs", "3", "--img", "96", "--no-ema", "--phi", "cbam"])
    assert given == {"epochs": 3, "input_shape": [96, 96], "ema": False, "attention": "cbam"}


@pytest.mark.parametrize("argv, words", [
    (["--lr", "-1"], ["--lr", "greater than 0"]),
    (["--img", "0"], ["--img", "between 32"]),
    (["--img", "100"], ["--img", "multiple of 32"]),
    (["--img", "-32"], ["--img", "between 32"]),
    (["--nbs", "0"], ["--nbs 0", "at least 1"]),
    (["--mosaic", "2"], ["--mosaic", "between 0.0 and 1.0"]),
    (["--label-smoothing", "5"], ["--label-smoothing", "0.5"]),
    (["--epochs", "5", "--freeze-epochs", "99"], ["--freeze-epochs 99", "--epochs 5"]),
    (["--phi", "foo"], ["unknown attention", "cbam"]),
    (["--attention", "feat9=ca"], ["feat9", "feat1, feat2, upsample"]),
    (["--attention", "feat1"], ["--attention", "POINT=BLOCK"]),
    (["--model", "yolov5n", "--attention", "feat1=ca"], ["feat1", "p3, p4, p5, up5, up4"]),
])
def test_bad_values_are_refused_before_anything_is_loaded(argv, words, tmp_path):
    with pytest.raises(ValueError) as info:
        resolve_run(parse_train_flags(argv + ["--data", str(tmp_path / "nothing"), "--save-dir", str(tmp_path)]))
    for word in words:
        assert word in str(info.value), str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_evaluation_schedule():
    """Default: every 10 epochs, every epoch of the last 30 percent (where best.pt comes from) and the last;
    --eval-period N: every N and the last."""
    assert [n for n in range(1, 101) if is_eval_epoch(n, 100, None)] == [10, 20, 30, 40, 50, 60, 70] + list(
        range(71, 101))
    assert [n for n in range(1, 6) if is_eval_epoch(n, 5, None)] == [4, 5]
    assert [n for n in range(1, 2) if is_eval_epoch(n, 1, None)] == [1]
    assert [n for n in range(1, 26) if is_eval_epoch(n, 25, 10)] == [10, 20, 25]
    assert all(is_eval_epoch(n, 7, 1) for n in range(1, 8))


def test_attention_spec_and_per_point_placement():
    spec = parse_attention_spec("feat1=ca, feat2=cbam:reduction=8:kernel_size=3,upsample=none")
    assert spec == {"feat1": {"type": "ca"}, "feat2": {"type": "cbam", "reduction": 8, "kernel_size": 3},
                    "upsample": {"type": "none"}}
    config = model_config("yolov4-tiny", "se", ["a", "b"], (64, 64), attention_points={"feat2": spec["feat2"],
                                                                                      "upsample": {"type": "0"}})
    model = build_model(config)
    points = model.attention_points()
    assert type(points["feat1"]).__name__ == "SE"                    # --phi fills the points not named
    assert isinstance(points["feat2"], CBAM) and points["feat2"].mlp[0].out_features == 512 // 8
    assert points["feat2"].spatial[0].kernel_size == (3, 3)
    assert isinstance(points["upsample"], nn.Identity)
    assert config.uniform_attention() is None and config.to_dict()["phi"] is None
    assert model.attention_layout(64) == {"feat1": (256, 4, 4), "feat2": (512, 2, 2), "upsample": (128, 4, 4)}
    v5 = build_model(model_config("yolov5s", 0, ["a"], (64, 64), attention_points={"up4": {"type": "coord"}}))
    assert isinstance(v5.attention_points()["up4"], CoordAttention)
    assert v5.attention_layout(640)["up4"] == (128, 80, 80) and v5.attention_layout(640)["p5"] == (512, 20, 20)
    with pytest.raises(ValueError, match="reduction_x"):
        build_model(model_config("yolov4-tiny", 0, ["a"], attention_points={"feat1": {"type": "se", "reduction_x": 2}}))


def test_model_config_round_trips_through_a_weights_only_file(tmp_path):
    config = model_config("yolov5n", "eca", ["cat", "dog"], (96, 96), attention_points={"p5": {"type": "cbam"}})
    path = tmp_path / "c.pt"
    torch.save({"config": config.to_dict()}, path)
    loaded = torch.load(path, weights_only=True)["config"]
    assert ModelConfig.from_dict(loaded) == config
    assert loaded["num_classes"] == 2 and loaded["version"] == 2


@pytest.mark.parametrize("field, value, words", [
    ("num_classes", 5, "num_classes 5"),
    ("input_shape", [33, 64], "multiple of 32"),
    ("input_shape", [64, 99999], "between 32"),
    ("input_shape", "416", "input_shape must be a list"),
    ("class_names", "cat", "class_names must be a list"),
    ("class_names", ["cat", ""], "class_names"),
    ("anchors", [[10, -1]] * 6, "anchors"),
    ("anchors_mask", [[3, 4, 50], [1, 2, 3]], "anchors_mask"),
    ("model", "yolov9", "yolov5s"),
    ("attention_points", {"feat1": "ca"}, "attention_points"),
    ("surprise", 1, "unknown fields surprise"),
])
def test_checkpoint_configs_are_checked_field_by_field(field, value, words):
    config = make_config("yolov4-tiny", 0, ["cat", "dog"], (64, 64))
    with pytest.raises(ValueError) as info:
        build_model({**config, field: value})
    assert words in str(info.value)


def old_format(checkpoint: dict) -> dict:
    """A checkpoint as the code before the typed configuration wrote it (version-less config, flat train_args)."""
    config = checkpoint["config"]
    old = dict(checkpoint)
    old["config"] = {"model": config["model"], "attention": config["attention"], "phi": config["phi"],
                     "backbone": config["backbone"], "num_classes": config["num_classes"],
                     "class_names": config["class_names"], "anchors": config["anchors"],
                     "anchors_mask": config["anchors_mask"], "input_shape": config["input_shape"],
                     "head": config["head"]}
    args = checkpoint["train_args"]
    old["train_args"] = {**args, "model": config["model"], "phi": config["attention"], "img": 64, "head": None,
                         "lr": 0.01, "amp": False}
    del old["train_args"]["plugin"]
    old.pop("hyp")
    return old


def test_checkpoints_of_the_previous_format_still_load_and_resume(data, tmp_path):
    out = train.main(["--data", str(data), "--epochs", "1", "--save-dir", str(tmp_path), "--name", "r", "--phi", "ca",
                      *TINY])
    new = torch.load(out / "last.pt", weights_only=True)
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    save_checkpoint(old_format(new), old_dir / "last.pt")
    yolo = YOLO(old_dir / "last.pt", device="cpu")
    assert yolo.model_config.attention == "ca" and yolo.model_config.attention_points == {}
    assert isinstance(yolo.model.attention_points()["feat2"], CoordAttention)
    resumed = train.main(["--resume", str(old_dir / "last.pt"), "--epochs", "2"])
    after = torch.load(resumed / "last.pt", weights_only=True)
    assert after["epoch"] == 2 and after["config"]["version"] == 2 and after["config"]["attention"] == "ca"
    assert after["train_args"]["batch"] == 4 and after["hyp"]["lr0"] == 0.01


PLUGIN = '''
import torch
from torch import nn
from nets.attention import register_attention


@register_attention("halfgate")
class HalfGate(nn.Module):
    """A user's block: a learned per-channel gate."""

    def __init__(self, channels, scale=0.5):
        super().__init__()
        self.gate = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x):
        return x * self.gate.view(1, -1, 1, 1)
'''


def test_a_plugin_block_trains_at_one_point_only(data, tmp_path):
    plugin = tmp_path / "my_blocks.py"
    plugin.write_text(PLUGIN)
    # two epochs of one step each: the warm-up gives gates and BN weights lr 0 at the very first step
    cmd = [sys.executable, "train.py", "--data", str(data), "--epochs", "2", "--save-dir", str(tmp_path), "--name",
           "p", "--attention", "upsample=halfgate:scale=0.25", "--plugin", str(plugin), *TINY]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ckpt = torch.load(tmp_path / "p" / "last.pt", weights_only=True)
    assert ckpt["config"]["attention_points"] == {"upsample": {"type": "halfgate", "scale": 0.25}}
    assert ckpt["config"]["attention"] == "none"
    assert ckpt["raw_model"]["upsample_att.gate"].shape == (128,)
    assert not torch.equal(ckpt["raw_model"]["upsample_att.gate"], torch.full((128,), 0.25))   # it trained
    assert not any(k.startswith(("feat1_att", "feat2_att")) for k in ckpt["model"])
    # predicting needs the plugin again (a checkpoint never names code to import)
    image = next((data / "JPEGImages").iterdir())
    predict = [sys.executable, "predict.py", "--weights", str(tmp_path / "p" / "best.pt"), "--source", str(image),
               "--device", "cpu", "--out", str(tmp_path / "pred")]
    refused = subprocess.run(predict, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "halfgate" in refused.stderr and "--plugin" in refused.stderr
    assert refused.stderr.startswith("error: ") and not (tmp_path / "pred").exists()
    done = subprocess.run(predict + ["--plugin", str(plugin)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "pred" / f"{image.stem}.jpg").is_file()
