"""What a study runs: variants (phis, per-point specs, models, backbones, or named flag sets) x seeds -> run folders.

A variant is a name and the train.py flags that make it; the study's other train flags are shared by all.
Axes given together are crossed: `--phi 0,4 --model yolov4-tiny,yolov5n` makes four variants.
"""
from __future__ import annotations

import itertools
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from utils.config import PHI_NAMES
from utils.engine.folders import safe_component

PLAN_FILE = "plan.json"
# flags the study sets for every run itself
STUDY_OWNED = ("--seed", "--name", "--save-dir", "--exist-ok", "--no-exist-ok", "--resume", "--device")


@dataclass(frozen=True)
class Variant:
    """One arm of the study: a folder-safe name and the train.py flags that make it."""

    name: str
    flags: tuple[str, ...]


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study: a variant at one seed, in its own folder."""

    variant: Variant
    seed: int
    folder: Path

    @property
    def key(self) -> str:
        return f"{self.variant.name}_s{self.seed}"


def split_list(text: str, flag: str) -> list[str]:
    """'0,1, 2' -> ['0', '1', '2']; an empty item is an error naming the flag."""
    items = [s.strip() for s in text.split(",")]
    if not all(items):
        raise ValueError(f"{flag} {text!r}: expected a comma-separated list without empty items")
    return items


def parse_seeds(text: str) -> list[int]:
    """--seeds 3 -> [0, 1, 2]; --seeds 0,5,7 -> those seeds."""
    if "," not in text:
        if not text.strip().isdigit() or int(text) < 1:
            raise ValueError(f"--seeds {text!r}: give a number of seeds (>= 1) or a list like 0,1,2")
        return list(range(int(text)))
    seeds = []
    for item in split_list(text, "--seeds"):
        if not item.isdigit():
            raise ValueError(f"--seeds {text!r}: {item!r} is not a non-negative integer")
        seeds.append(int(item))
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: a seed is named twice")
    return seeds


def phi_label(phi: str) -> str:
    """'4' -> 'ca' (the block's name), a name as given: variant names say what they are."""
    return PHI_NAMES[int(phi)] if phi.isdigit() and int(phi) < len(PHI_NAMES) else phi.lower()


def build_variants(phi: str | None = None, models: str | None = None, backbones: str | None = None,
                   attention: list[str] | None = None, named: list[str] | None = None) -> list[Variant]:
    """The crossed axes (each a comma list; --attention specs repeat, as they hold commas) plus NAME=FLAGS variants."""
    axes = []
    if phi:
        axes.append([(phi_label(p), ("--phi", p)) for p in split_list(phi, "--phi")])
    if models:
        axes.append([(m, ("--model", m)) for m in split_list(models, "--model")])
    if backbones:
        axes.append([(b, ("--backbone", b)) for b in split_list(backbones, "--backbone")])
    if attention:
        axes.append([(spec, ("--attention", spec)) for spec in attention])
    varying = [a for a in axes if len(a) > 1] or axes[:1]      # a one-value axis is a shared flag, not a name
    variants = [Variant(safe_component("-".join(label for (label, _), axis in zip(combo, axes) if axis in varying)),
                        tuple(f for _, flags in combo for f in flags)) for combo in itertools.product(*axes)] \
        if axes else []
    for item in named or []:
        name, sep, flags = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--variant {item!r}: expected NAME=TRAIN_FLAGS, e.g. 'ca_feat1=--attention feat1=ca'")
        if safe_component(name.strip()) != name.strip():
            raise ValueError(f"--variant {item!r}: the name {name.strip()!r} must be letters, digits, '-', '_' or '.'")
        variants.append(Variant(name.strip(), tuple(shlex.split(flags))))
    if not variants:
        raise ValueError("no variants: give --phi, --model, --backbone, --attention or --variant NAME=FLAGS")
    names = [v.name for v in variants]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"variant name(s) {', '.join(twice)} given twice; name variants apart with --variant")
    for v in variants:
        owned = [f for f in v.flags if f.split("=")[0] in STUDY_OWNED]
        if owned:
            raise ValueError(f"variant {v.name}: {owned[0]} is set by the study itself")
    return variants


def check_train_flags(flags: list[str]) -> None:
    """Shared train flags must leave seeds, folders and devices to the study."""
    owned = [f for f in flags if f.split("=")[0] in STUDY_OWNED]
    if owned:
        hint = {"--seed": "use --seeds", "--device": "use --devices", "--save-dir": "use --save-dir of study.py "
                "before the train flags", "--name": "use --name of study.py"}.get(owned[0].split("=")[0], "")
        raise ValueError(f"{owned[0]}: set by the study for each run{'; ' + hint if hint else ''}")


def runs_of(variants: list[Variant], seeds: list[int], study_dir: Path) -> list[RunSpec]:
    """Every (variant, seed) with its folder <study>/<variant>_s<seed>; seed-major so early results cover every variant."""
    return [RunSpec(v, s, study_dir / f"{v.name}_s{s}") for s in seeds for v in variants]


def plan_dict(variants: list[Variant], seeds: list[int], train_flags: list[str], train_settings: dict) -> dict:
    """What plan.json keeps: the variants' flags, the seeds, and the shared train flags as given and as parsed."""
    return {"variants": {v.name: list(v.flags) for v in variants}, "seeds": seeds, "train_flags": list(train_flags),
            "train_settings": train_settings}


def check_plan(study_dir: Path, plan: dict) -> None:
    """An existing study folder must hold the same study (more variants or seeds may be added)."""
    path = study_dir / PLAN_FILE
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable ({exc}); remove it or pass another --name") from None
    why = None
    if old.get("train_settings") != plan["train_settings"]:      # as parsed: the order of the flags does not matter
        why = f"train flags {' '.join(old.get('train_flags', []))!r} there, {' '.join(plan['train_flags'])!r} now"
    for name, flags in plan["variants"].items():
        if name in old.get("variants", {}) and old["variants"][name] != flags:
            why = f"variant {name} was {' '.join(old['variants'][name])!r}, now {' '.join(flags)!r}"
    if why:
        raise ValueError(f"{study_dir} holds a study with other settings ({why}); pass --name NEW for a new study, "
                         "or repeat the original flags to resume it")
