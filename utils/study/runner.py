"""The study from start to table: check everything, train the pending runs packed onto the devices, evaluate
every best.pt on the test split, and compute the statistics.

Every check happens before the study folder is made: the variants' train flags (each resolved as train.py
would), the seeds, the devices, and that neither the validation split (which chooses best.pt) nor the
training split is the test split.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nets.attention import load_plugin
from utils.config import RUN_PARTS, DataConfig, StudyConfig, TrainConfig, parse_train_flags
from utils.settings import add_flags
from utils.data.dataset import default_fallback
from utils.data.formats import DataSource, open_data
from utils.engine.folders import prepare_out, write_text
from utils.engine.run import resolve_run
from utils.log import get_logger
from utils.study.measure import evaluate_run, latency
from utils.study.mps import MPS, check_mode
from utils.study.plan import (PLAN_FILE, RunSpec, Variant, build_variants, check_plan, check_train_flags,
                              parse_seeds, plan_dict, runs_of)
from utils.study.report import VariantResult, plot, row, write_tables
from utils.study.runs import (RunState, error_line, evaluation_command, last_epoch, read_state, record,
                              train_command)
from utils.study.scheduler import Job, Outcome, auto_jobs, run_jobs
from utils.study.stats import RunMaps, deltas_of_maps

log = get_logger(__name__)
LEVEL = 0.95
INTERRUPTED_CODES = (130, -2)     # train.py after Ctrl-C / killed by SIGINT: resumed next time, not failed


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are one-line ValueErrors (the CLI prints `error: ...`, not a usage block)."""

    def error(self, message: str) -> None:
        raise ValueError(message)


@dataclass
class Plan:
    """A checked study: where, what, on which devices."""

    settings: StudyConfig
    folder: Path
    variants: list[Variant]
    seeds: list[int]
    train_flags: list[str]
    runs: list[RunSpec]
    devices: list[str | None]
    device_flag: str
    epochs: int
    train_settings: dict
    source: DataSource
    validation: str
    plugins: dict[str, list[str]]     # variant name -> its --plugin files (shared and its own)


def _split_images(source: DataSource, split: str) -> set[str]:
    """The image files of a split (as train.py would load it, fallback included)."""
    records, _ = source.load(split, fallback=default_fallback(split))
    return {str(Path(r.image_path).resolve()) for r in records}


def check_splits(source: DataSource, data: DataConfig, test_split: str) -> str:
    """The validation source (never the test split, never falling back to it) and a training split apart from test."""
    if not source.has_split(test_split):
        raise ValueError(f"--test-split {test_split}: {source.split_place} defines no {test_split} split; the "
                         "study's table needs a test split the runs never see")
    test = _split_images(source, test_split)
    overlap = _split_images(source, data.train_split) & test
    if overlap:
        raise ValueError(f"the training split {data.train_split} shares {len(overlap)} images with --test-split "
                         f"{test_split} (e.g. {Path(sorted(overlap)[0]).name}); train on a split without test images")
    val = data.val_split or ("val" if source.has_split("val") else None)
    if val is None:
        return f"{data.val_fraction * 100:g}% of {data.train_split} (held out)"
    if val == test_split or not source.has_split(val):
        why = "is the test split" if val == test_split else f"does not exist (train.py would fall back to " \
                                                            f"{default_fallback(val) or 'nothing'})"
        raise ValueError(f"--val-split {val}: {why}; best.pt must be chosen on images apart from the test split: "
                         "name another split or leave --val-split out to hold out a share of the training split")
    overlap = _split_images(source, val) & test
    if overlap:
        raise ValueError(f"--val-split {val} shares {len(overlap)} images with --test-split {test_split}; "
                         "best.pt would be chosen on test images")
    return val


def _devices(settings: StudyConfig) -> tuple[list[str | None], str]:
    """(CUDA_VISIBLE_DEVICES per slot or [None], the --device each run gets)."""
    text = (settings.devices or "").strip().lower()
    if text == "cpu" or (not text and not torch.cuda.is_available()):
        return [None], "cpu"
    if not torch.cuda.is_available():
        raise ValueError(f"--devices {settings.devices}: CUDA is not available here; use --devices cpu")
    count = torch.cuda.device_count()
    ids = [s.strip() for s in text.split(",")] if text else [str(i) for i in range(count)]
    bad = [i for i in ids if not i.isdigit() or int(i) >= count]
    if bad or len(set(ids)) != len(ids):
        raise ValueError(f"--devices {settings.devices}: expected distinct GPU indices below {count}, or cpu")
    # indices count the GPUs this process sees; a run must be pinned by the name its parent sees them by
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return ([visible[int(i)] for i in ids] if len(visible) >= count else ids), "cuda"


def plan_study(settings: StudyConfig, train_args: list[str]) -> Plan:
    """Every check, nothing written (the sample data set may be generated, as train.py does)."""
    check_train_flags(train_args)
    parser = OneLineParser(prog="study.py (train flags)", allow_abbrev=False)
    add_flags(parser, *RUN_PARTS)
    given = parse_train_flags(train_args, parser)
    variants = build_variants(settings.phi, settings.model, settings.backbone, settings.attention, settings.variant)
    seeds = parse_seeds(settings.seeds)
    if settings.baseline is not None and settings.baseline not in {v.name for v in variants}:
        raise ValueError(f"--baseline {settings.baseline}: not a variant; the variants are "
                         f"{', '.join(v.name for v in variants)}")
    for plugin in given.get("plugin", []):
        load_plugin(plugin)
    epochs, plugins = TrainConfig().epochs, {}
    for v in variants:
        flags = parse_train_flags([*train_args, *v.flags], parser)
        config = resolve_run(flags).config      # ranges, block names, options: as train.py checks them
        epochs = config.train.epochs
        plugins[v.name] = list(flags.get("plugin", []))
    check_mode(settings.mps, torch.cuda.is_available() and settings.devices != "cpu")
    data = DataConfig(**{k: v for k, v in given.items() if k in DataConfig.__dataclass_fields__})
    source = open_data(data.data)
    validation = check_splits(source, data, settings.test_split)
    devices, device_flag = _devices(settings)
    folder = Path(settings.save_dir) / settings.name
    plan = Plan(settings, folder, variants, seeds, list(train_args), runs_of(variants, seeds, folder), devices,
                device_flag, epochs, given, source, validation, plugins)
    check_plan(folder, _plan_dict(plan))
    return plan


def _plan_dict(plan: Plan) -> dict:
    return plan_dict(plan.variants, plan.seeds, plan.train_flags, plan.train_settings)


def _jobs(plan: Plan, train_script: Path) -> tuple[list[Job], dict[str, RunSpec]]:
    """Jobs for the runs still to do: fresh or resumed, each followed by its test evaluation; finished ones (also
    those whose outcome was lost) skipped."""
    jobs, by_key = [], {}
    for run in plan.runs:
        state = read_state(run.folder)
        if state.status == "interrupted" and (run.folder / "best.pt").is_file() \
                and last_epoch(run.folder) >= plan.epochs:
            record(run.folder, RunState("done", state.seconds, None, state.attempts))   # trained; outcome was lost
            continue
        if state.status == "done" or (state.status == "failed" and not plan.settings.retry_failed):
            continue
        plugins = plan.plugins[run.variant.name]
        argv = train_command(run, sys.executable, train_script, plan.train_flags, plan.device_flag,
                             resume=state.status == "interrupted", epochs=plan.epochs, plugins=plugins)
        evaluation = Job(f"{run.key} test", evaluation_command(
            sys.executable, run.folder / "best.pt", str(plan.source.path), plan.settings.test_split,
            plan.device_flag, plan.settings.bootstrap, plugins), run.folder / "test_stdout.log",
            run.folder / "test_stderr.log")
        jobs.append(Job(run.key, argv, run.folder / "stdout.log", run.folder / "stderr.log", then=evaluation))
        by_key[run.key] = run
    return jobs, by_key


def train_all(plan: Plan, train_script: Path, jobs_per_device: int | None = None) -> dict:
    """Run the pending runs; returns how they were packed."""
    jobs, by_key = _jobs(plan, train_script)
    per_device = jobs_per_device or plan.settings.jobs or auto_jobs(plan.devices, len(jobs))
    packing = {"jobs_per_device": per_device, "devices": [d or "cpu" for d in plan.devices], "mps": False}
    if not jobs:
        log.info("every run of the study is finished or recorded as failed")
        return packing
    done = [0]

    def on_start(job: Job, device: str | None) -> None:
        how = "evaluate" if job.key not in by_key else "resume" if "--resume" in job.argv else "start"
        log.info("%s %s on %s", how, job.key, f"GPU {device}" if device is not None else "cpu")

    def on_done(job: Job, outcome: Outcome) -> None:
        if job.key not in by_key:       # a test evaluation: what failed here, the study computes in its own process
            if outcome.returncode != 0:
                stderr = job.stderr.read_text(errors="replace") if job.stderr.is_file() else ""
                log.warning("%s: %s; the study evaluates it itself", job.key,
                            error_line(stderr, outcome.returncode, "the evaluation"))
            return
        run = by_key[job.key]
        before = read_state(run.folder)
        seconds, attempts = before.seconds + outcome.seconds, before.attempts + 1
        done[0] += 1
        if outcome.returncode == 0 and (run.folder / "best.pt").is_file():
            record(run.folder, RunState("done", seconds, None, attempts))
            log.info("[%d/%d] done %s in %.1f s", done[0], len(jobs), job.key, outcome.seconds)
        elif outcome.returncode in INTERRUPTED_CODES:
            record(run.folder, RunState("interrupted", seconds, None, attempts))
        else:
            stderr = job.stderr.read_text(errors="replace") if job.stderr.is_file() else ""
            error = error_line(stderr, outcome.returncode) if outcome.returncode else "train.py wrote no best.pt"
            record(run.folder, RunState("failed", seconds, error, attempts))
            log.warning("[%d/%d] failed %s: %s", done[0], len(jobs), job.key, error)

    log.info("%d runs to train, %d at once on each of %s", len(jobs), per_device, ", ".join(packing["devices"]))
    with MPS(plan.folder, plan.settings.mps, plan.device_flag == "cuda", per_device) as mps:
        packing["mps"] = bool(mps.env)
        run_jobs(jobs, plan.devices, per_device, on_done, env=mps.env, on_start=on_start)
    return packing


def analyse(plan: Plan) -> tuple[list[VariantResult], dict]:
    """Test-split mAP of every finished run (as its evaluation process left it, else computed here), cost and
    latency per variant, paired deltas."""
    results = {v.name: VariantResult(v) for v in plan.variants}
    maps: dict[str, dict[int, RunMaps]] = {v.name: {} for v in plan.variants}
    records, class_names = None, None
    device = "cuda" if plan.device_flag == "cuda" else "cpu"
    seconds = {"test_evaluation": 0.0, "latency": 0.0}
    for run in plan.runs:
        state = read_state(run.folder)
        result = results[run.variant.name]
        if state.status == "failed":
            result.failed[run.seed] = state.error or "failed"
            continue
        if state.status != "done":
            continue
        best = run.folder / "best.pt"
        names = torch.load(best, map_location="cpu", weights_only=True)["config"]["class_names"]
        if records is None:
            class_names = names
            records, _ = plan.source.load(plan.settings.test_split, class_names)
        elif names != class_names:
            raise ValueError(f"{best}: classes {names} differ from the study's {class_names}; every run must train "
                             "on the same data")
        start = time.perf_counter()
        evaluation = evaluate_run(best, records, class_names, device, plan.settings.bootstrap)
        seconds["test_evaluation"] += time.perf_counter() - start
        maps[run.variant.name][run.seed] = (np.array([evaluation.map50, evaluation.map50_95]), evaluation.resampled)
        result.per_seed[run.seed] = {"map50": evaluation.map50, "map50_95": evaluation.map50_95,
                                     "seconds": state.seconds}
        if result.cost is None:
            result.cost = evaluation.cost
            start = time.perf_counter()
            result.latency = latency(best, records[0].image_path, device)
            seconds["latency"] += time.perf_counter() - start
    log.info("analysis: test evaluation %.1f s (what the runs' own processes left undone), latency %.1f s",
             *seconds.values())
    baseline = plan.settings.baseline or plan.variants[0].name
    for name, result in results.items():
        if name != baseline:
            result.delta = deltas_of_maps(maps[baseline], maps[name], LEVEL)
    n_images = len(records or [])
    lat = next((r.latency for r in results.values() if r.latency), {}) or {}
    header = {"study": plan.settings.name, "test_split": plan.settings.test_split, "test_images": n_images,
              "validation": plan.validation, "seeds": plan.seeds, "train_flags": plan.train_flags,
              "resamples": plan.settings.bootstrap, "level": LEVEL, "latency_device": lat.get("device", "-"),
              "latency_precision": lat.get("precision", "-"),
              "analysis_seconds": {k: round(v, 1) for k, v in seconds.items()}}
    return list(results.values()), header


def run_study(plan: Plan, train_script: Path) -> tuple[str, Path]:
    """Make the folder, train, evaluate, write study.md/csv/json and study.png; returns (markdown, folder)."""
    prepare_out(plan.folder)
    old = json.loads((plan.folder / PLAN_FILE).read_text()) if (plan.folder / PLAN_FILE).is_file() else {}
    merged = _plan_dict(plan)
    merged["variants"] = {**old.get("variants", {}), **merged["variants"]}
    merged["seeds"] = sorted(set(old.get("seeds", [])) | set(plan.seeds))
    write_text(plan.folder / PLAN_FILE, json.dumps(merged, indent=1))
    start = time.perf_counter()
    packing = train_all(plan, train_script)
    runs_seconds = time.perf_counter() - start      # training and each run's test evaluation
    results, header = analyse(plan)
    packing_text = f"{packing['jobs_per_device']} at once per device on {', '.join(packing['devices'])}" + \
                   (", CUDA MPS" if packing["mps"] else "")
    header.update(concurrency=packing_text, packing=packing, runs_wall_seconds=round(runs_seconds, 1))
    baseline = plan.settings.baseline or plan.variants[0].name
    rows = [row(r) for r in results]
    failures = [(f"{r.variant.name}_s{s}", e) for r in results for s, e in sorted(r.failed.items())]
    per_run = [{"run": f"{r.variant.name}_s{s}", "seed": s, **v} for r in results for s, v in sorted(r.per_seed.items())]
    text = write_tables(plan.folder, rows, baseline, header, failures, per_run)
    if any(r["seeds_done"] for r in rows):
        plot(plan.folder, rows, baseline)
    return text, plan.folder
