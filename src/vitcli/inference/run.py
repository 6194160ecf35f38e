"""Running a predict or embed job from start to end: the one place that orchestrates it. Never prints.

``run_job`` joins torchrun's process group (when torchrun started this process), opens ``--output``
on rank 0 and hands the outcome of that open (the sources the file already holds, or the error) to
every rank through ``distributed.on_rank0``, the shared-failure path finetune uses, so no rank waits
for a rank 0 that could not open its file. It then streams the records into the sinks and, whatever
happens, closes every sink and leaves the group. ``predictor_for`` is the seam where an engine is
chosen for a model. The CLI passes its terminal sinks (tables, error lines, progress) in.

Torch-free at import: ``vitcli predict model.onnx`` never imports torch unless torchrun started it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vitcli.errors import UsageError
from vitcli.inference.job import Opener, PredictJob, Predictor, Tally, write_records
from vitcli.inference.predict import PredictOptions, failed_prediction
from vitcli.io.records import RecordSink, open_output

Loading = Callable[[str], contextlib.AbstractContextManager]  # model name -> context around its load
Terminal = Callable[[PredictJob], Sequence[RecordSink]]  # the job, once opened -> rank 0's terminal sinks


def _quiet(_: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _no_terminal(_: PredictJob) -> Sequence[RecordSink]:
    return ()


def is_onnx(model: str) -> bool:
    return model.lower().endswith(".onnx")


# ------------------------------------------------------------------------------------ engines


def predictor_for(model: str, weights: Path | None, options: PredictOptions,
                  loading: Loading = _quiet) -> Callable[[], Predictor]:
    """``make_predictor`` for ``model``: the engine that runs it, loaded only when first called.

    An exported ``.onnx`` file runs on ONNX Runtime (NumPy and Pillow, no torch); anything else is
    a timm model on torch. Options that mean nothing for the chosen engine are refused here, before
    any model loads.
    """
    if is_onnx(model):
        check_onnx_options(options, weights)
        return lambda: onnx_predictor(model, options)
    return lambda: torch_predictor(load_torch_model(model, weights, loading), options)


def load_torch_model(model: str, weights: Path | None, loading: Loading = _quiet) -> Any:
    """``vitcli.models.resolve.load_model`` inside ``loading(model)`` (the CLI's spinner)."""
    from vitcli.models.resolve import load_model

    with loading(model):
        return load_model(model, weights)


def torch_predictor(loaded: Any, options: PredictOptions) -> Predictor:
    from vitcli.inference.predict import predict

    return lambda sources: predict(loaded, sources, options)


def onnx_predictor(path: str, options: PredictOptions) -> Predictor:
    """Sources -> Prediction records through ONNX Runtime (``inference.onnx_engine``: no torch)."""
    from vitcli.inference.onnx_engine import load_onnx, predict_onnx

    model = load_onnx(path, options.device)
    return lambda sources: predict_onnx(model, sources, options.top_k, options.batch_size, options.tta,
                                         options.calibrated)


def check_onnx_options(options: PredictOptions, weights: Path | None) -> None:
    """Options that mean nothing for an exported file are refused rather than ignored."""
    given = [name for name, on in (("--weights", weights is not None), ("--precision", options.precision != "auto"),
                                   ("--workers", options.workers is not None),
                                   ("--exact-decode", not options.fast_decode)) if on]
    if given:
        raise UsageError(f"{', '.join(given)} do(es) not apply to an .onnx model: its weights, precision and "
                         "preprocessing (always the exact path) are fixed by `vitcli export`; leave them out")


# --------------------------------------------------------------------------------------- jobs


def run_predict(job: PredictJob, model: str, weights: Path | None, options: PredictOptions,
                csv: Path | None = None, terminal: Terminal = _no_terminal, loading: Loading = _quiet) -> Tally:
    """``vitcli predict``: the job's records into ``--output``, ``--csv`` and the terminal sinks."""
    from vitcli.io.records import CsvFile

    if is_onnx(model):
        check_onnx_options(options, weights)  # before joining any group: a usage error is the same on every rank

    def files() -> list[Any]:
        return [CsvFile(csv)] if csv is not None else []

    return run_job(job, options, lambda opts: predictor_for(model, weights, opts, loading), files=files,
                   terminal=terminal)


def run_job(job: PredictJob, options: PredictOptions, engine: Callable[[PredictOptions], Callable[[], Predictor]],
            opener: Opener = open_output, files: Callable[[], list[Any]] = list, terminal: Terminal = _no_terminal,
            failed: Callable[[str, str], Any] = failed_prediction) -> Tally:
    """Run ``job`` to its end; see the module docstring.

    Args:
        options: batch size and device (under torchrun, each rank gets its own device).
        engine: ``options -> make_predictor`` (``predictor_for``, or an embedder).
        opener: opens ``--output`` (rank 0): prediction records by default, embeddings for embed.
        files: rank 0's extra file sinks (``--csv``), made once the output is open.
        terminal: rank 0's terminal sinks, made once the output is open (they may report what it holds).
        failed: the record of an input that names no image.
    """
    group = None
    sinks: list[Any] = []
    try:
        if job.rank.enabled:
            from vitcli.distributed import init_process_group

            job.rank, device, group = init_process_group(options.device)
            options = dataclasses.replace(options, device=device)
        make_predictor = engine(options)
        job.done = _on_rank0(lambda: job.open(opener), job)
        if job.rank.main:
            sinks = [*terminal(job), *files(), *([job.opened.writer] if job.opened is not None else [])]
        records = job.stream(make_predictor, options.batch_size, group, failed)
        write_records(records, sinks, job.tally)
    finally:
        _close(sinks, job, group)
    return job.tally


def _on_rank0(fn: Callable[[], Any], job: PredictJob) -> Any:
    """``fn()`` on rank 0, its result (or its error) on every rank."""
    if not job.rank.enabled:
        return fn()
    from vitcli.distributed import on_rank0

    return on_rank0(fn, job.rank)


def _close(sinks: Sequence[Any], job: PredictJob, group: Any) -> None:
    """Close every sink that has a ``close()`` (each one, even when another fails), the output, the group."""
    errors: list[BaseException] = []
    for sink in (*sinks, job):
        close = getattr(sink, "close", None)
        if close is not None:
            try:
                close()
            except Exception as e:  # the first error is raised once all are closed
                errors.append(e)
    if job.rank.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if errors:
        raise errors[0]
