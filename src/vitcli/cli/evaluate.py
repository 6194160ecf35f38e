"""`vitcli evaluate`: accuracy, loss, per-class metrics and confusion matrix on a labelled folder."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from vitcli.cli._errors import handled_errors
from vitcli.cli._options import (
    DEFAULT_MODEL,
    BatchSizeOpt,
    DeviceOpt,
    Precision,
    PrecisionOpt,
    WeightsOpt,
    WorkersOpt,
)
from vitcli.cli._render import escape, progress_bar

MATRIX_TABLE_MAX_CLASSES = 30  # larger confusion matrices: --json or --confusion-png


def evaluate(
    data: Annotated[Path, typer.Argument(
        help="A folder of class sub-folders, or a dataset root: DATA/test is used, else DATA/val "
             "(validation/, valid/), else DATA itself.", metavar="DATA", show_default=False)],
    model: Annotated[str, typer.Option(
        "--model", "-m",
        help="A finetune run folder (runs/finetune/NAME: its best/ model), a model folder "
             "(config.json + model.safetensors), a timm name[.tag] or a name in the weights/ store "
             "(default: the shipped ImageNet DeiT-Tiny).",
        metavar="RUN_OR_MODEL")] = DEFAULT_MODEL,
    weights: WeightsOpt = None,
    split: Annotated[str | None, typer.Option(
        "--split", "-s", help="Evaluate DATA/NAME (e.g. val, test, train) instead of the automatic choice.",
        metavar="NAME")] = None,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print one JSON document to stdout instead of tables.")] = False,
    confusion_png: Annotated[Path | None, typer.Option(
        "--confusion-png", help="Also write the confusion matrix as a PNG image to this file.",
        metavar="FILE")] = None,
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Stop before evaluating if any image is unreadable (default: skip it).")] = False,
) -> None:
    """Evaluate a model on a folder-per-class split: top-1/top-5, loss, per-class metrics, confusion matrix.

    Example: vitcli evaluate ./data --model runs/finetune/exp/best --confusion-png confusion.png

    Class folders are matched to the model's labels by name, never by order; a class the model does
    not know is an error. A label the model holds twice (ImageNet's crane: bird 134, machine 517) is
    picked by index: name the folder crane_134 (or 134). Top-5 is shown for models of more than 5
    classes (null in --json otherwise).

    --json prints one JSON document: {"top1", "top5", "loss", "n_images", "folder", "per_class":
    [{"label", "precision", "recall", "f1", "support"}], "confusion_matrix": {"labels", "matrix"},
    "skipped": [{"path", "reason"}]} (matrix rows = true class, columns = predicted).

    Unreadable images are listed on stderr and skipped; the scores cover the rest, and the exit
    code is then 1 (as for predict: exit 1 if any input failed). --strict stops at the first one.

    Under torchrun (torchrun --nproc-per-node N -m vitcli evaluate DATA) each process scores every
    N-th image on its own device; the counts are summed and rank 0 reports the whole folder.
    """
    with handled_errors():
        from vitcli.inference.shards import torchrun_rank

        rank, group, device_name = torchrun_rank(), None, device
        if rank.enabled:
            from vitcli.inference.shards import init_process_group

            rank, device_name, group = init_process_group(device)
        try:
            _evaluate(data, model, weights, split, json_out, confusion_png, batch_size, workers, device_name,
                      precision.value, strict, rank, group)
        finally:
            if rank.enabled:
                import torch.distributed as dist

                dist.destroy_process_group()


def _evaluate(data, model, weights, split, json_out, confusion_png, batch_size, workers, device, precision, strict,
              rank, group) -> None:
    """One process's part; under torchrun every rank scores its share and rank 0 reports the sum."""
    from vitcli.console import err
    from vitcli.evaluate import evaluate_model
    from vitcli.models.resolve import load_model

    with err.status(f"loading {escape(model)}") if rank.main else contextlib.nullcontext():
        loaded = load_model(model, weights)
    if rank.main and loaded.folder is not None and loaded.folder != Path(model.removeprefix("local-dir:")).expanduser():
        err.print(f"using the model folder {escape(loaded.folder)}", highlight=False)
    with progress_bar("evaluate") if rank.main else contextlib.nullcontext(lambda done, total: None) as on_batch:
        result = evaluate_model(loaded, data, split=split, batch_size=batch_size, workers=workers, device=device,
                                precision=precision, strict=strict, on_batch=on_batch, rank=rank, group=group)
    if not rank.main:
        if result.skipped:
            raise typer.Exit(1)
        return
    for path, reason in result.skipped:
        err.print(f"[bold red]Error:[/] {escape(path)}: {escape(reason)}", highlight=False)
    if confusion_png is not None:
        from vitcli.charts import save_confusion_matrix

        title = f"{loaded.name} on {result.folder}"
        save_confusion_matrix(result.matrix, result.labels, confusion_png, title=title)
        err.print(f"wrote {escape(confusion_png)}", highlight=False)
    _report(result, json_out)
    if result.skipped:
        raise typer.Exit(1)


def _report(result, json_out: bool) -> None:
    import json

    from vitcli.console import err, out

    if json_out:
        out.out(json.dumps(result.to_dict()), highlight=False)
        return
    out.print(_summary_table(result))
    out.print(_class_table(result))
    if len(result.labels) <= MATRIX_TABLE_MAX_CLASSES:
        out.print(_matrix_table(result))
    else:
        err.print(f"the confusion matrix has {len(result.labels)} classes: see it with --json or "
                  "--confusion-png FILE", highlight=False)


def _summary_table(result):
    from rich.table import Table

    table = Table(title=escape(result.folder), header_style="bold", title_justify="left")
    table.add_column("images", justify="right")
    table.add_column("top-1", justify="right")
    top5 = [f"{result.top5:.2%}"] if result.top5 is not None else []  # no top-5 with 5 classes or fewer
    if top5:
        table.add_column("top-5", justify="right")
    table.add_column("loss", justify="right")
    table.add_row(str(result.n_images), f"{result.top1:.2%}", *top5, f"{result.loss:.4f}")
    return table


def _class_table(result):
    from rich.table import Table

    table = Table(header_style="bold")
    table.add_column("class", overflow="fold")
    for name in ("precision", "recall", "F1", "support"):
        table.add_column(name, justify="right")
    for m in result.per_class:
        table.add_row(escape(m.label), f"{m.precision:.4f}", f"{m.recall:.4f}", f"{m.f1:.4f}", str(m.support))
    return table


def _matrix_table(result):
    from rich.table import Table

    table = Table(title="confusion matrix (rows: true class, columns: predicted)", header_style="bold",
                  title_justify="left")
    table.add_column("true \\ predicted", overflow="fold")
    for label in result.labels:
        table.add_column(escape(label), justify="right", overflow="fold")
    for i, (label, row) in enumerate(zip(result.labels, result.matrix.tolist(), strict=True)):
        cells = [f"[bold]{count}[/]" if j == i and count else str(count) for j, count in enumerate(row)]
        table.add_row(escape(label), *cells)
    return table
