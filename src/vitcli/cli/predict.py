"""`vitcli predict`: top-k labels for images, folders, globs, lists and URLs, streamed as they are done."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from vitcli.cli.errors import handled_errors
from vitcli.cli.options import (
    DEFAULT_MODEL,
    BatchSizeOpt,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    NoCalibrationOpt,
    Precision,
    PrecisionOpt,
    WeightsOpt,
    WorkersOpt,
)
from vitcli.cli.render import escape


def predict(
    inputs: Annotated[list[str] | None, typer.Argument(
        help="Image files, folders (searched recursively), glob patterns ('photos/**/*.jpg') or http(s) URLs.",
        show_default=False)] = None,
    model: ModelOpt = DEFAULT_MODEL,
    weights: WeightsOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Labels to show per image.")] = 5,
    files_from: Annotated[str | None, typer.Option(
        "--files-from", "-f", help="Text file with one image path or URL per line, read as it goes; '-' reads stdin.")
    ] = None,
    json_out: JsonOpt = False,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Append every record to this .jsonl or .csv file as its batch is done. Rerun the "
                               "same command to resume: sources already in the file are skipped.",
        metavar="FILE")] = None,
    csv_out: Annotated[Path | None, typer.Option(
        "--csv", help="Also write every prediction to this CSV file (source,rank,index,label,prob,error), "
                      "batch by batch; an existing file is replaced.", metavar="FILE")] = None,
    shard: Annotated[str | None, typer.Option(
        "--shard", help="Predict only slice I of N (I from 0) of the inputs, in order, for job arrays: "
                        "concatenating the N outputs in shard order gives the one-process output.",
        metavar="I/N")] = None,
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    tta: Annotated[bool, typer.Option("--tta", help="Average with the horizontally flipped image.")] = False,
    exact_decode: Annotated[bool, typer.Option(
        "--exact-decode", help="Decode JPEGs at full size (slower; by default libjpeg downscales large "
                               "photos, never below the model's resize target).")] = False,
    no_calibration: NoCalibrationOpt = False,
) -> None:
    """Predict the top-k labels of images, streaming results as each batch is done, in input order.

    Example: vitcli predict photos/ cat.jpg --top-k 3 --output predictions.jsonl

    An exported .onnx file (`vitcli export`), as --model or as the first argument, runs on ONNX
    Runtime without torch: vitcli predict model.onnx cat.jpg

    --json prints JSON Lines: one object per image, {"source", "predictions": [{"rank", "index",
    "label", "prob"}], "error"}, in input order. An input that names no image (a missing file, an
    empty folder, a glob with no match) gets an object too, with its error and no predictions.
    Errors are also printed to stderr, one line each. Exit code 1 if any input failed (the rest are
    still predicted), 130 on Ctrl-C (files keep whole records; rerun with the same --output to resume).

    Under torchrun (torchrun --nproc-per-node N -m vitcli predict ...) each process predicts its
    share on its own device and rank 0 writes every record, in input order.
    """
    with handled_errors():
        from vitcli.distributed import torchrun_rank
        from vitcli.inference.job import PredictJob
        from vitcli.inference.predict import PredictOptions
        from vitcli.inference.shards import Shard

        raw = list(inputs or [])
        if model == DEFAULT_MODEL and raw and raw[0].endswith(".onnx"):  # `vitcli predict model.onnx img.jpg`
            model, raw = raw[0], raw[1:]
        job = PredictJob(raw, files_from, output, shard=Shard.parse(shard) if shard else None,
                         rank=torchrun_rank())
        options = PredictOptions(top_k=top_k, batch_size=batch_size, workers=workers, device=device,
                                 precision=precision.value, tta=tta, fast_decode=not exact_decode,
                                 calibrated=not no_calibration)
        _run(job, options, model, weights, json_out, csv_out)
        if not job.tally.ok:
            raise typer.Exit(1)


def _run(job, options, model: str, weights: Path | None, json_out: bool, csv_out: Path | None) -> None:
    """Open the outputs, stream the records into them, close them whatever happens."""
    import dataclasses

    from vitcli.console import err

    group = None
    if job.rank.enabled:
        from vitcli.distributed import broadcast, init_process_group

        job.rank, device, group = init_process_group(options.device)
        options = dataclasses.replace(options, device=device)
    csv_file = None
    progress = None
    if model.endswith(".onnx"):
        _check_onnx_options(options, weights)
    try:
        job.open()
        if job.rank.enabled:
            job.done = broadcast(job.done, job.rank, group)
        sinks: list[Any] = []
        if job.rank.main:
            from vitcli.cli.render import ErrorLines, ProgressSink, TableSink
            from vitcli.io.records import CsvFile, JsonlWriter

            progress = ProgressSink(job)  # after open(): it counts what is left to do
            sinks.append(ErrorLines())
            sinks.append(JsonlWriter(sys.stdout) if json_out else TableSink())
            if csv_out is not None:
                csv_file = CsvFile(csv_out)
                sinks.append(csv_file)
            if job.opened is not None:
                sinks.append(job.opened.writer)
                if len(job.done):
                    err.print(f"{escape(job.output)}: {len(job.done)} sources already done, skipping them",
                              highlight=False)
            sinks.append(progress)

        def load():
            import contextlib

            from vitcli.models.resolve import load_model

            with err.status(f"loading {escape(model)}") if job.rank.main else contextlib.nullcontext():
                return load_model(model, weights)

        from vitcli.inference.job import write_records

        if model.endswith(".onnx"):  # ONNX Runtime, no torch: preprocessing and labels come from the file
            records = job.stream(lambda: _onnx_predictor(model, options), options.batch_size, group)
        else:
            records = job.records(load, options, group=group)
        write_records(records, sinks, job.tally)
    except KeyboardInterrupt:
        if progress is not None:
            progress.stop()
        where = f"; rerun the same command to resume from {escape(job.output)}" if job.output else ""
        err.print(f"[bold red]Error:[/] interrupted after {job.tally.written} records{where}", highlight=False)
        raise typer.Exit(130) from None
    finally:
        if progress is not None:
            progress.stop()
        job.close()
        if csv_file is not None:
            csv_file.close()
        if group is not None or job.rank.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _onnx_predictor(path: str, options):
    """``sources -> Prediction records`` through ONNX Runtime (``inference.onnx_engine``: NumPy + Pillow, no torch)."""
    from vitcli.inference.onnx_engine import load_onnx, predict_onnx

    model = load_onnx(path, options.device)
    return lambda sources: predict_onnx(model, sources, options.top_k, options.batch_size, options.tta,
                                         options.calibrated)


def _check_onnx_options(options, weights: Path | None) -> None:
    """Options that mean nothing for an exported file are refused rather than ignored."""
    from vitcli.errors import UsageError

    given = [name for name, on in (("--weights", weights is not None), ("--precision", options.precision != "auto"),
                                   ("--workers", options.workers is not None),
                                   ("--exact-decode", not options.fast_decode)) if on]
    if given:
        raise UsageError(f"{', '.join(given)} do(es) not apply to an .onnx model: its weights, precision and "
                         "preprocessing (always the exact path) are fixed by `vitcli export`; leave them out")
