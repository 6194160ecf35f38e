"""A torch-free engine for OpenVINO IR files (``.xml`` + ``.bin``): OpenVINO, NumPy and Pillow only.

``vitcli predict model.xml`` and the compiled-model cache (``inference.cache``) run through here.
vitcli's metadata (labels, timm's data config, provenance, the calibration temperature) lives in
the IR's ``rt_info`` under ``vitcli``, one JSON document per key, as ONNX files keep it in
``metadata_props``. Preprocessing and top-k are the shared NumPy predictor's
(``inference.numpy_predict``), so the pixels equal timm's eval transform exactly.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitcli.errors import MissingExtraError, ModelLoadError, UsageError, first_line
from vitcli.inference.numpy_predict import ExportedModel
from vitcli.io.preprocess import DATA_KEYS

IR_SUFFIX = ".xml"
RT_INFO_ROOT = "vitcli"  # rt_info section of vitcli's metadata
INSTALL_HINT = "the OpenVINO engine needs the openvino package: pip install openvino"
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}


class _StackT(ctypes.Structure):  # struct stack_t of sigaltstack(2)
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def signal_stack_kept() -> Iterator[None]:
    """Keep the calling thread's alternate signal stack across a call into OpenVINO or NNCF.

    OpenVINO's CPU plugin (2026.4) points the compiling thread's ``sigaltstack`` at memory of its own
    and frees it later; the next signal whose handler runs on that stack (Python's handlers do: Ctrl-C,
    SIGTERM, SIGCHLD) then kills the process with SIGSEGV instead of running the handler. Found with
    gdb: ``vitcli finetune``'s Ctrl-C test crashed pytest after any test had compiled an OpenVINO model.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        saved = _StackT()
        ok = libc.sigaltstack(None, ctypes.byref(saved)) == 0
    except (OSError, AttributeError):  # no sigaltstack (not POSIX): nothing to keep
        ok = False
    try:
        yield
    finally:
        if ok:
            libc.sigaltstack(ctypes.byref(saved), None)


def import_openvino() -> Any:
    """``openvino``, or a MissingExtraError with the install line."""
    try:
        import openvino
    except ImportError as e:
        raise MissingExtraError(INSTALL_HINT) from e
    return openvino


def openvino_version() -> str:
    return import_openvino().get_version()


# ----------------------------------------------------------------------------------- metadata


def set_metadata(model: Any, meta: dict[str, Any]) -> None:
    """Write ``meta`` into an ``openvino.Model``'s rt_info, one JSON document per key."""
    for key, value in meta.items():
        model.set_rt_info(json.dumps(value, allow_nan=False), [RT_INFO_ROOT, key])


def read_metadata(model: Any) -> dict[str, Any]:
    """vitcli's metadata of an ``openvino.Model`` ({} when it has none)."""
    if not model.has_rt_info([RT_INFO_ROOT]):
        return {}
    meta: dict[str, Any] = {}
    for key, value in model.get_rt_info()[RT_INFO_ROOT].items():
        text = value.astype(str)
        try:
            meta[key] = json.loads(text)
        except json.JSONDecodeError:
            meta[key] = text
    return meta


def check_metadata(meta: dict[str, Any], where: str, num_outputs: int | None = None) -> dict[str, Any]:
    """The metadata, or a ModelLoadError naming what is missing or malformed in ``where``
    (the same bounds as for ONNX files: ``models.metadata``)."""
    from vitcli.models.metadata import check_data_config, check_labels

    missing = [k for k in ("labels", "input_size", "mean", "std") if k not in meta]
    if missing:
        raise ModelLoadError(f"'{where}' has no vitcli metadata ({', '.join(missing)}); export it with "
                             "`vitcli export -f openvino`, which writes them into the file")
    check_data_config({k: meta[k] for k in DATA_KEYS if k in meta}, f"'{where}'")
    check_labels(meta["labels"], f"'{where}'", num_outputs)
    return meta


# ---------------------------------------------------------------------------------- the model


@dataclass
class OpenVinoModel(ExportedModel):
    """A compiled OpenVINO model with the labels and preprocessing its IR carries.

    It is compiled with ``NUM_STREAMS`` streams, one per usable CPU (at most 8), each running one
    batch on its share of the cores. ``start`` puts a batch on the next infer request and returns
    the call that waits for its logits, so the caller can decode the next batch meanwhile
    (``inference.pipeline.overlapped``); ``logits`` cuts one batch into a part per stream. Both
    are entered from one thread at a time: the infer requests are used from the thread that calls
    them, never from several at once (two threads calling ``infer`` on their own requests hung one
    run in four of ``predict hymenoptera/`` inside OpenVINO's input dispatcher). Callers in several
    threads (evaluate's per-core streams) take turns: one lock covers every call into OpenVINO.
    """

    compiled: Any
    path: Path
    metadata: dict[str, Any]
    precision: str = "fp32"
    _ring: list[_Slot] = field(default_factory=list, init=False, repr=False)
    _next: int = field(default=0, init=False, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False)

    @functools.cached_property
    def streams(self) -> int:
        """The batches it runs at once (the compiled ``NUM_STREAMS``, at least 1)."""
        try:
            return max(1, int(self.compiled.get_property("NUM_STREAMS")))
        except Exception:  # a plugin or wrapper without the property: one at a time
            return 1

    def start(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        """Start float32 (B, 3, H, W) on the next infer request -> the call that waits for its logits.

        Two infer requests per stream take turns; a request still running an uncollected batch
        when its turn comes waits for it first and keeps its logits for that batch's wait call.
        """
        with self._lock:
            if not self._ring:
                self._ring = [_Slot(self.compiled.create_infer_request()) for _ in range(2 * self.streams)]
            slot = self._ring[self._next]
            self._next = (self._next + 1) % len(self._ring)
            wait = slot.start(np.ascontiguousarray(batch, dtype=np.float32))

        def locked() -> np.ndarray:
            with self._lock:
                return wait()
        return locked

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 (B, 3, H, W) -> float32 logits (B, num_classes), the batch cut into a part per stream."""
        parts = np.array_split(batch, min(self.streams, len(batch))) if len(batch) > 1 else [batch]
        with self._lock:
            waits = [self.start(part) for part in parts]
            return np.concatenate([wait() for wait in waits])


class _Slot:
    """One infer request and the batch it runs; the logits are copied out (the request reuses its buffer)."""

    def __init__(self, request: Any):
        self.request = request
        self.running: _Run | None = None

    def start(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        import openvino as ov

        self.finish()
        self.request.set_input_tensor(ov.Tensor(batch, shared_memory=True))
        self.request.start_async()
        self.running = run = _Run(batch)
        return lambda: run.logits if run.logits is not None else self.finish(run)

    def finish(self, run: _Run | None = None) -> Any:
        """Wait for the running batch and keep its logits with it (-> those logits)."""
        if self.running is not None:
            self.request.wait()
            self.running.logits = np.array(self.request.get_output_tensor(0).data, dtype=np.float32)
            self.running.batch, self.running = None, None
        return run.logits if run is not None else None


@dataclass
class _Run:
    batch: np.ndarray | None  # kept alive while the request reads it (the tensor shares its memory)
    logits: np.ndarray | None = None


def compile_config(precision: str, cache_dir: Path | None = None, threads: int | None = None) -> dict[str, str]:
    """The CPU plugin's properties: inference precision (fp32 exact, bf16 on native hardware), one stream
    per CPU (``inference.pipeline.default_streams``) on all of them, the blob cache. The CPUs are this
    process's usable ones shared among the processes torchrun runs on this machine."""
    from vitcli.cpuinfo import usable_cpus
    from vitcli.distributed import torchrun_rank
    from vitcli.inference.pipeline import default_streams

    if precision not in PRECISION_HINTS:
        raise UsageError(f"--precision {precision} does not run on OpenVINO's CPU plugin; use fp32 or bf16")
    cpus = threads or max(1, usable_cpus() // max(1, torchrun_rank().local_world))
    config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "NUM_STREAMS": str(default_streams(cpus)),
              "INFERENCE_NUM_THREADS": str(cpus)}
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir)
    return config


def compile_model(model: Any, precision: str = "fp32", cache_dir: Path | None = None) -> Any:
    """An ``openvino.Model`` or an IR path -> a compiled CPU model (blobs kept in ``cache_dir`` if given)."""
    ov = import_openvino()
    with signal_stack_kept():
        return ov.Core().compile_model(str(model) if isinstance(model, Path) else model, "CPU",
                                       compile_config(precision, cache_dir))


def export_blob(compiled: Any, path: Path) -> None:
    """Write a compiled model's blob (``CompiledModel.export_model``) to ``path``."""
    data = compiled.export_model()
    path.write_bytes(data.getvalue() if hasattr(data, "getvalue") else data)


def import_blob(path: Path, precision: str = "fp32") -> Any:
    """A compiled model back from its blob (made on this CPU, by this OpenVINO, at ``precision``)."""
    ov = import_openvino()
    with signal_stack_kept():
        return ov.Core().import_model(path.read_bytes(), "CPU", compile_config(precision))


def load_openvino(path: str | Path, precision: str = "fp32", device: str = "cpu") -> OpenVinoModel:
    """Open an exported IR (``model.xml`` beside ``model.bin``); its rt_info must carry vitcli's metadata."""
    ov = import_openvino()
    path = Path(path)
    if device not in ("auto", "cpu"):
        raise UsageError(f"--device {device}: vitcli runs OpenVINO IR files on the CPU; use --device cpu, or "
                         "export ONNX (`vitcli export -f onnx`) for a GPU runtime")
    if not path.is_file():
        raise UsageError(f"OpenVINO IR '{path}' does not exist")
    if not path.with_suffix(".bin").is_file():
        raise ModelLoadError(f"'{path}' has no weights file beside it ({path.with_suffix('.bin').name}); "
                             "copy the .xml and .bin together")
    try:
        model = ov.Core().read_model(str(path))
    except Exception as e:  # OpenVINO raises RuntimeError with pages of context
        raise ModelLoadError(f"'{path}' is not a readable OpenVINO IR ({first_line(e)})") from e
    outputs = model.outputs[0].get_partial_shape()
    num_outputs = outputs[-1].get_length() if outputs.rank.is_static and outputs[-1].is_static else None
    meta = check_metadata(read_metadata(model), str(path), num_outputs)
    try:
        compiled = compile_model(model, precision)
    except UsageError:
        raise
    except Exception as e:
        raise ModelLoadError(f"OpenVINO could not compile '{path}' ({first_line(e)})") from e
    return OpenVinoModel(compiled, path, meta, precision)


def save_ir(model: Any, path: Path, meta: dict[str, Any]) -> Path:
    """Write ``model`` as ``path`` (.xml) + its .bin with ``meta`` in rt_info; fp32 weights, atomically.

    Both files are written to a temporary folder beside ``path`` and renamed into place, the
    weights first, so a reader never meets an .xml without its whole .bin.
    """
    import tempfile

    ov = import_openvino()
    set_metadata(model, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", dir=path.parent))
    try:
        ov.save_model(model, str(tmp / path.name), compress_to_fp16=False)
        for suffix in (".bin", ".xml"):
            os.replace(tmp / path.with_suffix(suffix).name, path.with_suffix(suffix))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
