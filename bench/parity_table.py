"""Ours against the peer, each judged by both evaluators: the table of bench/parity.sh.

Reads the run folders that bench/accuracy_ab.sh (ours: LOGS/VARIANT/sSEED) and bench/peer_seeds.sh (the peer:
RUNS/MODEL_sSEED) leave, each with `peer_eval.json` (ultralytics' val.py on that best.pt) and our get_map.py's
`summary.json` (`map_new/` for ours, `map_ours/` for the peer's; with `--margin 0.5` `map_margin/` and
`map_ours_margin/`), and prints, per model and evaluator, the mean
+- sample sd over seeds, the per-seed values and ours minus the peer's.

usage: python3 bench/parity_table.py --ours /tmp/parity/ours --peer /tmp/parity/peer --models yolov5n yolov5s
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

OUR_VARIANT = {"yolov5n": "v5n-new", "yolov5s": "v5s"}     # accuracy_ab.sh's name for the default recipe
# evaluator -> the file it leaves in (our run folder, the peer's run folder)
EVALUATORS = {
    "our get_map.py": ("map_new/summary.json", "map_ours/summary.json"),
    "our get_map.py --margin 0.5": ("map_margin/summary.json", "map_ours_margin/summary.json"),
    "peer's val.py": ("peer_eval.json", "peer_eval.json"),
}


def scores(runs: list[Path], name: str) -> dict[str, list[float]]:
    """map50 and map50_95 of every run folder that has this file, in seed order."""
    found = [json.loads((run / name).read_text()) for run in runs if (run / name).is_file()]
    return {key: [float(s[key]) for s in found] for key in ("map50", "map50_95")}


def stat(values: list[float]) -> str:
    if not values:
        return "n/a"
    sd = f"{statistics.stdev(values):.3f}" if len(values) > 1 else "n/a"
    seeds = " / ".join(f"{v:.3f}" for v in values)
    return f"{statistics.mean(values):.3f} +- {sd} ({seeds})"


def delta(ours: list[float], peer: list[float]) -> str:
    if not ours or not peer:
        return "n/a"
    return f"{statistics.mean(ours) - statistics.mean(peer):+.3f}"


def table(ours_dir: Path, peer_dir: Path, models: list[str]) -> str:
    lines = ["| model | evaluator | n ours / peer | ours mAP50 | peer mAP50 | ours - peer | ours mAP50-95 | "
             "peer mAP50-95 | ours - peer |", "|---|---|---|---|---|---|---|---|---|"]
    for model in models:
        our_runs = sorted((ours_dir / OUR_VARIANT[model]).glob("s*"))
        peer_runs = sorted(peer_dir.glob(f"{model}_s*[0-9]"))
        for evaluator, (our_file, peer_file) in EVALUATORS.items():
            a, b = scores(our_runs, our_file), scores(peer_runs, peer_file)
            if not a["map50"] and not b["map50"]:
                continue                                    # not run (MARGIN_EVAL=0)
            lines.append(f"| {model} | {evaluator} | {len(a['map50'])} / {len(b['map50'])} | {stat(a['map50'])} | "
                         f"{stat(b['map50'])} | {delta(a['map50'], b['map50'])} | {stat(a['map50_95'])} | "
                         f"{stat(b['map50_95'])} | {delta(a['map50_95'], b['map50_95'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours", type=Path, required=True, help="accuracy_ab.sh's LOGS folder")
    parser.add_argument("--peer", type=Path, required=True, help="peer_seeds.sh's RUNS folder")
    parser.add_argument("--models", nargs="+", choices=sorted(OUR_VARIANT), required=True)
    args = parser.parse_args()
    print(table(args.ours, args.peer, args.models))


if __name__ == "__main__":
    main()
