"""Splitting a predict job: ``--shard I/N`` for job arrays, and torchrun ranks. No torch at import.

``--shard I/N`` takes the I-th of N contiguous slices of the expanded input order (I from 0), so the
N outputs concatenated in shard order are the one-process output: ``cat`` them. It counts the
inputs first (a second pass over folders and list files; no list of them is kept).

Under torchrun the ranks take blocks of ``block`` inputs in turn (rank r: blocks r, r+N, r+2N, ...)
and rank 0 writes the records of all ranks as they come, in input order: after each round every
rank sends its block's records to rank 0 (``gather_object`` over a gloo group, whatever the device
backend), so rank 0 holds at most one block per rank and the output streams as in one process.
A rank that fails ends its process with an error; the others are then ended by torchrun (whose
agent stops every worker when one exits with an error) or find the dead peer in the next gather.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from vitcli.distributed import Rank
from vitcli.errors import UsageError
from vitcli.inference.predict import Prediction

Item = Any  # an image source (str) or an InputProblem: one record each


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``--shard I/N``, I from 0 to N-1)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        index, sep, count = text.partition("/")
        try:
            shard = cls(int(index), int(count))
        except ValueError:
            shard = None
        if not sep or shard is None or shard.count < 1 or not 0 <= shard.index < shard.count:
            raise UsageError(f"--shard '{text}': give I/N with 0 <= I < N, e.g. --shard 0/4 ... --shard 3/4 "
                             "(Slurm: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=0-N-1)")
        return shard

    def bounds(self, total: int) -> tuple[int, int]:
        """[start, stop) of this shard among ``total`` items: contiguous, sizes differ by at most one."""
        return self.index * total // self.count, (self.index + 1) * total // self.count


def shard_items(items: Callable[[], Iterable[Item]], shard: Shard) -> Iterator[Item]:
    """This shard's contiguous slice of ``items()`` (called twice: once to count, once to read)."""
    total = sum(1 for _ in items())
    start, stop = shard.bounds(total)
    return itertools.islice(items(), start, stop)


# ------------------------------------------------------------------------------------- torchrun


def rank_blocks(items: Iterable[Item], rank: Rank, block: int,
                sizes: deque[int]) -> Iterator[Item]:
    """The items of this rank's blocks (r, r+N, r+2N, ... of ``block`` items); each block's size is
    appended to ``sizes`` before its first item is given, so records can be cut back into blocks."""
    it = iter(items)
    for number in itertools.count():
        chunk = list(itertools.islice(it, block))
        if not chunk:
            return
        if number % rank.world == rank.rank:
            sizes.append(len(chunk))
            yield from chunk


def records_by_block(records: Iterator[Prediction], sizes: deque[int]) -> Iterator[list[Prediction]]:
    """Cut this rank's records (one per item, in order) back into its blocks, one list per block."""
    while True:
        if not sizes:
            first = next(records, None)  # reading a record makes its block's size known
            if first is None:
                return
            records = itertools.chain([first], records)
        size = sizes.popleft()
        yield list(itertools.islice(records, size))


def merged_records(blocks: Iterator[list[Prediction]], rank: Rank, group: Any = None) -> Iterator[Prediction]:
    """All ranks' records in input order, on rank 0 (other ranks get none), one round at a time.

    Every rank calls this with its own blocks; each round gathers one block (or None once a rank
    has no more) from every rank to rank 0, which yields them in rank order.
    """
    import torch.distributed as dist

    while True:
        mine = next(blocks, None)
        gathered: list[Any] = [None] * rank.world if rank.main else None  # type: ignore[assignment]
        dist.gather_object(mine, gathered, dst=0, group=group)
        finished = [mine is None]
        if rank.main:
            for block in gathered:
                yield from block or ()
            finished = [all(block is None for block in gathered)]
        dist.broadcast_object_list(finished, src=0, group=group)
        if finished[0]:
            return
