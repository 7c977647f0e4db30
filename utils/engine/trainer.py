"""The training loop: data, model, AMP, EMA, freeze/unfreeze, warm-up, evaluation, checkpoints, DDP."""
from __future__ import annotations

import bisect
import csv
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from nets.yolo import build_model
from nets.yolo_training import YoloLoss
from nets.weights.pretrained import load_pretrained
from nets.weights.report import MIN_LOADED_SHARE, load_state
from utils.engine.checkpoint import CheckpointWriter, detached_copy, state_dict_from_file, write_error
from utils.config import EVAL_DETECTION, RunConfig
from utils.engine.train_data import TrainData
from utils.engine.evaluate import Evaluator
from utils.log import get_logger
from utils.engine.optim import (accumulation_steps, build_optimizer, hyper_as_floats, hyper_value, lr_lambda,
                         scheduled_lr, set_initial_lr, warmup)
from utils.ops.plots import plot_results
from utils.engine.torch_utils import ModelEMA, barrier, is_main_process, seed_everything, unwrap
from utils.engine.train_step import TrainStep, graph_blocker
from yolo import YOLO

log = get_logger(__name__)
# mAP50 / mAP50-95: COCO definitions (what get_map.py reports); mAP50_voc: VOC all-point AP at IoU 0.5
RESULT_FIELDS = ["epoch", "loss", "box_loss", "obj_loss", "cls_loss", "lr", "mAP50", "mAP50-95", "mAP50_voc",
                 "seconds"]
NOT_EVALUATED = {"map50": float("nan"), "map50_95": float("nan"), "map50_voc": float("nan")}
PLOT_SECONDS = 30.0   # loss.png / map.png are redrawn at most this often, and after the last epoch
DIVERGE_FACTOR = 10.0     # a loss read this many times the run's median so far counts as exploding ...
DIVERGE_READS = 3         # ... and this many such reads in a row (reads come every 10 steps) stop the run

USUAL_LR = {"sgd": 0.01, "adam": 0.001}   # the hyp files' lr0: the most a divergence message suggests


class TrainingDiverged(ValueError):
    """The loss exploded (or became NaN/inf); the message says what to run instead."""


class DivergenceWatch:
    """Tells an exploding loss from noise, from the loss reads the loop makes anyway (no extra syncs).

    The first epoch's reads are the baseline; later, a read above `factor` x the median of the good
    reads so far is a strike, and `reads` strikes in a row mean divergence. Strikes never join the median.
    """

    def __init__(self, factor: float | None = None, reads: int | None = None):
        self.factor = DIVERGE_FACTOR if factor is None else factor
        self.reads = DIVERGE_READS if reads is None else reads
        self.good: list[float] = []       # kept sorted: the median is the middle element
        self.strikes = 0
        self.judging = False
        self.last = float("nan")

    @property
    def median(self) -> float:
        return self.good[len(self.good) // 2] if self.good else float("nan")

    @property
    def exploding(self) -> bool:
        """The latest read was a strike: the weights now are not worth saving."""
        return self.strikes > 0

    def observe(self, loss: float) -> bool:
        """Record one read; True when the run has diverged (a non-finite loss, or `reads` strikes in a row)."""
        self.last = loss
        if not math.isfinite(loss):
            self.strikes = max(self.strikes, 1)
            return True
        if self.judging and self.good and loss > self.factor * self.median:
            self.strikes += 1
        else:
            self.strikes = 0
            bisect.insort(self.good, loss)
        return self.strikes >= self.reads


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16; None when AMP is off."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


class Trainer:
    """Holds one run's state; `run()` trains from `start_epoch` to `epochs`."""

    def __init__(self, config: RunConfig, hyp: dict, data: TrainData, run_dir: Path, resume_ckpt: dict | None,
                 rank: int, world: int):
        self.run_config, self.data, self.run_dir = config, data, run_dir
        self.args = args = config.train
        self.rank, self.world = rank, world
        self.device = data.device
        self.main = is_main_process()
        seed_everything(args.seed + rank)
        # cuDNN autotuning (benchmark mode) cost ~5 s of start-up per run here and gained nothing in steady
        # state (bench/RESULTS.md), so the heuristics are kept
        torch.backends.cudnn.benchmark = False
        self.config = config.model
        self.model = build_model(self.config).to(self.device)
        if args.weights and not resume_ckpt:
            self._init_from(args.weights)
        # a fresh run loads pretrained weights; a resumed one has them in its checkpoint already
        self.pretrained = (load_pretrained(self.model, self.config.family, args.backbone_weights)
                           if args.backbone_weights and not resume_ckpt else None)
        if args.sync_bn and world > 1:
            if self.device.type != "cuda":
                raise ValueError("--sync-bn works across GPU processes only; drop it for CPU training")
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.hyp = hyp
        self.loss_fn = YoloLoss(self.config, self.hyp)
        self.accumulate = accumulation_steps(args.batch, args.nbs)
        weight_decay = self.hyp["weight_decay"] * args.batch * self.accumulate / args.nbs
        self.optimizer = build_optimizer(self.model, args.optimizer, hyp["lr0"], self.hyp["momentum"], weight_decay)
        self.lf = lr_lambda(args.lr_schedule, args.epochs, self.hyp["lrf"])
        self.ema = ModelEMA(self.model) if args.ema else None
        self.amp = amp_dtype(self.device, self.device.type == "cuda" if args.amp is None else args.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.start_epoch, self.best_fitness = 0, -1.0
        self.watch = DivergenceWatch()
        self._saved_epoch = 0             # the epoch last.pt holds (submitted to the writer)
        self._pending: tuple[int, list] | None = None   # (epoch, checkpoint jobs) awaiting the next loss read
        self.writer = CheckpointWriter()
        self._eval_yolo: YOLO | None = None
        self._plotted = time.time()   # the first plot after PLOT_SECONDS
        if resume_ckpt:
            self._restore(resume_ckpt)
        blocker = graph_blocker(self.device, data.on_gpu, self.scaler.is_enabled(), self.accumulate,
                                args.sync_bn and world > 1, world)
        self.graphs = args.cuda_graph and blocker is None
        if self.main and self.device.type == "cuda":
            accumulating = f" (gradients accumulated over {self.accumulate} batches)" if self.accumulate > 1 else ""
            log.info("training step: %s%s", "captured as a CUDA graph" if self.graphs else
                     f"eager ({'--no-cuda-graph' if not args.cuda_graph else blocker})", accumulating)
        self._val_has_objects = any(len(r.boxes) for r in data.val_records)
        self.evaluator = Evaluator(data.val_records, data.class_names, batch_size=max(data.batch_size, 8),
                                   keep_batches=data.cache != "none",
                                   workers=config.data.workers) if self.main else None

    def _restore(self, ckpt: dict) -> None:
        unwrap(self.model).load_state_dict(ckpt.get("raw_model", ckpt["model"]))
        if self.ema is not None:
            self.ema.ema.load_state_dict(ckpt["model"])
            self.ema.updates = (ckpt.get("ema") or {}).get("updates", 0)
        if ckpt.get("optimizer"):
            self.optimizer.load_state_dict(ckpt["optimizer"])
            hyper_as_floats(self.optimizer)   # a graphed run saves them as tensors
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        if ckpt.get("optimizer"):
            previous = self.optimizer.param_groups[0]["initial_lr"]
            if previous != self.hyp["lr0"]:     # --lr given to the resume (resolve_run put it in the hyp)
                set_initial_lr(self.optimizer, self.hyp["lr0"])
                log.info("learning rate: %g (the run had %g)", self.hyp["lr0"], previous)
        self.start_epoch = int(ckpt["epoch"])
        self.best_fitness = float(ckpt.get("best_fitness", -1.0))
        self._saved_epoch = self.start_epoch

    def _init_from(self, path: str) -> None:
        """--weights: copy the matching tensors; a file matching (almost) nothing is the wrong model, not a start."""
        state = state_dict_from_file(path)
        own = self.model.state_dict()
        report = load_state(self.model, state, str(path))
        loaded, total = len(report.loaded), report.total
        if loaded < MIN_LOADED_SHARE * total:
            raise ValueError(f"--weights {path}: only {loaded} of the model's {total} tensors match by name and shape "
                             f"(at least {MIN_LOADED_SHARE:.0%} must); the file holds {len(state)} tensors "
                             f"({_first_keys(state)}), the model's are {_first_keys(own)}: give weights of the same "
                             f"--model / --phi, or leave --weights out to train from scratch")
        log.info("initialised %d/%d tensors from %s (matching names and shapes)", loaded, total, path)

    def _set_frozen(self, frozen: bool) -> None:
        for p in unwrap(self.model).backbone.parameters():
            p.requires_grad_(not frozen)

    def step_runner(self) -> TrainStep:
        """How this phase's steps run (rebuilt when the set of trainable parameters changes)."""
        return TrainStep(self.model, self.loss_fn, self.optimizer, self.scaler, self.ema, self.amp, self.device,
                         self.world, self.graphs)

    def run(self) -> dict:
        """Train; returns the final metrics."""
        args, nb = self.args, self.data.batches_per_epoch
        # counted from the run's first step, so a run resumed inside the warm-up finishes it
        warmup_steps = max(round(self.hyp["warmup_epochs"] * nb), 100)
        sgd = args.optimizer == "sgd"
        if self.main:
            self._prepare_results()
            if self.pretrained is not None:
                path = self.run_dir / "backbone_weights_report.json"
                try:
                    self.pretrained.save(path)
                except OSError as exc:
                    raise write_error(exc, path) from None
        try:
            metrics = self._epochs(warmup_steps, sgd)
        except KeyboardInterrupt:
            self._settle_pending(keep=not self.watch.exploding)   # Ctrl-C keeps the last finished epoch
            self.writer.wait()
            raise
        self._settle_pending(keep=not self.watch.exploding)
        self.writer.wait()
        if self.watch.exploding:                  # ended mid-explosion: its last epochs were not saved
            raise self._diverged(self.watch.last, args.epochs - 1)
        return metrics

    def _epochs(self, warmup_steps: int, sgd: bool) -> dict:
        """The epoch loop; returns the last epoch's metrics."""
        args, nb = self.args, self.data.batches_per_epoch
        metrics, frozen = {}, None
        for epoch in range(self.start_epoch, args.epochs):
            t0 = time.time()
            self.watch.judging = epoch > self.start_epoch     # this process's first epoch is the baseline
            if frozen != (epoch < args.freeze_epochs):
                frozen = epoch < args.freeze_epochs
                self._set_frozen(frozen)
                step_fn = self.step_runner()
            self.model.train()
            scheduled_lr(self.optimizer, self.lf(epoch))
            mosaic = epoch < args.special_aug_ratio * args.epochs
            totals = torch.zeros(4, device=self.device)
            bar = tqdm(self.data.batches(epoch, mosaic), total=nb, desc=f"epoch {epoch + 1}/{args.epochs}",
                       disable=not self.main, file=sys.stdout, leave=False)
            self.optimizer.zero_grad(set_to_none=False)   # in place: captured steps hold the gradient buffers
            for i, (images, targets) in enumerate(bar):
                step = i + nb * epoch
                if step <= warmup_steps:
                    warmup(self.optimizer, step, warmup_steps, self.lf(epoch), self.hyp, sgd)
                loss, parts = step_fn(images, targets, last=(i + 1) % self.accumulate == 0 or i + 1 == nb)
                totals += torch.stack([loss.detach() / len(images), parts["box"], parts["obj"], parts["cls"]])
                if i % 10 == 0 or i + 1 == nb:   # reading the loss back syncs: not every step
                    running = self._read_loss(totals[0]) / (i + 1)
                    if self.watch.observe(running):
                        self.writer.wait()        # the good last.pt already submitted is on disk before we stop
                        raise self._diverged(running, epoch)
                    if i == 0:                    # the first loss of the weights the last epoch ended with
                        self._settle_pending(keep=not self.watch.exploding)
                    bar.set_postfix(loss=f"{running:.4f}", lr=f"{hyper_value(self.optimizer.param_groups[0], 'lr'):.2e}")
            lr = hyper_value(self.optimizer.param_groups[0], "lr")
            losses = (totals / nb).tolist()
            metrics = self._end_epoch(epoch, losses, lr, t0)
            barrier()
        return metrics

    def _settle_pending(self, keep: bool) -> None:
        """Write the held checkpoints of the last epoch (its weights gave a sane loss), or drop them (they exploded)."""
        if self._pending is None:
            return
        number, jobs = self._pending
        self._pending = None
        if keep:
            self.writer.submit(jobs)
            self._saved_epoch = number
        else:
            log.warning("the weights of epoch %d give loss %.4g, over %gx the run's median %.4g: not saved; "
                        "last.pt keeps epoch %d", number, self.watch.last, self.watch.factor, self.watch.median,
                        self._saved_epoch)

    def _read_loss(self, total: torch.Tensor) -> float:
        """The summed loss as a float, averaged over ranks so every rank takes the same divergence decision."""
        if self.world > 1 and dist.is_initialized():
            total = total.detach().clone()
            dist.all_reduce(total)
            return total.item() / self.world
        return total.item()

    def _diverged(self, loss: float, epoch: int) -> TrainingDiverged:
        """The error for an exploded loss, with the command that continues from the last good checkpoint."""
        lower = f"{min(self.hyp['lr0'] / 10, USUAL_LR[self.args.optimizer]):g}"
        what = (f"the loss became {loss}" if not math.isfinite(loss) else
                f"the loss rose to {loss:.4g}, over {self.watch.factor:g}x its median {self.watch.median:.4g}")
        last = self.run_dir / "last.pt"
        if self._saved_epoch > 0 and last.is_file():
            advice = (f"last.pt keeps epoch {self._saved_epoch}: continue with a lower learning rate, "
                      f"train.py --resume {last} --lr {lower}")
        else:
            advice = f"nothing was saved yet: train again with a lower learning rate, e.g. --lr {lower}"
        return TrainingDiverged(f"training diverged in epoch {epoch + 1} ({what}; lr0 {self.hyp['lr0']:g}); "
                                f"{advice} (or check the labels)")

    def _end_epoch(self, epoch: int, losses: list[float], lr: float, t0: float) -> dict:
        """Evaluate (rank 0), save last/best/periodic checkpoints, append to results.csv, plot."""
        if not self.main:
            return {}
        args, number = self.args, epoch + 1
        metrics, fitness = dict(NOT_EVALUATED), float("nan")
        if number % args.eval_period == 0 or number == args.epochs:
            if self._eval_yolo is None:
                eval_model = self.ema.ema if self.ema is not None else unwrap(self.model)
                self._eval_yolo = YOLO.from_model(eval_model, self.config, self.device, conf=EVAL_DETECTION.conf,
                                                  nms_iou=EVAL_DETECTION.nms_iou)
            metrics = self.evaluator.quick(self._eval_yolo)
            # a validation split without objects has no mAP (NaN): count it as 0 so best.pt still exists
            fitness = metrics["map50"] if metrics["map50"] == metrics["map50"] else 0.0
        seconds = time.time() - t0   # training and evaluation; saving follows
        # without objects to validate on, no epoch is better than another: best.pt follows the last one
        improved = fitness == fitness and (fitness > self.best_fitness or not self._val_has_objects)
        if improved:
            self.best_fitness = fitness
        if self.watch.exploding:        # keep the last good checkpoint: these weights may be the explosion's
            log.warning("epoch %d: loss %.4g is over %gx the run's median %.4g; not saved, last.pt keeps epoch %d",
                        number, losses[0], self.watch.factor, self.watch.median, self._saved_epoch)
        else:
            ckpt = detached_copy(self._checkpoint(number, metrics))
            jobs = [(ckpt, self.run_dir / "last.pt")]
            if improved:
                jobs.append((self._inference_only(ckpt), self.run_dir / "best.pt"))
            if args.save_period > 0 and number % args.save_period == 0:
                jobs.append((self._inference_only(ckpt), self.run_dir / f"epoch{number}.pt"))
            # held until the next epoch's first loss shows these weights did not explode (one step later)
            self._pending = (number, jobs)
        row = [number, *[f"{v:.5f}" for v in losses], f"{lr:.6f}", f"{metrics['map50']:.5f}",
               f"{metrics['map50_95']:.5f}", f"{metrics['map50_voc']:.5f}", f"{seconds:.1f}"]
        self._write_results([row], "a")
        if time.time() - self._plotted >= PLOT_SECONDS or number == args.epochs:
            try:
                plot_results(self.run_dir / "results.csv", self.run_dir)
            except OSError as exc:
                raise write_error(exc, exc.filename or self.run_dir / "loss.png") from None
            self._plotted = time.time()
        shown = f"mAP50 {metrics['map50']:.4f}  mAP50-95 {metrics['map50_95']:.4f}" if fitness == fitness else ""
        log.info("epoch %d/%d  loss %.4f  %s  %.1fs", number, args.epochs, losses[0], shown, seconds)
        return metrics

    def _checkpoint(self, epoch: int, metrics: dict) -> dict:
        raw = unwrap(self.model).state_dict()
        return {
            "model": self.ema.ema.state_dict() if self.ema is not None else raw,
            "raw_model": raw,
            "config": self.config.to_dict(),
            "hyp": self.hyp,
            "ema": {"updates": self.ema.updates} if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": epoch,
            "best_fitness": self.best_fitness,
            "train_args": self.run_config.flat(),
            "metrics": {k: float(v) for k, v in metrics.items()},
        }

    @staticmethod
    def _inference_only(ckpt: dict) -> dict:
        """best.pt / epochN.pt: weights, config, metrics and arguments, without the resume state."""
        return {k: ckpt[k] for k in ("model", "config", "hyp", "epoch", "metrics", "train_args", "best_fitness")}

    def _prepare_results(self) -> None:
        """Start results.csv, or on resume keep only the rows of epochs already in the checkpoint."""
        path = self.run_dir / "results.csv"
        rows = []
        if self.start_epoch and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.reader(f)][1:]
            rows = [r for r in rows if r and r[0].isdigit() and int(r[0]) <= self.start_epoch]
        self._write_results([RESULT_FIELDS, *rows], "w")

    def _write_results(self, rows: list[list], mode: str) -> None:
        """Write ("w") or append ("a") rows of results.csv; a refused write is one line naming the file."""
        path = self.run_dir / "results.csv"
        try:
            with open(path, mode, newline="") as f:
                csv.writer(f).writerows(rows)
        except OSError as exc:
            raise write_error(exc, path) from None


def _first_keys(state: dict, n: int = 3) -> str:
    """'a, b, c, ...': the first few names of a state dict, for error messages."""
    keys = list(state)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") if keys else "none"

