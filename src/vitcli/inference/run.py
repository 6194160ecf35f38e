"""Running a predict or embed job from start to end: the one place that orchestrates it. Never prints.

``run_job`` joins torchrun's process group (when torchrun started this process), opens ``--output``
on rank 0 and hands the outcome of that open (the sources the file already holds, or the error) to
every rank through ``distributed.on_rank0``, the shared-failure path finetune uses, so no rank waits
for a rank 0 that could not open its file. It then streams the records into the sinks and, whatever
happens, closes every sink and leaves the group. ``predictor_for`` is the seam where an engine is
chosen for a model (``inference.backend`` picks torch or OpenVINO). The CLI passes its terminal sinks
(tables, error lines, progress) in.

Torch-free at import: ``vitcli predict model.onnx`` (or ``.xml``, or a model whose OpenVINO build is
cached) never imports torch unless torchrun started it.
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


def is_exported(model: str) -> bool:
    """An exported file that runs on its own engine: ``.onnx`` (ONNX Runtime) or ``.xml`` (OpenVINO)."""
    return model.lower().endswith((".onnx", ".xml"))


# ------------------------------------------------------------------------------------ engines


def predictor_for(model: str, weights: Path | None, options: PredictOptions, loading: Loading = _quiet,
                  backend: str | None = None, say: Callable[[str], None] | None = None) -> Callable[[], Predictor]:
    """``make_predictor`` for ``model``: the engine that runs it, loaded only when first called.

    An exported ``.onnx`` file runs on ONNX Runtime and an ``.xml`` file on OpenVINO (NumPy and
    Pillow, no torch); anything else is a timm model, run where ``inference.backend.choose_engine``
    says (``backend``: --backend, None for $VITCLI_BACKEND or auto): OpenVINO from the compiled-model
    cache, or torch. ``say`` gets the line saying which. Options that mean nothing for the chosen
    engine are refused here, before any model loads.
    """
    if is_exported(model):
        check_onnx_options(options, weights, model, backend)
        return lambda: onnx_predictor(model, options) if is_onnx(model) else openvino_predictor(model, options)

    def make() -> Predictor:
        from vitcli.inference.backend import choose_engine

        loaded: list[Any] = []

        def load() -> Any:
            if not loaded:
                loaded.append(load_torch_model(model, weights, loading))
            return loaded[0]

        choice = choose_engine(model, weights, load, backend, options.device, options.precision)
        if choice.line and say is not None:
            say(choice.line)
        if choice.openvino is not None:
            return numpy_predictor(choice.openvino, options)
        return torch_predictor(choice.loaded or load(), options)

    return make


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
    from vitcli.inference.onnx_engine import load_onnx

    return numpy_predictor(load_onnx(path, options.device), options)


def openvino_predictor(path: str, options: PredictOptions) -> Predictor:
    """Sources -> Prediction records through OpenVINO (``inference.openvino_engine``: no torch); fp32
    unless --precision bf16 (a file alone cannot be verified against torch)."""
    from vitcli.inference.openvino_engine import load_openvino

    return numpy_predictor(load_openvino(path, "bf16" if options.precision == "bf16" else "fp32", options.device),
                           options)


def numpy_predictor(model: Any, options: PredictOptions) -> Predictor:
    """The shared NumPy predictor (``inference.numpy_predict``) over an ONNX Runtime or OpenVINO model."""
    from vitcli.inference.numpy_predict import predict_model

    return lambda sources: predict_model(model, sources, options.top_k, options.batch_size, options.tta,
                                         options.calibrated, options.fast_decode)


def check_onnx_options(options: PredictOptions, weights: Path | None, model: str = ".onnx",
                       backend: str | None = None) -> None:
    """Options that mean nothing for an exported file are refused rather than ignored."""
    xml = not is_onnx(model)
    engine = "openvino" if xml else "onnxruntime"
    if backend not in (None, "auto", engine):  # only an explicit --backend: $VITCLI_BACKEND is a default
        raise UsageError(f"--backend {backend}: '{model}' is an exported file that runs on {engine}; "
                         f"drop --backend or use --backend {engine}")
    precisions = ("auto", "fp32", "bf16") if xml else ("auto",)
    given = [name for name, on in (("--weights", weights is not None),
                                   ("--precision", options.precision not in precisions),
                                   ("--workers", options.workers is not None)) if on]
    if given:
        kind = "an OpenVINO .xml" if xml else "an .onnx"
        raise UsageError(f"{', '.join(given)} do(es) not apply to {kind} model: its weights, precision and "
                         "preprocessing are fixed by `vitcli export`; leave them out")


# --------------------------------------------------------------------------------------- jobs


def run_predict(job: PredictJob, model: str, weights: Path | None, options: PredictOptions,
                csv: Path | None = None, terminal: Terminal = _no_terminal, loading: Loading = _quiet,
                backend: str | None = None, say: Callable[[str], None] | None = None) -> Tally:
    """``vitcli predict``: the job's records into ``--output``, ``--csv`` and the terminal sinks."""
    from vitcli.io.records import CsvFile

    if is_exported(model):  # before joining any group: a usage error is the same on every rank
        check_onnx_options(options, weights, model, backend)

    def files() -> list[Any]:
        return [CsvFile(csv)] if csv is not None else []

    return run_job(job, options, lambda opts: predictor_for(model, weights, opts, loading, backend, say),
                   files=files, terminal=terminal)


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
