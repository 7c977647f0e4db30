"""study.py end to end on tiny data (2 variants x 2 seeds), its resume and failure handling, flag errors, and
the scheduler's packing over (fake) devices."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import study
from utils.cli import run_cli
from utils.data.sample_data import make_sample_dataset
from utils.study.plan import PLAN_FILE, RunSpec, build_variants, check_plan, parse_seeds, plan_dict
from utils.data.formats import open_data
from utils.study import runner
from utils.study.measure import _test_set_digest
from utils.study.runs import error_line, evaluation_command, train_command
from utils.study.scheduler import Job, auto_jobs, run_jobs

# A block that trains normally except in the run seeded 1, where its training forward raises: an injected
# failure. (Eval-mode forwards pass: the study's own cost and latency measurements run them in this process.)
FLAKY = textwrap.dedent('''
    import torch
    from torch import nn
    from nets.attention import register_attention

    @register_attention("flaky")
    class Flaky(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.gate = nn.Parameter(torch.ones(channels))

        def forward(self, x):
            if self.training and torch.initial_seed() == 1:
                raise ValueError("flaky block: injected failure")
            return x * self.gate.view(1, -1, 1, 1)
''')
TRAIN = ["--epochs", "1", "--img", "64", "--batch", "4", "--workers", "0", "--eval-period", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_sample_dataset(tmp_path_factory.mktemp("data") / "voc", n_train=8, n_val=4, n_test=6, size=(64, 64))


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "flaky.py"
    path.write_text(FLAKY)
    return path


def study_args(data, plugin, logs):
    return ["--data", str(data), "--phi", "0", "--variant", "flaky=--attention upsample=flaky", "--seeds", "2",
            "--save-dir", str(logs), "--name", "s", "--jobs", "2", "--devices", "cpu", "--bootstrap", "50",
            "--plugin", str(plugin), *TRAIN]


def test_study_tables_resume_and_failure(data, plugin, tmp_path, capsys, caplog, monkeypatch):
    folder = study.main(study_args(data, plugin, tmp_path))
    for name in ("study.md", "study.csv", "study.json", "study.png", "plan.json"):
        assert (folder / name).stat().st_size > 0
    table = json.loads((folder / "study.json").read_text())
    rows = {r["variant"]: r for r in table["variants"]}
    assert rows["none"]["seeds_done"] == 2 and rows["flaky"]["seeds_done"] == 1 and rows["flaky"]["seeds_failed"] == 1
    assert table["failed"] == [{"run": "flaky_s1", "error": "flaky block: injected failure"}]
    assert "flaky_s1`: flaky block: injected failure" in (folder / "study.md").read_text()
    assert table["validation"] == "val" and table["test_images"] == 6
    # the table holds the test-split mAP of each best.pt, mean over seeds; the delta pairs seed 0 only
    runs = {r["run"]: r for r in table["runs"]}
    mean = (runs["none_s0"]["map50_95"] + runs["none_s1"]["map50_95"]) / 2
    assert rows["none"]["map50_95_mean"] == pytest.approx(mean)
    assert rows["flaky"]["delta_map50_95"] == pytest.approx(runs["flaky_s0"]["map50_95"] - runs["none_s0"]["map50_95"])
    assert rows["flaky"]["parameters"] - rows["none"]["parameters"] == 128      # the gate at upsample (128 ch)
    assert rows["none"]["latency_ms"] > 0 and rows["none"]["gflops"] >= rows["none"]["gflops_matmul"] > 0
    with open(folder / "study.csv", newline="") as f:
        assert [r["variant"] for r in csv.DictReader(f)] == ["none", "flaky"]
    # each trained run was evaluated on test by its own follow-up process, whose results the table shows
    for key in ("none_s0", "none_s1", "flaky_s0"):
        saved = json.loads((folder / key / "test_eval.json").read_text())
        assert saved["map50_95"] == runs[key]["map50_95"] and len(saved["resampled"]) == 50
    assert not (folder / "flaky_s1" / "test_eval.json").exists()

    # interrupted in its first epoch: a last.pt at epoch 0 and no recorded outcome -> resumed, the rest untouched
    run = folder / "none_s1"
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    ckpt["epoch"] = 0
    torch.save(ckpt, run / "last.pt")
    for name in ("study_run.json", "test_detections.npz", "test_eval.json"):
        (run / name).unlink()
    untouched = (folder / "none_s0" / "stdout.log").stat().st_mtime_ns
    # and its test evaluation process fails: the study evaluates the run itself, with a warning
    failing = [sys.executable, "-c", "import sys; sys.exit('error: evaluation broke')"]
    monkeypatch.setattr(runner, "evaluation_command", lambda *args: failing)
    capsys.readouterr()
    study.main(study_args(data, plugin, tmp_path))
    out = capsys.readouterr().out
    assert "resume none_s1" in out
    assert not [line for line in out.split("# Study")[0].splitlines() if line.startswith("start ")]
    assert "none_s1 test: evaluation broke; the study evaluates it itself" in caplog.text
    assert json.loads((run / "test_eval.json").read_text())["map50_95"] == \
        {r["run"]: r for r in json.loads((folder / "study.json").read_text())["runs"]}["none_s1"]["map50_95"]
    state = json.loads((run / "study_run.json").read_text())
    assert state["status"] == "done"
    with open(run / "results.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1]      # epoch 1 trained again, once
    assert (folder / "none_s0" / "stdout.log").stat().st_mtime_ns == untouched
    assert json.loads((folder / "study.json").read_text())["failed"][0]["run"] == "flaky_s1"


@pytest.mark.parametrize("extra, message", [
    (["--seed", "3"], "--seed: set by the study"),
    (["--val-split", "test"], "--val-split test: is the test split"),
    (["--test-split", "nosuch"], "--test-split nosuch"),
    (["--phi", "0,nosuch"], "nosuch"),
    (["--img", "100"], "--img 100"),
    (["--baseline", "ca"], "--baseline ca: not a variant"),
    (["--epoch", "3"], "unrecognized arguments"),
    (["--seeds", "0,0"], "--seeds"),
])
def test_bad_study_flags_are_one_line_errors_before_any_folder(data, tmp_path, capsys, extra, message):
    args = ["--data", str(data), "--phi", "0,1", "--save-dir", str(tmp_path / "logs"), "--devices", "cpu", *extra]
    with pytest.raises(SystemExit) as exc:
        run_cli(study.main, args)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error:") and "\n" not in err and message in err
    assert not (tmp_path / "logs").exists()


def test_variants_cross_axes_and_name_themselves():
    names = [v.name for v in build_variants(phi="0,ca", models="yolov4-tiny,yolov5n")]
    assert names == ["none-yolov4-tiny", "none-yolov5n", "ca-yolov4-tiny", "ca-yolov5n"]
    one_model = build_variants(phi="0,4", models="yolov5n")
    assert [v.name for v in one_model] == ["none", "ca"] and one_model[1].flags == ("--phi", "4", "--model", "yolov5n")
    spec = build_variants(attention=["feat1=ca,feat2=cbam:reduction=8"])[0]
    assert spec.flags == ("--attention", "feat1=ca,feat2=cbam:reduction=8") and "/" not in spec.name
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("4,7") == [4, 7]
    with pytest.raises(ValueError, match="given twice"):
        build_variants(phi="0,none")


def test_a_study_folder_resumes_only_the_same_study(tmp_path):
    variants = build_variants(phi="0,4")
    plan = plan_dict(variants, [0, 1], ["--epochs", "3", "--img", "64"], {"epochs": 3, "input_shape": [64, 64]})
    (tmp_path / PLAN_FILE).write_text(json.dumps(plan))
    check_plan(tmp_path, plan_dict(variants, [0, 1, 2], ["--img", "64", "--epochs", "3"],     # order, more seeds: ok
                                   {"input_shape": [64, 64], "epochs": 3}))
    check_plan(tmp_path, plan_dict(build_variants(phi="0,4,se"), [0], [], plan["train_settings"]))  # a new variant
    with pytest.raises(ValueError, match="holds a study with other settings"):
        check_plan(tmp_path, plan_dict(variants, [0, 1], ["--epochs", "4"], {"epochs": 4, "input_shape": [64, 64]}))
    with pytest.raises(ValueError, match="variant ca was"):
        check_plan(tmp_path, plan_dict(build_variants(named=["ca=--phi 4 --lr 0.1"]), [0], [], plan["train_settings"]))


def test_a_cached_test_evaluation_is_tied_to_the_test_labels(data):
    # test_eval.json's key: a label fixed in the test split (or an image added) makes the study evaluate again
    records, _ = open_data(str(data)).load("test")
    before = _test_set_digest(records)
    assert _test_set_digest(open_data(str(data)).load("test")[0]) == before
    records[0].boxes = records[0].boxes + 1
    assert _test_set_digest(records) != before
    assert _test_set_digest(records[1:]) not in (before, _test_set_digest(records))


def test_run_commands_carry_the_runs_plugins_and_find_this_repository(tmp_path):
    run = RunSpec(build_variants(phi="0")[0], 0, tmp_path / "none_s0")
    resume = train_command(run, sys.executable, Path("train.py"), [], "cpu", True, 3, ["my_blocks.py"])
    assert resume[-2:] == ["--plugin", "my_blocks.py"]        # a resume must be given its plugins again
    # started where a folder named utils shadows the project's package, the evaluation still finds its tool
    (tmp_path / "utils").mkdir()
    (tmp_path / "utils" / "__init__.py").write_text("")
    argv = evaluation_command(sys.executable, tmp_path / "best.pt", "data", "test", "cpu", 10, ["p.py"])
    done = subprocess.run([*argv, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "study run's test evaluation" in done.stdout, done.stderr


def test_error_line_takes_the_last_error_or_the_traceback_end():
    assert error_line("note\nerror: first\nerror: --lr 5: too high\n", 2) == "--lr 5: too high"
    traceback = "Traceback (most recent call last):\n  File \"x.py\", line 1\n    boom()\ntorch.OutOfMemoryError: CUDA out of memory"
    assert error_line(traceback, 1) == "torch.OutOfMemoryError: CUDA out of memory"
    assert error_line("", -9).startswith("killed by SIGKILL")


def test_scheduler_spreads_over_fake_devices_within_the_limit(tmp_path):
    # 6 jobs over two fake GPUs, 2 at once on each: every job sees one device, the first four are spread
    # 2 + 2, and no device ever runs more than 2 at the same moment
    code = ("import os, sys, time; t = time.time(); time.sleep(0.4); "
            "print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['OMP_NUM_THREADS'], t, time.time())")
    jobs = [Job(f"j{i}", [sys.executable, "-c", code], tmp_path / f"j{i}.out", tmp_path / f"j{i}.err")
            for i in range(6)]
    finished = []
    outcomes = run_jobs(jobs, ["0", "1"], 2, lambda job, outcome: finished.append(outcome.key), poll_s=0.02)
    assert sorted(finished) == [f"j{i}" for i in range(6)] and all(o.returncode == 0 for o in outcomes)
    spans, first = {"0": [], "1": []}, []
    for i in range(6):
        device, threads, start, end = (tmp_path / f"j{i}.out").read_text().split()
        spans[device].append((float(start), float(end)))
        first += [device] if i < 4 else []
        assert int(threads) >= 1
    assert sorted(first) == ["0", "0", "1", "1"] and len(spans["0"]) + len(spans["1"]) == 6
    for device, intervals in spans.items():
        for start, _ in intervals:
            assert sum(s <= start < e for s, e in intervals) <= 2


def test_a_follow_up_job_runs_only_after_its_job_succeeds(tmp_path):
    def job(key, code, then=None):
        return Job(key, [sys.executable, "-c", code], tmp_path / f"{key}.out", tmp_path / f"{key}.err", then=then)

    jobs = [job("ok", "pass", then=job("ok then", "print('followed')")),
            job("bad", "raise SystemExit(3)", then=job("bad then", "pass"))]
    order = []
    run_jobs(jobs, [None], 1, lambda j, o: order.append((j.key, o.returncode)), poll_s=0.02)
    assert order == [("ok", 0), ("ok then", 0), ("bad", 3)]      # a follow-up goes before the queued jobs
    assert (tmp_path / "ok then.out").read_text() == "followed\n"


def test_a_failing_job_does_not_stop_the_others(tmp_path):
    jobs = [Job("bad", [sys.executable, "-c", "import sys; print('error: nope', file=sys.stderr); sys.exit(2)"],
                tmp_path / "b.out", tmp_path / "b.err"),
            Job("good", [sys.executable, "-c", "pass"], tmp_path / "g.out", tmp_path / "g.err")]
    outcomes = {o.key: o for o in run_jobs(jobs, [None], 1, lambda j, o: None, poll_s=0.02)}
    assert outcomes["bad"].returncode == 2 and outcomes["good"].returncode == 0
    assert error_line((tmp_path / "b.err").read_text(), 2) == "nope"


def test_auto_jobs_by_memory_cores_and_runs():
    assert auto_jobs([None], 15) == 1
    # 139 GiB free holds 34 runs of 4 GiB; 16 cores; 15 runs -> 15 at once
    assert auto_jobs(["0"], 15, cpus=16, free_gib={"0": 139.0}) == 15
    assert auto_jobs(["0", "1"], 15, cpus=16, free_gib={"0": 139.0, "1": 20.0}) == 5   # the fuller GPU decides
    assert auto_jobs(["0"], 15, cpus=4, free_gib={"0": 139.0}) == 4
    assert auto_jobs(["0"], 3, cpus=16, free_gib={"0": 2.0}) == 1
    assert auto_jobs(["GPU-3f2a"], 15, cpus=16, free_gib={"0": 139.0}) == 1       # memory unknown: one at a time
