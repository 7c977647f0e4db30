"""One study run's test evaluation, in a process of its own (study.py queues it after the run's training).

  python -m utils.tools.study_eval --best RUN/best.pt --data DATA --split test --device cuda --resamples 1000

Writes the run's test_detections.npz and test_eval.json beside best.pt (utils.study.measure.evaluate_run), which
the study then reads instead of evaluating the run itself.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nets.attention import load_plugin
from utils.cli import run_cli
from utils.data.formats import open_data
from utils.study.measure import evaluate_run


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
    for plugin in args.plugin:
        load_plugin(plugin)
    class_names = torch.load(args.best, map_location="cpu", weights_only=True)["config"]["class_names"]
    records, _ = open_data(args.data).load(args.split, class_names)
    evaluate_run(args.best, records, class_names, args.device, args.resamples)


if __name__ == "__main__":
    run_cli(main)
