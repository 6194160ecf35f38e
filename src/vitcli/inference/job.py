"""A predict job as a stream: inputs -> shard -> skip what --output holds -> records -> writers.

Nothing per image is kept once its record is written: inputs are expanded lazily (folders one
listing at a time, list files one line at a time), predictions leave batch by batch, and an
``--output`` file remembers 8 bytes per source it holds, to be skipped on a rerun. Torch-free at
import; the model loads only when some input names an image that is still to do.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcli.distributed import Rank
from vitcli.errors import UsageError
from vitcli.inference.predict import (
    Prediction,
    PredictOptions,
    failed_prediction,
    first_source,
    predict,
    with_input_problems,
)
from vitcli.inference.shards import Item, Shard, merged_records, rank_blocks, records_by_block, shard_items
from vitcli.io.records import DoneSources, OpenOutput, RecordSink, open_output

if TYPE_CHECKING:
    from vitcli.models.resolve import LoadedModel

Predictor = Callable[[Iterator[str]], Iterable[Any]]  # image sources -> one record each, in order
Opener = Callable[[Path, bool], Any]  # (path, resume) -> an open output: .writer, .done, .close()


@dataclass
class Tally:
    """What a job wrote: records, failed records (input problems and unreadable images), skipped sources."""

    written: int = 0
    failed: int = 0
    skipped: int = 0

    @property
    def ok(self) -> bool:
        return self.failed == 0


def write_records(records: Iterable[Any], sinks: Sequence[RecordSink], tally: Tally | None = None) -> Tally:
    """Give every record to every sink as it comes (predictions from any engine, or embeddings)."""
    tally = tally if tally is not None else Tally()
    for record in records:
        for sink in sinks:
            sink.write(record)
        tally.written += 1
        tally.failed += not record.ok
    return tally


def input_items(inputs: Sequence[str], files_from: str | None) -> Iterator[Item]:
    """Image sources and input problems, in order: the arguments, then the list file's lines."""
    from vitcli.io.inputs import iter_inputs, iter_path_list

    listed = iter_path_list(files_from) if files_from is not None else iter(())
    return iter_inputs(itertools.chain(inputs, listed))


def item_source(item: Item) -> str:
    return item if isinstance(item, str) else item.source


@dataclass
class PredictJob:
    """The inputs of one ``vitcli predict`` run, its shard and its ``--output`` (resumed by default)."""

    inputs: Sequence[str]
    files_from: str | None = None
    output: Path | None = None
    resume: bool = True
    shard: Shard | None = None
    rank: Rank = field(default_factory=Rank)
    tally: Tally = field(default_factory=Tally)
    opened: OpenOutput | None = None
    done: DoneSources = field(default_factory=DoneSources)

    def __post_init__(self) -> None:
        if not self.inputs and self.files_from is None:
            raise UsageError("no images given; pass files, folders, globs or URLs, or --files-from FILE")
        if not self.countable and (self.shard is not None or self.rank.enabled):
            raise UsageError(f"--files-from {self.files_from} can be read only once, but --shard and torchrun "
                             "read the list twice; save the list to a file and pass --files-from FILE")

    def open(self, opener: Opener = open_output) -> DoneSources:
        """Open ``--output`` for appending (rank 0 only) with ``opener`` (prediction records by default) and
        learn the sources it holds, to be skipped; returns them (``vitcli.inference.run`` shares them)."""
        if self.output is not None and self.rank.main:
            self.opened = opener(self.output, self.resume)
            self.done = self.opened.done
        return self.done

    def close(self) -> None:
        if self.opened is not None:
            self.opened.close()

    @property
    def countable(self) -> bool:
        """Whether the inputs can be read twice (to count them): not a list from stdin or a pipe."""
        if self.files_from is None:
            return True
        path = Path(self.files_from)
        return self.files_from != "-" and (path.is_file() or not path.exists())  # a missing file: reported later

    def items(self) -> Iterator[Item]:
        """This job's items, lazily: its shard, less the sources already in ``--output``."""
        items: Iterable[Item] = (shard_items(lambda: input_items(self.inputs, self.files_from), self.shard)
                                 if self.shard is not None else input_items(self.inputs, self.files_from))
        done = self.done.skipper()  # by occurrence: a source listed twice and done once is done once
        for item in items:
            if len(self.done) and done(item_source(item)):
                self.tally.skipped += 1
                continue
            yield item

    def count(self) -> int:
        """How many records this job will write (a separate pass over the inputs)."""
        return sum(1 for _ in PredictJob(self.inputs, self.files_from, shard=self.shard, done=self.done).items())

    def records(self, load: Callable[[], LoadedModel], options: PredictOptions = PredictOptions(),
                on_batch: Callable[[int], None] | None = None, group: Any = None) -> Iterator[Prediction]:
        """The job's records in input order, predicted by ``vitcli.predict.predict`` with ``load()``'s model.

        ``load`` is called only if some item names an image: inputs that name none (missing files,
        empty folders) are reported without loading a model.
        """
        def make_predictor() -> Predictor:
            loaded = load()
            return lambda sources: predict(loaded, sources, options, on_batch)

        return self.stream(make_predictor, options.batch_size, group)

    def stream(self, make_predictor: Callable[[], Predictor], block: int = 32, group: Any = None,
               failed: Callable[[str, str], Any] = failed_prediction) -> Iterator[Any]:
        """The job's records in input order, from any predictor (torch, a torch-free ONNX Runtime one, or
        an embedder; ``failed(source, reason)`` makes the record of an input that names no image).

        ``make_predictor()`` is called once, only if some item names an image; the predictor it
        returns takes the image sources (lazily) and yields one record per source, in order. Under
        torchrun this rank predicts its blocks of ``block`` items and rank 0 yields every rank's
        records (the other ranks yield none).
        """
        items: Iterator[Item] = self.items()
        sizes: deque[int] = deque()
        if self.rank.enabled:
            items = rank_blocks(items, self.rank, block, sizes)
        leading, rest = first_source(items)
        if rest is None:
            records: Iterator[Any] = iter([failed(p.source, p.reason) for p in leading])
        else:
            records = with_input_problems(itertools.chain(leading, rest), make_predictor(), failed)
        if not self.rank.enabled:
            return records
        return merged_records(records_by_block(records, sizes), self.rank, group)
