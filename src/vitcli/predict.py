"""Batched prediction: image sources -> Prediction records. Never prints.

Decoding, resizing and cropping produce 8-bit images, and each batch is normalized in one
vectorized step (``vitcli.data.EvalPipeline``). Where the decoding runs depends on the device: on
a GPU, in DataLoader worker processes overlapped with the forward pass (``decoded_batches``); on the
CPU, where both need the same cores, in per-core streams that each decode a batch and run the model
on it (``scored_batches``).
A file that fails to load becomes a Prediction with ``error`` set and the other images in its batch
are still predicted.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from vitcli.data import draft_size_for, eval_pipeline, load_image
from vitcli.errors import ImageLoadError, UsageError
from vitcli.models import LoadedModel, autocast, resolve_device


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
    precision: str = "fp32"
    tta: bool = False  # average the softmax of the image and its horizontal flip
    # False: timm's exact Pillow transform. True: JPEG DCT-domain downscaling (never below the resize
    # target), torchvision JPEG decoding and uint8 resizing in torch (see vitcli.data.eval_pipeline)
    fast_decode: bool = True


class ImageSourceDataset(torch.utils.data.Dataset):
    """(image tensor or None, error or None) for each source, so one bad file spoils nothing."""

    def __init__(self, sources: Sequence[str], transform: Callable[[Any], torch.Tensor],
                 draft_size: tuple[int, int] | None = None, loader: Callable[..., Any] = load_image):
        self.sources = list(sources)
        self.transform = transform
        self.draft_size = draft_size
        self.loader = loader

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, str | None]:
        try:
            return self.transform(self.loader(self.sources[i], self.draft_size)), None
        except ImageLoadError as e:
            return None, e.reason
        except Exception as e:  # a transform that chokes on a pathological image
            return None, f"could not preprocess ({type(e).__name__}: {e})"


def _collate(items: list[tuple[torch.Tensor | None, str | None]]) -> tuple[torch.Tensor | None, list]:
    """Stack the good images; keep each item's error (None where it loaded) in order."""
    good = [x for x, _ in items if x is not None]
    return (torch.stack(good) if good else None), [err for _, err in items]


def default_workers() -> int:
    """DataLoader worker processes feeding an accelerator: one per CPU core, at most 4."""
    return min(4, os.cpu_count() or 1)


def decoded_batches(dataset: torch.utils.data.Dataset, batch_size: int, collate: Callable[[list], Any],
                    device: torch.device, workers: int | None = None) -> Iterable[Any]:
    """``collate(items)`` for each run of ``batch_size`` dataset items, in order.

    For an accelerator, ``workers`` DataLoader processes (default ``default_workers()``, 0: none)
    decode ahead while the device computes. For the CPU, the calling thread decodes (the CPU's
    parallel scheme is ``scored_batches``' streams).
    """
    if device.type == "cpu":
        n = len(dataset)
        return (collate([dataset[i] for i in range(first, min(first + batch_size, n))])
                for first in range(0, n, batch_size))
    workers = min(default_workers() if workers is None else workers, len(dataset))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers > 0 else None,
    )


def predict(loaded: LoadedModel, sources: Sequence[str], options: PredictOptions = PredictOptions(),
            on_batch: Callable[[int], None] | None = None) -> Iterator[Prediction]:
    """Yield one Prediction per source, in input order.

    Args:
        loaded: the model from ``vitcli.models.load_model``.
        sources: image paths or URLs.
        options: batch size, workers, device, precision, TTA, top-k.
        on_batch: called with the number of sources done after each batch (progress bars).
    """
    if options.top_k < 1:
        raise UsageError("--top-k must be at least 1")
    if options.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    device = resolve_device(options.device)
    autocast(device, options.precision)  # validates the precision for the device
    model = loaded.model.to(device).eval()
    top_k = min(options.top_k, loaded.num_classes)
    draft = draft_size_for(loaded.data_config) if options.fast_decode else None
    pipeline = eval_pipeline(loaded.data_config, fast=options.fast_decode)
    dataset = ImageSourceDataset(sources, pipeline.per_image, draft, pipeline.load)

    def top_of(batch: tuple[torch.Tensor | None, list]) -> tuple[list, list, list]:
        """(uint8 images, errors) -> (top-k indices, top-k probs, errors); runs in stream threads."""
        images, errors = batch
        if images is None:
            return [], [], errors
        with torch.inference_mode():  # per thread, like autocast: a fresh context for every batch
            x = pipeline.to_batch(images.to(device, non_blocking=True))  # uint8 travels, then normalize
            probs = forward_probs(model, x, autocast(device, options.precision), options.tta)
            values, indices = probs.topk(top_k, dim=1)
        return indices.cpu().tolist(), values.float().cpu().tolist(), errors

    start = 0
    for indices, values, errors in scored_batches(dataset, options.batch_size, _collate, top_of, device,
                                                  options.workers):
        row = 0
        for offset, error in enumerate(errors):
            source = sources[start + offset]
            if error is not None:
                yield Prediction(source, error=error)
                continue
            yield Prediction(source, top=[
                Label(rank + 1, idx, loaded.labels[idx], p)
                for rank, (idx, p) in enumerate(zip(indices[row], values[row], strict=True))
            ])
            row += 1
        start += len(errors)
        if on_batch is not None:
            on_batch(start)


def scored_batches(dataset: torch.utils.data.Dataset, batch_size: int, collate: Callable[[list], Any],
                   score: Callable[[Any], Any], device: torch.device, workers: int | None = None) -> Iterator[Any]:
    """``score(collate(items))`` for each run of ``batch_size`` dataset items, in order.

    On the CPU, with more than one thread, the work runs in per-core streams: ``workers`` threads
    (default: torch's thread count) each decode a whole batch and run the model on it with an equal
    share of torch's threads (one each on a 2-core machine). ``batch_size`` is then the most images
    per batch: a job too small to give every stream full batches is cut into equal ones. No core
    waits for another, and the decoding of one stream fills the time the other spends in the model.
    DataLoader workers decoding beside a 2-thread forward pass, or all cores decoding a batch and
    then running the model in turns, measured slower on 2 cores (README, "Speed"). While the streams
    run, torch's thread count is the per-stream share; it is restored after. Elsewhere
    (``workers=0``, one thread, or an accelerator) batches come from ``decoded_batches`` and are
    scored in the calling thread.
    """
    n, threads = len(dataset), torch.get_num_threads()
    streams = min(threads if workers is None else workers, -(-n // batch_size))
    if device.type != "cpu" or streams < 2:
        for batch in decoded_batches(dataset, batch_size, collate, device, workers):
            yield score(batch)
        return
    batch_size = min(batch_size, -(-n // streams))  # a job of under streams x batch_size: equal shares

    def job(first: int) -> Any:
        return score(collate([dataset[i] for i in range(first, min(first + batch_size, n))]))

    torch.set_num_threads(max(1, threads // streams))  # threads started from now on take this share
    pool = ThreadPoolExecutor(streams, thread_name_prefix="vitcli-stream")
    try:
        firsts = iter(range(0, n, batch_size))
        pending = deque(pool.submit(job, first) for first in itertools.islice(firsts, 2 * streams))
        while pending:  # at most 2 batches per stream in flight, results in input order
            result = pending.popleft().result()
            if (first := next(firsts, None)) is not None:
                pending.append(pool.submit(job, first))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def forward_probs(model: torch.nn.Module, images: torch.Tensor, precision_ctx: Any,
                  tta: bool = False) -> torch.Tensor:
    """Softmax probabilities (B, num_classes) in fp32, optionally averaged with the flipped images."""
    with precision_ctx:
        logits = model(images)  # (B, num_classes)
        probs = logits.float().softmax(dim=1)
        if tta:
            probs = (probs + model(images.flip(-1)).float().softmax(dim=1)) / 2
    return probs
