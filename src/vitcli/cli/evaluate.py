"""`vitcli evaluate`: accuracy, loss, calibration, per-class metrics, confusion matrix and the most
confident mistakes on a labelled folder. Parses options and renders; the job is ``vitcli.evaluate``."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from vitcli.cli.errors import handled_errors
from vitcli.cli.options import (
    DEFAULT_MODEL,
    BackendOpt,
    BatchSizeOpt,
    DeviceOpt,
    NoCalibrationOpt,
    Precision,
    PrecisionOpt,
    WeightsOpt,
    WorkersOpt,
)
from vitcli.cli.render import escape, progress_bar

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
    reliability_png: Annotated[Path | None, typer.Option(
        "--reliability-png", help="Also write a reliability diagram (accuracy against confidence in 15 bins, "
                                  "with their image counts and the ECE) to this PNG file.", metavar="FILE")] = None,
    mistakes: Annotated[int, typer.Option(
        "--mistakes", min=0, help="How many of the most confident mistakes to list (0: none).",
        metavar="N")] = 15,
    mistakes_png: Annotated[Path | None, typer.Option(
        "--mistakes-png", help="Also draw the listed mistakes as a grid of thumbnails with their labels "
                               "and probabilities in this PNG file.", metavar="FILE")] = None,
    no_calibration: NoCalibrationOpt = False,
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    backend: BackendOpt = None,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Stop before evaluating if any image is unreadable (default: skip it).")] = False,
) -> None:
    """Evaluate a model on a folder-per-class split: top-1/top-5, loss, calibration (NLL, ECE), per-class
    metrics, confusion matrix, and the most confident mistakes.

    Example: vitcli evaluate ./data --model runs/finetune/exp/best --mistakes-png mistakes.png

    Class folders are matched to the model's labels by name, never by order; a class the model does
    not know is an error. A label the model holds twice (ImageNet's crane: bird 134, machine 517) is
    picked by index: name the folder crane_134 (or 134). Top-5 is shown for models of more than 5
    classes (null in --json otherwise).

    Probabilities use the model's stored temperature (vitcli finetune and vitcli calibrate store one),
    which changes no top-1; --no-calibration shows the plain softmax. ECE uses 15 equal-width bins.

    The most confident mistakes, pointed at a training folder, are a label audit: images whose folder
    label the model confidently disputes come first.

    --json prints one JSON document: {"top1", "top5", "loss", "n_images", "folder", "per_class":
    [{"label", "precision", "recall", "f1", "support"}], "confusion_matrix": {"labels", "matrix"},
    "skipped": [{"path", "reason"}], "calibration": {"temperature", "nll", "ece", "ece_uncalibrated",
    "reliability": [{"lo", "hi", "count", "confidence", "accuracy"}]}, "mistakes": [{"path", "label",
    "predicted", "prob", "label_prob"}], "most_confused": [{"label", "predicted", "images"}]}
    (matrix rows = true class, columns = predicted).

    Unreadable images are listed on stderr and skipped; the scores cover the rest, and the exit
    code is then 1 (as for predict: exit 1 if any input failed). --strict stops at the first one.

    Under torchrun (torchrun --nproc-per-node N -m vitcli evaluate DATA) each process scores every
    N-th image on its own device; the counts are summed and rank 0 reports the whole folder.
    """
    with handled_errors():
        from vitcli.console import err
        from vitcli.distributed import torchrun_rank
        from vitcli.evaluate import EvalRequest, run_evaluate

        request = EvalRequest(data, model, str(weights) if weights else None, split, batch_size, workers,
                              device, precision.value, strict, not no_calibration, mistakes,
                              backend.value if backend else None)
        main = torchrun_rank().main
        status = err.status(f"loading {escape(model)}") if main else contextlib.nullcontext()
        status.__enter__()

        def loaded_now(loaded) -> None:
            status.__exit__(None, None, None)
            if loaded.folder is not None and loaded.folder != Path(model.removeprefix("local-dir:")).expanduser():
                err.print(f"using the model folder {escape(str(loaded.folder))}", highlight=False)

        try:
            with progress_bar("evaluate") if main else contextlib.nullcontext(None) as on_batch:
                loaded, result = run_evaluate(request, loaded_now, on_batch,
                                              lambda line: err.print(escape(line), highlight=False))
        finally:
            status.__exit__(None, None, None)
        if main:
            _write_files(loaded, result, confusion_png, reliability_png, mistakes_png)
            _report(result, json_out)
        if result.skipped:
            raise typer.Exit(1)


def _write_files(loaded, result, confusion_png: Path | None, reliability_png: Path | None,
                 mistakes_png: Path | None) -> None:
    from vitcli.console import err

    for path, reason in result.skipped:
        err.print(f"[bold red]Error:[/] {escape(path)}: {escape(reason)}", highlight=False)
    title = f"{loaded.name} on {result.folder}"
    if confusion_png is not None:
        from vitcli.charts import save_confusion_matrix

        save_confusion_matrix(result.matrix, result.labels, confusion_png, title=title)
        err.print(f"wrote {escape(str(confusion_png))}", highlight=False)
    if reliability_png is not None:
        from vitcli.charts import save_reliability_diagram

        save_reliability_diagram(result.reliability, reliability_png, title=title, ece=result.ece,
                                 temperature=result.temperature)
        err.print(f"wrote {escape(str(reliability_png))}", highlight=False)
    if mistakes_png is not None:
        from vitcli.charts import save_mistakes_grid

        save_mistakes_grid(result.mistakes, mistakes_png, title=f"most confident mistakes: {title}")
        err.print(f"wrote {escape(str(mistakes_png))}", highlight=False)


def _report(result, json_out: bool) -> None:
    import json

    from vitcli.console import err, out

    if json_out:
        out.out(json.dumps(result.to_dict(), allow_nan=False), highlight=False)
        return
    out.print(_summary_table(result))
    out.print(_class_table(result))
    if len(result.labels) <= MATRIX_TABLE_MAX_CLASSES:
        out.print(_matrix_table(result))
    else:
        err.print(f"the confusion matrix has {len(result.labels)} classes: see it with --json or "
                  "--confusion-png FILE", highlight=False)
    if result.confused:
        out.print(_confused_table(result))
    if result.mistakes:
        out.print(_mistakes_table(result))


def _summary_table(result):
    from rich.table import Table

    table = Table(title=escape(result.folder), header_style="bold", title_justify="left")
    table.add_column("images", justify="right")
    table.add_column("top-1", justify="right")
    top5 = [f"{result.top5:.2%}"] if result.top5 is not None else []  # no top-5 with 5 classes or fewer
    if top5:
        table.add_column("top-5", justify="right")
    table.add_column("loss", justify="right")
    for name in ("NLL", "ECE", "T"):
        table.add_column(name, justify="right")
    ece = f"{result.ece:.4f}"
    if result.ece_uncalibrated is not None:
        ece += f" (raw {result.ece_uncalibrated:.4f})"
    temperature = f"{result.temperature:.3f}" if result.temperature is not None else "none"
    table.add_row(str(result.n_images), f"{result.top1:.2%}", *top5, f"{result.loss:.4f}", f"{result.nll:.4f}",
                  ece, temperature)
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


def _confused_table(result):
    from rich.table import Table

    table = Table(title="most confused classes", header_style="bold", title_justify="left")
    table.add_column("true class", overflow="fold")
    table.add_column("predicted as", overflow="fold")
    table.add_column("images", justify="right")
    for label, predicted, count in result.confused:
        table.add_row(escape(label), escape(predicted), str(count))
    return table


def _mistakes_table(result):
    from rich.table import Table

    table = Table(title="most confident mistakes (a label audit: check these first)", header_style="bold",
                  title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("image", overflow="fold")
    table.add_column("folder label", overflow="fold")
    table.add_column("predicted", overflow="fold")
    table.add_column("its prob", justify="right")
    table.add_column("label prob", justify="right")
    for i, m in enumerate(result.mistakes, 1):
        table.add_row(str(i), escape(m.path), escape(m.label), escape(m.predicted), f"{m.prob:.4f}",
                      f"{m.label_prob:.4f}")
    return table
