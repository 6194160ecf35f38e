"""`vitcli predict`: top-k labels for images, folders, globs, lists and URLs, streamed as they are done."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from vitcli.cli.errors import handled_errors
from vitcli.cli.options import (
    DEFAULT_MODEL,
    BackendOpt,
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
    backend: BackendOpt = None,
    tta: Annotated[bool, typer.Option("--tta", help="Average with the horizontally flipped image.")] = False,
    exact_decode: Annotated[bool, typer.Option(
        "--exact-decode", help="Decode JPEGs at full size (slower; by default libjpeg downscales large "
                               "photos, never below the model's resize target).")] = False,
    no_calibration: NoCalibrationOpt = False,
) -> None:
    """Predict the top-k labels of images, streaming results as each batch is done, in input order.

    Example: vitcli predict photos/ cat.jpg --top-k 3 --output predictions.jsonl

    An exported .onnx or OpenVINO .xml file (`vitcli export`), as --model or as the first argument,
    runs on ONNX Runtime or OpenVINO without torch: vitcli predict model.xml cat.jpg

    On a CPU the model runs through OpenVINO when it converts and agrees with torch fp32 (built
    once into the user's cache, $XDG_CACHE_HOME/vitcli), else torch; one line on stderr says which
    (--backend picks one; docs/engines.md).

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
        from vitcli.inference.run import is_exported, run_predict
        from vitcli.inference.shards import Shard

        raw = list(inputs or [])
        if model == DEFAULT_MODEL and raw and is_exported(raw[0]):  # `vitcli predict model.xml img.jpg`
            model, raw = raw[0], raw[1:]
        job = PredictJob(raw, files_from, output, shard=Shard.parse(shard) if shard else None,
                         rank=torchrun_rank())
        options = PredictOptions(top_k=top_k, batch_size=batch_size, workers=workers, device=device,
                                 precision=precision.value, tta=tta, fast_decode=not exact_decode,
                                 calibrated=not no_calibration)
        try:
            tally = run_predict(job, model, weights, options, csv=csv_out,
                                terminal=lambda job: terminal_sinks(job, json_out), loading=loading_status(job),
                                backend=backend.value if backend else None, say=engine_line(job))
        except KeyboardInterrupt:
            raise interrupted(job) from None
        if not tally.ok:
            raise typer.Exit(1)


def terminal_sinks(job, json_out: bool) -> list:
    """Rank 0's terminal: one error line per failed record, the table (or JSON Lines), a progress bar."""
    from vitcli.cli.render import ErrorLines, ProgressSink, TableSink
    from vitcli.console import err
    from vitcli.io.records import JsonlWriter

    if job.output is not None and len(job.done):
        err.print(f"{escape(str(job.output))}: {len(job.done)} sources already done, skipping them", highlight=False)
    return [ErrorLines(), JsonlWriter(sys.stdout) if json_out else TableSink(), ProgressSink(job)]


def loading_status(job):
    """A spinner on stderr while a model loads, on rank 0 (the others stay quiet)."""
    import contextlib

    from vitcli.console import err

    def loading(name: str):
        return err.status(f"loading {escape(name)}") if job.rank.main else contextlib.nullcontext()

    return loading


def engine_line(job):
    """The one line saying which engine runs (``inference.backend``), on rank 0."""
    from vitcli.console import err

    def say(line: str) -> None:
        if job.rank.main:
            err.print(escape(line), highlight=False)

    return say


def interrupted(job) -> typer.Exit:
    """Ctrl-C: say how far the job got and how to resume; exit 130."""
    from vitcli.console import err

    where = f"; rerun the same command to resume from {escape(str(job.output))}" if job.output else ""
    err.print(f"[bold red]Error:[/] interrupted after {job.tally.written} records{where}", highlight=False)
    return typer.Exit(130)
