"""`vitcli predict`: top-k labels for images, folders, globs, lists and URLs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitcli.cli._errors import fail, handled_errors
from vitcli.cli._options import (
    DEFAULT_MODEL,
    BatchSizeOpt,
    Device,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    Precision,
    PrecisionOpt,
    WeightsOpt,
    WorkersOpt,
)

PROGRESS_MIN_IMAGES = 64


def predict(
    inputs: Annotated[list[str] | None, typer.Argument(
        help="Image files, folders (searched recursively), glob patterns ('photos/**/*.jpg') or http(s) URLs.",
        show_default=False)] = None,
    model: ModelOpt = DEFAULT_MODEL,
    weights: WeightsOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Labels to show per image.")] = 5,
    files_from: Annotated[str | None, typer.Option(
        "--files-from", "-f", help="Text file with one image path or URL per line; '-' reads stdin.")] = None,
    json_out: JsonOpt = False,
    csv_out: Annotated[Path | None, typer.Option(
        "--csv", help="Also write every prediction to this CSV file (source,rank,index,label,prob,error).")] = None,
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = None,
    device: DeviceOpt = Device.auto,
    precision: PrecisionOpt = Precision.fp32,
    tta: Annotated[bool, typer.Option("--tta", help="Average with the horizontally flipped image.")] = False,
    exact_decode: Annotated[bool, typer.Option(
        "--exact-decode", help="Decode JPEGs at full size (slower; by default libjpeg downscales large "
                               "photos, never below the model's resize target).")] = False,
) -> None:
    """Predict the top-k labels of images.

    Example: vitcli predict photos/ cat.jpg --model deit_tiny_patch16_224 --top-k 3

    An exported .onnx file (`vitcli export`), as --model or as the first argument, runs on ONNX
    Runtime without torch: vitcli predict model.onnx cat.jpg

    --json prints JSON Lines: one object per image, {"source", "predictions": [{"rank", "index",
    "label", "prob"}], "error"}, in input order. An input that names no image (a missing file, an
    empty folder, a glob with no match) gets an object too, with its error and no predictions.
    Errors are also printed to stderr, one line each. Exit code 1 if any input failed (the rest are
    still predicted).
    """
    with handled_errors():
        from vitcli.data import expand_inputs, read_path_list

        raw = list(inputs or [])
        if model == DEFAULT_MODEL and raw and raw[0].endswith(".onnx"):  # `vitcli predict model.onnx img.jpg`
            model, raw = raw[0], raw[1:]
        if files_from is not None:
            raw += read_path_list(files_from)
        if not raw:
            raise fail("no images given; pass files, folders, globs or URLs, or --files-from FILE", 2)
        sources, problems = expand_inputs(raw)
        # the model loads even when no input exists, so a bad --model is reported as such (exit 2)
        results = _run(sources, model, weights, top_k, batch_size, workers, device, precision, tta,
                       not exact_decode)
        records = _in_input_order(results, problems)
        _report(records, json_out, csv_out)
        if not all(r.ok for r in records):
            raise typer.Exit(1)


def _in_input_order(results, problems):
    """Predictions with each input problem as a failed Prediction, in the order of the inputs."""
    from vitcli.predict import Prediction

    records, done = [], 0
    for problem in problems:  # in input order, so ``before`` only grows
        records += results[done:problem.before]
        records.append(Prediction(problem.source, error=problem.reason))
        done = problem.before
    return records + results[done:]


def _run(sources, model, weights, top_k, batch_size, workers, device, precision, tta, fast_decode):
    from vitcli.console import err

    if model.endswith(".onnx"):  # ONNX Runtime, no torch: preprocessing and labels from the file
        from vitcli.runtime import load_onnx, predict_onnx

        stream = predict_onnx(load_onnx(model, device.value), sources, top_k, batch_size, tta)
    else:
        from vitcli.models import load_model
        from vitcli.predict import PredictOptions
        from vitcli.predict import predict as run_predict

        with err.status(f"loading {model}"):
            loaded = load_model(model, weights)
        options = PredictOptions(top_k=top_k, batch_size=batch_size, workers=workers, device=device.value,
                                 precision=precision.value, tta=tta, fast_decode=fast_decode)
        stream = run_predict(loaded, sources, options)
    if len(sources) < PROGRESS_MIN_IMAGES:
        return list(stream)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    results = []
    columns = [TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("predict", total=len(sources))
        for result in stream:
            results.append(result)
            progress.advance(task)
    return results


def _report(records, json_out: bool, csv_out: Path | None) -> None:
    import json

    from rich.markup import escape

    from vitcli.console import err, out

    for r in records:
        if not r.ok:
            err.print(f"[bold red]Error:[/] {escape(f'{r.source}: {r.error}')}", highlight=False)
    if csv_out is not None:
        _write_csv(csv_out, records)
    if json_out:
        for r in records:
            record = {"source": r.source, "predictions": [vars(label) for label in r.top], "error": r.error}
            out.out(json.dumps(record), highlight=False)
        return
    ok = [r for r in records if r.ok]
    if ok:
        out.print(_table(ok))


def _table(results):
    from rich.table import Table

    table = Table(show_lines=False, header_style="bold")
    table.add_column("image", overflow="fold")
    table.add_column("#", justify="right")
    table.add_column("label")
    table.add_column("prob", justify="right")
    for r in results:
        for label in r.top:
            table.add_row(r.source if label.rank == 1 else "", str(label.rank), label.label,
                          f"{label.prob:.4f}", end_section=label.rank == len(r.top))
    return table


def _write_csv(path: Path, records) -> None:
    import csv

    from vitcli.fileio import atomic_open

    with atomic_open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["source", "rank", "index", "label", "prob", "error"])
        for r in records:
            if not r.ok:
                writer.writerow([r.source, "", "", "", "", r.error])
            for label in r.top:
                writer.writerow([r.source, label.rank, label.index, label.label, f"{label.prob:.6f}", ""])
