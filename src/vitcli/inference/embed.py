"""Image embeddings: the model's pooled pre-logits features, and the near-duplicate pairs among them.

``embed`` runs timm's ``forward_features`` then ``forward_head(pre_logits=True)`` (the pooled token,
after the final norm and any pre-logits layer, before the classifier), L2-normalised by default, on
the batches predict uses. ``run_embed`` runs it as a job: the same inputs, streaming, resume,
``--shard`` and torchrun as predict (``vitcli.inference.run``). ``near_duplicates`` finds the pairs
above a cosine threshold in tiles, so memory stays bounded by the tile, not the square of the count.
No torch at import.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vitcli.errors import UsageError
from vitcli.inference.job import PredictJob, Predictor, Tally
from vitcli.inference.predict import PredictOptions, batched_outputs
from vitcli.inference.run import Loading, Terminal, is_onnx, load_torch_model, run_job
from vitcli.io.embeddings import open_embeddings

if TYPE_CHECKING:
    from vitcli.models.resolve import LoadedModel

TILE = 2048  # rows per side of a similarity tile: 16 MB of float32


@dataclass
class Embedding:
    """The embedding of one image source, or why it could not be made."""

    source: str
    vector: np.ndarray | None = None  # float32 (D,)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def failed_embedding(source: str, reason: str) -> Embedding:
    return Embedding(source, error=reason)


def pooled_features(model: Any, x: Any, precision_ctx: Any, normalize: bool = True) -> Any:
    """(B, 3, H, W) -> (B, D) float32 pre-logits features (timm: forward_features, forward_head(pre_logits))."""
    import torch

    with precision_ctx:
        features = model.forward_head(model.forward_features(x), pre_logits=True)  # (B, D)
    features = features.float().flatten(1)
    return torch.nn.functional.normalize(features, dim=1) if normalize else features


def embed(loaded: LoadedModel, sources: Iterable[str], options: PredictOptions = PredictOptions(),
          normalize: bool = True) -> Iterator[Embedding]:
    """One Embedding per source, in input order, batch by batch; an unreadable image gets its error."""
    import torch

    def vectors(model: torch.nn.Module, x: torch.Tensor, precision_ctx: Any) -> list[np.ndarray]:
        features = pooled_features(model, x, precision_ctx, normalize)
        if not torch.isfinite(features).all():
            return [row if np.isfinite(row).all() else None for row in features.cpu().numpy()]
        return list(features.cpu().numpy())

    for source, error, vector in batched_outputs(loaded, sources, options, vectors):
        if error is None and vector is None:
            error = "the model gave a non-finite embedding for this image"
        yield Embedding(source, vector, error)


def without_line_breaks(records: Iterable[Embedding]) -> Iterator[Embedding]:
    """A source whose name holds a line break cannot be a line of the sources file: an error record."""
    for record in records:
        if "\n" in record.source or "\r" in record.source:
            record = Embedding(record.source, error="its name holds a line break, which a sources file cannot "
                                                    "hold; rename it or write --output as .jsonl")
        yield record


def embedder_for(model: str, weights: Path | None, options: PredictOptions, normalize: bool = True,
                 loading: Loading | None = None, npy: bool = False) -> Callable[[], Predictor]:
    """``make_predictor`` for embeddings: torch only (an exported .onnx holds the logits, not the features)."""
    if is_onnx(model):
        raise UsageError(f"embed needs the model itself: '{model}' holds only the logits; pass the model it "
                         "was exported from as --model")

    def make() -> Predictor:
        loaded = load_torch_model(model, weights, loading) if loading else load_torch_model(model, weights)

        def embedder(sources: Iterator[str]) -> Iterable[Embedding]:
            records = embed(loaded, sources, options, normalize)
            return without_line_breaks(records) if npy else records

        return embedder

    return make


def run_embed(job: PredictJob, model: str, weights: Path | None, options: PredictOptions, normalize: bool = True,
              terminal: Terminal | None = None, loading: Loading | None = None) -> Tally:
    """``vitcli embed``: the job's embeddings into ``--output`` (``.npy`` + sources, or ``.jsonl``)."""
    if is_onnx(model):
        embedder_for(model, weights, options)  # the usage error, before any group is joined
    if job.output is None:
        raise UsageError("embed needs --output FILE (.npy or .jsonl)")
    npy = job.output.suffix.lower() == ".npy"
    opener = functools.partial(_open, model=model, normalized=normalize)
    return run_job(job, options, lambda opts: embedder_for(model, weights, opts, normalize, loading, npy),
                   opener=opener, terminal=terminal or (lambda job: ()), failed=failed_embedding)


def _open(path: Path, resume: bool, model: str, normalized: bool) -> Any:
    return open_embeddings(path, resume, model, normalized)


# ----------------------------------------------------------------------------- near duplicates


@dataclass(frozen=True)
class Pair:
    """Two rows whose embeddings are at least the threshold apart in cosine similarity."""

    a: int
    b: int
    cosine: float


def near_duplicates(vectors: np.ndarray, threshold: float, groups: np.ndarray | None = None,
                    tile: int = TILE) -> Iterator[Pair]:
    """Pairs ``a < b`` of rows with cosine similarity >= ``threshold``, by ``a``, then by similarity.

    ``vectors`` may be a memory-mapped (N, D) array; rows are normalised tile by tile. With ``groups``
    (0 or 1 per row), only pairs across the two groups are given (a in group 0, b in group 1: the
    train/val leakage check). Memory: two tiles and their (tile, tile) similarities.
    """
    if not -1.0 <= threshold <= 1.0:
        raise UsageError(f"--near-duplicates {threshold}: give a cosine similarity from -1 to 1, e.g. 0.95")
    n = len(vectors)
    rows = np.arange(n)
    first = rows if groups is None else rows[groups == 0]
    second = rows if groups is None else rows[groups == 1]
    for i in range(0, len(first), tile):
        a = first[i:i + tile]
        left = _unit(vectors[a])
        found: list[Pair] = []
        start = i if groups is None else 0  # one set: the upper triangle only
        for j in range(start, len(second), tile):
            b = second[j:j + tile]
            sims = left @ _unit(vectors[b]).T  # (tile, tile)
            hit_a, hit_b = np.nonzero(sims >= threshold)
            for p, q in zip(hit_a.tolist(), hit_b.tolist(), strict=True):
                if groups is not None or a[p] < b[q]:
                    found.append(Pair(int(a[p]), int(b[q]), float(sims[p, q])))
        yield from sorted(found, key=lambda pair: (pair.a, -pair.cosine))


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def near_duplicate_sources(output: Path, threshold: float,
                           inputs: Sequence[str] | None = None) -> Iterator[tuple[str, str, float]]:
    """``(source a, source b, cosine)`` for the near-duplicate pairs of an embeddings file.

    With two ``inputs``, only pairs from the first input to the second (rows of other sources in the
    file are left out), the train/val leakage check; else all pairs of the file.
    """
    from vitcli.inference.job import input_items, item_source
    from vitcli.io.embeddings import load_embeddings
    from vitcli.io.records import DoneSources

    vectors, sources = load_embeddings(output)
    groups = None
    if inputs is not None:
        if len(inputs) != 2:
            raise UsageError("near duplicates across inputs need exactly two inputs, e.g. data/train data/val")
        first, second = (DoneSources(item_source(i) for i in input_items([name], None)) for name in inputs)
        groups = np.fromiter((0 if s in first else 1 if s in second else -1 for s in sources), dtype=np.int8,
                             count=len(sources))
    for pair in near_duplicates(vectors, threshold, groups):
        yield sources[pair.a], sources[pair.b], pair.cosine
