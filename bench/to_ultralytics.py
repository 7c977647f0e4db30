"""Write one of our YOLOv5 checkpoints as an ultralytics YOLOv5 v7.0 `.pt`, so the peer's own val.py can score it.

Issue 17 compares our mAP (get_map.py, COCO's definition) with the peer's (its val.py, its own matcher and
interpolation). Scoring each detector's best.pt with both evaluators separates the models from the evaluators:
get_map.py reads an ultralytics file directly; this script goes the other way. It builds the peer's
`DetectionModel` from its own yaml (so it needs the peer's source tree, never part of this project), copies our
tensors in through the name map of nets/weights/ultralytics.py and checks that the two models give the same
raw outputs on a random batch before saving.

  python3 bench/to_ultralytics.py --weights logs/run/best.pt --peer .peers/yolov5 --out ours_as_peer.pt
  cd .peers/yolov5 && python3 val.py --weights ours_as_peer.pt --data data.yaml --img 416 --half   # (the peer's)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nets.weights.ultralytics import DETECT_LAYER, yolov5_name_map  # noqa: E402
from nets.yolo import as_model_config, build_model  # noqa: E402
from utils.engine.checkpoint import load_checkpoint  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="our best.pt / last.pt of a --model yolov5n/s/m/l/x run")
    p.add_argument("--peer", required=True, help="the ultralytics YOLOv5 v7.0 source folder (with models/yolo.py)")
    p.add_argument("--out", required=True, help="the .pt to write")
    args = p.parse_args()

    ckpt = load_checkpoint(args.weights)
    config = as_model_config(ckpt["config"])
    if not config.model.startswith("yolov5") or config.attention != "none":
        sys.exit(f"error: {args.weights} is a {config.model} / {config.attention} model; only plain YOLOv5 converts")
    ours = build_model(config).eval()
    ours.load_state_dict(ckpt["model"])

    # the peer has its own top-level `utils` package: forget ours (its objects stay alive) before importing theirs
    for name in [n for n in sys.modules if n == "utils" or n.startswith("utils.")]:
        del sys.modules[name]
    sys.path.insert(0, str(Path(args.peer).resolve()))
    from models.yolo import DetectionModel     # the peer's class, pickled into the file it will load
    peer = DetectionModel(str(Path(args.peer) / "models" / f"{config.model}.yaml"), ch=3,
                          nc=len(config.class_names)).eval()
    detect = peer.model[DETECT_LAYER]
    # the peer keeps anchors in grid units of each stride; ours are pixels per level, coarsest level first
    anchors_px = torch.tensor(config.anchors, dtype=torch.float32)
    ours_levels = torch.stack([anchors_px[mask] for mask in reversed(config.anchors_mask)])   # P3, P4, P5
    detect.anchors.copy_(ours_levels / detect.stride.view(-1, 1, 1))

    ours_state = ours.state_dict()
    theirs = {their: ours_state[own] for their, own in yolov5_name_map(config.model[-1]).items()}
    missing, unexpected = peer.load_state_dict(theirs, strict=False)
    missing = [k for k in missing if k != f"model.{DETECT_LAYER}.anchors"]
    if missing or unexpected:
        sys.exit(f"error: name map mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")

    with torch.no_grad():   # same raw head outputs (P3, P4, P5) on one random batch
        x = torch.rand(2, 3, *config.input_shape)
        peer.model[DETECT_LAYER].training = True            # raw maps, not decoded boxes
        theirs_out = peer(x)
        peer.model[DETECT_LAYER].training = False
        ours_out = ours(x)
        for level, t in enumerate(theirs_out):                # theirs: (B, A, H, W, 5 + C)
            o = ours_out[len(ours_out) - 1 - level]           # ours: (B, A * (5 + C), H, W), coarsest first
            o = o.view(t.shape[0], t.shape[1], t.shape[-1], *t.shape[2:4]).permute(0, 1, 3, 4, 2)
            err = (o - t).abs().max().item()
            if err > 1e-3:
                sys.exit(f"error: outputs differ at P{level + 3} (max |diff| {err:.2e}); not written")
    peer.names, peer.nc = list(config.class_names), len(config.class_names)     # as the peer's train.py sets them
    torch.save({"epoch": -1, "model": peer.half(), "ema": None, "optimizer": None,
                "opt": {"imgsz": config.input_shape[0]}}, args.out)
    print(f"{args.weights} -> {args.out} ({config.model}, {len(config.class_names)} classes, "
          f"{config.input_shape[0]} px; raw outputs equal to 1e-3)")


if __name__ == "__main__":
    main()
