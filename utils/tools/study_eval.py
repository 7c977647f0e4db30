"""One study run's test evaluation, in a process of its own (study.py queues it after the run's training).

  python -m utils.tools.study_eval --best RUN/best.pt --data DATA --split test --device cuda --resamples 1000

Writes the run's test_detections.npz and test_eval.json beside best.pt (utils.study.measure.evaluate_run), which
the study then reads instead of evaluating the run itself.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from nets.attention import load_plugin
from utils.cli import run_cli
from utils.data.formats import open_data
from utils.log import get_logger
from utils.study.measure import evaluate_run

log = get_logger(__name__)


def main(argv: list[str] | None = None) -> None:
    """The argv that utils.study.runs.evaluation_command builds."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--best", type=Path, required=True, help="the run's best.pt")
    parser.add_argument("--data", required=True, help="the study's --data")
    parser.add_argument("--split", required=True, help="the study's --test-split")
    parser.add_argument("--device", required=True, help="cuda or cpu")
    parser.add_argument("--resamples", type=int, required=True, help="the study's --bootstrap")
    parser.add_argument("--plugin", action="append", default=[], help="the study's --plugin files")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    for plugin in args.plugin:
        load_plugin(plugin)
    class_names = torch.load(args.best, map_location="cpu", weights_only=True)["config"]["class_names"]
    records, _ = open_data(args.data).load(args.split, class_names)
    loaded = time.perf_counter()
    evaluation = evaluate_run(args.best, records, class_names, args.device, args.resamples)
    log.info("%s on %d %s images: mAP50 %.4f, mAP50-95 %.4f; %.1f s after the imports (%.1f s loading the split, "
             "%.1f s evaluating)", args.best, len(records), args.split, evaluation.map50, evaluation.map50_95,
             time.perf_counter() - start, loaded - start, time.perf_counter() - loaded)


if __name__ == "__main__":
    run_cli(main)
