"""How batches are decoded and scored, shared by predict, evaluate and training benchmarks.

On a GPU, DataLoader worker processes decode ahead while the device computes. On the CPU, where
decoding and the model need the same cores, per-core streams each decode a batch and run the model
on it with their share of torch's threads (``scored_batches``; docs/predict.md, "Speed").
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from vitcli.errors import ImageLoadError
from vitcli.inference.pipeline import chunked, pipelined
from vitcli.io.images import load_image


class SourceImages:
    """``images[source]`` -> (image tensor or None, error or None): one bad file spoils nothing.

    Keyed by the source itself, so a stream of paths needs no list of them (``scored_key_batches``).
    """

    def __init__(self, transform: Callable[[Any], torch.Tensor], draft_size: tuple[int, int] | None = None,
                 loader: Callable[..., Any] = load_image):
        self.transform = transform
        self.draft_size = draft_size
        self.loader = loader

    def __getitem__(self, source: str) -> tuple[torch.Tensor | None, str | None]:
        try:
            return self.transform(self.loader(source, self.draft_size)), None
        except ImageLoadError as e:
            return None, e.reason
        except Exception as e:  # a transform that chokes on a pathological image
            return None, f"could not preprocess ({type(e).__name__}: {e})"


class ImageSourceDataset(torch.utils.data.Dataset):
    """``SourceImages`` over a list of sources, by index."""

    def __init__(self, sources: Sequence[str], transform: Callable[[Any], torch.Tensor],
                 draft_size: tuple[int, int] | None = None, loader: Callable[..., Any] = load_image):
        self.sources = list(sources)
        self.images = SourceImages(transform, draft_size, loader)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, str | None]:
        return self.images[self.sources[i]]


def collate_images(items: list[tuple[torch.Tensor | None, str | None]]) -> tuple[torch.Tensor | None, list]:
    """Stack the good images; keep each item's error (None where it loaded) in order."""
    good = [x for x, _ in items if x is not None]
    return (torch.stack(good) if good else None), [err for _, err in items]


def default_workers(processes: int | None = None) -> int:
    """DataLoader worker processes feeding an accelerator: the CPUs this process may use
    (``cpuinfo.usable_cpus``: affinity set and cgroup quota) shared by ``processes``, the ranks on
    this machine (default: torchrun's LOCAL_WORLD_SIZE, else 1), at most 4 each."""
    from vitcli.cpuinfo import usable_cpus
    from vitcli.distributed import torchrun_rank

    if processes is None:
        processes = torchrun_rank().local_world
    return min(4, max(usable_cpus() // max(processes, 1), 1))


def scored_batches(dataset: torch.utils.data.Dataset, batch_size: int, collate: Callable[[list], Any],
                   score: Callable[[Any], Any], device: torch.device, workers: int | None = None) -> Iterator[Any]:
    """``score(collate(items))`` for each run of ``batch_size`` dataset items, in order.

    ``scored_key_batches`` over the indices ``range(len(dataset))``; see there.
    """
    for _, result in scored_key_batches(dataset, range(len(dataset)), batch_size, collate, score, device, workers):
        yield result


def scored_key_batches(dataset: Any, keys: Iterable[Any], batch_size: int, collate: Callable[[list], Any],
                       score: Callable[[Any], Any], device: torch.device,
                       workers: int | None = None) -> Iterator[tuple[list[Any], Any]]:
    """``(batch keys, score(collate([dataset[k] for k in batch keys])))`` for runs of ``batch_size`` keys.

    ``keys`` may be a lazy iterator of any length (``vitcli predict`` streams image paths through it):
    it is read only a few batches ahead of the results, which come in order.

    On the CPU, with more than one thread, the work runs in per-core streams (the streams of
    ``vitcli.inference.pipeline.pipelined``): ``workers`` threads
    (default: torch's thread count) each decode a whole batch and run the model on it with an equal
    share of torch's threads (one each on a 2-core machine). ``batch_size`` is then the most images
    per batch: a job too small to give every stream full batches is cut into equal ones. No core
    waits for another, and the decoding of one stream fills the time the other spends in the model.
    DataLoader workers decoding beside a 2-thread forward pass, or all cores decoding a batch and
    then running the model in turns, measured slower on 2 cores (docs/predict.md, "Speed"). While the streams
    run, torch's thread count is the per-stream share; it is restored after. Elsewhere
    (``workers=0``, one thread, or an accelerator) batches come from DataLoader processes (an
    accelerator) or the calling thread (the CPU) and are scored in the calling thread.
    """
    keys = iter(keys)
    threads = torch.get_num_threads()
    streams = threads if workers is None else workers
    # look ahead one full round: a job smaller than that is cut into equal shares
    head = list(itertools.islice(keys, max(streams, 1) * batch_size))
    n_head = len(head)
    if not n_head:
        return
    small = n_head < max(streams, 1) * batch_size
    streams = min(streams, -(-n_head // batch_size)) if small else streams
    if small and streams >= 2:
        batch_size = -(-n_head // streams)
    chunks = chunked(itertools.chain(head, keys), batch_size)
    if device.type != "cpu" or streams < 2:
        yield from _scored_inline(dataset, chunks, collate, score, device, workers)
        return

    torch.set_num_threads(max(1, threads // streams))  # threads started from now on take this share
    try:  # at most 2 batches per stream in flight, results in input order
        yield from pipelined(chunks, lambda chunk: collate([dataset[k] for k in chunk]), score, streams=streams)
    finally:
        torch.set_num_threads(threads)


def _scored_inline(dataset: Any, chunks: Iterator[list[Any]], collate: Callable[[list], Any],
                   score: Callable[[Any], Any], device: torch.device,
                   workers: int | None) -> Iterator[tuple[list[Any], Any]]:
    """Batches decoded by DataLoader processes (an accelerator) or in this thread, scored here."""
    if device.type == "cpu" or workers == 0:
        for chunk in chunks:
            yield chunk, score(collate([dataset[k] for k in chunk]))
        return
    sent: deque[list[Any]] = deque()  # the loader reads chunks ahead, in order: the i-th result is the i-th sent

    def batches() -> Iterator[list[Any]]:
        for chunk in chunks:
            sent.append(chunk)
            yield chunk

    workers = default_workers() if workers is None else workers
    loader = torch.utils.data.DataLoader(  # the "indices" a worker receives are our keys: dataset[key]
        dataset, batch_sampler=batches(), num_workers=workers, collate_fn=collate,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers > 0 else None,
    )
    for batch in loader:
        yield sent.popleft(), score(batch)
