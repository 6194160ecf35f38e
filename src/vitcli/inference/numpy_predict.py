"""One torch-free predictor for every engine that maps a float32 batch to logits in NumPy.

ONNX Runtime (``onnx_engine``) and OpenVINO (``openvino_engine``) differ only in how a batch runs;
decoding (Pillow), timm's eval transform (``io.preprocess``), the softmax with the
model's temperature, TTA and top-k are the same code here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vitcli.errors import ImageLoadError, ModelLoadError, UsageError
from vitcli.io.images import load_image
from vitcli.io.preprocess import DATA_KEYS, draft_size_for, preprocess

Run = Callable[[np.ndarray], np.ndarray]  # float32 (B, 3, H, W) -> float32 logits (B, num_classes)
Start = Callable[[np.ndarray], Callable[[], np.ndarray]]  # queue a batch -> the call that waits for its logits


class ExportedModel:
    """What an exported file's metadata says, for the engines that run one (``OnnxModel``,
    ``OpenVinoModel``: dataclasses with ``path`` and ``metadata``)."""

    path: Path
    metadata: dict[str, Any]

    @property
    def labels(self) -> list[str]:
        return list(self.metadata["labels"])

    @property
    def data_config(self) -> dict[str, Any]:
        """timm's data config, as ``vitcli export`` recorded it."""
        return {k: self.metadata[k] for k in DATA_KEYS if k in self.metadata}

    @property
    def temperature(self) -> float | None:
        """The stored calibration temperature (``vitcli calibrate``/``finetune``), None if there is none."""
        from vitcli.calibration import TEMPERATURE_KEY, checked_temperature

        return checked_temperature(self.metadata.get(TEMPERATURE_KEY), f"the metadata of '{self.path}'")

    streams = 0  # batches the engine runs in the background at once (0: it runs them in the caller, ``logits``)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def start(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        """Queue a batch -> the call that waits for its logits (here: run now, in the caller)."""
        result = self.logits(batch)
        return lambda: result


class NumpyModel(Protocol):
    """What an exported-file engine offers: its labels, data config, metadata and a batch runner."""

    metadata: dict[str, Any]
    path: Any

    @property
    def labels(self) -> list[str]: ...

    @property
    def data_config(self) -> dict[str, Any]: ...

    @property
    def temperature(self) -> float | None: ...

    def logits(self, batch: np.ndarray) -> np.ndarray: ...

    @property
    def streams(self) -> int: ...

    def start(self, batch: np.ndarray) -> Callable[[], np.ndarray]: ...


def softmax(logits: np.ndarray, temperature: float | None = None) -> np.ndarray:
    """Probabilities (B, C) of logits (B, C), as softmax(logits / T) when a temperature is given."""
    if temperature is not None:
        logits = logits / np.float32(temperature)
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_model(model: NumpyModel, sources: Iterable[str], top_k: int = 5, batch_size: int = 32,
                  tta: bool = False, calibrated: bool = True, fast_decode: bool = True) -> Iterator[Any]:
    """``predict_numpy`` with a model's own engine, labels, preprocessing and (``calibrated``) temperature."""
    return predict_numpy(model.logits, model.labels, model.data_config, sources, top_k, batch_size, tta,
                         model.temperature if calibrated else None, f"'{model.path}'", model.start, model.streams,
                         fast_decode)


def predict_numpy(run: Run, labels: Sequence[str], config: dict[str, Any], sources: Iterable[str], top_k: int = 5,
                  batch_size: int = 32, tta: bool = False, temperature: float | None = None,
                  where: str = "the model", start: Start | None = None, streams: int = 0,
                  fast_decode: bool = False) -> Iterator[Any]:
    """Yield one ``vitcli.inference.predict.Prediction`` per source, in order; a bad image yields its error.

    Args:
        run: the engine: float32 (B, 3, H, W) -> float32 logits (B, num_classes).
        labels: one name per logit.
        config: timm's data config (input_size, mean, std, interpolation, crop_pct, crop_mode).
        sources: image paths or URLs, read lazily a few batches ahead.
        temperature: probabilities are softmax(logits / temperature) when given.
        where: the model's name in errors ("'model.onnx'").
        start, streams: an engine that runs ``streams`` batches in the background (``start`` queues
            one and returns the call that waits for its logits): ``streams`` threads then decode
            ahead while it runs (``inference.pipeline.overlapped``), and a job smaller than one
            batch per stream is shared among them. Without, decoding and ``run`` take turns.
        fast_decode: libjpeg decodes large JPEGs at a reduced DCT scale, never below the size the
            resize needs (``io.preprocess.draft_size_for``; as torch's predict does by default);
            else every pixel is decoded and the result equals timm's eval transform exactly.
    """
    from vitcli.inference.pipeline import balanced_chunks, overlapped
    from vitcli.inference.predict import NOT_A_NUMBER, Label, Prediction

    if top_k < 1:
        raise UsageError("--top-k must be at least 1")
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    top_k = min(top_k, len(labels))
    draft = draft_size_for(config) if fast_decode else None
    if start is None:
        streams = 0

        def start(batch: np.ndarray) -> Callable[[], np.ndarray]:
            result = run(batch)
            return lambda: result

    def decode(chunk: list[str]) -> tuple[np.ndarray | None, list[str | None]]:
        arrays: list[np.ndarray] = []
        errors: list[str | None] = []
        for source in chunk:
            try:
                arrays.append(preprocess(load_image(source, draft), config))
                errors.append(None)
            except ImageLoadError as e:
                errors.append(e.reason)
            except Exception as e:  # a pathological image the resize chokes on
                errors.append(f"could not preprocess ({type(e).__name__}: {e})")
        return (np.stack(arrays) if arrays else None), errors  # (B, 3, H, W)

    def scored(decoded: tuple[np.ndarray | None, list[str | None]]) -> Callable[[], Any]:
        batch, errors = decoded
        if batch is None:
            return lambda: (None, errors)
        plain = start(batch)
        flipped = start(np.ascontiguousarray(batch[..., ::-1])) if tta else None

        def wait() -> tuple[np.ndarray, list[str | None]]:
            probs = softmax(plain(), temperature)
            if flipped is not None:
                probs = (probs + softmax(flipped(), temperature)) / 2
            return probs, errors
        return wait

    # sources: a list, or a lazy stream of millions (vitcli.inference.job)
    chunks = balanced_chunks(sources, batch_size, streams)
    for chunk, (probs, errors) in overlapped(chunks, decode, scored, depth=streams, decoders=streams):
        if probs is not None:
            if probs.shape[1] != len(labels):  # a graph whose class count is not fixed in the file
                raise ModelLoadError(f"{where} outputs {probs.shape[1]} classes but its metadata has "
                                     f"{len(labels)} labels; export the model again")
            order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
            finite = np.isfinite(probs).all(axis=1)
        row = 0
        for source, error in zip(chunk, errors, strict=True):
            if error is None and not finite[row]:
                error, row = NOT_A_NUMBER, row + 1
            if error is not None:
                yield Prediction(source, error=error)
                continue
            yield Prediction(source, top=[Label(rank + 1, int(i), labels[int(i)], float(probs[row, i]))
                                          for rank, i in enumerate(order[row])])
            row += 1
