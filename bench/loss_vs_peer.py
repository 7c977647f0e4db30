"""Our YOLOv5 loss against the peer's (ultralytics YOLOv5 v7.0 `utils/loss.py` ComputeLoss) on the same raw outputs.

Issue 17 asks whether our YOLOv5 trains the same function as the peer. bench/to_ultralytics.py shows the networks
give the same outputs; this script feeds one set of raw outputs (of a fresh model of ours, random input) and
one set of targets (crowded, near borders, an image without boxes) to both losses and prints the loss, its parts
and the largest difference of the gradients with respect to the outputs. Needs the peer's source (never part of
this project, see ../shared/peers/README.md) and its imports (pandas, seaborn, ...); runs on the CPU.

  PYTHONPATH=.peers/shim python3 bench/loss_vs_peer.py --peer .peers/yolov5 [--model yolov5s --classes 3]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nets.yolo import build_model, model_config  # noqa: E402
from nets.yolo_training import YoloLoss, load_hyp  # noqa: E402


def random_targets(batch: int, per_image: list[int], classes: int, seed: int = 1) -> torch.Tensor:
    """[B,K,6] per-image targets (padding rows image -1): centres anywhere, sizes 1-31 % of the image."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.full((batch, max(per_image), 6), -1.0)
    for b, n in enumerate(per_image):
        targets[b, :n, 0] = b
        targets[b, :n, 1] = torch.randint(0, classes, (n,), generator=g).float()
        targets[b, :n, 2:4] = torch.rand(n, 2, generator=g) * 0.96 + 0.02
        targets[b, :n, 4:6] = torch.rand(n, 2, generator=g) * 0.3 + 0.01
    return targets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", required=True, help="the ultralytics YOLOv5 v7.0 source folder")
    p.add_argument("--model", default="yolov5s")
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--img", type=int, default=416)
    args = p.parse_args()

    torch.manual_seed(0)
    config = model_config(args.model, 0, [f"c{i}" for i in range(args.classes)], (args.img, args.img))
    hyp = load_hyp(args.model)
    outputs = [o.detach().requires_grad_(True) for o in build_model(config).train()(torch.rand(4, 3, args.img, args.img))]
    targets = random_targets(4, [12, 5, 0, 8], args.classes)
    loss, parts = YoloLoss(config, hyp)(outputs, targets)
    loss.backward()

    # the peer has its own top-level `utils` package: forget ours before importing theirs
    for name in [n for n in sys.modules if n.split(".")[0] in ("utils", "nets")]:
        del sys.modules[name]
    sys.path.insert(0, str(Path(args.peer).resolve()))
    from models.yolo import DetectionModel  # noqa: PLC0415
    from utils.loss import ComputeLoss  # noqa: PLC0415

    peer = DetectionModel(str(Path(args.peer) / "models" / f"{args.model}.yaml"), ch=3, nc=args.classes)
    # the peer's train.py scales the gains by levels, classes and image size before building the loss
    peer.hyp = {**hyp, "cls": hyp["cls"] * args.classes / 80, "obj": hyp["obj"] * (args.img / 640) ** 2,
                "cls_pw": 1.0, "obj_pw": 1.0, "fl_gamma": 0.0, "label_smoothing": 0.0}
    detect = peer.model[-1]
    anchors = torch.tensor(config.anchors)
    levels = torch.stack([anchors[m] for m in reversed(config.anchors_mask)])                  # P3, P4, P5 pixels
    detect.anchors.copy_(levels / detect.stride.view(-1, 1, 1))
    theirs = []
    for level in range(len(outputs)):                                  # theirs: [B, A, H, W, 5+C], finest first
        o = outputs[len(outputs) - 1 - level]
        b, _, h, w = o.shape
        theirs.append(o.detach().view(b, 3, -1, h, w).permute(0, 1, 3, 4, 2).contiguous().requires_grad_(True))
    flat = targets.view(-1, 6)
    peer_loss, items = ComputeLoss(peer)(theirs, flat[flat[:, 0] >= 0])
    peer_loss.sum().backward()

    print(f"ours: loss {loss.item():.6f}  box {parts['box'].item():.6f}  obj {parts['obj'].item():.6f}  "
          f"cls {parts['cls'].item():.6f}")
    print(f"peer: loss {peer_loss.item():.6f}  box {items[0].item():.6f}  obj {items[1].item():.6f}  "
          f"cls {items[2].item():.6f}")
    for level, t in enumerate(theirs):
        o = outputs[len(outputs) - 1 - level]
        b, _, h, w = o.shape
        ours_grad = o.grad.view(b, 3, -1, h, w).permute(0, 1, 3, 4, 2)
        print(f"P{level + 3}: max |gradient difference| {(ours_grad - t.grad).abs().max().item():.2e} "
              f"(largest gradient {ours_grad.abs().max().item():.2e})")


if __name__ == "__main__":
    main()
