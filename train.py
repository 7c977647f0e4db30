"""Train YOLOv4-tiny / YOLOv5 with attention on Pascal-VOC-format data.

  python train.py --phi 4                                  # YOLOv4-tiny + Coordinate Attention on VOCdevkit/VOC2007
  python train.py --data sample --phi cbam --epochs 30     # the built-in sample set
  python train.py --model yolov5s --phi 4 --data path/to/VOC
  python train.py --resume logs/<run>/last.pt [--epochs 200]
  torchrun --nproc_per_node 2 train.py ...                 # several GPUs
"""
from __future__ import annotations

import argparse
from pathlib import Path

from nets.attention import ATTENTION_NAMES, attention_name
from nets.yolo import MODEL_NAMES
from nets.yolo_training import load_hyp
from utils.checkpoint import load_checkpoint
from utils.cli import numbered_dir, print_config, run_cli
from utils.data_setup import DEFAULT_DATA, TrainData, resolved_hyp
from utils.torch_utils import distributed_env, init_distributed, is_main_process, select_device
from utils.trainer import Trainer

# flags a resumed run may change; everything else comes from the checkpoint
RESUME_OVERRIDES = ("epochs", "device", "workers", "cuda_graph")
DEFAULTS = dict(model="yolov4-tiny", phi="0", data=DEFAULT_DATA, classes=None, train_split="train",
                val_split="val", img=416, epochs=100, batch=16, device=None, workers=4, weights=None,
                freeze_epochs=0, optimizer="sgd", lr=None, lr_schedule="cos", label_smoothing=None,
                mosaic=None, mixup=None, special_aug_ratio=0.7, amp=None, ema=True, eval_period=1,
                save_period=0, save_dir="logs", name=None, seed=0, cache="none", augment="auto",
                sync_bn=False, cuda_graph=True, hyp=None, resume=None, nbs=64, exist_ok=False, head=None)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=None)
    phis = ", ".join(f"{i}={n}" for i, n in enumerate(ATTENTION_NAMES))
    p.add_argument("--model", choices=MODEL_NAMES, help="detector (default yolov4-tiny)")
    p.add_argument("--phi", help=f"attention block, number or name: {phis} (default 0)")
    p.add_argument("--data", help=f"VOC folder with Annotations/, JPEGImages/, ImageSets/Main/, or 'sample' (default {DEFAULT_DATA})")
    p.add_argument("--classes", help="class-names file, one per line (default: DATA/classes.txt, else names found)")
    p.add_argument("--train-split", help="ImageSets/Main split to train on (default train, else trainval)")
    p.add_argument("--val-split", help="split to evaluate on (default val, else test)")
    p.add_argument("--img", type=int, help="input size, a multiple of 32 (default 416)")
    p.add_argument("--epochs", type=int, help="total epochs; with --resume, extends a finished run (default 100)")
    p.add_argument("--batch", type=int, help="global batch size, split over GPUs with torchrun (default 16)")
    p.add_argument("--device", help="cuda, cuda:N, N or cpu (default cuda when present)")
    p.add_argument("--workers", type=int, help="data-loading processes per GPU (default 4)")
    p.add_argument("--weights", help="initialise from a checkpoint or state dict where names and shapes match")
    p.add_argument("--resume", help="continue a run from its last.pt")
    p.add_argument("--freeze-epochs", type=int, help="epochs with the backbone frozen before it is trained (default 0)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), help="default sgd")
    p.add_argument("--lr", type=float, help="initial learning rate (default from the hyp file: 0.01 sgd, 0.001 adam)")
    p.add_argument("--lr-schedule", choices=("cos", "step"), help="cosine to lr*lrf, or x0.1 at 70%% and 90%% (default cos)")
    p.add_argument("--label-smoothing", type=float, help="class label smoothing eps (default 0)")
    p.add_argument("--mosaic", type=float, help="mosaic probability (default from the hyp file: 1.0)")
    p.add_argument("--mixup", type=float, help="mixup probability (default from the hyp file: 0.0)")
    p.add_argument("--special-aug-ratio", type=float, help="mosaic only in this first share of epochs (default 0.7)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, help="mixed precision (default on with CUDA)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, help="exponential moving average of weights (default on)")
    p.add_argument("--eval-period", type=int, help="evaluate on the val split every N epochs (default 1)")
    p.add_argument("--save-period", type=int, help="also keep epochN.pt every N epochs (default 0 = off)")
    p.add_argument("--save-dir", help="parent folder of runs (default logs)")
    p.add_argument("--name", help="run folder name (default <model>_<attention>, numbered if taken)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--cache", choices=("none", "ram", "gpu"), help="keep decoded images in memory (default none)")
    p.add_argument("--augment", choices=("auto", "cpu", "gpu"),
                   help="where augmentation runs; auto = gpu when on CUDA with --cache, else cpu workers")
    p.add_argument("--sync-bn", action="store_true", default=None, help="synchronised BatchNorm across GPUs")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction,
                   help="replay each training step as one CUDA graph where possible (default on; needs GPU "
                        "augmentation, bf16 or fp32, --batch >= --nbs)")
    p.add_argument("--hyp", help="hyperparameter YAML (default model_data/hyp.<family>.yaml)")
    p.add_argument("--head", choices=("yolov4", "yolov5"),
                   help="box decoding and target assignment: yolov4 (best anchor in the centre cell, exp sizes) or "
                        "yolov5 (ratio-matched anchors in 3 cells, bounded sizes); default: the model's own")
    p.add_argument("--nbs", type=int, help="nominal batch: gradients are accumulated to about this many images per "
                                           "step, and weight decay scaled to it (default 64)")
    p.add_argument("--exist-ok", action="store_true", default=None, help="reuse --name's folder instead of numbering a new one")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[argparse.Namespace, dict | None]:
    """Defaults filled in, or the resumed run's arguments with the allowed overrides."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        if not ckpt.get("optimizer"):
            raise ValueError(f"--resume {args.resume}: no training state inside; resume from a run's last.pt")
        ignored = sorted(set(given) - set(RESUME_OVERRIDES) - {"resume"})
        if ignored:
            print(f"note: resuming keeps the run's settings; ignoring --{', --'.join(k.replace('_', '-') for k in ignored)}")
        values = {**DEFAULTS, **ckpt["train_args"], **{k: given[k] for k in RESUME_OVERRIDES if k in given}}
        values["resume"] = args.resume
        if ckpt["epoch"] >= values["epochs"]:
            raise ValueError(f"--resume {args.resume}: the run already finished {ckpt['epoch']} epochs; "
                             f"pass --epochs N with N > {ckpt['epoch']} to extend it")
    else:
        values = {**DEFAULTS, **given}
    args = argparse.Namespace(**values)
    args.phi = attention_name(args.phi)
    if args.img % 32:
        raise ValueError(f"--img {args.img}: the input size must be a multiple of 32 (e.g. {round(args.img / 32) * 32 or 32})")
    for flag in ("epochs", "batch", "eval_period"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    return args, ckpt


def run_dir(args: argparse.Namespace) -> Path:
    """logs/<name>, numbered if the name is taken; a resumed run keeps its folder."""
    if args.resume:
        return Path(args.resume).resolve().parent
    return numbered_dir(Path(args.save_dir) / (args.name or f"{args.model}_{args.phi}"), args.exist_ok)


def main(argv: list[str] | None = None) -> Path:
    args, ckpt = resolve(parse_args(argv))
    rank, local_rank, world = distributed_env()
    device = select_device(args.device)
    if world > 1 and device.type == "cuda":
        device = select_device(f"cuda:{local_rank}")
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} must be divisible by the {world} processes")
    args.amp = device.type == "cuda" if args.amp is None else args.amp
    init_distributed(device)
    hyp = resolved_hyp(load_hyp(args.model, args.hyp), args)
    args.lr = hyp["lr0"]
    data = TrainData(args, hyp, device, rank, world, progress=is_main_process())
    out = run_dir(args) if is_main_process() else None
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        print_config("train.py", {"run folder": out, **{k: v for k, v in vars(args).items()}, "device": device,
                                  "classes": ", ".join(data.class_names),
                                  "images": f"{len(data.train_records)} train / {len(data.val_records)} val",
                                  "augmentation": "GPU (batched)" if data.on_gpu else f"CPU ({args.workers} workers)"})
    trainer = Trainer(args, data, out or Path("."), ckpt, rank, world)
    metrics = trainer.run()
    if is_main_process():
        best = f"{trainer.best_fitness:.4f}" if trainer.best_fitness >= 0 else "n/a"
        last = metrics.get("map50", float("nan"))
        print(f"done: best mAP50 {best} (last epoch {last:.4f}); weights in {out}/best.pt and last.pt, "
              f"curves in {out}/")
    return out


if __name__ == "__main__":
    run_cli(main)
