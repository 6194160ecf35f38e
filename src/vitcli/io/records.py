"""Prediction records on disk: JSON Lines and CSV writers, reading an output back to resume. No torch.

Every writer takes one ``Prediction`` at a time and flushes it whole, so that results leave as soon
as they exist and an interrupted job leaves whole lines only. ``open_output`` opens an ``--output``
file for appending: it reads the sources already in it (``DoneSources``, 8 bytes each) so that a
rerun skips them, and drops a partial last line that a killed process may have left.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from vitcli.errors import UsageError
from vitcli.inference.predict import Label, Prediction

CSV_HEADER = ("source", "rank", "index", "label", "prob", "error")
OUTPUT_SUFFIXES = (".jsonl", ".csv")
# file names that are not UTF-8 reach us as surrogate escapes (os.fsdecode): written back as the same bytes
NAME_ERRORS = "surrogateescape"


class RecordSink(Protocol):
    """Anything that takes prediction records one by one (files, the terminal table, stderr)."""

    def write(self, record: Prediction) -> None: ...


def to_json(record: Prediction) -> str:
    """One JSON Lines record: ``{"source", "predictions": [{"rank", "index", "label", "prob"}], "error"}``."""
    return json.dumps({"source": record.source, "predictions": [vars(label) for label in record.top],
                       "error": record.error})


def from_json(line: str) -> Prediction:
    """The inverse of ``to_json``."""
    data = json.loads(line)
    return Prediction(data["source"], [Label(**p) for p in data["predictions"]], data["error"])


def csv_rows(record: Prediction) -> list[list[Any]]:
    """The CSV rows of one record: one per label, or one with the error."""
    if not record.ok:
        return [[record.source, "", "", "", "", record.error]]
    return [[record.source, label.rank, label.index, label.label, f"{label.prob:.6f}", ""] for label in record.top]


class JsonlWriter:
    """JSON Lines, one flushed line per record."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, record: Prediction) -> None:
        self.stream.write(to_json(record) + "\n")  # one write per record: a record is whole or absent
        self.stream.flush()


class CsvWriter:
    """CSV rows ``source,rank,index,label,prob,error``; the rows of a record are written and flushed together."""

    def __init__(self, stream: IO[str], header: bool = True):
        self.stream = stream
        self.buffer = io.StringIO()
        self.rows = csv.writer(self.buffer)
        if header:
            self.rows.writerow(CSV_HEADER)
            self._flush()

    def write(self, record: Prediction) -> None:
        self.rows.writerows(csv_rows(record))
        self._flush()

    def _flush(self) -> None:
        self.stream.write(self.buffer.getvalue())
        self.stream.flush()
        self.buffer.seek(0)
        self.buffer.truncate()


class CsvFile:
    """``--csv FILE``: every record's rows, written batch by batch. The file is created (or replaced) at
    the first record, so a job that fails before it has anything to write leaves an existing file alone."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.stream: IO[str] | None = None
        self.writer: CsvWriter | None = None

    def write(self, record: Prediction) -> None:
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.stream = self.path.open("w", newline="", encoding="utf-8", errors=NAME_ERRORS)
            self.writer = CsvWriter(self.stream)
        self.writer.write(record)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


def writer_for(path: Path, stream: IO[str], header: bool = True) -> JsonlWriter | CsvWriter:
    """The writer for ``path``'s suffix (``.jsonl`` or ``.csv``)."""
    return CsvWriter(stream, header) if output_format(path) == "csv" else JsonlWriter(stream)


def output_format(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise UsageError(f"--output '{path}': use a .jsonl or .csv file name (the suffix picks the format)")
    return suffix[1:]


# ----------------------------------------------------------------------------------- resuming


def source_key(source: str) -> int:
    """A 64-bit digest of a source: what ``DoneSources`` keeps (8 bytes instead of the whole path)."""
    return int.from_bytes(hashlib.blake2b(source.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class DoneSources:
    """The sources already in an output file, as a sorted array of 64-bit digests: 8 MB per million.

    Two different sources share a digest with probability about n^2 / 2^65 (3e-8 for a million).
    """

    def __init__(self, sources: Iterable[str] = ()):
        import numpy as np

        self._keys = np.unique(np.fromiter((source_key(s) for s in sources), dtype=np.uint64))

    def __len__(self) -> int:
        return int(self._keys.size)

    def __contains__(self, source: str) -> bool:
        import numpy as np

        if not self._keys.size:
            return False
        key = np.uint64(source_key(source))
        i = int(np.searchsorted(self._keys, key))
        return i < self._keys.size and self._keys[i] == key


def recorded_sources(path: Path) -> Iterator[str]:
    """The source of every record in an output file (``.jsonl`` or ``.csv``), in file order, read lazily.

    CSV rows of one record repeat its source; they are given once.
    """
    fmt = output_format(path)
    with Path(path).open(newline="" if fmt == "csv" else None, encoding="utf-8", errors=NAME_ERRORS) as f:
        if fmt == "jsonl":
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)["source"]
                    except (ValueError, KeyError, TypeError) as e:
                        raise UsageError(f"--output '{path}' line {n} is not a vitcli prediction record; "
                                         "give another file name, or remove the file to start over") from e
            return
        rows = csv.reader(f)
        header = next(rows, None)
        if header is not None and tuple(header) != CSV_HEADER:
            raise UsageError(f"--output '{path}' is not a vitcli predictions CSV (header {','.join(header)}); "
                             "give another file name, or remove the file to start over")
        last = None
        for row in rows:
            if row and row[0] != last:
                last = row[0]
                yield last


@dataclass
class OpenOutput:
    """An ``--output`` file opened for appending, with the sources it already holds."""

    path: Path
    stream: IO[str]
    writer: JsonlWriter | CsvWriter
    done: DoneSources

    def close(self) -> None:
        self.stream.close()


def open_output(path: str | Path, resume: bool = True) -> OpenOutput:
    """Open ``path`` (``.jsonl`` or ``.csv``) to append records; with ``resume``, skip what it holds.

    A partial last line (a process killed in the middle of a write) is cut off first. Without
    ``resume`` an existing file is started afresh.
    """
    path = Path(path)
    fmt = output_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = resume and path.is_file() and path.stat().st_size > 0
    if existing:
        _drop_partial_last_line(path)
        done = DoneSources(recorded_sources(path))
    else:
        done = DoneSources()
    stream = path.open("a" if existing else "w", newline="" if fmt == "csv" else None, encoding="utf-8",
                       errors=NAME_ERRORS)
    header = fmt == "csv" and stream.tell() == 0
    return OpenOutput(path, stream, writer_for(path, stream, header), done)


def _drop_partial_last_line(path: Path) -> None:
    """Truncate ``path`` after its last newline (a whole-line file is left as it is)."""
    with path.open("rb+") as f:
        size = f.seek(0, io.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        block, end = 65536, size
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            end = start
        f.truncate(0)
