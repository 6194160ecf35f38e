"""A torch-free predictor for exported ``.onnx`` files: ONNX Runtime, NumPy and Pillow only.

``vitcli predict model.onnx`` runs through here and never imports torch or timm, so it starts in a
fraction of a second. Labels and preprocessing come from the file's own metadata (written by
``vitcli.export.job``); ``vitcli.io.preprocess`` reproduces timm's eval transform step for step on
PIL images, so the pixels fed to the network equal timm's exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitcli.cpuinfo import usable_cpus
from vitcli.errors import MissingExtraError, ModelLoadError, UsageError
from vitcli.inference.numpy_predict import ExportedModel
from vitcli.models.metadata import check_data_config, check_labels, parse_json_value

INSTALL_HINT = 'ONNX support needs the export extra: pip install -e ".[export]"'


def import_onnxruntime() -> Any:
    """``onnxruntime``, or a MissingExtraError with the install line."""
    try:
        import onnxruntime
    except ImportError as e:
        raise MissingExtraError(INSTALL_HINT) from e
    return onnxruntime


# ---------------------------------------------------------------------------------- the model


@dataclass
class OnnxModel(ExportedModel):
    """An ONNX Runtime session with the labels and preprocessing its file carries.

    On the CPU it runs ``streams`` batches at once (one per usable CPU, each on its share of the
    intra-op threads: ``session.run`` is safe to call concurrently), as OpenVINO's streams do:
    ``start`` hands a batch to a stream and returns the call that waits for its logits, so predict
    decodes the next batches meanwhile; ``logits`` cuts one batch into a part per stream.
    """

    session: Any
    path: Path
    metadata: dict[str, Any]
    streams: int = 0  # 0: every call runs in the caller, on all the intra-op threads
    _pool: Any = field(default=None, init=False, repr=False)

    @property
    def input_name(self) -> str:
        return self.session.get_inputs()[0].name

    @property
    def input_dtype(self) -> Any:
        return np.float16 if self.session.get_inputs()[0].type == "tensor(float16)" else np.float32

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 (B, 3, H, W) -> float32 logits (B, num_classes), in the calling thread."""
        out = self.session.run(None, {self.input_name: batch.astype(self.input_dtype, copy=False)})[0]
        return out.astype(np.float32, copy=False)

    def start(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        """Hand a batch to the next free stream -> the call that waits for its logits."""
        if self.streams < 2:
            return super().start(batch)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.streams, thread_name_prefix="vitcli-onnx")
        return self._pool.submit(self.run, batch).result

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 (B, 3, H, W) -> float32 logits (B, num_classes), the batch cut into a part per stream."""
        if self.streams < 2 or len(batch) < 2:
            return self.run(batch)
        waits = [self.start(part) for part in np.array_split(batch, min(self.streams, len(batch)))]
        return np.concatenate([wait() for wait in waits])


def read_metadata(session: Any, where: str = "model") -> dict[str, Any]:
    """The vitcli metadata of a session: each ``metadata_props`` value is a JSON document."""
    return parse_metadata(session.get_modelmeta().custom_metadata_map, where)


def parse_metadata(raw: dict[str, str], where: str = "model") -> dict[str, Any]:
    """JSON-decode each value (nesting bounded); values other tools wrote as plain strings stay strings."""
    return {key: parse_json_value(key, value, where) for key, value in raw.items()}


def session_options(threads: int | None = None, spin: bool = True) -> Any:
    """Session options; ``spin=False`` stops idle threads busy-waiting (for benchmarks that take turns)."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cpus()
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def onnx_has_cuda() -> bool:
    """Whether this ONNX Runtime has the CUDA provider (onnxruntime-gpu; the plain package has not)."""
    return "CUDAExecutionProvider" in import_onnxruntime().get_available_providers()


def providers(device: str = "auto") -> list[Any]:
    """CUDA first when the runtime has it and the device allows it (``cuda:N``: GPU N), the CPU always.

    ``--device cuda`` (or ``cuda:N``) on a runtime without the CUDA provider is a usage error, not a
    silent fall-back to the CPU.
    """
    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise UsageError(f"--device '{device}' does not apply to an .onnx model; use auto, cpu, cuda or cuda:N")
    chosen: list[Any] = []
    if kind in ("auto", "cuda") and onnx_has_cuda():
        cuda = "CUDAExecutionProvider"
        chosen = [(cuda, {"device_id": int(index)})] if index else [cuda]
    if kind == "cuda" and not chosen:
        raise UsageError(f"--device {device} was asked for but this ONNX Runtime has no CUDA provider; "
                         "install onnxruntime-gpu (in place of onnxruntime) or use --device cpu")
    return [*chosen, "CPUExecutionProvider"]


def load_onnx(path: str | Path, device: str = "auto", threads: int | None = None, spin: bool = True,
              streams: int | None = None) -> OnnxModel:
    """Open an exported ``.onnx`` file; its metadata must carry labels and a data config.

    ``threads``: the CPU threads in all (default: the usable CPUs, shared among torchrun's processes on
    this machine); ``streams``: batches run at once on the CPU, each on ``threads // streams`` of them
    (default: one per CPU, at most 8; ``inference.pipeline.default_streams``). On CUDA, one at a time.
    """
    from vitcli.distributed import torchrun_rank
    from vitcli.inference.pipeline import default_streams

    ort = import_onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"ONNX file '{path}' does not exist")
    chosen = providers(device)  # a device this runtime cannot use is a usage error, raised as it is
    threads = threads or max(1, usable_cpus() // max(1, torchrun_rank().local_world))
    if chosen[0] != "CPUExecutionProvider":  # a GPU runs one batch at a time
        streams = 0
    elif streams is None:
        streams = default_streams(threads)
    try:
        session = ort.InferenceSession(str(path), session_options(max(1, threads // max(1, streams)), spin),
                                       providers=chosen)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ModelLoadError(f"'{path}' is not a loadable ONNX model ({str(e).strip().splitlines()[0]})") from e
    meta = read_metadata(session, f"'{path}'")
    if not {"labels", "input_size", "mean", "std"} <= meta.keys():
        raise ModelLoadError(f"'{path}' has no vitcli metadata (labels, input_size, mean, std); "
                             "export it with `vitcli export`, which writes them into the file")
    model = OnnxModel(session, path, meta, streams if streams >= 2 else 0)
    inputs, outputs = session.get_inputs()[0].shape, session.get_outputs()[0].shape  # (B, C, H, W), (B, classes)
    check_data_config(model.data_config, f"'{path}'", inputs[2:] if len(inputs) == 4 else None)
    check_labels(meta["labels"], f"'{path}'", outputs[-1] if len(outputs) == 2 else None)
    return model


def predict_onnx(model: OnnxModel, sources: Iterable[str], top_k: int = 5, batch_size: int = 32,
                 tta: bool = False, calibrated: bool = True) -> Iterator[Any]:
    """Yield one ``vitcli.inference.predict.Prediction`` per source, in order (``numpy_predict.predict_model``).

    ``calibrated``: apply the temperature stored in the file's metadata, if any (False: plain softmax).
    """
    from vitcli.inference.numpy_predict import predict_model

    return predict_model(model, sources, top_k, batch_size, tta, calibrated)
