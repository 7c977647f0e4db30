"""The training loop: data, model, AMP, EMA, freeze/unfreeze, warm-up, evaluation, checkpoints, DDP."""
from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from nets.attention import start_near_identity
from nets.yolo import build_model
from nets.yolo_training import YoloLoss
from nets.weights.pretrained import load_pretrained
from nets.weights.report import MIN_LOADED_SHARE, load_state
from utils.engine.checkpoint import CheckpointWriter, detached_copy, state_dict_from_file, write_error
from utils.config import EVAL_DETECTION, RunConfig, is_eval_epoch
from utils.engine.train_data import TrainData
from utils.engine.epoch_ledger import NOT_EVALUATED, EpochLedger, FinishedEpoch
from utils.engine.evaluate import Evaluator, checkpoint_fitness
from utils.log import get_logger
from utils.engine.optim import (DECAY_GROUP, accumulation_steps, build_optimizer, hyper_as_floats, hyper_value, lr_lambda,
                         scheduled_lr, set_initial_lr, warmup)
from utils.engine.torch_utils import ModelEMA, barrier, is_main_process, seed_everything, unwrap
from utils.engine.divergence import DivergenceWatch, TrainingDiverged
from utils.engine.loss_scale import LossScaler
from utils.engine.train_step import TrainStep, graph_blocker
from utils.ops.capture_guard import CaptureGuard
from utils.ops.streams import made_event
from yolo import YOLO

log = get_logger(__name__)
# an epoch's resume checkpoint is copied off the GPU (and last.pt written) when it is evaluated (it may become
# best.pt), is a --save-period epoch or the last, or when this many seconds passed since the last copy: epochs of
# a tenth of a second (BCCD on an H200) need not each pay for one, and a resume repeats at most this much training
LAST_PT_SECONDS = 10.0
USUAL_LR = {"sgd": 0.01, "adam": 0.001}   # the hyp files' lr0: the most a divergence message suggests


def amp_dtype(device: torch.device, enabled: bool, cuda_dtype: str = "fp16") -> torch.dtype | None:
    """--amp-dtype on CUDA, bf16 on the CPU, None when AMP is off.

    fp16 is CUDA's default: torch sends fp16 BatchNorm (fp32 parameters) to cuDNN's fused kernels but bf16 to
    its own, slower ones; the YOLOv4-tiny step is ~20 % faster (bench/RESULTS.md). Its loss is scaled on the
    device (utils/engine/loss_scale.py), so the step is still captured as a CUDA graph.
    """
    if not enabled:
        return None
    if device.type != "cuda":
        return torch.bfloat16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[cuda_dtype]


@dataclass(frozen=True)
class Phase:
    """A stretch of epochs with one trainable set: the frozen start (--freeze-epochs) or the rest."""

    frozen: bool
    batch: int          # this process's batch
    accumulate: int     # batches per optimiser step
    lr0: float          # the initial learning rate the schedule scales


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
        loads_weights = bool(args.weights or args.backbone_weights) and not resume_ckpt
        if args.attention_init == "identity" or (args.attention_init == "auto" and loads_weights):
            # before loading, so a file's own attention tensors replace this start
            started = start_near_identity(self.model.attention_points())
            if self.main and started:
                log.info("attention start: %s", ", ".join(f"{p} {how}" for p, how in started.items()))
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
        frozen_batch = args.freeze_batch or args.batch
        self.phases = {
            True: Phase(True, frozen_batch // world, accumulation_steps(frozen_batch, args.nbs),
                        args.freeze_lr or hyp["lr0"]),
            False: Phase(False, args.batch // world, accumulation_steps(args.batch, args.nbs), hyp["lr0"]),
        }
        # weight decay is set per phase (enter_phase), scaled to the images each optimiser step sees
        self.optimizer = build_optimizer(self.model, args.optimizer, hyp["lr0"], self.hyp["momentum"], 0.0)
        self.lf = lr_lambda(self.hyp["lr_schedule"], args.epochs, self.hyp["lrf"])
        self.ema = ModelEMA(self.model) if args.ema else None
        self.amp = amp_dtype(self.device, self.device.type == "cuda" if args.amp is None else args.amp, args.amp_dtype)
        self.scaler = LossScaler(self.device, enabled=self.amp == torch.float16)
        self.start_epoch = 0
        self.watch = DivergenceWatch()
        self.writer = CheckpointWriter()
        self._eval_yolo: YOLO | None = None
        self._eval_model: torch.nn.Module | None = None    # CUDA: a copy of the weights evaluated on a side stream
        self._eval_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" and self.main else None
        self._capture_guard = CaptureGuard()    # the evaluation thread and graph captures take turns
        if resume_ckpt:
            self._restore(resume_ckpt)
        self._val_has_objects = any(len(r.boxes) for r in data.val_records)
        saved_best = (resume_ckpt or {}).get("best_fitness")
        best_fitness = -1.0 if saved_best is None else float(saved_best)
        self.ledger = EpochLedger(run_dir, args.epochs, args.save_period, self.writer, self._fitness,
                                  self._val_has_objects, best_fitness, saved_epoch=self.start_epoch)
        self._copied_at = -math.inf        # time.monotonic() of the last resume checkpoint copied off the GPU
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
        if ckpt.get("scaler") and self.scaler.enabled:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch = int(ckpt["epoch"])
        if ckpt.get("optimizer"):
            # the phase entered next sets the initial lr; a resume's --lr is in the hyp already (resolve_run)
            previous = self.optimizer.param_groups[0]["initial_lr"]
            now = self.phases[self.start_epoch < self.args.freeze_epochs].lr0
            if previous != now:
                log.info("learning rate: %g (the run had %g)", now, previous)

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

    def phase_of(self, epoch: int) -> Phase:
        return self.phases[epoch < self.args.freeze_epochs]

    def steps_before(self, epoch: int) -> int:
        """Optimiser-loop steps (batches) of all epochs before `epoch`: phases may differ in batch."""
        frozen = min(epoch, self.args.freeze_epochs)
        return (frozen * self.data.batches_at(self.phases[True].batch)
                + (epoch - frozen) * self.data.batches_at(self.phases[False].batch))

    def enter_phase(self, phase: Phase) -> TrainStep:
        """Freeze or unfreeze the backbone, set the phase's batch, lr and weight decay; returns its step runner."""
        for p in unwrap(self.model).backbone.parameters():
            p.requires_grad_(not phase.frozen)
        self.data.set_batch_size(phase.batch)
        set_initial_lr(self.optimizer, phase.lr0)
        images_per_step = phase.batch * self.world * phase.accumulate
        self.optimizer.param_groups[DECAY_GROUP]["weight_decay"] = self.hyp["weight_decay"] * images_per_step / self.args.nbs
        blocker = graph_blocker(self.device, self.data.on_gpu, phase.accumulate, self.args.sync_bn and self.world > 1,
                                self.world, self.args.compile)
        graphs = self.args.cuda_graph and blocker is None
        if self.main:
            if self.args.freeze_epochs:
                log.info("%s: batch %d, lr0 %g", "backbone frozen (its BatchNorm in eval mode)" if phase.frozen
                         else "backbone trained", phase.batch * self.world, phase.lr0)
            if self.device.type == "cuda":
                accumulating = f" (gradients accumulated over {phase.accumulate} batches)" if phase.accumulate > 1 else ""
                log.info("training step: %s%s", "captured as a CUDA graph" if graphs else
                         f"eager ({'--no-cuda-graph' if not self.args.cuda_graph else blocker})", accumulating)
        return TrainStep(self.model, self.loss_fn, self.optimizer, self.scaler, self.ema, self.amp, self.device,
                         self.world, graphs, compiled=self.args.compile, capture_guard=self._capture_guard)

    def _train_mode(self, phase: Phase) -> None:
        """Training mode, with a frozen backbone's BatchNorm layers kept on their (pretrained) running statistics."""
        self.model.train()
        if phase.frozen:
            for module in unwrap(self.model).backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def run(self) -> dict:
        """Train; returns the final metrics."""
        args = self.args
        # counted from the run's first step, so a run resumed inside the warm-up finishes it
        warmup_steps = max(round(self.hyp["warmup_epochs"] * self.data.batches_at(self.phase_of(0).batch)), 100)
        sgd = args.optimizer == "sgd"
        if self.main:
            self.ledger.start_results(self.start_epoch)
            if self.pretrained is not None:
                path = self.run_dir / "backbone_weights_report.json"
                try:
                    self.pretrained.save(path)
                except OSError as exc:
                    raise write_error(exc, path) from None
        try:
            self._epochs(warmup_steps, sgd)
        except KeyboardInterrupt:
            self.ledger.finish(not self.watch.exploding, self._explosion())   # Ctrl-C keeps the last epoch copied
            raise
        metrics = self.ledger.finish(not self.watch.exploding, self._explosion())
        if self.watch.exploding:                  # ended mid-explosion: its last epochs were not saved
            raise self._diverged(self.watch.last, args.epochs - 1)
        return metrics

    def _epochs(self, warmup_steps: int, sgd: bool) -> None:
        """The epoch loop."""
        args = self.args
        phase = None
        for epoch in range(self.start_epoch, args.epochs):
            t0 = time.time()
            self.watch.judging = epoch > self.start_epoch     # this process's first epoch is the baseline
            if phase != self.phase_of(epoch):
                phase = self.phase_of(epoch)
                step_fn = self.enter_phase(phase)
            nb, first_step = self.data.batches_per_epoch, self.steps_before(epoch)
            self._train_mode(phase)
            scheduled_lr(self.optimizer, self.lf(epoch))
            mosaic = epoch < self.hyp["special_aug_ratio"] * args.epochs
            totals = torch.zeros(4, device=self.device)
            bar = tqdm(self.data.batches(epoch, mosaic), total=nb, desc=f"epoch {epoch + 1}/{args.epochs}",
                       disable=not self.main, file=sys.stdout, leave=False)
            self.optimizer.zero_grad(set_to_none=False)   # in place: captured steps hold the gradient buffers
            for i, (images, targets) in enumerate(bar):
                step = first_step + i
                if step <= warmup_steps:
                    warmup(self.optimizer, step, warmup_steps, self.lf(epoch), self.hyp, sgd)
                loss, parts = step_fn(images, targets, last=(i + 1) % phase.accumulate == 0 or i + 1 == nb)
                totals += torch.stack([loss.detach() / len(images), parts["box"], parts["obj"], parts["cls"]])
                if i % 10 == 0 or i + 1 == nb:   # reading the loss back syncs: not every step
                    running = self._read_loss(totals[0]) / (i + 1)
                    if self.watch.observe(running):
                        self.ledger.finish(False, quiet=True)   # what was judged sane is on disk first
                        raise self._diverged(running, epoch)
                    if i == 0:                    # the first loss of the weights the last epoch ended with
                        self.ledger.judge(not self.watch.exploding, self._explosion())
                    else:
                        self.ledger.poll()
                    bar.set_postfix(loss=f"{running:.4f}", lr=f"{hyper_value(self.optimizer.param_groups[0], 'lr'):.2e}")
            lr = hyper_value(self.optimizer.param_groups[0], "lr")
            losses = (totals / nb).tolist()
            self._end_epoch(epoch, losses, lr, t0)
            barrier()

    def _explosion(self) -> str:
        """The last loss read against the run's median, for messages."""
        return f"loss {self.watch.last:.4g}, over {self.watch.factor:g}x the run's median {self.watch.median:.4g}"

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
        last, saved = self.run_dir / "last.pt", self.ledger.saved_epoch
        if saved > 0 and last.is_file():
            advice = (f"last.pt keeps epoch {saved}: continue with a lower learning rate, "
                      f"train.py --resume {last} --lr {lower}")
        else:
            advice = f"nothing was saved yet: train again with a lower learning rate, e.g. --lr {lower}"
        if not math.isfinite(loss) and self.amp == torch.float16:   # an activation past fp16's 65,504
            advice += "; or train in bf16, whose range is float32's: --amp-dtype bf16"
        return TrainingDiverged(f"training diverged in epoch {epoch + 1} ({what}; lr0 {self.hyp['lr0']:g}); "
                                f"{advice} (or check the labels)")

    def _end_epoch(self, epoch: int, losses: list[float], lr: float, t0: float) -> None:
        """Rank 0: start the evaluation of this epoch's weights (its mAP follows in the background), hold the epoch."""
        if not self.main:
            return
        args, number = self.args, epoch + 1
        self.ledger.settle()            # the last epoch's evaluation is done before its weights are replaced
        evaluated = is_eval_epoch(number, args.epochs, args.eval_period)
        metrics = self._start_evaluation() if evaluated else None
        seconds = time.time() - t0   # training (and on CPU the evaluation's detections); saving follows
        ckpt = None
        due = (evaluated or number == args.epochs or (args.save_period > 0 and number % args.save_period == 0)
               or time.monotonic() - self._copied_at >= LAST_PT_SECONDS)
        if self.watch.exploding:        # keep the last good checkpoint: these weights may be the explosion's
            log.warning("epoch %d: loss %.4g is over %gx the run's median %.4g; not saved, last.pt keeps epoch %d",
                        number, losses[0], self.watch.factor, self.watch.median, self.ledger.saved_epoch)
        elif due:
            ckpt = detached_copy(self._checkpoint(number))
            self._copied_at = time.monotonic()
        # settled (written) once the next epoch's first loss shows these weights did not explode
        self.ledger.hold(FinishedEpoch(number, losses, lr, seconds, ckpt, metrics))

    def _start_evaluation(self) -> Future:
        """The validation mAP of this moment's weights, computed on the ledger's thread.

        On CUDA the weights are copied (device to device) and detected on a side stream while the next epoch
        trains; on the CPU the detections are made now and only the mAP arithmetic runs in the background.
        """
        source = self.ema.ema if self.ema is not None else unwrap(self.model)
        if self._eval_stream is None:
            if self._eval_yolo is None:
                self._eval_yolo = self._evaluation_yolo(source)
            return self.ledger.metrics_later(self.evaluator.scorer(self._eval_yolo))
        if self._eval_model is None:
            self._eval_model = copy.deepcopy(source).eval()
            self._eval_yolo = self._evaluation_yolo(self._eval_model)
        with torch.no_grad():
            torch._foreach_copy_(list(self._eval_model.state_dict().values()), list(source.state_dict().values()))
        copied = made_event(self.device)     # the weights stay allocated: waiting for the copy is all it needs

        def evaluate() -> dict:
            with self._capture_guard.using(), torch.cuda.stream(self._eval_stream):
                self._eval_stream.wait_event(copied)
                return self.evaluator.quick(self._eval_yolo)

        return self.ledger.metrics_later(evaluate)

    def _evaluation_yolo(self, model: torch.nn.Module) -> YOLO:
        return YOLO.from_model(model, self.config, self.device, conf=EVAL_DETECTION.conf,
                               nms_iou=EVAL_DETECTION.nms_iou, multi_label=EVAL_DETECTION.multi_label)

    def _fitness(self, metrics: dict) -> float:
        """What best.pt maximises: (1 - w) mAP50 + w mAP50-95, w = hyp fitness_map50_95 (0 when no objects)."""
        return checkpoint_fitness(metrics, self.hyp["fitness_map50_95"])

    def _checkpoint(self, epoch: int) -> dict:
        """The full checkpoint of this moment; the ledger fills in `metrics` and `best_fitness` when it settles."""
        raw = unwrap(self.model).state_dict()
        return {
            "model": self.ema.ema.state_dict() if self.ema is not None else raw,
            "raw_model": raw,
            "config": self.config.to_dict(),
            "hyp": self.hyp,
            "ema": {"updates": self.ema.updates} if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.enabled else None,
            "epoch": epoch,
            "best_fitness": None,
            "train_args": self.run_config.flat(),
            "metrics": dict(NOT_EVALUATED),
        }


def _first_keys(state: dict, n: int = 3) -> str:
    """'a, b, c, ...': the first few names of a state dict, for error messages."""
    keys = list(state)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") if keys else "none"

