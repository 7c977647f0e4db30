"""Train YOLOv4-tiny / YOLOv5 with attention on Pascal VOC, YOLO txt or COCO json data.

  python train.py --phi 4                                  # YOLOv4-tiny + Coordinate Attention on VOCdevkit/VOC2007
  python train.py --data sample --phi cbam --epochs 30     # the built-in sample set
  python train.py --model yolov5s --phi 4 --data path/to/VOC
  python train.py --data path/to/data.yaml --anchors auto  # YOLO txt labels; anchors fitted to the boxes
  python train.py --data path/to/coco                      # COCO: annotations/instances_<split>.json
  python train.py --attention feat1=ca,feat2=cbam:reduction=8 --plugin my_blocks.py   # blocks per point
  python train.py --backbone resnet18 [--backbone list]   # a torchvision (or timm:NAME) backbone
  python train.py --resume logs/<run>/last.pt [--epochs 200]
  torchrun --nproc_per_node 2 train.py ...                 # several GPUs
"""
from __future__ import annotations

from pathlib import Path

from utils.cli import print_config, run_cli, spec_text
from utils.config import AUTO_EVAL_PERIOD, AUTO_EVAL_TAIL, parse_train_flags, train_parser


def main(argv: list[str] | None = None) -> Path | None:
    given = parse_train_flags(argv, train_parser(__doc__))
    # torch and the rest load only now: --help and flag errors answer without them (seconds saved)
    from nets.backbones import backbone_listing  # noqa: PLC0415
    from utils.engine.run import HYP_FLAGS, prepare_run, resolve_run  # noqa: PLC0415
    from utils.engine.torch_utils import is_main_process  # noqa: PLC0415

    if given.get("backbone") == "list":     # before anything is loaded or made
        print(backbone_listing())
        return None
    resolved = resolve_run(given)
    if resolved.ignored:
        print(f"note: resuming keeps the run's settings; ignoring {', '.join(resolved.ignored)}")
    if resolved.moved_from:
        print(f"note: resuming {resolved.moved_from.name} in {resolved.folder} (with a copy of its results.csv); "
              f"{resolved.moved_from} is left as it was")
    run = prepare_run(resolved)
    if is_main_process():
        data, model = run.data, run.config.model
        print_config("train.py", {"run folder": run.folder, "model": model.model,
                                  "attention": ", ".join(f"{p}={spec_text(model.block_at(p))}"
                                                         for p in run.trainer.model.attention_points()),
                                  "head": head_text(run.trainer.loss_fn.head),
                                  "input": "x".join(map(str, model.input_shape)),
                                  **run.config.flat(), **{k: run.hyp[k] for k in HYP_FLAGS if k in run.hyp},
                                  "cache": f"{data.cache} ({data.cache_plan.reason})",
                                  "eval_period": eval_schedule_text(run.config.train.eval_period),
                                  "lr0": run.hyp["lr0"], "device": run.device,
                                  "format": data.source.describe(), "classes": ", ".join(data.class_names),
                                  "images": f"{len(data.train_records)} train / {len(data.val_records)} val",
                                  "validation": data.val_source,
                                  "augmentation": "GPU (batched)" if data.on_gpu else
                                  f"CPU ({run.config.data.workers} workers)"})
    trainer = run.trainer
    metrics = trainer.run()
    if is_main_process():
        best = f"{trainer.ledger.best_fitness:.4f}" if trainer.ledger.best_fitness >= 0 else "n/a"
        w = run.hyp["fitness_map50_95"]
        chosen_by = "mAP50" if w == 0 else f"fitness ({1 - w:g} mAP50 + {w:g} mAP50-95)"
        last = metrics.get("map50", float("nan"))
        print(f"done: best {chosen_by} {best} (last epoch mAP50 {last:.4f}, mAP50-95 "
              f"{metrics.get('map50_95', float('nan')):.4f}); weights in {run.folder}/best.pt and last.pt, "
              f"curves in {run.folder}/")
    return run.folder


def eval_schedule_text(period: int | None) -> str:
    """The evaluation schedule in words, for the start-up table."""
    if period is not None:
        return "every epoch" if period == 1 else f"every {period} epochs and the last"
    return f"every {AUTO_EVAL_PERIOD} epochs, and every epoch of the last {AUTO_EVAL_TAIL * 100:.0f} percent"


def head_text(head) -> str:
    """'yolov5 (anchor_t=4.0, obj_iou_ratio=1.0)': the head style and its training settings."""
    return f"{head.name} ({', '.join(f'{k}={v}' for k, v in head.settings().items())})"


if __name__ == "__main__":
    run_cli(main)
