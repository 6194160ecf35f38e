"""Embedding files: ``.npy`` with a sources file beside it, or JSON Lines; written as records come, resumable.

``emb.npy`` holds one float32 row per embedded image and ``emb.sources.txt`` its source on the same
line (row i = line i); ``emb.json`` says which model made them. The ``.npy`` header is rewritten after
every row, so the file is a valid array at any moment, and memory stays flat for any number of rows.
``emb.jsonl`` holds ``{"source", "model", "embedding"}`` per line instead. An image that could not be
embedded gets no row (its error goes to the terminal), so a rerun tries it again.

``open_embeddings`` opens either for appending, locked against a second writer: a killed run leaves
at most a partial last row or line, which is cut off, and the rows and sources are cut to the same
count. No torch.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from vitcli.errors import UsageError
from vitcli.io.fileio import atomic_open, lock_for_writing
from vitcli.io.records import DoneSources

SUFFIXES = (".npy", ".jsonl")
HEADER_BYTES = 128  # magic, version, length and the padded dict: room for a 20-digit row count
MAGIC = b"\x93NUMPY\x01\x00"


def embeddings_format(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise UsageError(f"--output '{path}': use a .npy file (with a .sources.txt beside it) or a .jsonl file "
                         "for embeddings (the suffix picks the format)")
    return suffix[1:]


def sources_path(path: Path) -> Path:
    """``emb.npy`` -> ``emb.sources.txt``: line i is the source of row i."""
    return Path(path).with_suffix(".sources.txt")


def meta_path(path: Path) -> Path:
    """``emb.npy`` -> ``emb.json``: the model that made the rows, their dimension and normalization."""
    return Path(path).with_suffix(".json")


def npy_header(rows: int, dim: int) -> bytes:
    """A .npy version 1.0 header of exactly ``HEADER_BYTES`` for a C-order float32 (rows, dim) array."""
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}"
    body = text.ljust(HEADER_BYTES - len(MAGIC) - 2 - 1) + "\n"
    return MAGIC + len(body).to_bytes(2, "little") + body.encode("latin1")


def same_model(a: str, b: str) -> bool:
    """Whether two --model values name the same model (a folder given as a relative and an absolute path)."""
    if a == b:
        return True
    return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()


def refuse_other_model(found: str | None, model: str, path: Path) -> None:
    if found is not None and not same_model(found, model):
        raise UsageError(f"--output '{path}' holds embeddings of the model {found}; pass --model {found} "
                         "to add to it, or give another file")


def refuse_other_dim(found: int, dim: int, path: Path) -> None:
    if found != dim:
        raise UsageError(f"--output '{path}' holds {found}-dimensional embeddings but this model gives {dim}; "
                         "use the model that made the file, or give another file")


# ---------------------------------------------------------------------------------------- .npy


class NpyWriter:
    """Rows into ``emb.npy`` and sources into ``emb.sources.txt``, both flushed per record; the header
    follows, so an interrupted file is a valid array of the rows written (resume cuts the two to match)."""

    def __init__(self, path: Path, stream: IO[bytes], sources: IO[str], rows: int, dim: int | None):
        self.path, self.stream, self.sources = path, stream, sources
        self.rows, self.dim = rows, dim

    def write(self, record: Any) -> None:
        if not record.ok:
            return  # no row: a rerun tries it again
        vector = np.ascontiguousarray(record.vector, dtype="<f4")
        if self.dim is None:
            self.dim = int(vector.size)
            self.stream.write(npy_header(0, self.dim))
        refuse_other_dim(self.dim, int(vector.size), self.path)
        self.stream.seek(0, os.SEEK_END)
        self.stream.write(vector.tobytes())
        self.stream.flush()
        self.sources.write(record.source + "\n")
        self.sources.flush()
        self.rows += 1
        self.stream.seek(0)
        self.stream.write(npy_header(self.rows, self.dim))
        self.stream.flush()

    def close(self) -> None:
        self.stream.close()
        self.sources.close()


def read_npy_shape(stream: IO[bytes], path: Path) -> tuple[int, int]:
    """(rows the file holds whole, dim) of a .npy written by ``NpyWriter``; the header's count may lag."""
    stream.seek(0)
    try:
        version = np.lib.format.read_magic(stream)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(stream) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(stream))
    except ValueError as e:
        raise UsageError(f"--output '{path}' is not a .npy file ({e}); give another file name, or remove it "
                         "to start over") from e
    if len(shape) != 2 or fortran or dtype != np.dtype("<f4") or stream.tell() != HEADER_BYTES:
        raise UsageError(f"--output '{path}' is not a vitcli embeddings file (shape {shape}, {dtype}); "
                         "give another file name, or remove it to start over")
    size = stream.seek(0, os.SEEK_END)
    return (size - HEADER_BYTES) // (4 * shape[1]) if shape[1] else 0, shape[1]


def whole_lines(path: Path) -> int:
    """Cut ``path`` after its last newline; the number of lines it then holds."""
    count = 0
    with path.open("rb+") as f:
        end = 0
        for line in iter(lambda: f.readline(), b""):
            if not line.endswith(b"\n"):
                break
            count += 1
            end += len(line)
        f.truncate(end)
    return count


def cut_lines(path: Path, keep: int) -> None:
    """Keep the first ``keep`` lines of ``path``."""
    with path.open("rb+") as f:
        for _ in range(keep):
            f.readline()
        f.truncate(f.tell())


def read_sources(path: Path) -> Iterator[str]:
    """The sources of an ``emb.sources.txt`` (or of any file of one name per line), lazily."""
    with path.open(encoding="utf-8", errors="surrogateescape", newline="\n") as f:
        for line in f:
            yield line.removesuffix("\n")


def read_meta(path: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads(meta_path(path).read_text(encoding="utf-8"))
        if isinstance(meta, dict):
            return meta
    return {}


def open_npy(path: Path, resume: bool, model: str, normalized: bool) -> OpenEmbeddings:
    sources = sources_path(path)
    existing = resume and path.is_file() and path.stat().st_size > 0
    if existing:
        refuse_other_model(read_meta(path).get("model"), model, path)
    stream = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o666), "r+b")  # truncated only once locked
    try:
        lock_for_writing(stream, path)
        rows, dim = _resumed_npy(stream, path, sources) if existing else (0, None)
    except BaseException:
        stream.close()
        raise
    if not existing:
        stream.truncate(0)
    with atomic_open(meta_path(path)) as f:
        json.dump({"model": model, "normalized": normalized, "sources": sources.name}, f)
    done = DoneSources(read_sources(sources)) if existing and sources.is_file() else DoneSources()
    text = sources.open("a" if existing else "w", encoding="utf-8", errors="surrogateescape", newline="\n")
    return OpenEmbeddings(path, NpyWriter(path, stream, text, rows, dim), done)


def _resumed_npy(stream: IO[bytes], path: Path, sources: Path) -> tuple[int, int]:
    """Cut a .npy and its sources file to the rows both hold whole; (rows, dim)."""
    rows, dim = read_npy_shape(stream, path)
    lines = whole_lines(sources) if sources.is_file() else 0
    rows = min(rows, lines)  # a run killed between the row and its source line: both cut to match
    stream.truncate(HEADER_BYTES + 4 * dim * rows)
    stream.seek(0)
    stream.write(npy_header(rows, dim))
    stream.flush()
    if sources.is_file():
        cut_lines(sources, rows)
    return rows, dim


# --------------------------------------------------------------------------------------- .jsonl


class JsonlEmbeddings:
    """``{"source", "model", "embedding"}`` per line, flushed whole."""

    def __init__(self, path: Path, stream: IO[str], model: str, dim: int | None):
        self.path, self.stream, self.model, self.dim = path, stream, model, dim

    def write(self, record: Any) -> None:
        if not record.ok:
            return
        vector = np.asarray(record.vector, dtype=np.float32)
        self.dim = self.dim or int(vector.size)
        refuse_other_dim(self.dim, int(vector.size), self.path)
        numbers = ",".join(f"{v:.9g}" for v in vector.tolist())  # 9 digits: float32 round-trips exactly
        head = json.dumps({"source": record.source, "model": self.model})[:-1]
        self.stream.write(f'{head}, "embedding": [{numbers}]}}\n')
        self.stream.flush()

    def close(self) -> None:
        self.stream.close()


def open_jsonl(path: Path, resume: bool, model: str) -> OpenEmbeddings:
    existing = resume and path.is_file() and path.stat().st_size > 0
    stream = path.open("a", encoding="utf-8")  # truncated only once locked
    dim, sources = None, []
    try:
        lock_for_writing(stream, path)
        if not existing:
            stream.truncate(0)
        else:
            whole_lines(path)
            stream.seek(0, os.SEEK_END)
            for n, record in enumerate(read_jsonl(path), 1):
                if n == 1:
                    refuse_other_model(record.get("model"), model, path)
                    dim = len(record["embedding"])
                sources.append(record["source"])
    except BaseException:
        stream.close()
        raise
    return OpenEmbeddings(path, JsonlEmbeddings(path, stream, model, dim), DoneSources(sources))


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The records of an embeddings .jsonl file, lazily."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record["source"], str) or not isinstance(record["embedding"], list):
                    raise TypeError
            except (ValueError, KeyError, TypeError) as e:
                raise UsageError(f"--output '{path}' line {n} is not a vitcli embedding record; give another "
                                 "file name, or remove the file to start over") from e
            yield record


# ---------------------------------------------------------------------------------------- both


@dataclass
class OpenEmbeddings:
    """An embeddings output opened for appending, with the sources it already holds."""

    path: Path
    writer: NpyWriter | JsonlEmbeddings
    done: DoneSources

    def close(self) -> None:
        self.writer.close()


def open_embeddings(path: str | Path, resume: bool = True, model: str = "", normalized: bool = True) -> OpenEmbeddings:
    """Open ``path`` (``.npy`` or ``.jsonl``) to append embeddings of ``model``; with ``resume``, skip what
    it holds (a file of another model is a usage error). Without ``resume`` it is started afresh."""
    path = Path(path)
    fmt = embeddings_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return open_npy(path, resume, model, normalized) if fmt == "npy" else open_jsonl(path, resume, model)


def load_embeddings(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """(vectors (N, D) float32, sources) of an embeddings file: the .npy memory-mapped, a .jsonl read whole."""
    path = Path(path)
    if embeddings_format(path) == "npy":
        vectors = np.load(path, mmap_mode="r")
        return vectors, list(read_sources(sources_path(path)))[: len(vectors)]
    records = list(read_jsonl(path))
    dim = len(records[0]["embedding"]) if records else 0
    vectors = np.asarray([r["embedding"] for r in records], dtype=np.float32).reshape(len(records), dim)
    return vectors, [r["source"] for r in records]
