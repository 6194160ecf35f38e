"""Decoding overlapped with the engine, so that predict runs at the decode-once bound. No torch at import.

Every image costs the machine ``1/decode_rate`` seconds to decode and preprocess and ``1/model_rate``
to score, both measured with all the cores. When decoding and the model share the cores, the most a
pipeline can reach is the decode-once bound ``1 / (1/decode_rate + 1/model_rate)``
(``decode_once_bound``): nothing idles and nothing is done twice.

``pipelined`` runs ``infer(decode(chunk))`` over a stream of chunks in one of three ways:

- ``streams >= 2`` (the torch engine on CPUs): streams, one thread each, that decode a whole batch
  and then score it with their share of the cores (``cores / streams`` threads). No core waits
  for another and none is oversubscribed: the decoding of one stream fills the time another
  spends in the model. Measured on 2 cores with OpenVINO bf16: 1.02 of the bound, against 0.79
  for a decoding thread beside an engine on all the cores (their threads fight over the cores)
  and 0.86 for no overlap.
- ``streams == 1`` (an accelerator, or a single core): a producer thread decodes up to ``ahead``
  batches ahead into a bounded queue while the calling thread runs the engine.
- ``streams == 0``: decode and score in the calling thread, one batch after the other.

``overlapped`` is the same for an engine that runs batches in the background itself (OpenVINO:
``NUM_STREAMS`` streams, each on its share of the cores, fed through infer requests): decoding
threads work ahead while the calling thread queues batches and collects their results, so the
engine is only ever entered from one thread.

Results come in input order, and at most ``ahead`` batches per stream are decoded and not yet
yielded (bounded memory for inputs of any length). An exception in ``decode`` or ``infer``
is raised in the caller, at that chunk's place.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

C = TypeVar("C")  # a chunk: the sources of one batch
B = TypeVar("B")  # a decoded batch
R = TypeVar("R")  # the engine's result for it
E = TypeVar("E")  # an engine handle one stream uses at a time

MAX_STREAMS = 8  # beyond this, more streams only hold more batches in memory: engines scale within a stream


def decode_once_bound(decode_rate: float, model_rate: float) -> float:
    """Images per second when the same cores decode (``decode_rate`` img/s with all of them) and run the
    model (``model_rate`` img/s with all of them), each image decoded once and scored once."""
    if decode_rate <= 0 or model_rate <= 0:
        raise ValueError("decode_rate and model_rate must be positive")
    return 1.0 / (1.0 / decode_rate + 1.0 / model_rate)


def default_streams(cpus: int | None = None) -> int:
    """Streams for a CPU engine: one per usable CPU, at most ``MAX_STREAMS`` (each then scores with
    ``cpus // streams`` threads, ``stream_threads``)."""
    if cpus is None:
        from vitcli.cpuinfo import usable_cpus

        cpus = usable_cpus()
    return max(1, min(cpus, MAX_STREAMS))


def stream_threads(streams: int, cpus: int | None = None) -> int:
    """The engine threads each stream may use: the usable CPUs shared equally, at least 1."""
    if cpus is None:
        from vitcli.cpuinfo import usable_cpus

        cpus = usable_cpus()
    return max(1, cpus // max(streams, 1))


def chunked(items: Iterable[C], size: int) -> Iterator[list[C]]:
    """Runs of ``size`` items (the last may be shorter), read lazily."""
    items = iter(items)
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def balanced_chunks(items: Iterable[C], batch_size: int, streams: int) -> Iterator[list[C]]:
    """Runs of ``batch_size`` items, except that a job smaller than one full round (``streams`` batches)
    is cut into ``streams`` equal ones, so that every stream gets a share (read one round ahead)."""
    items = iter(items)
    head = list(itertools.islice(items, max(streams, 1) * batch_size))
    if streams >= 2 and len(head) < streams * batch_size:
        batch_size = max(1, -(-len(head) // streams))
    return chunked(itertools.chain(head, items), batch_size)


def pipelined(chunks: Iterable[C], decode: Callable[[C], B], infer: Callable[[B], R], streams: int = 0,
              ahead: int = 2) -> Iterator[tuple[C, R]]:
    """``(chunk, infer(decode(chunk)))`` for every chunk, in order; see the module docstring for ``streams``.

    With ``streams >= 2``, ``infer`` is called from several threads at once: give each call its own
    engine handle (``HandlePool``) or use an engine that allows concurrent calls.
    """
    if ahead < 1:
        raise ValueError("ahead must be at least 1")
    chunks = iter(chunks)
    if streams <= 0:
        for chunk in chunks:
            yield chunk, infer(decode(chunk))
    elif streams == 1:
        yield from _decoded_ahead(chunks, decode, infer, ahead)
    else:
        yield from _in_streams(chunks, lambda chunk: infer(decode(chunk)), streams, ahead)


def _in_streams(chunks: Iterator[C], work: Callable[[C], R], streams: int, ahead: int) -> Iterator[tuple[C, R]]:
    pool = ThreadPoolExecutor(streams, thread_name_prefix="vitcli-stream")
    try:
        pending = deque((chunk, pool.submit(work, chunk)) for chunk in itertools.islice(chunks, ahead * streams))
        while pending:  # results in input order; a new chunk enters as each one leaves
            chunk, future = pending.popleft()
            result = future.result()
            if (following := next(chunks, None)) is not None:
                pending.append((following, pool.submit(work, following)))
            yield chunk, result
    finally:  # also when the caller stops early: queued chunks are dropped, running ones finish
        pool.shutdown(wait=True, cancel_futures=True)


def overlapped(chunks: Iterable[C], decode: Callable[[C], B], start: Callable[[B], Callable[[], R]],
               depth: int = 0, decoders: int = 0, ahead: int = 2) -> Iterator[tuple[C, R]]:
    """``(chunk, start(decode(chunk))())`` for every chunk, in order, for an engine that runs batches
    in the background (OpenVINO's infer requests): ``start`` queues a batch and returns the call that
    waits for its result.

    ``start`` and the calls it returns run in this thread only, up to ``depth`` chunks queued at
    once, while ``decoders`` threads decode up to ``ahead`` chunks each ahead of the engine (0:
    this thread decodes, between starting one chunk and waiting for the previous one).
    """
    if ahead < 1:
        raise ValueError("ahead must be at least 1")
    decoded: Iterator[tuple[C, B]] = (_in_streams(iter(chunks), decode, decoders, ahead) if decoders >= 1
                                      else ((chunk, decode(chunk)) for chunk in chunks))
    queued: deque[tuple[C, Callable[[], R]]] = deque()
    failure: Exception | None = None
    try:
        while True:
            try:
                chunk, batch = next(decoded)
                queued.append((chunk, start(batch)))
            except StopIteration:
                break
            except Exception as e:  # raised at its chunk's place, after the chunks queued before it
                failure = e
                break
            if len(queued) > depth:
                chunk, wait = queued.popleft()
                yield chunk, wait()
        while queued:
            chunk, wait = queued.popleft()
            yield chunk, wait()
        if failure is not None:
            raise failure
    finally:  # the caller stopped early or a chunk failed: let the engine finish what it holds
        for _, wait in queued:
            with contextlib.suppress(Exception):
                wait()


_DONE = object()


def _decoded_ahead(chunks: Iterator[C], decode: Callable[[C], B], infer: Callable[[B], R],
                   ahead: int) -> Iterator[tuple[C, R]]:
    """A producer thread decodes into a queue of ``ahead`` batches; this thread runs the engine."""
    decoded: queue.Queue[Any] = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def produce() -> None:
        try:
            for chunk in chunks:
                try:
                    item: Any = (chunk, decode(chunk), None)
                except BaseException as e:  # raised in the consumer, at this chunk's place
                    item = (chunk, None, e)
                while not stop.is_set():
                    try:
                        decoded.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set() or item[2] is not None:
                    return
        except BaseException as e:  # the chunk iterator itself failed
            decoded.put((None, None, e))
            return
        decoded.put(_DONE)

    producer = threading.Thread(target=produce, name="vitcli-decode", daemon=True)
    producer.start()
    try:
        while (item := decoded.get()) is not _DONE:
            chunk, batch, error = item
            if error is not None:
                raise error
            yield chunk, infer(batch)
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:  # unblock a producer waiting on a full queue
                decoded.get_nowait()
        producer.join()


class HandlePool(Generic[E]):
    """Engine handles (OpenVINO infer requests, one per stream) lent to one stream at a time.

    ``with pool.handle() as request: request.infer(...)``: a stream takes a free handle and gives it
    back, so ``streams`` concurrent calls never share one.
    """

    def __init__(self, handles: Iterable[E]):
        self._free: queue.SimpleQueue[E] = queue.SimpleQueue()
        self.size = 0
        for handle in handles:
            self._free.put(handle)
            self.size += 1
        if not self.size:
            raise ValueError("a HandlePool needs at least one handle")

    def handle(self) -> _Lent[E]:
        return _Lent(self._free)


class _Lent(Generic[E]):
    def __init__(self, free: queue.SimpleQueue[E]):
        self._free = free
        self._handle: E | None = None

    def __enter__(self) -> E:
        self._handle = self._free.get()
        return self._handle

    def __exit__(self, *_: Any) -> None:
        self._free.put(self._handle)  # type: ignore[arg-type]
