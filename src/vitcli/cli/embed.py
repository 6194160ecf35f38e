"""`vitcli embed`: pooled pre-logits features of images into .npy or .jsonl, and near-duplicate pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitcli.cli.errors import handled_errors
from vitcli.cli.options import (
    DEFAULT_MODEL,
    BatchSizeOpt,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    Precision,
    PrecisionOpt,
    WeightsOpt,
    WorkersOpt,
)
from vitcli.cli.render import escape


def embed(
    inputs: Annotated[list[str] | None, typer.Argument(
        help="Image files, folders (searched recursively), glob patterns or http(s) URLs, as for predict.",
        show_default=False)] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="FILE",
        help="emb.npy (float32 rows, with emb.sources.txt beside it: line i is the source of row i, and emb.json "
             "naming the model) or emb.jsonl (one {source, model, embedding} per line). Written as batches are "
             "done; rerun the same command to resume. Optional with --near-duplicates.")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    weights: WeightsOpt = None,
    normalize: Annotated[bool, typer.Option(
        "--normalize/--no-normalize", help="L2-normalise each embedding (then a dot product is the cosine).")] = True,
    near_duplicates: Annotated[float | None, typer.Option(
        "--near-duplicates", metavar="T", min=-1.0, max=1.0,
        help="List the pairs of images whose cosine similarity is at least T (e.g. 0.95). With two inputs, only "
             "pairs across them: `vitcli embed data/train data/val --near-duplicates 0.95` is a train/val "
             "leakage check.")] = None,
    files_from: Annotated[str | None, typer.Option(
        "--files-from", "-f", help="Text file with one image path or URL per line; '-' reads stdin.")] = None,
    shard: Annotated[str | None, typer.Option(
        "--shard", metavar="I/N", help="Embed only slice I of N (I from 0) of the inputs, as predict.")] = None,
    json_out: JsonOpt = False,
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
) -> None:
    """Embed images: the model's pooled features before its classifier, one vector per image.

    Example: vitcli embed photos/ -o photos.npy

    Same inputs, streaming, resume (rerun with the same --output), --shard and torchrun as predict.
    Exit code 1 if any image failed (it gets no row; a rerun tries it again).

    --near-duplicates T prints `cosine  a  b` per pair (--json: one {"a", "b", "cosine"} object per
    line), for each image its matches from the most similar down.
    """
    with handled_errors():
        import contextlib
        import tempfile

        from vitcli.distributed import torchrun_rank
        from vitcli.inference.embed import run_embed
        from vitcli.inference.job import PredictJob
        from vitcli.inference.predict import PredictOptions
        from vitcli.inference.shards import Shard

        if output is None and near_duplicates is None:
            from vitcli.errors import UsageError

            raise UsageError("give --output FILE (.npy or .jsonl) for the embeddings, or --near-duplicates T")
        options = PredictOptions(batch_size=batch_size, workers=workers, device=device, precision=precision.value)
        with contextlib.ExitStack() as stack:
            if output is None:  # --near-duplicates alone: the embeddings live as long as the command
                output = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vitcli-embed-"))) / "emb.npy"
            job = PredictJob(list(inputs or []), files_from, output, shard=Shard.parse(shard) if shard else None,
                             rank=torchrun_rank())
            try:
                tally = run_embed(job, model, weights, options, normalize, terminal=_terminal,
                                  loading=_loading(job))
            except KeyboardInterrupt:
                from vitcli.cli.predict import interrupted

                raise interrupted(job) from None
            if near_duplicates is not None and job.rank.main:
                _print_pairs(output, near_duplicates, list(inputs or []) if files_from is None else [], json_out)
        if not tally.ok:
            raise typer.Exit(1)


def _terminal(job) -> list:
    from vitcli.cli.render import ErrorLines, ProgressSink
    from vitcli.console import err

    if len(job.done):
        err.print(f"{escape(str(job.output))}: {len(job.done)} sources already done, skipping them", highlight=False)
    return [ErrorLines(), ProgressSink(job, label="embed")]


def _loading(job):
    from vitcli.cli.predict import loading_status

    return loading_status(job)


def _print_pairs(output: Path, threshold: float, inputs: list[str], json_out: bool) -> None:
    import json

    from vitcli.console import err, out
    from vitcli.inference.embed import near_duplicate_sources

    count = 0
    across = len(inputs) == 2
    for a, b, cosine in near_duplicate_sources(output, threshold, inputs if across else None):
        count += 1
        if json_out:
            out.out(json.dumps({"a": a, "b": b, "cosine": round(cosine, 6)}), highlight=False)
        else:
            out.print(f"{cosine:.4f}  {escape(a)}  {escape(b)}", highlight=False, soft_wrap=True)
    where = f" between {escape(inputs[0])} and {escape(inputs[1])}" if across else ""
    err.print(f"{count} pair(s) at cosine >= {threshold}{where}", highlight=False)
