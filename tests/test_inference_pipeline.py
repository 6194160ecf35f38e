"""vitcli.inference.pipeline: decoding overlapped with the engine, in order, bounded, failures in place."""

from __future__ import annotations

import threading
import time

import pytest

from vitcli.inference.pipeline import (
    HandlePool,
    chunked,
    decode_once_bound,
    default_streams,
    pipelined,
    stream_threads,
)

MODES = [0, 1, 2, 3]


def test_the_decode_once_bound():
    # decoding 80 img/s and the model 20 img/s on the same cores: 12.5 + 50 ms per image
    assert decode_once_bound(80, 20) == pytest.approx(16.0)
    assert decode_once_bound(1e9, 20) == pytest.approx(20.0)  # free decoding: the model alone
    with pytest.raises(ValueError):
        decode_once_bound(0, 20)


def test_streams_share_the_cpus():
    assert [default_streams(n) for n in (1, 2, 6, 64)] == [1, 2, 6, 8]
    assert [stream_threads(streams, 16) for streams in (1, 2, 8, 32)] == [16, 8, 2, 1]


def test_chunked_reads_lazily():
    pulled = []

    def items():
        for i in range(7):
            pulled.append(i)
            yield i

    chunks = chunked(items(), 3)
    assert next(chunks) == [0, 1, 2] and pulled == [0, 1, 2]
    assert list(chunks) == [[3, 4, 5], [6]]


@pytest.mark.parametrize("streams", MODES)
def test_results_in_input_order_whatever_the_finishing_order(streams):
    def decode(chunk):
        time.sleep(0.002 * (chunk[0] % 3))  # later chunks often finish first
        return [x * 10 for x in chunk]

    out = list(pipelined(chunked(range(23), 4), decode, sum, streams=streams))

    assert [chunk for chunk, _ in out] == list(chunked(range(23), 4))
    assert [result for _, result in out] == [sum(x * 10 for x in c) for c in chunked(range(23), 4)]


@pytest.mark.parametrize("streams", [1, 2, 3])
def test_decoding_overlaps_the_engine(streams):
    """The engine's first call waits until the next batch is being decoded: only an overlapping
    pipeline gets past it (inline decoding would time out)."""
    second_decoding = threading.Event()

    def decode(chunk):
        if chunk[0] == 1:
            second_decoding.set()
        return chunk

    def infer(batch):
        if batch[0] == 0:
            assert second_decoding.wait(timeout=5), "the next batch was not decoded during this one"
        return batch

    assert [r for _, r in pipelined(chunked(range(4), 1), decode, infer, streams=streams)] == [[0], [1], [2], [3]]


@pytest.mark.parametrize("streams, ahead", [(1, 1), (1, 3), (2, 2), (3, 1)])
def test_at_most_ahead_batches_per_stream_are_held(streams, ahead):
    decoded, consumed, most = [0], [0], [0]
    lock = threading.Lock()

    def decode(chunk):
        with lock:
            decoded[0] += 1
        return chunk

    for _ in pipelined(chunked(range(40), 1), decode, lambda b: b, streams=streams, ahead=ahead):
        time.sleep(0.003)  # a slow consumer: decoding would run away if it were not bounded
        consumed[0] += 1
        with lock:
            most[0] = max(most[0], decoded[0] - consumed[0])
    # streams: the chunks in flight; one stream: the queue, the batch being decoded and the one in hand
    limit = ahead * streams if streams > 1 else ahead + 1
    assert consumed[0] == 40 and most[0] <= limit


@pytest.mark.parametrize("streams", MODES)
@pytest.mark.parametrize("where", ["decode", "infer"])
def test_a_failure_is_raised_at_its_chunk(streams, where):
    def decode(chunk):
        if where == "decode" and chunk[0] == 8:
            raise RuntimeError("bad batch")
        return chunk

    def infer(batch):
        if where == "infer" and batch[0] == 8:
            raise RuntimeError("bad batch")
        return batch

    got = []
    with pytest.raises(RuntimeError, match="bad batch"):
        for chunk, _ in pipelined(chunked(range(20), 4), decode, infer, streams=streams):
            got.append(chunk[0])
    assert got == [0, 4]  # everything before it, nothing after


@pytest.mark.parametrize("streams", [1, 2])
def test_stopping_early_leaves_no_thread_behind(streams):
    before = threading.active_count()
    stream = pipelined(chunked(range(10_000), 2), lambda c: c, lambda b: b, streams=streams)
    assert next(stream)[0] == [0, 1]
    stream.close()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before


def test_a_failing_source_of_chunks_is_raised_by_the_producer_mode():
    def chunks():
        yield [0]
        raise OSError("list file vanished")

    with pytest.raises(OSError, match="vanished"):
        list(pipelined(chunks(), lambda c: c, lambda b: b, streams=1))


def test_streams_never_share_an_engine_handle():
    pool = HandlePool([object(), object()])
    busy: set[int] = set()
    lock = threading.Lock()
    clashes = []

    def infer(batch):
        with pool.handle() as handle:
            with lock:
                clashes.append(id(handle) in busy)
                busy.add(id(handle))
            time.sleep(0.002)
            with lock:
                busy.discard(id(handle))
        return batch

    list(pipelined(chunked(range(30), 1), lambda c: c, infer, streams=2))
    assert len(clashes) == 30 and not any(clashes)
    with pytest.raises(ValueError):
        HandlePool([])


def test_a_job_smaller_than_a_round_is_shared_among_the_streams():
    from vitcli.inference.pipeline import balanced_chunks

    assert [len(c) for c in balanced_chunks(range(10), 32, 2)] == [5, 5]  # both streams get work
    assert [len(c) for c in balanced_chunks(range(70), 32, 2)] == [32, 32, 6]  # a full round: as asked
    assert [len(c) for c in balanced_chunks(range(10), 32, 1)] == [10]
    assert [x for c in balanced_chunks(range(7), 4, 3) for x in c] == list(range(7))



class _Engine:
    """A background engine for ``overlapped``: ``start`` queues a batch, the call it returns gives
    ``sum(batch)``; it logs what happens and in which thread, and counts what is queued."""

    def __init__(self):
        self.log: list[str] = []
        self.threads: set[int] = set()
        self.queued = self.most = 0

    def decode(self, chunk):
        self.log.append(f"decode {chunk[0]}")
        return chunk

    def start(self, batch):
        self.threads.add(threading.get_ident())
        self.log.append(f"start {batch[0]}")
        self.queued += 1
        self.most = max(self.most, self.queued)

        def wait():
            self.threads.add(threading.get_ident())
            self.log.append(f"wait {batch[0]}")
            self.queued -= 1
            return sum(batch)
        return wait


@pytest.mark.parametrize("depth, decoders", [(0, 0), (1, 0), (2, 2), (3, 1)])
def test_overlapped_keeps_order_and_enters_the_engine_from_the_calling_thread_only(depth, decoders):
    from vitcli.inference.pipeline import overlapped

    engine = _Engine()
    out = list(overlapped(chunked(range(23), 4), engine.decode, engine.start, depth=depth, decoders=decoders))

    assert out == [(c, sum(c)) for c in chunked(range(23), 4)]
    assert engine.threads == {threading.get_ident()}  # OpenVINO's requests: one thread, never several
    assert engine.queued == 0 and engine.most <= depth + 1


def test_overlapped_decodes_the_next_batch_while_the_engine_runs_the_last():
    from vitcli.inference.pipeline import overlapped

    turns, overlap = _Engine(), _Engine()
    list(overlapped(chunked(range(3), 1), turns.decode, turns.start, depth=0))
    list(overlapped(chunked(range(3), 1), overlap.decode, overlap.start, depth=1))

    assert turns.log[:4] == ["decode 0", "start 0", "wait 0", "decode 1"]  # depth 0: one after the other
    assert overlap.log[:4] == ["decode 0", "start 0", "decode 1", "start 1"]  # batch 0 runs while 1 decodes
    assert overlap.log.index("wait 0") > overlap.log.index("decode 1")


@pytest.mark.parametrize("decoders", [0, 2])
def test_overlapped_raises_a_failure_at_its_chunk_and_collects_what_it_started(decoders):
    from vitcli.inference.pipeline import overlapped

    engine = _Engine()

    def decode(chunk):
        if chunk[0] == 8:
            raise RuntimeError("bad batch")
        return engine.decode(chunk)

    got = []
    with pytest.raises(RuntimeError, match="bad batch"):
        for chunk, _ in overlapped(chunked(range(20), 4), decode, engine.start, depth=2, decoders=decoders):
            got.append(chunk[0])
    assert got == [0, 4] and engine.queued == 0  # nothing after it; nothing left running in the engine

    stream = overlapped(chunked(range(40), 4), engine.decode, engine.start, depth=3)
    next(stream)
    stream.close()  # a caller that stops early
    assert engine.queued == 0
