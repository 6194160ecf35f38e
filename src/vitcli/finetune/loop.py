"""The fine-tuning loop, top to bottom: build the parts, train one epoch, evaluate, and ``fit`` a whole run.

The recipe is timm's: ``create_optimizer_v2`` (AdamW with layer-wise LR decay), ``create_scheduler_v2``
(cosine with warmup, updated every optimizer step), ``Mixup`` + ``SoftTargetCrossEntropy``, ``ModelEmaV3``,
``NativeScaler`` (fp16 loss scaling) and ``dispatch_clip_grad``.

Resume (see ``rundir``): an epoch's sample order is a function of (seed, epoch) and the RNG states are
saved, so a run resumed mid-epoch on one process with ``workers=0`` ends with bit-identical weights.

Distributed: under ``torchrun`` (RANK/LOCAL_RANK/WORLD_SIZE set) one process per device trains a
DistributedDataParallel copy; only rank 0 writes files and calls the callback. A failure on any rank
stops every rank with that error (see ``vitcli.distributed``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitcli.devices import autocast, resolve_precision
from vitcli.distributed import (
    Rank,
    all_reduce,
    any_rank,
    close_distributed,
    init_distributed,
    on_every_rank,
    on_rank0,
    share_step,
)
from vitcli.errors import NonFiniteLossError
from vitcli.finetune import rundir
from vitcli.finetune.config import STATE_FILE, FinetuneConfig, absolute_paths, check_config
from vitcli.finetune.data import check_files_exist, data_warnings, leak_warnings, make_loaders, prepare_data
from vitcli.finetune.model import build_model, classifier_heads, model_data_config
from vitcli.finetune.parts import TrainParts, build_parts
from vitcli.finetune.progress import Progress, RunResult
from vitcli.finetune.sampling import epoch_seed, seed_everything, set_rng_state
from vitcli.finetune.stop import interrupted, non_finite, stop_on_signals
from vitcli.finetune.temperature import calibrate_run
from vitcli.io.datasets import FolderData
from vitcli.metrics import ScoreSums

Callback = Callable[[str, dict[str, Any]], None]


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
    from timm.utils import dispatch_clip_grad

    model, optimizer, accum = parts.model, parts.optimizer, parts.accum_steps
    params = [p for p in parts.raw_model.parameters() if p.requires_grad]
    model.train()
    if parts.freeze:  # a linear probe: the frozen backbone keeps its norm statistics and no dropout
        model.eval()
        for head in classifier_heads(parts.raw_model):
            head.train()
    loss_sum, seen, batch, stopped = 0.0, 0, start_batch, None
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    batches = iter(batches)
    while True:
        update = (batch + 1) % accum == 0 or batch + 1 == num_batches
        no_sync = model.no_sync() if parts.dist.enabled and not update else contextlib.nullcontext()
        with no_sync:
            loss, failure = None, None
            try:
                images, targets = next(batches)
                images = images.to(parts.device, non_blocking=True)
                targets = targets.to(parts.device, non_blocking=True)
                if parts.mixup is not None:
                    images, targets = _mix(parts, images, targets)
                with autocast(parts.device, parts.precision):
                    logits = model(images)  # (B, num_classes)
                    loss = parts.loss_fn(logits, targets)
            except StopIteration:
                break
            except Exception as e:  # shared by the step's collective: every rank stops with this error
                failure = e
            loss_value, interrupt = share_step(loss, bool(stop_requested and stop_requested()), failure, parts.dist)
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(f"the loss became {loss_value} at optimizer step {global_step + 1}")
            batch += 1
            if parts.scaler is not None:  # timm's NativeScaler: scaled backward, then unscale, clip, step, update
                parts.scaler(loss / accum, optimizer, clip_grad=parts.clip_grad, parameters=params,
                             need_update=update)
            else:
                (loss / accum).backward()
                if update:
                    if parts.clip_grad:
                        dispatch_clip_grad(params, parts.clip_grad)
                    optimizer.step()
        loss_sum += loss_value * len(images)
        seen += len(images)
        if not update:
            continue
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
             device: torch.device, precision: str = "fp32", dist: Rank = Rank()) -> dict[str, Any]:
    """Validation loss (plain cross-entropy), top-1 accuracy, top-5 where there are more than 5 classes
    (``val_top5`` is left out otherwise), and the confusion matrix: ``metrics.ScoreSums``, the counts
    ``vitcli evaluate`` keeps too.

    Under torchrun each rank evaluates its share and the sums are reduced over the ranks.
    """
    model.eval()
    sums = ScoreSums(num_classes)
    def score_my_share() -> None:
        for images, target in batches:
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(images)  # (B, C)
            sums.add(logits.float(), target)

    # a failure on one rank (a decode error, out of memory) reaches every rank before the sums are reduced
    on_every_rank(score_my_share, dist)
    sums.reduce(lambda t: all_reduce(t, dist))
    metrics: dict[str, Any] = {"val_loss": sums.loss if sums.count else 0.0,
                               "val_top1": sums.top1 if sums.count else 0.0}
    if sums.topk is not None:
        metrics["val_top5"] = sums.topk if sums.count else 0.0
    metrics |= {"confusion": sums.matrix, "count": sums.count}
    return metrics


# -------------------------------------------------------------------------------------- the run


def fit(config: FinetuneConfig, callback: Callback | None = None) -> RunResult:
    """Fine-tune ``config.model`` on ``config.data`` and write the run folder.

    ``callback(event, info)`` receives "start", "epoch_start", "step", "evaluate", "epoch_end" and "end" events
    (rank 0 only). Raises TrainingInterrupted after saving the state on Ctrl-C/SIGTERM,
    NonFiniteLossError on a NaN/inf loss, DatasetError/UsageError/ModelLoadError before training.
    """
    check_config(config)
    if config.resume is None:
        config = absolute_paths(config)  # what args.json keeps: --resume then works from any directory
    dist, device = init_distributed(config.device)
    try:
        return _fit(config, callback if dist.main else None, dist, device)
    finally:
        close_distributed(dist)


def _fit(config: FinetuneConfig, callback: Callback | None, dist: Rank, device: torch.device) -> RunResult:
    emit = callback or (lambda event, info: None)
    precision = resolve_precision(config.precision, device, training=True)
    resuming = config.resume is not None

    # 1. data: the split is decided once, saved, and reused by --resume
    if resuming:
        run_dir = Path(config.resume)  # type: ignore[arg-type]
        data = FolderData.load(run_dir / rundir.SPLIT_FILE)
        check_files_exist(data)
    else:
        data = prepare_data(config, dist)
    classes, counts = data.classes, data.counts("train")

    # 2. model, preprocessing, loaders, recipe
    seed_everything(config.seed)
    loaded = build_model(config, classes)
    model = loaded.model.to(device)
    data_config = model_data_config(model, config.img_size)
    leaks = [] if resuming else leak_warnings(config, data, loaded, data_config, device, dist)
    train_loader, val_loader, sampler = make_loaders(config, data, data_config, device, dist)
    num_batches = len(train_loader)
    steps_per_epoch = math.ceil(num_batches / config.accum_steps)
    parts = build_parts(config, model, counts, steps_per_epoch, device, precision, dist)
    progress, state = Progress(), {}

    # 3. the run folder (rank 0 makes it and writes to it; every rank agrees on its name)
    if resuming:
        state = rundir.read_state(run_dir / STATE_FILE)
        progress = rundir.load_state(state, parts)
    else:
        run_dir = on_rank0(lambda: rundir.new_run_dir(config), dist)
    leftovers = on_rank0(lambda: rundir.remove_leftovers(run_dir), dist) or []  # of a run killed mid-save
    resolved = {"device": str(device), "precision": precision, "world_size": dist.world,
                "steps_per_epoch": steps_per_epoch}

    def write_run_files() -> None:
        if not resuming:
            data.save(run_dir / rundir.SPLIT_FILE)
        rundir.write_args(run_dir, config, loaded, data_config, resolved)

    on_rank0(write_run_files, dist)

    def save(best: bool = False) -> None:  # rank 0 writes; an error there stops every rank
        def write() -> None:
            if best:
                rundir.save_model(run_dir / "best", parts.saved_model, classes, data_config)
            rundir.save_model(run_dir / "last", parts.saved_model, classes, data_config)
            rundir.save_state(run_dir, parts, progress)
            rundir.write_metrics(run_dir / rundir.METRICS_FILE, progress.rows)

        on_rank0(write, dist)

    # 4. train: epochs of train_one_epoch + evaluate, the state saved after each. From here on,
    #    Ctrl-C (SIGINT) or SIGTERM stops the run at the next optimizer step and saves the state.
    stopped = "done"
    rng = state.get("rng") if resuming and dist.world == 1 else None
    with stop_on_signals() as stop:
        emit("start", {
            "run_dir": run_dir, "classes": classes, "train_counts": counts, "val_counts": data.counts("val"),
            "layout": data.layout, "skipped": data.skipped, "warnings": data_warnings(data, config) + leaks
            + [f"removed what a run killed while saving left: {', '.join(leftovers)}"] * bool(leftovers),
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
                seed_everything(epoch_seed(config.seed, epoch, dist.rank))
            elif rng is not None:
                set_rng_state(rng)  # continue the interrupted epoch exactly where it stopped
            else:
                seed_everything(epoch_seed(config.seed, epoch, dist.rank) + progress.batch)
            rng = None
            sampler.set_epoch(epoch, start=progress.batch * config.batch_size)
            train_loader.generator.manual_seed(epoch_seed(config.seed, epoch, dist.rank))
            emit("epoch_start", {"epoch": epoch + 1, "epochs": config.epochs, "num_batches": num_batches,
                                 "batch": progress.batch, "steps_per_epoch": steps_per_epoch})
            try:
                stats = train_one_epoch(
                    parts, train_loader, num_batches=num_batches, global_step=progress.global_step,
                    start_batch=progress.batch, max_steps=config.max_steps,
                    on_step=lambda info, e=epoch: emit("step", dict(info, epoch=e + 1)),
                    stop_requested=stop.requested)
            except NonFiniteLossError as e:
                raise non_finite(e, run_dir, epoch) from None
            progress.global_step, progress.batch = stats["global_step"], stats["batch"]
            progress.loss_sum += stats["loss_sum"]
            progress.images += stats["images"]
            progress.train_time += stats["train_time"]

            if stats["stopped"] == "interrupt":
                on_rank0(lambda: (rundir.save_state(run_dir, parts, progress),
                                  rundir.save_model(run_dir / "last", parts.saved_model, classes, data_config)), dist)
                raise interrupted(config, run_dir, progress, stop.signal)

            # evaluate the model that gets saved (the EMA one when --ema)
            emit("evaluate", {"epoch": epoch + 1, "images": len(data.val)})
            eval_started = time.perf_counter()
            metrics = evaluate(parts.saved_model, val_loader, len(classes), device, precision, dist)
            eval_time = time.perf_counter() - eval_started
            row = {"epoch": epoch + 1,
                   "train_loss": progress.loss_sum / progress.images if progress.images else math.nan,
                   **{k: metrics[k] for k in ("val_loss", "val_top1", "val_top5") if k in metrics},
                   "lr": stats["lr"], "epoch_time": progress.train_time + eval_time,  # s, training and evaluation
                   "img_s": progress.images / max(progress.train_time, 1e-9)}  # training images per second
            improved = progress.record(row, metrics, finished=stats["batch"] >= num_batches)
            save(best=improved)
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
            if any_rank(stop.requested(), dist):
                raise interrupted(config, run_dir, progress, stop.signal)

    # 5. the temperature of best/ and last/, fitted on the validation split (a resumed run's too)
    emit("calibrate", {"images": len(data.val)})
    temperatures = calibrate_run(run_dir, parts.saved_model, classes, val_loader, device, precision, dist)
    emit("calibrated", {"temperatures": temperatures})

    # 6. figures
    on_rank0(lambda: rundir.write_figures(run_dir, progress, classes), dist)
    result = RunResult(run_dir=run_dir, best_top1=progress.best_top1, best_epoch=progress.best_epoch,
                       epochs_done=progress.epoch, global_step=progress.global_step, stopped=stopped,
                       rows=progress.rows, model=parts.saved_model)
    emit("end", {"result": result})
    return result


