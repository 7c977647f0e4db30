"""The attention study: every variant x seeds as ordinary training runs, then an honest table on the test split.

  python study.py --data VOCdevkit/BCCD --phi 0,1,2,3,4 --seeds 3 --epochs 100 --img 416 --batch 64 --cache gpu
  python study.py --data DIR --attention feat1=ca --attention feat1=ca,feat2=cbam --seeds 5
  python study.py --data DIR --model yolov4-tiny,yolov5n --phi 0,ca         # axes are crossed: 4 variants
  python study.py --data DIR --phi 0 --variant 'ca_lr2=--phi ca --lr 0.02'  # any train flags as a variant

Flags not listed below are train.py flags, shared by every run. Runs go to <save-dir>/<name>/<variant>_s<seed>/;
the same command again resumes: finished runs are skipped, interrupted ones resumed, failed ones reported
(--retry-failed runs them again). Writes study.md, study.csv, study.json and study.png in the study folder.
"""
from __future__ import annotations

import argparse
import signal
from pathlib import Path

from utils.cli import run_cli
from utils.config import StudyConfig
from utils.settings import add_flags, check_ranges, from_flat
from utils.study.runner import OneLineParser, plan_study, run_study

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"


def parse_args(argv: list[str] | None) -> tuple[StudyConfig, list[str]]:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                     epilog="every other flag is passed to train.py (python train.py --help lists them)")
    add_flags(parser, StudyConfig)
    known, train_args = parser.parse_known_args(argv)
    settings = from_flat(StudyConfig, vars(known))
    check_ranges(settings)
    return settings, train_args


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt     # the runs are stopped as by Ctrl-C and MPS is shut down


def main(argv: list[str] | None = None) -> Path:
    settings, train_args = parse_args(argv)
    plan = plan_study(settings, train_args)
    print(f"study {plan.folder}: {len(plan.variants)} variants ({', '.join(v.name for v in plan.variants)}) x "
          f"{len(plan.seeds)} seeds, validation on {plan.validation}, table on the {settings.test_split} split")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        text, folder = run_study(plan, TRAIN_SCRIPT)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(text)
    print(f"done: {folder}/study.md, study.csv, study.json, study.png")
    return folder


if __name__ == "__main__":
    run_cli(main)
