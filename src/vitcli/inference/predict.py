"""Batched prediction: image sources -> Prediction records, streamed. Never prints; no torch at import.

Decoding, resizing and cropping produce 8-bit images, and each batch is normalized in one
vectorized step (``vitcli.io.transforms.EvalPipeline``). Where the decoding runs depends on the device: on
a GPU, in DataLoader worker processes overlapped with the forward pass; on the CPU, where both need
the same cores, in per-core streams that each decode a batch and run the model on it
(``vitcli.inference.batching.scored_key_batches``). Sources are read lazily, a few batches ahead, and each
batch's records are yielded as soon as it is done, in input order.
A file that fails to load becomes a Prediction with ``error`` set and the other images in its batch
are still predicted. ``with_input_problems`` puts the inputs that named no image in their place,
for this predictor or any other (a torch-free ONNX Runtime one) that yields records in order.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vitcli.errors import UsageError

NOT_A_NUMBER = "the model's output for this image is not a number (NaN or infinite); no labels can be given"

if TYPE_CHECKING:
    import torch

    from vitcli.io.inputs import InputProblem
    from vitcli.models.resolve import LoadedModel


@dataclass(frozen=True)
class Label:
    """One of the top-k answers for an image."""

    rank: int
    index: int
    label: str
    prob: float


@dataclass
class Prediction:
    """The top-k labels for one image source, or why it could not be read."""

    source: str
    top: list[Label] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class PredictOptions:
    top_k: int = 5
    batch_size: int = 32
    workers: int | None = None  # CPU: streams (None: torch's threads); GPU: DataLoader processes (None: cores, max 4)
    device: str = "auto"
    precision: str = "auto"  # vitcli.devices.resolve_precision: bf16 where native and faster, else fp32 (tf32 on CUDA)
    tta: bool = False  # average the softmax of the image and its horizontal flip
    # False: timm's exact Pillow transform. True: JPEG DCT-domain downscaling (never below the resize
    # target), torchvision JPEG decoding and uint8 resizing in torch (see vitcli.io.transforms.eval_pipeline)
    fast_decode: bool = True
    calibrated: bool = True  # divide the logits by the model's stored temperature (vitcli.calibration), if any


def predict(loaded: LoadedModel, sources: Iterable[str], options: PredictOptions = PredictOptions(),
            on_batch: Callable[[int], None] | None = None) -> Iterator[Prediction]:
    """Yield one Prediction per source, in input order, each batch as soon as it is done.

    Args:
        loaded: the model from ``vitcli.models.resolve.load_model``.
        sources: image paths or URLs; any iterable, read lazily a few batches ahead (a generator
            over a million paths is never held as a list).
        options: batch size, workers, device, precision, TTA, top-k.
        on_batch: called with the number of sources done after each batch (progress bars).
    """
    from vitcli.calibration import model_temperature

    if options.top_k < 1:
        raise UsageError("--top-k must be at least 1")
    top_k = min(options.top_k, loaded.num_classes)
    temperature = model_temperature(loaded) if options.calibrated else None

    def top_of(model: torch.nn.Module, x: torch.Tensor, precision_ctx: Any) -> list[tuple[list, list]]:
        """A batch -> (top-k indices, top-k probs) per image."""
        values, indices = forward_probs(model, x, precision_ctx, options.tta, temperature).topk(top_k, dim=1)
        return list(zip(indices.cpu().tolist(), values.float().cpu().tolist(), strict=True))

    for source, error, row in batched_outputs(loaded, sources, options, top_of, on_batch):
        if error is None and not all(math.isfinite(p) for p in row[1]):
            error = NOT_A_NUMBER
        if error is not None:
            yield Prediction(source, error=error)
            continue
        yield Prediction(source, top=[Label(rank + 1, idx, loaded.labels[idx], p)
                                      for rank, (idx, p) in enumerate(zip(*row, strict=True))])


def batched_outputs(loaded: LoadedModel, sources: Iterable[str], options: PredictOptions,
                    forward: Callable[[torch.nn.Module, torch.Tensor, Any], list[Any]],
                    on_batch: Callable[[int], None] | None = None) -> Iterator[tuple[str, str | None, Any]]:
    """``(source, error, output)`` per source, in input order, batch by batch: the decoding, batching and
    device handling that predict and embed share.

    ``forward(model, x, precision_ctx)`` gets each batch of the images that loaded, normalized, on the
    device (``x``: (B, 3, H, W)), in inference mode, and returns one output per image; an image that
    failed to load gets its error and no output.
    """
    import torch

    from vitcli.devices import autocast, resolve_device, resolve_precision
    from vitcli.inference.batching import SourceImages, collate_images, scored_key_batches
    from vitcli.io.preprocess import draft_size_for
    from vitcli.io.transforms import eval_pipeline

    if options.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    device = resolve_device(options.device)
    precision = resolve_precision(options.precision, device)  # auto -> what runs; checked for the device
    model = loaded.model.to(device).eval()
    draft = draft_size_for(loaded.data_config) if options.fast_decode else None
    pipeline = eval_pipeline(loaded.data_config, fast=options.fast_decode)
    images = SourceImages(pipeline.per_image, draft, pipeline.load)

    def run(batch: tuple[torch.Tensor | None, list]) -> tuple[list, list]:
        """(uint8 images, errors) -> (outputs of the good images, errors); runs in stream threads."""
        pixels, errors = batch
        if pixels is None:
            return [], errors
        with torch.inference_mode():  # per thread, like autocast: a fresh context for every batch
            x = pipeline.to_batch(pixels.to(device, non_blocking=True))  # uint8 travels, then normalize
            return forward(model, x, autocast(device, precision)), errors

    done = 0
    for batch, (outputs, errors) in scored_key_batches(images, sources, options.batch_size, collate_images, run,
                                                       device, options.workers):
        good = iter(outputs)
        for source, error in zip(batch, errors, strict=True):
            yield source, error, None if error is not None else next(good)
        done += len(batch)
        if on_batch is not None:
            on_batch(done)


def failed_prediction(source: str, reason: str) -> Prediction:
    """The record of an input that could not be predicted."""
    return Prediction(source, error=reason)


def with_input_problems(items: Iterable[str | InputProblem], predict_sources: Callable[[Iterator[str]], Iterable[Any]],
                        failed: Callable[[str, str], Any] = failed_prediction) -> Iterator[Any]:
    """Records for a stream of sources and input problems, in their order.

    ``predict_sources`` gets the image sources only (lazily) and must yield one record per source in
    order, as ``predict`` does (or a torch-free predictor, or an embedder); each input problem becomes
    ``failed(source, reason)`` in its place. Nothing is held but the problems met between two records.
    """
    pending: deque[tuple[int, InputProblem]] = deque()  # (sources pulled before it, problem)
    pulled = 0

    def sources() -> Iterator[str]:
        nonlocal pulled
        for item in items:
            if isinstance(item, str):
                pulled += 1
                yield item
            else:
                pending.append((pulled, item))

    emitted = 0
    for record in predict_sources(sources()):
        while pending and pending[0][0] <= emitted:
            problem = pending.popleft()[1]
            yield failed(problem.source, problem.reason)
        yield record
        emitted += 1
    while pending:  # the problems after the last source (read when the stream ran dry)
        problem = pending.popleft()[1]
        yield failed(problem.source, problem.reason)


def first_source(items: Iterable[str | InputProblem]) -> tuple[list[InputProblem], Iterator[str | InputProblem] | None]:
    """The input problems before the first image source, and the stream from that source on (None
    when there is no source at all: then nothing needs a model, and the caller reports the problems)."""
    items = iter(items)
    leading: list[InputProblem] = []
    for item in items:
        if isinstance(item, str):
            return leading, itertools.chain([item], items)
        leading.append(item)
    return leading, None


def forward_probs(model: torch.nn.Module, images: torch.Tensor, precision_ctx: Any,
                  tta: bool = False, temperature: float | None = None) -> torch.Tensor:
    """Softmax probabilities (B, num_classes) in fp32, optionally averaged with the flipped images.

    ``temperature``: the probabilities are ``softmax(logits / temperature)`` (the ranking is unchanged).
    """
    t = temperature or 1.0
    with precision_ctx:
        logits = model(images)  # (B, num_classes)
        probs = (logits.float() / t).softmax(dim=1)
        if tta:
            probs = (probs + (model(images.flip(-1)).float() / t).softmax(dim=1)) / 2
    return probs
