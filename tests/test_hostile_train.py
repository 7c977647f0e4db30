"""Hostile input and faults on the training side: refused writes, divergence, moved data, wrong weights, bad hyp."""
from __future__ import annotations

import csv
import os
import shutil
import stat

import pytest
import torch

import train
from utils.cli import run_cli
from utils.data.sample_data import make_sample_dataset
from utils.engine.checkpoint import OutputWriteError, save_checkpoint
from utils.engine import divergence
from utils.engine.divergence import DivergenceWatch

ARGS = ["--img", "64", "--batch", "4", "--workers", "0", "--device", "cpu"]
ENFORCE_FAIL = "[enforce fail at inline_container.cc:626] . unexpected pos 1984 vs 1872"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_sample_dataset(tmp_path_factory.mktemp("data") / "voc", n_train=4, n_val=2, n_test=2, size=(64, 64))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A finished 1-epoch run (tests work on copies of it)."""
    return train.main(["--data", str(data), "--epochs", "1", "--save-dir", str(tmp_path_factory.mktemp("logs")),
                       "--name", "r", *ARGS])


def copy_run(run, tmp_path, name="r"):
    copy = tmp_path / name
    shutil.copytree(run, copy)
    return copy


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        run_cli(train.main, argv)
    assert exc.value.code != 0
    # counted warnings about the data (e.g. anchors that fit 64 px boxes badly) may come first, on lines of their own
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning: ")]
    err = "\n".join(lines)
    assert len(lines) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def epochs_in(folder) -> list[int]:
    with open(folder / "results.csv", newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def test_checkpoints_get_the_usual_file_mode(run):
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("last.pt", "best.pt", "results.csv"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o666 & ~umask, name


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_unwritable_save_dir_is_one_line_and_writes_nothing(data, tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    save_dir = blocker / "logs" if where == "under_a_file" else blocker
    err = one_line_error(capsys, ["--data", str(data), "--epochs", "1", "--save-dir", str(save_dir), *ARGS])
    assert err.startswith(f"error: cannot write {save_dir}") and "Not a directory" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"] and blocker.read_text() == "keep me"


def test_a_full_disk_keeps_the_file_it_would_replace(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)
    before = path.read_bytes()

    def full(obj, f, *a, **kw):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OutputWriteError, match=f"cannot write {path}: No space left on device"):
        save_checkpoint({"epoch": 2}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_failed_checkpoint_write_is_one_line_and_last_pt_survives(run, tmp_path, capsys, monkeypatch):
    copy = copy_run(run, tmp_path)
    before = (copy / "last.pt").read_bytes()
    stale = copy / ".last.pt.k1ll3d.tmp"        # what a write killed half-way leaves
    stale.write_bytes(b"half")
    (copy / ".notes.tmp").write_text("not ours")
    real_save = torch.save

    def enforce_fail(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        raise RuntimeError(ENFORCE_FAIL)

    monkeypatch.setattr(torch, "save", enforce_fail)
    err = one_line_error(capsys, ["--resume", str(copy / "last.pt"), "--epochs", "2"])
    assert err.startswith(f"error: cannot write {copy / 'last.pt'}: ")
    assert "disk full" in err and "unexpected pos" in err
    assert (copy / "last.pt").read_bytes() == before
    assert not stale.exists() and (copy / ".notes.tmp").exists()
    assert not [p for p in copy.iterdir() if p.name.startswith(".last.pt.")]


def test_an_unwritable_results_csv_is_one_line(run, tmp_path, capsys):
    copy = copy_run(run, tmp_path)
    (copy / "results.csv").unlink()
    (copy / "results.csv").mkdir()               # a folder where the file should go: open() refuses, even as root
    err = one_line_error(capsys, ["--resume", str(copy / "last.pt"), "--epochs", "2"])
    assert err.startswith(f"error: cannot write {copy / 'results.csv'}: Is a directory"), err


def test_divergence_watch_needs_several_reads_far_above_the_median():
    watch = DivergenceWatch(factor=10, reads=3)
    assert not any(watch.observe(v) for v in [5.0, 100.0, 1.0])        # the first epoch is the baseline
    watch.judging = True
    assert not any(watch.observe(v) for v in [0.9, 0.8, 40.0, 50.0, 0.7])   # two spikes, then back: noise
    assert not watch.exploding and watch.median == 1.0
    assert [watch.observe(v) for v in [60.0, 1e3, 1e4]] == [False, False, True]
    assert DivergenceWatch().observe(float("nan"))                       # NaN/inf stop at once, even at start


def test_a_non_finite_fp16_loss_also_suggests_bf16(tmp_path):
    """An inf loss under fp16 autocast may be an activation past fp16's range: the message names bf16 too."""
    from types import SimpleNamespace
    from utils.engine.trainer import Trainer
    trainer = SimpleNamespace(hyp={"lr0": 0.01}, args=SimpleNamespace(optimizer="sgd"), watch=DivergenceWatch(),
                              run_dir=tmp_path, ledger=SimpleNamespace(saved_epoch=0), amp=torch.float16)
    assert "--amp-dtype bf16" in str(Trainer._diverged(trainer, float("inf"), 2))
    assert "--amp-dtype bf16" not in str(Trainer._diverged(trainer, 50.0, 2))      # a rising loss is the lr's
    trainer.amp = torch.bfloat16
    assert "--amp-dtype bf16" not in str(Trainer._diverged(trainer, float("inf"), 2))


def test_an_exploding_loss_stops_keeps_the_last_good_epoch_and_resume_takes_lr(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(divergence, "DIVERGE_READS", 1)    # one read per epoch here: stop at the first strike
    err = one_line_error(capsys, ["--data", str(data), "--epochs", "4", "--save-dir", str(tmp_path), "--name", "d",
                                  "--lr", "1e6", "--eval-period", "10", *ARGS])
    last = tmp_path / "d" / "last.pt"
    # the lr warm-up reaches ~1e4 in epoch 2; epoch 3's first loss shows epoch 2's weights exploded
    assert "training diverged in epoch 3" in err and "last.pt keeps epoch 1" in err, err
    assert f"--resume {last} --lr 0.01" in err
    assert torch.load(last, weights_only=True)["epoch"] == 1
    out = train.main(["--resume", str(last), "--lr", "0.001", "--epochs", "2"])
    assert "ignoring" not in capsys.readouterr().out
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["hyp"]["lr0"] == 0.001 and ckpt["train_args"]["lr"] == 0.001
    assert {g["initial_lr"] for g in ckpt["optimizer"]["param_groups"]} == {0.001}
    with open(out / "results.csv", newline="") as f:
        assert float(list(csv.DictReader(f))[-1]["loss"]) < 1.0


def test_resume_after_the_data_moved_into_a_new_save_dir(run, data, tmp_path, capsys):
    old = copy_run(run, tmp_path, "old")
    ckpt = torch.load(old / "last.pt", weights_only=True)
    ckpt["train_args"]["data"] = str(tmp_path / "gone")               # where the data was when it trained
    torch.save(ckpt, old / "last.pt")
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    new_logs = tmp_path / "new"
    out = train.main(["--resume", str(old / "last.pt"), "--epochs", "2", "--data", str(moved),
                      "--workers", "0", "--device", "cpu", "--save-dir", str(new_logs)])
    shown = capsys.readouterr().out
    assert out == (new_logs / "old").resolve() and f"in {out}" in shown and "left as it was" in shown
    assert "ignoring" not in shown
    assert epochs_in(out) == [1, 2] and torch.load(out / "last.pt", weights_only=True)["epoch"] == 2
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before          # the original run is untouched
    assert torch.load(out / "last.pt", weights_only=True)["train_args"]["data"] == str(moved)
    again = one_line_error(capsys, ["--resume", str(old / "last.pt"), "--epochs", "3", "--save-dir", str(new_logs)])
    assert f"--save-dir {new_logs}: {out} already holds files" in again    # never over another run's files


def test_weights_of_another_model_are_refused(data, tmp_path, capsys):
    foreign = tmp_path / "other.pth"
    torch.save({f"encoder.layer{i}.weight": torch.zeros(3, 3) for i in range(5)}, foreign)
    logs = tmp_path / "logs"
    err = one_line_error(capsys, ["--data", str(data), "--epochs", "1", "--save-dir", str(logs), "--weights",
                                  str(foreign), *ARGS])
    assert f"--weights {foreign}: only 0 of the model's" in err and "holds 5 tensors" in err, err
    assert "encoder.layer0.weight" in err and "backbone." in err
    assert not logs.exists()


@pytest.mark.parametrize("text, words", [
    ("lr0: 0.01\nbox: [0.05\n", ["not valid YAML at line"]),
    ("lr0: 0.01\nmomentum: 0.9\n", ["missing lrf, weight_decay", "box", "balance"]),
    ("- just\n- a list\n", ["expected a mapping"]),
])
def test_a_bad_hyp_file_is_one_line_before_any_folder(data, tmp_path, capsys, text, words):
    hyp = tmp_path / "hyp.yaml"
    hyp.write_text(text)
    logs = tmp_path / "logs"
    err = one_line_error(capsys, ["--data", str(data), "--save-dir", str(logs), "--hyp", str(hyp), *ARGS])
    assert f"--hyp {hyp}" in err and all(w in err for w in words), err
    assert not logs.exists()


@pytest.mark.parametrize("flag, value, words", [
    ("--lr", "-1", "greater than 0"), ("--img", "0", "between 32"), ("--nbs", "0", "at least 1"),
    ("--mosaic", "2", "between 0.0 and 1.0"), ("--label-smoothing", "5", "0.5"), ("--freeze-epochs", "99", "--epochs"),
    ("--batch", "0", "at least 1"), ("--epochs", "0", "at least 1"), ("--workers", "-1", "at least 0"),
    ("--eval-period", "0", "at least 1"), ("--save-period", "-1", "at least 0"),
    ("--special-aug-ratio", "2", "between 0.0 and 1.0"), ("--mixup", "-1", "between 0.0 and 1.0"),
    ("--seed", "-1", "between 0"), ("--freeze-batch", "0", "at least 1"), ("--freeze-lr", "0", "greater than 0"),
    ("--freeze-batch", "8", "needs --freeze-epochs"), ("--freeze-lr", "0.1", "needs --freeze-epochs"),
])
def test_numeric_flags_out_of_range_are_one_line_before_any_folder(data, tmp_path, capsys, flag, value, words):
    argv = ["--data", str(data), "--save-dir", str(tmp_path / "logs"), "--epochs", "5", *ARGS, flag, value]
    err = one_line_error(capsys, argv)
    assert f"{flag} {value}" in err and words in err, err
    assert not (tmp_path / "logs").exists()
