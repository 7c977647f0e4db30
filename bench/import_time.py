"""What start-up spends on imports: wall time of each command and `python -X importtime` self time per package.

  python bench/import_time.py [--repeats 3]

Commands: `train.py --help`, the imports of a training run (what train.py loads after parsing its flags),
and `predict.py --help`. The first repeat on a fresh machine includes a cold file cache; all are printed.
"""
from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "train.py --help": ["train.py", "--help"],
    "a training run's imports": ["-c", "import train, nets.backbones, utils.engine.run, utils.engine.torch_utils"],
    "predict.py --help": ["predict.py", "--help"],
}


def per_package(log: str) -> collections.Counter:
    """Self microseconds per top-level package from an importtime log."""
    totals: collections.Counter = collections.Counter()
    for line in log.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = line.split(":", 1)[1].split("|")
        totals[name.strip().split(".")[0]] += int(self_us)
    return totals


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    for label, argv in COMMANDS.items():
        walls, packages = [], collections.Counter()
        for _ in range(args.repeats):
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=ROOT, capture_output=True,
                                  text=True, check=True)
            walls.append(time.perf_counter() - start)
            packages = per_package(done.stderr)        # the last repeat's (warm file cache)
        top = ", ".join(f"{k} {v / 1e6:.2f}" for k, v in packages.most_common(8))
        print(f"{label}: wall {' / '.join(f'{w:.2f}' for w in walls)} s; imports {sum(packages.values()) / 1e6:.2f} s "
              f"({top})")


if __name__ == "__main__":
    main()
