"""`vitcli predict`: top-k labels for images, folders, globs, lists and URLs, streamed as they are done."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from vitcli.cli._errors import handled_errors
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
    device: DeviceOpt = Device.auto,
    precision: PrecisionOpt = Precision.fp32,
    tta: Annotated[bool, typer.Option("--tta", help="Average with the horizontally flipped image.")] = False,
    exact_decode: Annotated[bool, typer.Option(
        "--exact-decode", help="Decode JPEGs at full size (slower; by default libjpeg downscales large "
                               "photos, never below the model's resize target).")] = False,
) -> None:
    """Predict the top-k labels of images, streaming results as each batch is done, in input order.

    Example: vitcli predict photos/ cat.jpg --top-k 3 --output predictions.jsonl

    --json prints JSON Lines: one object per image, {"source", "predictions": [{"rank", "index",
    "label", "prob"}], "error"}, in input order. An input that names no image (a missing file, an
    empty folder, a glob with no match) gets an object too, with its error and no predictions.
    Errors are also printed to stderr, one line each. Exit code 1 if any input failed (the rest are
    still predicted), 130 on Ctrl-C (files keep whole records; rerun with the same --output to resume).

    Under torchrun (torchrun --nproc-per-node N -m vitcli predict ...) each process predicts its
    share on its own device and rank 0 writes every record, in input order.
    """
    with handled_errors():
        from vitcli.predict import PredictOptions
        from vitcli.sharding import Shard, torchrun_rank
        from vitcli.streaming import PredictJob

        job = PredictJob(list(inputs or []), files_from, output, shard=Shard.parse(shard) if shard else None,
                         rank=torchrun_rank())
        options = PredictOptions(top_k=top_k, batch_size=batch_size, workers=workers, device=device.value,
                                 precision=precision.value, tta=tta, fast_decode=not exact_decode)
        _run(job, options, model, weights, json_out, csv_out)
        if not job.tally.ok:
            raise typer.Exit(1)


def _run(job, options, model: str, weights: Path | None, json_out: bool, csv_out: Path | None) -> None:
    """Open the outputs, stream the records into them, close them whatever happens."""
    import dataclasses

    from vitcli.console import err

    group = None
    if job.rank.enabled:
        from vitcli.sharding import broadcast, init_process_group

        job.rank, device, group = init_process_group(options.device)
        options = dataclasses.replace(options, device=device)
    csv_file = None
    progress = None
    try:
        job.open()
        if job.rank.enabled:
            job.done = broadcast(job.done, group)
        sinks: list[Any] = []
        if job.rank.main:
            from vitcli.records import CsvWriter, JsonlWriter

            progress = _ProgressSink(job)  # after open(): it counts what is left to do
            sinks.append(_ErrorLines())
            sinks.append(JsonlWriter(sys.stdout) if json_out else _TableSink())
            if csv_out is not None:
                csv_out.parent.mkdir(parents=True, exist_ok=True)
                csv_file = csv_out.open("w", newline="", encoding="utf-8")
                sinks.append(CsvWriter(csv_file))
            if job.opened is not None:
                sinks.append(job.opened.writer)
                if len(job.done):
                    err.print(f"{job.output}: {len(job.done)} sources already done, skipping them", highlight=False)
            sinks.append(progress)

        def load():
            import contextlib

            from vitcli.models import load_model

            with err.status(f"loading {model}") if job.rank.main else contextlib.nullcontext():
                return load_model(model, weights)

        from vitcli.streaming import write_records

        write_records(job.records(load, options, group=group), sinks, job.tally)
    except KeyboardInterrupt:
        if progress is not None:
            progress.stop()
        where = f"; rerun the same command to resume from {job.output}" if job.output else ""
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


class _ErrorLines:
    """One ``Error: SOURCE: REASON`` line on stderr per failed record, as it comes."""

    def write(self, record) -> None:
        if not record.ok:
            from rich.markup import escape

            from vitcli.console import err

            err.print(f"[bold red]Error:[/] {escape(f'{record.source}: {record.error}')}", highlight=False)


class _TableSink:
    """The results table on stdout, printed image by image with fixed columns so the rows line up."""

    def __init__(self) -> None:
        self.header = True

    def write(self, record) -> None:
        if not record.ok:
            return
        from rich import box
        from rich.table import Table

        from vitcli.console import out

        table = Table(box=box.SIMPLE_HEAD, show_header=self.header, header_style="bold", show_edge=False,
                      pad_edge=False)
        table.add_column("image", overflow="fold", width=max(16, min(out.width, 160) - 40))
        table.add_column("#", justify="right", width=2)
        table.add_column("label", width=22, overflow="fold")
        table.add_column("prob", justify="right", width=6)
        for label in record.top:
            table.add_row(record.source if label.rank == 1 else "", str(label.rank), label.label, f"{label.prob:.4f}")
        out.print(table)
        self.header = False


class _ProgressSink:
    """A progress bar on stderr (images/s, and the ETA once the inputs are counted) for larger jobs."""

    def __init__(self, job) -> None:
        self.job = job
        self.progress = None
        self.task = None
        self.total: int | None = None
        if job.countable:  # counted beside the prediction: the first results need not wait for it
            threading.Thread(target=self._count, daemon=True, name="vitcli-count").start()

    def _count(self) -> None:
        try:
            self.total = self.job.count()
        except Exception:  # an unreadable input shows up in the job itself; the bar just has no total
            return
        if self.progress is not None:
            self.progress.update(self.task, total=self.total)

    def write(self, record) -> None:
        if self.progress is None:
            if max(self.total or 0, self.job.tally.written) < PROGRESS_MIN_IMAGES:
                return
            self._start()
        speed = self.progress.tasks[0].speed  # rich's own estimate over the last 30 s
        self.progress.update(self.task, completed=self.job.tally.written + 1,
                             rate=f"{speed:.1f} img/s" if speed else "")

    def _start(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from vitcli.console import err

        columns = [TextColumn("predict"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]
        self.progress = Progress(*columns, console=err, transient=True)
        self.progress.start()
        self.task = self.progress.add_task("predict", total=self.total, completed=self.job.tally.written, rate="")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

