"""Prediction records on disk: JSON Lines and CSV writers, reading an output back to resume. No torch.

Every writer takes one ``Prediction`` at a time and flushes it whole, so that results leave as soon
as they exist and an interrupted job leaves whole lines only. ``open_output`` opens an ``--output``
file for appending: it reads the sources already in it (``DoneSources``, 8 bytes each) so that a
rerun skips them, and drops a partial last line that a killed process may have left.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from vitcli.errors import UsageError, VitcliError
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
                       "error": record.error}, allow_nan=False)  # a bare NaN is not JSON: never written


def from_json(line: str) -> Prediction:
    """The inverse of ``to_json``."""
    data = json.loads(line)
    return Prediction(data["source"], [Label(**p) for p in data["predictions"]], data["error"])


def csv_rows(record: Prediction) -> list[list[Any]]:
    """The CSV rows of one record: one per label, or one with the error."""
    if not record.ok:
        return [[record.source, "", "", "", "", record.error]]
    return [[record.source, label.rank, label.index, label.label, f"{label.prob:.6f}", ""] for label in record.top]


class OutputError(VitcliError):
    """An output file that could not be written (a full disk, a read-only folder): the machine's problem."""


@contextlib.contextmanager
def _os_errors_named(stream: IO[str]) -> Iterator[None]:
    """An OSError while writing ``stream`` as one OutputError naming its file (stdout's are left as they are)."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as e:
        name = getattr(stream, "name", None)
        if not isinstance(name, str) or name.startswith("<"):
            raise
        from vitcli.io.fileio import describe_os_error

        raise OutputError(describe_os_error(e, name) + " (the records written so far are kept)") from e


class JsonlWriter:
    """JSON Lines, one flushed line per record."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, record: Prediction) -> None:
        with _os_errors_named(self.stream):
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
        with _os_errors_named(self.stream):
            self.stream.write(self.buffer.getvalue())
            self.stream.flush()
        self.buffer.seek(0)
        self.buffer.truncate()


class CsvFile:
    """``--csv FILE``: every record's rows, written batch by batch. The file is locked at once (a second
    job writing it fails before it starts) and emptied at the first record, so a job that fails before it
    has anything to write leaves an existing file alone."""

    def __init__(self, path: Path):
        from vitcli.io.fileio import describe_os_error, lock_for_writing

        self.path = Path(path)
        created = not self.path.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.stream: IO[str] = self.path.open("a", newline="", encoding="utf-8", errors=NAME_ERRORS)
        except OSError as e:
            raise OutputError(describe_os_error(e, self.path)) from e
        try:
            lock_for_writing(self.stream, self.path)
        except BaseException:
            self.stream.close()
            raise
        self.created = created
        self.writer: CsvWriter | None = None

    def write(self, record: Prediction) -> None:
        if self.writer is None:
            os.ftruncate(self.stream.fileno(), 0)  # appending (O_APPEND) from the start of the emptied file
            self.writer = CsvWriter(self.stream)
        self.writer.write(record)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # what a failed write left in the buffer: cut on resume
            self.stream.close()
        if self.writer is None and self.created:  # nothing was written: leave no empty file behind
            self.path.unlink(missing_ok=True)


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
    """The records already in an output file: the sorted 64-bit digests of their sources and how many
    records each source has (12 bytes per distinct source). A source listed n times is done n times.

    Two different sources share a digest with probability about n^2 / 2^65 (3e-8 for a million).
    """

    def __init__(self, sources: Iterable[str] = ()):
        import numpy as np

        keys = np.fromiter((source_key(s) for s in sources), dtype=np.uint64)
        self._keys, counts = np.unique(keys, return_counts=True)
        self._counts = counts.astype(np.uint32)

    def __len__(self) -> int:
        """How many records: each occurrence of a source counts."""
        return int(self._counts.sum())

    def _index(self, source: str) -> int | None:
        import numpy as np

        if not self._keys.size:
            return None
        key = np.uint64(source_key(source))
        i = int(np.searchsorted(self._keys, key))
        return i if i < self._keys.size and self._keys[i] == key else None

    def __contains__(self, source: str) -> bool:
        return self._index(source) is not None

    def skipper(self) -> Callable[[str], bool]:
        """For one pass over the inputs, in order: whether this occurrence of a source is already done
        (the first n occurrences of a source with n records), so a resumed job equals an uninterrupted one."""
        import numpy as np

        seen = np.zeros(self._keys.size, dtype=np.uint32)

        def done(source: str) -> bool:
            i = self._index(source)
            if i is None or seen[i] >= self._counts[i]:
                return False
            seen[i] += 1
            return True

        return done


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
        for row in rows:  # a record starts at a new source, at rank 1, or with an error row (no rank)
            if row and (row[0] != last or len(row) < 2 or row[1] in ("1", "")):
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
        with contextlib.suppress(OSError):  # what a failed write left in the buffer: cut on resume
            self.stream.close()


def open_output(path: str | Path, resume: bool = True) -> OpenOutput:
    """Open ``path`` (``.jsonl`` or ``.csv``) to append records; with ``resume``, skip what it holds.

    The file is opened for appending and locked (``lock_for_writing``) before anything is read or cut,
    so a second job on the same file fails at once. An unfinished record (a process killed, or a disk
    that filled, in the middle of a write: a partial last line, or a CSV record with fewer rows than the
    others) is cut off first. Without ``resume`` an existing file is emptied, after the lock is taken.
    """
    from vitcli.io.fileio import lock_for_writing

    path = Path(path)
    fmt = output_format(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        stream = path.open("a", newline="" if fmt == "csv" else None, encoding="utf-8", errors=NAME_ERRORS)
    except OSError as e:
        from vitcli.io.fileio import describe_os_error

        raise OutputError(describe_os_error(e, path)) from e
    try:
        lock_for_writing(stream, path)
        if not resume:
            os.ftruncate(stream.fileno(), 0)
        elif os.fstat(stream.fileno()).st_size > 0:
            _check_ours(path, fmt)  # a file that is not ours is refused before anything is cut
            _drop_partial_last_line(path)
            if fmt == "csv":
                _drop_unfinished_csv_record(path)
        done = DoneSources(recorded_sources(path)) if resume and path.stat().st_size > 0 else DoneSources()
    except BaseException:
        stream.close()
        raise
    header = fmt == "csv" and os.fstat(stream.fileno()).st_size == 0
    return OpenOutput(path, stream, writer_for(path, stream, header), done)


def _check_ours(path: Path, fmt: str) -> None:
    """Raise UsageError unless the first line of ``path`` is a vitcli record (or CSV header), or unfinished."""
    with path.open("rb") as f:
        first = f.readline(1 << 20)
    if first.endswith(b"\n"):
        with contextlib.suppress(StopIteration):
            next(recorded_sources(path) if fmt == "jsonl" else _csv_header_only(path))


def _csv_header_only(path: Path) -> Iterator[str]:
    with Path(path).open(newline="", encoding="utf-8", errors=NAME_ERRORS) as f:
        header = next(csv.reader(f), None)
    if header is not None and tuple(header) != CSV_HEADER:
        raise UsageError(f"--output '{path}' is not a vitcli predictions CSV (header {','.join(header)}); "
                         "give another file name, or remove the file to start over")
    yield from ()


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


def _drop_unfinished_csv_record(path: Path) -> None:
    """Cut the last record of a predictions CSV if it is not whole: fewer rows than the record before it
    (the rows of a record are written together, so only the last one can be cut), or a quoted field
    that never ends. A last record with nothing to compare it with is cut too: redoing one image is
    cheap, counting a cut record as done loses it."""
    with path.open("rb") as f:
        end = 0  # bytes read by the CSV reader so far: the end of the last whole row

        def lines() -> Iterator[str]:
            nonlocal end
            for raw in f:
                end += len(raw)
                yield raw.decode("utf-8", NAME_ERRORS)

        rows = csv.reader(lines())
        keep = 0  # where the file is whole up to
        last: tuple[str, int, int, bool] | None = None  # (source, start, rows, failed) of the last record
        reference = None  # the row count of the last whole record with labels
        try:
            next(rows, None)  # the header (checked by recorded_sources)
            keep = end
            for row in rows:
                failed = len(row) == len(CSV_HEADER) and row[1] == "" and row[5] != ""
                if (last is not None and row and row[0] == last[0] and not last[3] and not failed
                        and row[1] != "1"):  # the next label of the same record
                    last = (last[0], last[1], last[2] + 1, failed)
                else:
                    if last is not None and not last[3]:
                        reference = last[2]
                    last = (row[0] if row else "", keep, 1, failed)
                keep = end
        except csv.Error:  # a quoted field cut at the end of the file
            pass
    if last is not None and not last[3] and last[2] != reference:
        keep = last[1]
    if keep < path.stat().st_size:
        with path.open("rb+") as f:
            f.truncate(keep)
