"""From command-line flags to a ready training run: the one set-up train.py, bench/ and tests share.

`utils.config.parse_train_flags` -> the flags given; `resolve_run` -> a checked RunConfig (a resume merges the
checkpoint's settings with the flags a resume may change); `prepare_run` -> device, data, model and
trainer, with the run folder made only once everything is known good.
"""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from nets.attention import load_plugin
from nets.yolo import complete_model_config
from nets.yolo_training import RECIPE_DEFAULTS, load_hyp
from utils.engine.anchors import choose_anchors
from utils.engine.autobatch import auto_batch
from utils.engine.checkpoint import load_checkpoint, remove_stale_temps, write_error
from utils.engine.folders import numbered_dir
from utils.config import RUN_PARTS, DataConfig, ModelConfig, RunConfig, TrainConfig, parse_attention_spec
from utils.settings import check_ranges, flag_name, from_flat, resume_flags, split_given
from utils.engine.train_data import TrainData
from utils.engine.torch_utils import distributed_env, init_distributed, is_main_process, select_device
from utils.engine.trainer import Trainer, amp_dtype
from utils.log import get_logger

log = get_logger(__name__)
# training flags that override the hyp key of the same name when given
HYP_FLAGS = ("mosaic", "mixup", "label_smoothing", "lr_schedule", "special_aug_ratio", "fitness_map50_95")


@dataclass
class Resolved:
    """A checked run configuration, the checkpoint a resume continues, and the given flags it did not use.

    folder: where a resume writes (None: decided by run_dir); moved_from: the run's own folder when a
    resume given --save-dir continues elsewhere (that folder is then left as it was).
    """

    config: RunConfig
    checkpoint: dict | None
    ignored: list[str]
    folder: Path | None = None
    moved_from: Path | None = None


def resolve_run(given: dict) -> Resolved:
    """Defaults + given flags, or (with resume) the checkpoint's settings + the flags a resume may change."""
    for plugin in given.get("plugin", []):
        load_plugin(plugin)                 # before any block name is checked
    model_given, data_given, train_given = split_given(given, *RUN_PARTS)
    if isinstance(model_given.get("attention_points"), str):
        model_given["attention_points"] = parse_attention_spec(model_given["attention_points"])
    if not given.get("resume"):
        model = complete_model_config(ModelConfig(**model_given, class_names=["?"]))   # classes come with the data
        config = RunConfig(dataclasses.replace(model, class_names=[]), DataConfig(**data_given),
                           TrainConfig(**train_given))
        _check(config)
        return Resolved(config, None, [])
    path = given["resume"]
    ckpt = load_checkpoint(path)
    if not ckpt.get("optimizer"):
        raise ValueError(f"--resume {path}: no training state inside; resume from a run's last.pt")
    allowed = resume_flags(*RUN_PARTS) | {"resume"}
    ignored = sorted(set(given) - allowed)
    stored = ckpt.get("train_args") or {}     # fields this version does not know are left out
    changes = {k: v for k, v in given.items() if k in allowed}
    config = RunConfig(complete_model_config(ModelConfig.from_dict(ckpt["config"])),
                       from_flat(DataConfig, {**stored, **changes}),
                       # the anchors are the checkpoint's: the file or fit that chose them is not read again
                       from_flat(TrainConfig, {**stored, "plugin": [], "anchor_fit": None, **changes}))
    _check(config)
    if ckpt["epoch"] >= config.train.epochs:
        raise ValueError(f"--resume {path}: the run already finished {ckpt['epoch']} epochs; "
                         f"pass --epochs N with N > {ckpt['epoch']} to extend it")
    own = Path(path).resolve().parent
    folder = resume_folder(own, given.get("save_dir"))
    flags = {f.name: flag_name(f) for part in RUN_PARTS for f in dataclasses.fields(part)}
    return Resolved(config, ckpt, [flags.get(k, f"--{k.replace('_', '-')}") for k in ignored], folder,
                    own if folder != own else None)


def resume_folder(own: Path, save_dir: str | None) -> Path:
    """The run's own folder, or with --save-dir <save-dir>/<the run's folder name>, which must be new or empty."""
    if save_dir is None:
        return own
    folder = (Path(save_dir) / own.name).resolve()
    if folder != own and folder.is_dir() and any(folder.iterdir()):
        raise ValueError(f"--save-dir {save_dir}: {folder} already holds files; resume from {folder / 'last.pt'} "
                         "or choose another --save-dir")
    return folder


def _check(config: RunConfig) -> None:
    """Every range and rule, before anything is loaded or written."""
    check_ranges(config.data)
    config.train.validate()


def resolved_hyp(hyp: dict, train: TrainConfig) -> dict:
    """The family's YAML hyperparameters with the command-line overrides applied."""
    hyp = dict(hyp)
    if train.optimizer == "adam":
        hyp["lr0"] = hyp.get("lr0_adam", 0.001)
        hyp["warmup_bias_lr"] = 0.0
    if train.lr is not None:
        hyp["lr0"] = train.lr
    hyp.update(flag_overrides(train))
    return hyp


def flag_overrides(train: TrainConfig) -> dict:
    """The hyp keys a training flag sets, for the flags given (not None)."""
    return {key: getattr(train, key) for key in HYP_FLAGS if getattr(train, key) is not None}


def resumed_hyp(ckpt: dict, train: TrainConfig) -> dict:
    """A checkpoint's hyp exactly; keys it predates come from its stored flags, else RECIPE_DEFAULTS."""
    hyp = {**RECIPE_DEFAULTS, **flag_overrides(train), **ckpt["hyp"]}
    if train.lr is not None:
        hyp["lr0"] = train.lr         # a resume may change --lr (e.g. after divergence)
    return hyp


def run_dir(config: RunConfig) -> Path:
    """logs/<name>, numbered if the name is taken; a resumed run keeps its folder."""
    train = config.train
    if train.resume:
        return Path(train.resume).resolve().parent
    name = train.name or f"{config.model.model}_{config.model.uniform_attention() or 'mixed'}"
    return numbered_dir(Path(train.save_dir) / name, train.exist_ok)


@dataclass
class Run:
    """Everything one training process holds: the final config, hyperparameters, device, data and trainer."""

    config: RunConfig
    hyp: dict
    device: torch.device
    data: TrainData
    trainer: Trainer
    folder: Path


def prepare_run(resolved: Resolved, folder: Path | None = None, progress: bool = True) -> Run:
    """Device, distributed set-up, data, model and trainer; the run folder is made last (main process)."""
    config, ckpt = resolved.config, resolved.checkpoint
    rank, local_rank, world = distributed_env()
    device = select_device(config.train.device)
    if world > 1 and device.type == "cuda":
        device = select_device(f"cuda:{local_rank}")
    for flag, batch in (("--batch", config.train.batch), ("--freeze-batch", config.train.freeze_batch)):
        if batch is not None and batch % world:
            raise ValueError(f"{flag} {batch} must be divisible by the {world} processes")
    init_distributed(device)
    if ckpt is not None and isinstance(ckpt.get("hyp"), dict):
        hyp = resumed_hyp(ckpt, config.train)   # the run's hyperparameters, whatever the YAML says now
    else:
        hyp = resolved_hyp(load_hyp(config.model.model, config.train.hyp), config.train)
    # --batch auto is measured on the model, which needs the data's classes: the data starts at the nominal batch
    data = TrainData(config.data, tuple(config.model.input_shape), (config.train.batch or config.train.nbs) // world,
                     config.train.seed, hyp, device, rank, world, progress=progress and is_main_process(),
                     compiled=config.train.compile)
    if ckpt is None:
        model = complete_model_config(dataclasses.replace(config.model, class_names=data.class_names))
        model = choose_anchors(model, data.train_records, config.train.anchor_fit, hyp.get("anchor_t"))
        config = dataclasses.replace(config, model=model)
    if config.train.batch is None:
        config = with_auto_batch(config, device, world)
        data.set_batch_size(config.train.batch // world)
    folder = folder or resolved.folder or run_dir(config)
    trainer = Trainer(config, hyp, data, folder, ckpt, rank, world)
    if is_main_process():
        make_run_folder(folder, resolved.moved_from)
    return Run(config, hyp, device, data, trainer, folder)


def with_auto_batch(config: RunConfig, device: torch.device, world: int) -> RunConfig:
    """The config with --batch auto resolved (stored so, so a resume keeps the batch the run started with)."""
    amp = amp_dtype(device, device.type == "cuda" if config.train.amp is None else config.train.amp,
                    config.train.amp_dtype)
    choice = auto_batch(config.model, device, amp, config.train.nbs, world)
    if is_main_process():
        log.info("batch %d (auto: %s)", choice.batch, choice.reason)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, batch=choice.batch))


def make_run_folder(folder: Path, moved_from: Path | None) -> None:
    """Create the run folder (a moved resume gets a copy of the run's results.csv); drop temp files of killed writes."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        history = moved_from / "results.csv" if moved_from else None
        if history is not None and history.is_file() and not (folder / "results.csv").exists():
            shutil.copyfile(history, folder / "results.csv")
    except OSError as exc:
        raise write_error(exc, exc.filename or folder) from None
    removed = remove_stale_temps(folder)
    if removed:
        log.info("removed %d unfinished checkpoint write(s) of an earlier process: %s", len(removed),
                 ", ".join(p.name for p in removed))
