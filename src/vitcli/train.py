"""Fine-tuning: ``FinetuneConfig`` -> ``fit()`` -> a run folder. Never prints; progress leaves through a callback.

The recipe is timm's: ``create_optimizer_v2`` (AdamW with layer-wise LR decay), ``create_scheduler_v2``
(cosine with warmup, updated every optimizer step), ``Mixup`` + ``SoftTargetCrossEntropy``, ``ModelEmaV3``.

A run folder (``runs/finetune/<name>``) holds::

    args.json          the resolved FinetuneConfig (and what it resolved to: device, precision, ...)
    split.json         the train/val samples (vitcli.datasets.FolderData), reused by --resume
    metrics.csv        one row per epoch, rewritten atomically
    state.pt           training state for --resume (tensors and plain containers: weights_only=True)
    best/  last/       timm hub-layout model folders (config.json + model.safetensors)
    curves.png  confusion_matrix.png   (the confusion matrix is the best model's, on val)

Resume. ``state.pt`` is written at the end of every epoch and when the run stops early (Ctrl-C or
SIGTERM at an optimizer-step boundary, --max-steps). It records the position *within* the epoch, so
--resume continues mid-epoch rather than redoing it: an epoch's sample order is a function of
(seed, epoch) and the RNG states are restored, so on one process with ``workers=0`` a resumed run
ends with bit-identical weights. With DataLoader workers, a resume from an epoch boundary is still
exact; the augmentations of the rest of an interrupted epoch differ. A NaN/inf loss stops the run
and leaves the last good ``state.pt`` alone.

Distributed: under ``torchrun`` (RANK/LOCAL_RANK/WORLD_SIZE set) one process per device trains a
DistributedDataParallel copy; only rank 0 writes files and calls the callback.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitcli.batching import default_workers
from vitcli.datasets import FolderData, LabeledImages, discover, drop_unreadable
from vitcli.devices import autocast, resolve_device, resolve_precision
from vitcli.errors import DatasetError, UsageError, VitcliError
from vitcli.models import DEFAULT_MODEL, LoadedModel, load_model

STATE_FILE = "state.pt"
STATE_VERSION = 1
IMBALANCE_HINT_RATIO = 3.0  # max/min images per class above which a --balance hint is given
MIN_DELTA = 1e-4  # a val loss lower by less than this is no improvement (patience, best/)

# timm schedulers that can be stepped per optimizer update (plateau needs a metric per epoch)
SCHEDULES = ("cosine", "tanh", "poly", "wsd", "constant")

# Options that may change when a run is resumed; anything else must match the saved args.json.
RESUMABLE_OPTIONS = ("epochs", "max_steps", "patience", "workers", "device")

Callback = Callable[[str, dict[str, Any]], None]


@dataclass
class FinetuneConfig:
    """One fine-tuning run. The defaults are a recipe for small datasets (hundreds to a few thousand
    images) starting from an ImageNet-pretrained ViT; they were chosen on deit_tiny + hymenoptera
    (245 train images), where they reach 95-97% val top-1 in 3 epochs on a CPU."""

    # data
    data: str = ""  # DATA/train/<class>/... (+ DATA/val/) or DATA/<class>/...
    val_split: float = 0.2  # held-out fraction per class when DATA has no val/ folder
    balance: str = "none"  # none | sampler (class-balanced sampling) | loss (class-weighted loss)
    strict: bool = False  # an unreadable image is fatal instead of skipped

    # model
    model: str = DEFAULT_MODEL  # timm name[.tag], a model folder or a store entry
    weights: str | None = None  # a weights file for the --model architecture
    pretrained: bool = True  # False: random init (training from scratch; needs far more data)
    img_size: int | None = None  # None: the pretrained size; else pos_embed is resampled (patch size kept)
    drop_path: float = 0.1  # stochastic depth rate (ignored by models without it)
    freeze: bool = False  # train the classifier head only (a linear probe)
    zero_head: bool = True  # the new head starts at zero (ViT paper); False keeps timm's random init

    # optimization
    epochs: int = 10
    batch_size: int = 32  # per process
    accum_steps: int = 1  # gradient accumulation: optimizer step every N batches
    opt: str = "adamw"  # any timm.optim name
    lr: float = 1e-3  # peak LR of the head; lower layers get lr * layer_decay**depth
    min_lr: float = 1e-6  # LR at the end of the schedule
    weight_decay: float = 0.05
    layer_decay: float | None = 0.65  # layer-wise LR decay (None/1.0 off); timm's group_matcher decides layers
    warmup_epochs: float = 0.5  # linear warmup, in epochs (fractions allowed)
    sched: str = "cosine"  # any timm.scheduler name stepped per update: cosine, tanh, poly, wsd, constant
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0  # max gradient norm (None: off)

    # augmentation (timm's train transform: RandomResizedCrop + flip; small data wants it mild)
    scale_min: float = 0.35  # RandomResizedCrop area range (scale_min, 1.0)
    color_jitter: float = 0.0
    randaugment: str | None = None  # e.g. "rand-m9-mstd0.5-inc1" (timm auto_augment string)
    mixup: float = 0.0  # mixup alpha (0: off)
    cutmix: float = 0.0  # cutmix alpha (0: off)

    # weight averaging
    ema: bool = True  # evaluate and save an exponential moving average of the weights
    ema_decay: float = 0.998  # approached with a warmup (ModelEmaV3 use_warmup: ~0.87 at step 20, 0.99 at 1000)

    # run
    precision: str = "auto"  # auto (bf16 where the hardware has it), fp32, bf16, fp16 (CUDA only)
    device: str = "auto"
    workers: int | None = None  # DataLoader processes per training process (None: CPU cores, at most 4)
    seed: int = 0
    patience: int | None = None  # stop after N epochs without improvement (see MIN_DELTA; None: off)
    max_steps: int | None = None  # smoke runs: stop after N optimizer steps in total
    project: str = "runs/finetune"
    name: str | None = None  # run folder name (default exp, exp2, exp3, ...)
    exist_ok: bool = False  # reuse runs/finetune/NAME instead of numbering a new one
    resume: str | None = None  # a run folder to continue (see resume_config)


@dataclass
class RunResult:
    """What a finished (or early-stopped) run produced."""

    run_dir: Path
    best_top1: float
    best_epoch: int  # 1-based; 0 if no epoch was evaluated
    epochs_done: int
    global_step: int
    stopped: str  # "done", "patience" or "max_steps"
    rows: list[dict[str, float]] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)  # the final model, as saved in last/

    @property
    def best_dir(self) -> Path:
        return self.run_dir / "best"

    @property
    def last_dir(self) -> Path:
        return self.run_dir / "last"


class TrainingInterrupted(VitcliError):
    """Ctrl-C (or SIGTERM): the state was saved and the run can be resumed."""

    exit_code = 130

    def __init__(self, message: str, run_dir: Path, exit_code: int = 130):
        super().__init__(message)
        self.run_dir = run_dir
        self.exit_code = exit_code


def _read_state(path: Path) -> dict[str, Any]:
    """The training state, loaded as plain tensors and containers only (weights_only=True)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # written atomically, so only damage from outside gets here
        raise VitcliError(f"cannot resume: '{path}' is corrupt or truncated ({type(e).__name__}); its weights "
                          f"are in '{path.parent / 'last'}': start a new run with --model on that folder") from e


class NonFiniteLossError(VitcliError):
    """The loss became NaN or infinite; the last good state is kept."""


# ------------------------------------------------------------------------------ configuration


def resume_config(run_dir: str | Path, **given: Any) -> FinetuneConfig:
    """The saved config of ``run_dir``, with the options given again on the command line.

    Only RESUMABLE_OPTIONS may change; another option that differs from the saved run is refused.
    ``max_steps`` is not carried over: a resumed smoke run continues to the end unless given again.
    """
    run_dir = Path(run_dir).expanduser()
    args_file = run_dir / "args.json"
    if not args_file.is_file():
        raise UsageError(f"--resume '{run_dir}' is not a finetune run folder (no args.json); "
                         "give runs/finetune/NAME")
    if not (run_dir / STATE_FILE).is_file():
        raise UsageError(f"nothing to resume in '{run_dir}': it has no {STATE_FILE} (the run stopped "
                         "before its first step); start a new run")
    saved = json.loads(args_file.read_text())["config"]
    known = {f.name for f in fields(FinetuneConfig)}
    saved = {k: v for k, v in saved.items() if k in known}
    saved["max_steps"] = None  # a smoke-run limit holds for the invocation that gives it
    for key, value in given.items():
        if value is None or key in ("resume", "project", "name", "exist_ok"):
            continue
        if key == "data":
            if Path(value).expanduser().resolve() != Path(saved["data"]).expanduser().resolve():
                raise UsageError(f"--resume '{run_dir}' trained on '{saved['data']}', not '{value}'")
        elif key in RESUMABLE_OPTIONS:
            saved[key] = value
        elif saved.get(key) != value:
            raise UsageError(f"--{key.replace('_', '-')} cannot change when resuming (the run used "
                             f"{saved.get(key)!r}); leave it out, or start a new run")
    saved["resume"] = str(run_dir)
    return FinetuneConfig(**saved)


def check_config(config: FinetuneConfig) -> None:
    """Refuse option values that cannot work, before anything is loaded (UsageError, exit 2)."""
    if not config.data and config.resume is None:
        raise UsageError("no data folder given; expected DATA/train/<class>/... or DATA/<class>/...")
    if config.balance not in ("none", "sampler", "loss"):
        raise UsageError(f"unknown --balance '{config.balance}'; use none, sampler or loss")
    if config.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UsageError(f"unknown --precision '{config.precision}'; use auto, fp32, bf16 or fp16")
    for name in ("epochs", "batch_size", "accum_steps"):
        if getattr(config, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if config.lr <= 0:
        raise UsageError(f"--lr must be positive (got {config.lr})")
    if config.layer_decay is not None and not 0 < config.layer_decay <= 1:
        raise UsageError(f"--layer-decay must be in (0, 1] (got {config.layer_decay})")
    if not 0 < config.scale_min <= 1:
        raise UsageError(f"--scale-min must be in (0, 1] (got {config.scale_min})")
    if not 0 <= config.label_smoothing < 1:
        raise UsageError(f"--label-smoothing must be in [0, 1) (got {config.label_smoothing})")
    if config.balance == "loss" and (config.mixup > 0 or config.cutmix > 0):
        raise UsageError("--balance loss cannot be combined with --mixup/--cutmix (soft targets); "
                         "use --balance sampler")
    if config.max_steps is not None and config.max_steps < 1:
        raise UsageError("--max-steps must be at least 1")
    if config.img_size is not None and config.img_size < 16:
        raise UsageError(f"--img-size {config.img_size} is too small")
    from timm.optim import list_optimizers

    if config.opt.lower() not in list_optimizers():
        close = difflib.get_close_matches(config.opt.lower(), list_optimizers(), n=3)
        raise UsageError(f"unknown --opt '{config.opt}'" + (f"; did you mean {', '.join(close)}?" if close else
                                                             "; see timm.optim.list_optimizers()"))
    if config.sched not in SCHEDULES:
        raise UsageError(f"unknown --sched '{config.sched}'; use {', '.join(SCHEDULES)}")


# --------------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device)
    import torch.distributed as tdist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    want = resolve_device(device)
    if want.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        tdist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev)
    elif want.type == "cpu":
        dev = want
        tdist.init_process_group("gloo", rank=rank, world_size=world)
    else:
        raise UsageError(f"torchrun needs CUDA or CPU processes; --device {device} is not supported")
    return Dist(rank, local_rank, world), dev


def _broadcast(obj: Any, dist: Dist) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.enabled:
        return obj
    import torch.distributed as tdist

    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def _on_rank0(fn: Callable[[], Any], dist: Dist) -> Any:
    """``fn()`` run on rank 0; its result, or the VitcliError it raised, on every rank."""
    if not dist.enabled:
        return fn()
    outcome: tuple[str, Any] = ("", None)
    if dist.main:
        try:
            outcome = ("ok", fn())
        except VitcliError as e:
            outcome = ("error", e)
    kind, value = _broadcast(outcome, dist)
    if kind == "error":
        raise value
    return value


def _all_reduce(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Sum ``t`` over the ranks, in place (through the GPU under nccl, which reduces CUDA tensors only)."""
    if dist.enabled:
        import torch.distributed as tdist

        if tdist.get_backend() == "nccl" and t.device.type != "cuda":
            work = t.to(torch.device("cuda", torch.cuda.current_device()))
            tdist.all_reduce(work)
            t.copy_(work.cpu())
        else:
            tdist.all_reduce(t)
    return t


# ------------------------------------------------------------------------------------ sampling


class EpochSampler(torch.utils.data.Sampler[int]):
    """This rank's share of one epoch's sample order, a function of (seed, epoch) alone.

    Shuffled, or drawn with replacement in proportion to ``weights`` (class balancing); in training
    the order is padded so every rank gets as many samples. ``set_epoch(epoch, start)`` skips the
    first ``start`` samples of this rank's share (a resumed, interrupted epoch).
    """

    def __init__(self, size: int, *, shuffle: bool, weights: torch.Tensor | None = None, seed: int = 0,
                 dist: Dist = Dist(), pad: bool = True):
        self.size, self.shuffle, self.weights, self.seed = size, shuffle, weights, seed
        self.dist, self.pad = dist, pad
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def share(self) -> int:
        """Samples this rank sees in a whole epoch."""
        if self.pad:
            return math.ceil(self.size / self.dist.world)
        return len(range(self.dist.rank, self.size, self.dist.world))

    def __len__(self) -> int:
        return max(self.share() - self.start, 0)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        total = self.share() * self.dist.world if self.pad else self.size
        if self.weights is not None:
            order = torch.multinomial(self.weights, total, replacement=True, generator=g)
        elif self.shuffle:
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        if len(order) < total:  # pad by repeating the start of the order
            order = torch.cat([order, order[: total - len(order)]])
        mine = order[self.dist.rank :: self.dist.world]
        return iter(mine[self.start :].tolist())


def _seed_worker(worker_id: int) -> None:
    """DataLoader workers: numpy and random follow the torch seed the loader gave this worker."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % 2**63


def rng_state() -> dict[str, Any]:
    """python, numpy, torch and CUDA RNG states as tensors and plain containers (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------ the recipe


@dataclass
class TrainParts:
    """Everything one optimizer step touches."""

    model: nn.Module  # what runs forward: the DDP wrapper under torchrun, else the model itself
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    device: torch.device
    precision: str  # fp32, bf16 or fp16
    scheduler: Any = None  # a timm Scheduler, stepped per optimizer update
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    ema: Any = None  # timm.utils.ModelEmaV3
    mixup: Any = None  # timm.data.Mixup
    accum_steps: int = 1
    clip_grad: float | None = None
    freeze: bool = False
    num_classes: int = 0
    label_smoothing: float = 0.0
    dist: Dist = Dist()

    @property
    def raw_model(self) -> nn.Module:
        return getattr(self.model, "module", self.model)


def build_model(config: FinetuneConfig, classes: list[str]) -> LoadedModel:
    """The pretrained model with a new head for ``classes``, at ``img_size`` if given.

    Models that take no ``img_size`` (CNNs) or ``drop_path_rate`` are built without them; a CNN
    then simply sees the larger input.
    """
    extra: dict[str, Any] = {"img_size": config.img_size, "drop_path_rate": config.drop_path or None}
    while True:
        try:
            loaded = load_model(config.model, config.weights, pretrained=config.pretrained,
                                num_classes=len(classes), labels=list(classes),
                                **{k: v for k, v in extra.items() if v is not None})
            break
        except TypeError as e:  # "__init__() got an unexpected keyword argument 'img_size'"
            bad = next((k for k, v in extra.items() if v is not None and f"'{k}'" in str(e)), None)
            if bad is None:
                raise
            extra[bad] = None
    # A new head starts at zero, as in the ViT paper's fine-tuning: the backbone gets no gradient until
    # the head has learned something, and the head's random init no longer adds run-to-run noise.
    # A model folder already trained on these same classes keeps its head.
    if config.zero_head and list(loaded.model.pretrained_cfg.get("label_names") or []) != list(classes):
        for p in loaded.model.get_classifier().parameters():
            nn.init.zeros_(p)
    return loaded


def model_data_config(model: nn.Module, img_size: int | None) -> dict[str, Any]:
    """Preprocessing for the model as built (a ViT made at 288 reports 288, not its pretrained 224)."""
    import timm.data

    return timm.data.resolve_input_data_config(model, args={"img_size": img_size} if img_size else None)


def build_parts(config: FinetuneConfig, model: nn.Module, counts: list[int], steps_per_epoch: int,
                device: torch.device, precision: str, dist: Dist) -> TrainParts:
    """Optimizer, schedule, loss, mixup, EMA and (under torchrun) the DDP wrapper, all from timm."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    if config.freeze:
        head = model.get_classifier()
        head_params = {id(p) for p in head.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in head_params)
    layer_decay = config.layer_decay if config.layer_decay not in (None, 1.0) and not config.freeze else None
    optimizer = create_optimizer_v2(model, opt=config.opt, lr=config.lr, weight_decay=config.weight_decay,
                                    layer_decay=layer_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=config.sched, num_epochs=config.epochs, warmup_epochs=config.warmup_epochs,
        warmup_lr=config.lr * 1e-2, min_lr=config.min_lr, step_on_epochs=False,
        updates_per_epoch=steps_per_epoch)
    num_classes = len(counts)
    mixup = None
    if config.mixup > 0 or config.cutmix > 0:
        mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                      label_smoothing=config.label_smoothing, num_classes=num_classes)
        loss_fn: nn.Module = SoftTargetCrossEntropy()
    else:
        weight = None
        if config.balance == "loss":  # inverse frequency, mean 1 over the classes
            weight = torch.tensor([sum(counts) / (num_classes * max(c, 1)) for c in counts], device=device)
        loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=True) if config.ema else None
    forward_model = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        forward_model = DistributedDataParallel(model, device_ids=ids)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return TrainParts(model=forward_model, optimizer=optimizer, loss_fn=loss_fn, device=device,
                      precision=precision, scheduler=scheduler, scaler=scaler, ema=ema, mixup=mixup,
                      accum_steps=config.accum_steps, clip_grad=config.clip_grad, freeze=config.freeze,
                      num_classes=num_classes, label_smoothing=config.label_smoothing, dist=dist)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest LR of the param groups (the head's, under layer decay)."""
    return max(group["lr"] for group in optimizer.param_groups)


# ---------------------------------------------------------------------------- train / evaluate


def train_one_epoch(
    parts: TrainParts,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    num_batches: int,
    global_step: int = 0,
    start_batch: int = 0,
    max_steps: int | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """One pass over ``batches`` (batch ``start_batch`` onwards of ``num_batches``).

    Returns the epoch's metrics (train_loss, images, train_time, img_s, lr) and where it ended:
    ``global_step``, ``batch`` (batches consumed in this epoch) and ``stopped`` (None when the epoch
    finished, else "max_steps" or "interrupt"; either happens right after an optimizer step).
    """
    model, optimizer, accum = parts.model, parts.optimizer, parts.accum_steps
    model.train()
    if parts.freeze:  # a linear probe: the frozen backbone keeps its norm statistics and no dropout
        model.eval()
        parts.raw_model.get_classifier().train()
    loss_sum, seen, batch, stopped = 0.0, 0, start_batch, None
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for images, targets in batches:
        images = images.to(parts.device, non_blocking=True)
        targets = targets.to(parts.device, non_blocking=True)
        if parts.mixup is not None:
            images, targets = _mix(parts, images, targets)
        batch += 1
        update = batch % accum == 0 or batch == num_batches
        no_sync = model.no_sync() if parts.dist.enabled and not update else contextlib.nullcontext()
        with no_sync:
            with autocast(parts.device, parts.precision):
                logits = model(images)  # (B, num_classes)
                loss = parts.loss_fn(logits, targets)
            # one collective per batch: the loss for the NaN check, and whether any rank was interrupted
            flags = torch.tensor([loss.item(), float(bool(stop_requested and stop_requested()))])
            _all_reduce(flags, parts.dist)
            loss_value, interrupt = flags[0].item() / parts.dist.world, flags[1].item() > 0
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(f"the loss became {loss_value} at optimizer step {global_step + 1}")
            backward_loss = loss / accum
            if parts.scaler is not None:
                backward_loss = parts.scaler.scale(backward_loss)
            backward_loss.backward()
        loss_sum += loss_value * len(images)
        seen += len(images)
        if not update:
            continue
        if parts.scaler is not None:
            parts.scaler.unscale_(optimizer)
        if parts.clip_grad:
            nn.utils.clip_grad_norm_(parts.raw_model.parameters(), parts.clip_grad)
        if parts.scaler is not None:
            parts.scaler.step(optimizer)
            parts.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        global_step += 1
        if parts.scheduler is not None:
            parts.scheduler.step_update(num_updates=global_step)
        if parts.ema is not None:
            parts.ema.update(parts.raw_model, step=global_step)
        if on_step is not None:
            on_step({"batch": batch, "num_batches": num_batches, "global_step": global_step,
                     "loss": loss_value, "lr": current_lr(optimizer)})
        if max_steps is not None and global_step >= max_steps:
            stopped = "max_steps"
        elif interrupt:
            stopped = "interrupt"
        if stopped:
            break
    elapsed = time.perf_counter() - started
    return {"train_loss": loss_sum / seen if seen else math.nan, "images": seen, "train_time": elapsed,
            "img_s": seen / elapsed if elapsed > 0 else 0.0, "lr": current_lr(optimizer),
            "global_step": global_step, "batch": batch, "stopped": stopped,
            "loss_sum": loss_sum}


def _mix(parts: TrainParts, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's Mixup needs an even batch: an odd one loses its last image (a single image is not mixed)."""
    from timm.data.mixup import mixup_target

    if len(images) == 1:
        return images, mixup_target(targets, parts.num_classes, smoothing=parts.label_smoothing)
    if len(images) % 2:
        images, targets = images[:-1], targets[:-1]
    return parts.mixup(images, targets)


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
             device: torch.device, precision: str = "fp32", dist: Dist = Dist()) -> dict[str, Any]:
    """Validation loss (plain cross-entropy), top-1 and top-5 accuracy, and the confusion matrix.

    Under torchrun each rank evaluates its share and the sums are reduced; ``preds``/``targets`` are
    this rank's own, ``confusion`` is the whole set's.
    """
    from vitcli.evaluate import confusion_matrix

    model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(4, dtype=torch.float64)  # loss, top1, top5, count
    preds, targets = [], []
    for images, target in batches:
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(images)  # (B, C)
        logits = logits.float()
        topk = logits.topk(k, dim=1).indices  # (B, k)
        hits = topk.eq(target[:, None])
        sums += torch.tensor([F.cross_entropy(logits, target, reduction="sum").item(),
                              hits[:, 0].sum().item(), hits.any(dim=1).sum().item(), len(target)],
                             dtype=torch.float64)
        preds.append(topk[:, 0].cpu())
        targets.append(target.cpu())
    pred_t = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    target_t = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    confusion = _all_reduce(confusion_matrix(target_t, pred_t, num_classes), dist)
    loss, top1, top5, count = _all_reduce(sums, dist).tolist()
    count = max(count, 1)
    return {"val_loss": loss / count, "val_top1": top1 / count, "val_top5": top5 / count,
            "preds": pred_t, "targets": target_t, "confusion": confusion, "count": int(count)}


# -------------------------------------------------------------------------------------- the run


@dataclass
class _Progress:
    """What state.pt remembers besides the modules: where the run is and how it has gone."""

    epoch: int = 0  # the epoch in progress (0-based)
    batch: int = 0  # batches of that epoch already trained on
    global_step: int = 0
    loss_sum: float = 0.0  # running train loss of the epoch in progress
    images: int = 0
    train_time: float = 0.0
    best_top1: float = -1.0
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best (patience)
    best_confusion: list[list[int]] = field(default_factory=list)  # the best model's, on val
    rows: list[dict[str, float]] = field(default_factory=list)


def fit(config: FinetuneConfig, callback: Callback | None = None) -> RunResult:
    """Fine-tune ``config.model`` on ``config.data`` and write the run folder.

    ``callback(event, info)`` receives "start", "epoch_start", "step", "evaluate", "epoch_end" and "end" events
    (rank 0 only). Raises TrainingInterrupted after saving the state on Ctrl-C/SIGTERM,
    NonFiniteLossError on a NaN/inf loss, DatasetError/UsageError/ModelLoadError before training.
    """
    check_config(config)
    dist, device = init_distributed(config.device)
    try:
        return _fit(config, callback if dist.main else None, dist, device)
    finally:
        if dist.enabled:
            import torch.distributed as tdist

            tdist.destroy_process_group()


def _fit(config: FinetuneConfig, callback: Callback | None, dist: Dist, device: torch.device) -> RunResult:
    emit = callback or (lambda event, info: None)
    precision = resolve_precision(config.precision, device)
    resuming = config.resume is not None

    # 1. data: the split is decided once (rank 0), saved, and reused by --resume
    if resuming:
        run_dir = Path(config.resume)  # type: ignore[arg-type]
        data = FolderData.load(run_dir / "split.json")
        _check_files_exist(data)
    else:
        run_dir = None
        data = _on_rank0(lambda: _prepare_data(config), dist)
    classes = data.classes
    counts = data.counts("train")

    # 2. model, preprocessing, loaders, recipe
    seed_everything(config.seed)
    loaded = build_model(config, classes)
    model = loaded.model.to(device)
    data_config = model_data_config(model, config.img_size)
    train_loader, val_loader, sampler = _loaders(config, data, data_config, device, dist)
    num_batches = len(train_loader)
    steps_per_epoch = math.ceil(num_batches / config.accum_steps)
    parts = build_parts(config, model, counts, steps_per_epoch, device, precision, dist)
    progress, state = _Progress(), {}

    # 3. the run folder (rank 0 names it; every rank agrees)
    if not resuming:
        run_dir = _on_rank0(lambda: _new_run_dir(config), dist)
    assert run_dir is not None
    if resuming:
        state = _read_state(run_dir / STATE_FILE)
        progress = _load_state(state, parts, dist)
    if dist.main:
        if not resuming:
            data.save(run_dir / "split.json")
        _write_args(run_dir, config, loaded, data_config, device, precision, dist, steps_per_epoch)

    # 4. train: epochs of train_one_epoch + evaluate, the state saved after each. From here on,
    #    Ctrl-C (SIGINT) or SIGTERM stops the run at the next optimizer step and saves the state.
    stopped = "done"
    rng = state.get("rng") if resuming and dist.world == 1 else None
    with _stop_on_signals() as stop:
        emit("start", {
            "run_dir": run_dir, "classes": classes, "train_counts": counts, "val_counts": data.counts("val"),
            "layout": data.layout, "skipped": data.skipped, "warnings": _data_warnings(data, config),
            "model": config.model, "arch": loaded.arch, "source": loaded.source,
            "input_size": data_config["input_size"], "device": str(device), "precision": precision,
            "world_size": dist.world, "epochs": config.epochs, "steps_per_epoch": steps_per_epoch,
            "num_batches": num_batches, "resumed_epoch": progress.epoch if resuming else None,
            "resumed_batch": progress.batch if resuming else None,
            "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        })
        while progress.epoch < config.epochs:
            epoch = progress.epoch
            if progress.batch == 0:
                seed_everything(_epoch_seed(config.seed, epoch, dist.rank))
            elif rng is not None:
                set_rng_state(rng)  # continue the interrupted epoch exactly where it stopped
            else:
                seed_everything(_epoch_seed(config.seed, epoch, dist.rank) + progress.batch)
            rng = None
            sampler.set_epoch(epoch, start=progress.batch * config.batch_size)
            train_loader.generator.manual_seed(_epoch_seed(config.seed, epoch, dist.rank))
            emit("epoch_start", {"epoch": epoch + 1, "epochs": config.epochs, "num_batches": num_batches,
                                 "batch": progress.batch, "steps_per_epoch": steps_per_epoch})
            try:
                stats = train_one_epoch(
                    parts, train_loader, num_batches=num_batches, global_step=progress.global_step,
                    start_batch=progress.batch, max_steps=config.max_steps,
                    on_step=lambda info, e=epoch: emit("step", dict(info, epoch=e + 1)),
                    stop_requested=stop.requested)
            except NonFiniteLossError as e:
                raise _non_finite(e, run_dir, epoch) from None
            progress.global_step, progress.batch = stats["global_step"], stats["batch"]
            progress.loss_sum += stats["loss_sum"]
            progress.images += stats["images"]
            progress.train_time += stats["train_time"]

            if stats["stopped"] == "interrupt":
                _save_state(run_dir, parts, progress, dist)
                _save_model(run_dir / "last", parts, classes, data_config, dist)
                raise _interrupted(config, run_dir, progress, stop.signal)

            # evaluate the model that gets saved (the EMA one when --ema)
            eval_model = parts.ema.module if parts.ema is not None else parts.raw_model
            emit("evaluate", {"epoch": epoch + 1, "images": len(data.val)})
            eval_started = time.perf_counter()
            metrics = evaluate(eval_model, val_loader, len(classes), device, precision, dist)
            eval_time = time.perf_counter() - eval_started
            row = {"epoch": epoch + 1,
                   "train_loss": progress.loss_sum / progress.images if progress.images else math.nan,
                   "val_loss": metrics["val_loss"], "val_top1": metrics["val_top1"],
                   "val_top5": metrics["val_top5"], "lr": stats["lr"],
                   "epoch_time": progress.train_time + eval_time,  # seconds, training and evaluation
                   "img_s": progress.images / max(progress.train_time, 1e-9)}  # training images per second
            if progress.rows and progress.rows[-1]["epoch"] == row["epoch"]:
                progress.rows.pop()  # the partial row of a --max-steps stop, now completed
            progress.rows.append(row)
            # better: a higher top-1, or the same top-1 at a clearly lower loss (small val sets tie often)
            improved = metrics["val_top1"] > progress.best_top1 or (
                metrics["val_top1"] == progress.best_top1 and metrics["val_loss"] < progress.best_loss - MIN_DELTA)
            if improved:
                progress.best_top1, progress.best_loss = metrics["val_top1"], metrics["val_loss"]
                progress.best_epoch, progress.bad_epochs = epoch + 1, 0
                progress.best_confusion = metrics["confusion"].tolist()
                _save_model(run_dir / "best", parts, classes, data_config, dist)
            else:
                progress.bad_epochs += 1

            if stats["batch"] >= num_batches:  # the next epoch starts from its beginning
                progress.epoch, progress.batch = epoch + 1, 0
                progress.loss_sum, progress.images, progress.train_time = 0.0, 0, 0.0
            else:  # max_steps: the row above covers the part of the epoch that was trained
                progress.rows[-1]["partial"] = 1.0
            _save_model(run_dir / "last", parts, classes, data_config, dist)
            _save_state(run_dir, parts, progress, dist)
            if dist.main:
                _write_metrics(run_dir / "metrics.csv", progress.rows)
            patience_out = bool(config.patience) and progress.bad_epochs >= config.patience  # type: ignore[operator]
            emit("epoch_end", {"row": row, "best": improved, "best_top1": progress.best_top1,
                               "best_epoch": progress.best_epoch, "bad_epochs": progress.bad_epochs,
                               "patience": config.patience, "epochs": config.epochs})

            if stats["stopped"] == "max_steps":
                stopped = "max_steps"
                break
            if patience_out:
                stopped = "patience"
                break
            interrupt = torch.tensor([float(stop.requested())])
            if _all_reduce(interrupt, dist).item() > 0:
                raise _interrupted(config, run_dir, progress, stop.signal)

    # 5. figures
    if dist.main:
        _write_figures(run_dir, progress, classes)
    result = RunResult(run_dir=run_dir, best_top1=progress.best_top1, best_epoch=progress.best_epoch,
                       epochs_done=progress.epoch, global_step=progress.global_step, stopped=stopped,
                       rows=progress.rows, model=parts.ema.module if parts.ema is not None else parts.raw_model)
    emit("end", {"result": result})
    return result


# ---------------------------------------------------------------------------------- run pieces


def _prepare_data(config: FinetuneConfig) -> FolderData:
    """discover() the layout, then decode every image once: unreadable ones are skipped (or fatal)."""
    data = discover(config.data, val_split=config.val_split, seed=config.seed)
    data.train, skipped_train = drop_unreadable(data.train, strict=config.strict)
    data.val, skipped_val = drop_unreadable(data.val, strict=config.strict)
    data.skipped = skipped_train + skipped_val
    empty = [c for c, n in zip(data.classes, data.counts("train"), strict=True) if n == 0]
    if empty:
        raise DatasetError(f"class(es) with no readable training images: {', '.join(empty)}")
    if not data.val:
        raise DatasetError(f"no readable validation images in '{config.data}'")
    return data


def _check_files_exist(data: FolderData) -> None:
    missing = [p for p, _ in data.train + data.val if not Path(p).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} image(s) of the saved split are gone (first: {missing[0]}); "
                           "the run cannot be resumed on changed data")


def _data_warnings(data: FolderData, config: FinetuneConfig) -> list[str]:
    warnings = list(data.warnings)
    counts = data.counts("train")
    if config.balance == "none" and min(counts) and max(counts) / min(counts) > IMBALANCE_HINT_RATIO:
        warnings.append(f"classes are imbalanced (largest/smallest = {max(counts) / min(counts):.1f}); "
                        "consider --balance sampler or --balance loss")
    return warnings


def _loaders(config: FinetuneConfig, data: FolderData, data_config: dict[str, Any], device: torch.device,
             dist: Dist) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader, EpochSampler]:
    from vitcli.data import eval_transform, train_transform

    train_tf = train_transform(data_config, scale=(config.scale_min, 1.0), color_jitter=config.color_jitter,
                               auto_augment=config.randaugment or None)
    weights = None
    if config.balance == "sampler":
        counts = data.counts("train")
        weights = torch.tensor([1.0 / counts[t] for _, t in data.train], dtype=torch.float64)
    sampler = EpochSampler(len(data.train), shuffle=True, weights=weights, seed=config.seed, dist=dist)
    workers = config.workers if config.workers is not None else default_workers(dist.world)
    # full batches only (BatchNorm needs more than one sample), unless the data is smaller than a batch
    drop_last = sampler.share() >= config.batch_size
    # forked workers inherit the stop-on-signal handler, so Ctrl-C doesn't kill them mid-epoch
    fork = workers > 0 and sys.platform == "linux"
    common = {"num_workers": workers, "pin_memory": device.type == "cuda", "worker_init_fn": _seed_worker,
              "multiprocessing_context": "fork" if fork else None}
    train = torch.utils.data.DataLoader(LabeledImages(data.train, train_tf), batch_size=config.batch_size,
                                        sampler=sampler, drop_last=drop_last, generator=torch.Generator(),
                                        **common)
    val_sampler = EpochSampler(len(data.val), shuffle=False, dist=dist, pad=False)
    val = torch.utils.data.DataLoader(LabeledImages(data.val, eval_transform(data_config)),
                                      batch_size=config.batch_size, sampler=val_sampler,
                                      generator=torch.Generator(), **common)
    return train, val, sampler


def _new_run_dir(config: FinetuneConfig) -> Path:
    """project/name, numbered name2, name3, ... when it exists (unless exist_ok); created here."""
    project = Path(config.project).expanduser()
    project.mkdir(parents=True, exist_ok=True)
    base = config.name or "exp"
    if config.exist_ok:
        (project / base).mkdir(exist_ok=True)
        return project / base
    for n in range(1, 100_000):
        candidate = project / (base if n == 1 else f"{base}{n}")
        try:
            candidate.mkdir()  # atomic: two runs started at once get different folders
            return candidate
        except FileExistsError:
            continue
    raise UsageError(f"too many runs named '{base}' in '{project}'; use --name")


def _write_args(run_dir: Path, config: FinetuneConfig, loaded: LoadedModel, data_config: dict[str, Any],
                device: torch.device, precision: str, dist: Dist, steps_per_epoch: int) -> None:
    import timm

    from vitcli import __version__
    from vitcli.fileio import atomic_open

    resolved = {"arch": loaded.arch, "source": loaded.source, "device": str(device), "precision": precision,
                "world_size": dist.world, "steps_per_epoch": steps_per_epoch,
                "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
                "versions": {"vitcli": __version__, "timm": timm.__version__, "torch": torch.__version__}}
    with atomic_open(run_dir / "args.json") as f:
        json.dump({"config": asdict(config), "resolved": resolved}, f, indent=1)


def _save_model(folder: Path, parts: TrainParts, classes: list[str], data_config: dict[str, Any],
                dist: Dist) -> None:
    from vitcli.models import save_model_folder

    if dist.main:
        model = parts.ema.module if parts.ema is not None else parts.raw_model
        save_model_folder(model, folder, classes, data_config)


def _save_state(run_dir: Path, parts: TrainParts, progress: _Progress, dist: Dist) -> None:
    from vitcli.fileio import atomic_save_torch

    if not dist.main:
        return
    state = {
        "version": STATE_VERSION,
        "model": parts.raw_model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict() if parts.scheduler is not None else None,
        "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
        "ema": parts.ema.state_dict() if parts.ema is not None else None,
        "progress": asdict(progress),
        "rng": rng_state(),
    }
    atomic_save_torch(state, run_dir / STATE_FILE)


def _load_state(state: dict[str, Any], parts: TrainParts, dist: Dist) -> _Progress:
    if state.get("version") != STATE_VERSION:
        raise UsageError(f"{STATE_FILE} has version {state.get('version')}; this vitcli writes {STATE_VERSION}")
    parts.raw_model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    saved_schedule = state["scheduler"] or {}
    if parts.scheduler is not None and saved_schedule.get("t_initial") == getattr(parts.scheduler, "t_initial", None):
        parts.scheduler.load_state_dict(saved_schedule)  # else --epochs changed: the new schedule takes over
    if parts.scaler is not None and state["scaler"] is not None:
        parts.scaler.load_state_dict(state["scaler"])
    if parts.ema is not None and state["ema"] is not None:
        parts.ema.load_state_dict(state["ema"])
    progress = _Progress(**state["progress"])
    if parts.scheduler is not None:
        parts.scheduler.step_update(num_updates=progress.global_step)
    return progress


def _write_metrics(path: Path, rows: list[dict[str, float]]) -> None:
    from vitcli.fileio import atomic_open

    columns = ["epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "epoch_time", "img_s"]
    with atomic_open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row["epoch"]] + [f"{row[c]:.6g}" for c in columns[1:]])


def _write_figures(run_dir: Path, progress: _Progress, classes: list[str]) -> None:
    from vitcli.plots import save_confusion_matrix, save_curves

    if progress.rows:
        save_curves(progress.rows, run_dir / "curves.png")
    if progress.best_confusion:
        save_confusion_matrix(progress.best_confusion, classes, run_dir / "confusion_matrix.png",
                              title=f"{run_dir.name}: best model (epoch {progress.best_epoch}) on val")


def _non_finite(e: NonFiniteLossError, run_dir: Path, epoch: int) -> NonFiniteLossError:
    kept = (f"the last good state is kept in {run_dir / STATE_FILE} ({run_dir / 'last'} has its weights)"
            if (run_dir / STATE_FILE).is_file() else "no state was saved yet")
    return NonFiniteLossError(f"{e} (epoch {epoch + 1}); the run stopped and {kept}. Try a lower --lr, "
                              "--precision fp32 or a smaller --clip-grad")


def _interrupted(config: FinetuneConfig, run_dir: Path, progress: _Progress, signum: int) -> TrainingInterrupted:
    where = (f"in epoch {progress.epoch + 1} after batch {progress.batch}" if progress.batch
             else f"after epoch {progress.epoch}")
    data = f"{config.data} " if config.data else ""
    return TrainingInterrupted(
        f"interrupted {where} (step {progress.global_step}); the state is saved in {run_dir}. "
        f"Resume with: vitcli finetune {data}--resume {run_dir}",
        run_dir, exit_code=128 + (signum or signal.SIGINT))


class _StopFlag:
    def __init__(self) -> None:
        self.signal = 0

    def requested(self) -> bool:
        return self.signal != 0


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_StopFlag]:
    """SIGINT/SIGTERM ask the loop to stop at the next optimizer step; a second Ctrl-C aborts at once.

    DataLoader workers forked meanwhile inherit the handler, so they keep serving until the loop stops.
    """
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.signal = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
