"""`vitcli finetune`: fine-tune a timm classifier on folders of class folders.

Every option defaults to None here and the core's ``FinetuneConfig`` supplies the value (--help shows
it, read from ``vitcli.finetune.config``, which imports no torch), so ``--resume`` can tell the options
given again from the rest.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from vitcli.cli.errors import handled_errors
from vitcli.cli.options import Device, WeightsOpt
from vitcli.cli.render import escape
from vitcli.finetune.config import BALANCE_MODES, DEFAULT_MODEL, PRECISIONS, RESUMABLE_OPTIONS, SCHEDULES, default

Balance = Enum("Balance", [(m, m) for m in BALANCE_MODES], type=str)  # type: ignore[misc]
TrainPrecision = Enum("TrainPrecision", [(p, p) for p in PRECISIONS], type=str)  # type: ignore[misc]
Schedule = Enum("Schedule", [(s, s) for s in SCHEDULES], type=str)  # type: ignore[misc]


def shown(name: str) -> str:
    """FinetuneConfig's default of ``name`` as --help shows it: on/off for switches."""
    value = default(name)
    return "on" if value is True else "off" if value is None or value is False else str(value)


def finetune(
    data: Annotated[Path | None, typer.Argument(
        help="DATA/train/CLASS/... with DATA/val/ (or validation/, valid/), or DATA/CLASS/... split by "
             "--val-split. Optional with --resume.", show_default=False)] = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="timm classifier name[.tag] (ViT, DeiT, ResNet, EfficientNet, ...), a model folder "
                              "or a weights/ store entry; it gets a new head for the classes of DATA.",
        show_default=DEFAULT_MODEL)] = None,
    weights: WeightsOpt = None,
    img_size: Annotated[int | None, typer.Option(
        "--img-size", min=16, help="Train at this resolution; ViT position embeddings are resampled "
                                   "(patch size kept).", show_default="the model's")] = None,
    pretrained: Annotated[bool | None, typer.Option(
        "--pretrained/--no-pretrained", help="Start from pretrained weights (--no-pretrained: random init).",
        show_default="pretrained")] = None,
    freeze: Annotated[bool | None, typer.Option(
        "--freeze", help="Train the classifier head(s) only (a linear probe).", show_default=shown("freeze"))] = None,
    zero_head: Annotated[bool | None, typer.Option(
        "--zero-head/--random-head", help="Start the new classifier head at zero (the ViT paper's fine-tuning) "
                                          "or from timm's random init.", show_default=shown("zero_head"))] = None,
    val_split: Annotated[float | None, typer.Option(
        "--val-split", min=0.0, max=1.0, help="Fraction of each class held out for validation when DATA has "
                                              "no val/ folder (stratified, seeded by --seed).",
        show_default=shown("val_split"))] = None,
    balance: Annotated[Balance | None, typer.Option(
        "--balance", help="Class imbalance: sampler draws classes equally often, loss weights them "
                          "inversely to their counts.", show_default=shown("balance"))] = None,
    strict: Annotated[bool | None, typer.Option(
        "--strict", help="Fail on an unreadable image instead of skipping it.", show_default=shown("strict"))] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", "-e", min=1, help="Training epochs.",
                                               show_default=shown("epochs"))] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", "-b", min=1, help="Images per step (per process under torchrun).",
        show_default=shown("batch_size"))] = None,
    accum_steps: Annotated[int | None, typer.Option(
        "--accum-steps", min=1, help="Gradient accumulation: one optimizer step every N batches.",
        show_default=shown("accum_steps"))] = None,
    lr: Annotated[float | None, typer.Option(
        "--lr", min=0.0, help="Peak learning rate (of the head, under --layer-decay).",
        show_default=shown("lr"))] = None,
    min_lr: Annotated[float | None, typer.Option("--min-lr", min=0.0, help="LR at the end of the schedule.",
                                                 show_default=shown("min_lr"))] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay", min=0.0, help="AdamW weight decay.",
                                                       show_default=shown("weight_decay"))] = None,
    layer_decay: Annotated[float | None, typer.Option(
        "--layer-decay", min=0.0, max=1.0, help="Layer-wise LR decay: block i of n gets lr * d**(n-i); "
                                                "1 turns it off.", show_default=shown("layer_decay"))] = None,
    warmup_epochs: Annotated[float | None, typer.Option(
        "--warmup-epochs", min=0.0, help="Linear LR warmup, in epochs (fractions allowed).",
        show_default=shown("warmup_epochs"))] = None,
    sched: Annotated[Schedule | None, typer.Option(
        "--sched", help="LR schedule (timm.scheduler), updated every optimizer step.",
        show_default=shown("sched"))] = None,
    opt: Annotated[str | None, typer.Option(
        "--opt", help="Optimizer name from timm.optim (adamw, sgd, lamb, lion, ...).",
        show_default=shown("opt"))] = None,
    label_smoothing: Annotated[float | None, typer.Option(
        "--label-smoothing", min=0.0, max=0.99, help="Label smoothing of the cross-entropy.",
        show_default=shown("label_smoothing"))] = None,
    clip_grad: Annotated[float | None, typer.Option(
        "--clip-grad", min=0.0, help="Clip the gradient norm to this (0: off).",
        show_default=shown("clip_grad"))] = None,
    drop_path: Annotated[float | None, typer.Option(
        "--drop-path", min=0.0, max=0.9, help="Stochastic depth rate.", show_default=shown("drop_path"))] = None,
    scale_min: Annotated[float | None, typer.Option(
        "--scale-min", min=0.01, max=1.0, help="RandomResizedCrop keeps between this fraction of the image "
                                               "area and all of it.", show_default=shown("scale_min"))] = None,
    color_jitter: Annotated[float | None, typer.Option(
        "--color-jitter", min=0.0, help="Colour jitter strength (0: off).", show_default=shown("color_jitter"))] = None,
    randaugment: Annotated[str | None, typer.Option(
        "--randaugment", help="timm RandAugment policy, e.g. rand-m9-mstd0.5-inc1.",
        show_default=shown("randaugment"))] = None,
    mixup: Annotated[float | None, typer.Option(
        "--mixup", min=0.0, help="Mixup alpha (e.g. 0.8; 0: off).", show_default=shown("mixup"))] = None,
    cutmix: Annotated[float | None, typer.Option(
        "--cutmix", min=0.0, help="CutMix alpha (e.g. 1.0; 0: off).", show_default=shown("cutmix"))] = None,
    leak_check: Annotated[bool | None, typer.Option(
        "--leak-check/--no-leak-check", help="Before training, embed both splits with the model and warn about "
                                             "validation images that nearly duplicate training ones (cosine >= 0.95).",
        show_default=shown("leak_check"))] = None,
    ema: Annotated[bool | None, typer.Option(
        "--ema/--no-ema", help="Evaluate and save an exponential moving average of the weights.",
        show_default=shown("ema"))] = None,
    ema_decay: Annotated[float | None, typer.Option(
        "--ema-decay", min=0.0, max=1.0, help="EMA decay, reached after a warmup.",
        show_default=shown("ema_decay"))] = None,
    precision: Annotated[TrainPrecision | None, typer.Option(
        "--precision", help="auto: bf16 on GPUs with native bf16 (Ampere and newer) and on CPUs with "
                            "AVX512-BF16 or AMX, fp16 with loss scaling on other GPUs (V100, T4), else fp32.",
        show_default=shown("precision"))] = None,
    device: Annotated[Device | None, typer.Option(
        "--device", help="Where to train: auto picks cuda, then mps, then cpu (torchrun: one GPU per process).",
        show_default=shown("device"))] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", "-j", min=0, help="DataLoader worker processes.", show_default="CPU cores, at most 4")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the split, the order and augmentation.",
                                             show_default=shown("seed"))] = None,
    patience: Annotated[int | None, typer.Option(
        "--patience", min=1, help="Stop after this many epochs without improvement (a higher val top-1, "
                                  "or the same at a lower val loss).",
        show_default=shown("patience"))] = None,
    max_steps: Annotated[int | None, typer.Option(
        "--max-steps", min=1, help="Stop after this many optimizer steps in total (smoke runs).",
        show_default=shown("max_steps"))] = None,
    project: Annotated[Path | None, typer.Option(
        "--project", help="Where run folders are made.", show_default=shown("project"))] = None,
    name: Annotated[str | None, typer.Option(
        "--name", help="Run folder name; numbered NAME2, NAME3, ... if it exists.", show_default="exp")] = None,
    exist_ok: Annotated[bool | None, typer.Option(
        "--exist-ok", help="Reuse PROJECT/NAME instead of numbering a new folder; the previous run's files "
                           "in it (state.pt, best/, last/, ...) are removed first.",
        show_default=shown("exist_ok"))] = None,
    resume: Annotated[Path | None, typer.Option(
        "--resume", help="Continue a run folder from its state.pt with its saved options (from any directory); "
                         f"only {', '.join('--' + o.replace('_', '-') for o in RESUMABLE_OPTIONS)} may change.",
        show_default=False)] = None,
) -> None:
    """Fine-tune a pretrained classifier (a ViT by default) on folders of class folders.

    Example: vitcli finetune data/ --model deit_tiny_patch16_224 --epochs 5

    Writes runs/finetune/exp (exp2, ...): best/ and last/ model folders (use them with
    `vitcli predict --model runs/finetune/exp/best`), metrics.csv, curves.png,
    confusion_matrix.png, args.json, split.json and state.pt. Ctrl-C saves the state:
    continue with --resume runs/finetune/exp. Multi-GPU:
    torchrun --nproc-per-node 4 -m vitcli finetune data/
    """
    given = {key: value for key, value in locals().items() if value is not None}
    with handled_errors():
        from vitcli.console import err, out
        from vitcli.distributed import torchrun_rank

        if not torchrun_rank().main:  # torchrun: rank 0 speaks for all
            err.quiet = out.quiet = True
        _run(given)


def _run(given: dict[str, Any]) -> None:
    from vitcli.console import err
    from vitcli.errors import TrainingInterrupted
    from vitcli.finetune.config import from_cli
    from vitcli.finetune.loop import fit

    config = from_cli(given)
    view = _View()
    try:
        result = fit(config, view)
    except TrainingInterrupted as e:
        view.close()
        err.print(f"[bold yellow]Interrupted:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(e.exit_code) from None
    finally:
        view.close()
    _report(result)


class _View:
    """Renders fit()'s events on stderr: the data summary, a progress bar per epoch, a table per epoch."""

    def __init__(self) -> None:
        self.progress: Any = None
        self.task: Any = None
        self.status: Any = None

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        getattr(self, f"on_{event}", lambda info: None)(info)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.status is not None:
            self.status.stop()
            self.status = None

    def on_start(self, info: dict[str, Any]) -> None:
        from rich.table import Table

        from vitcli.console import err

        resumed = ""
        if info["resumed_epoch"] is not None:
            at = f", batch {info['resumed_batch']}" if info["resumed_batch"] else ""
            resumed = f" (resuming at epoch {info['resumed_epoch'] + 1}{at})"
        size = "x".join(str(s) for s in info["input_size"][1:])
        procs = f", {info['world_size']} processes" if info["world_size"] > 1 else ""
        err.print(f"[bold]finetune[/] {escape(info['arch'])} ({info['source']}, {size}, "
                  f"{info['params'] / 1e6:.1f}M trainable parameters) on {info['device']} {info['precision']}"
                  f"{procs} -> {escape(str(info['run_dir']))}{resumed}", highlight=False)
        table = Table(title=f"{len(info['classes'])} classes ({info['layout']} layout)", title_justify="left",
                      header_style="bold")
        table.add_column("class")
        table.add_column("train", justify="right")
        table.add_column("val", justify="right")
        for name, n_train, n_val in zip(info["classes"], info["train_counts"], info["val_counts"], strict=True):
            table.add_row(escape(name), str(n_train), str(n_val))
        table.add_row("total", str(sum(info["train_counts"])), str(sum(info["val_counts"])), style="dim")
        err.print(table)
        if info["skipped"]:
            err.print(f"[yellow]Skipped {len(info['skipped'])} unreadable file(s):[/]")
            for path, reason in info["skipped"]:
                err.print(f"  {escape(path)}: {escape(reason)}", highlight=False)
        for warning in info["warnings"]:
            err.print(f"[yellow]Warning:[/] {escape(warning)}", highlight=False)

    def on_epoch_start(self, info: dict[str, Any]) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from vitcli.console import err

        self.close()
        self.progress = Progress(
            TextColumn(f"epoch {info['epoch']}/{info['epochs']}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=err, transient=True)
        self.task = self.progress.add_task("train", total=info["num_batches"], completed=info["batch"],
                                           loss="-", lr="-")
        self.progress.start()

    def on_step(self, info: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=info["batch"], loss=f"{info['loss']:.4f}",
                                 lr=f"{info['lr']:.2e}")

    def on_evaluate(self, info: dict[str, Any]) -> None:
        from vitcli.console import err

        self.close()
        self.status = err.status(f"epoch {info['epoch']}: evaluating on {info['images']} val images")
        self.status.start()

    def on_epoch_end(self, info: dict[str, Any]) -> None:
        from rich.table import Table

        from vitcli.console import err

        self.close()
        row = info["row"]
        table = Table(header_style="bold", show_edge=False)
        top5 = "val_top5" in row  # only with more than 5 classes: else every image is in the top 5
        for column in ("epoch", "loss", "val loss", "top-1", *(["top-5"] if top5 else []), "lr", "time", "img/s", ""):
            table.add_column(column, justify="right")
        mark = "[green]best[/]" if info["best"] else ""
        if not info["best"] and info["patience"]:
            mark = f"[dim]{info['bad_epochs']}/{info['patience']} without improvement[/]"
        table.add_row(f"{row['epoch']}/{info['epochs']}", f"{row['train_loss']:.4f}", f"{row['val_loss']:.4f}",
                      f"{row['val_top1']:.2%}", *([f"{row['val_top5']:.2%}"] if top5 else []), f"{row['lr']:.2e}",
                      f"{row['epoch_time']:.0f}s", f"{row['img_s']:.1f}", mark)
        err.print(table)


    def on_calibrate(self, info: dict[str, Any]) -> None:
        from vitcli.console import err

        self.close()
        self.status = err.status(f"fitting the temperature on {info['images']} val images")
        self.status.start()

    def on_calibrated(self, info: dict[str, Any]) -> None:
        from vitcli.console import err

        self.close()
        for name, fitted in info["temperatures"].items():
            if fitted.temperature is None:
                err.print(f"{name}/: no temperature fitted: {escape(fitted.reason)}", highlight=False)
            else:
                err.print(f"{name}/: temperature {fitted.temperature:.3f} (val NLL {fitted.nll_before:.4f} -> "
                          f"{fitted.nll_after:.4f}, ECE {fitted.ece_before:.4f} -> {fitted.ece_after:.4f})",
                          highlight=False)


def _report(result: Any) -> None:
    from vitcli.console import err, out

    reason = {"patience": "stopped early (--patience)", "max_steps": "stopped at --max-steps"}.get(result.stopped)
    if reason:
        err.print(f"[yellow]{reason}[/] after {result.global_step} steps", highlight=False)
    if result.best_epoch:
        out.print(f"best val top-1 {result.best_top1:.2%} (epoch {result.best_epoch}): {escape(result.best_dir)}",
                  highlight=False)
    out.print(f"run folder: {escape(result.run_dir)}", highlight=False)
    err.print(f"predict with: vitcli predict --model {escape(result.best_dir)} IMAGES", highlight=False)

