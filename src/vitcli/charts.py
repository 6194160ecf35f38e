"""PNG figures: training curves and confusion matrices. Never prints.

matplotlib is imported inside the functions (it costs ~0.3 s) and used through its object API with
the Agg canvas, so no pyplot state or global backend is touched. Files are written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ANNOTATE_MAX_CLASSES = 30  # above this, cells are not annotated with their counts
TICK_LABELS_MAX_CLASSES = 100  # above this, class names are left off the axes
LABEL_MAX_CHARS = 24
DPI = 120


def _number(value: Any) -> float:
    """A metrics value (float, int, numeric string, '' or None) as a float, NaN when missing."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically (one DPI for every figure vitcli draws)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from vitcli.io.fileio import atomic_open

    FigureCanvasAgg(fig)
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI)
    return path


def save_curves(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Loss (train_loss, val_loss) and accuracy (val_top1, val_top5) by epoch, as a PNG.

    Args:
        rows: metrics.csv rows, one per epoch; missing keys, empty strings and NaN are gaps.
            Accuracies given as fractions (all <= 1) are shown in percent.
        path: the PNG to write (atomically).
    """
    from matplotlib.figure import Figure

    epochs = [_number(row.get("epoch", i + 1)) for i, row in enumerate(rows)]
    epochs = [i + 1 if math.isnan(e) else e for i, e in enumerate(epochs)]

    def series(key: str) -> list[float]:
        return [_number(row.get(key)) for row in rows]

    accuracy = {key: series(key) for key in ("val_top1", "val_top5")}
    finite = [v for values in accuracy.values() for v in values if not math.isnan(v)]
    scale = 100.0 if finite and max(finite) <= 1.0 else 1.0

    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    panels = [(loss_ax, {"train_loss": series("train_loss"), "val_loss": series("val_loss")}, "loss", 1.0),
              (acc_ax, accuracy, "accuracy (%)", scale)]
    for ax, lines, ylabel, factor in panels:
        drawn = False
        for key, values in lines.items():
            if all(math.isnan(v) for v in values):
                continue
            ax.plot(epochs, [v * factor for v in values], marker="o", markersize=3, label=key)
            drawn = True
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    loss_ax.set_title("loss")
    acc_ax.set_title("validation accuracy")
    return save_figure(fig, path)


def save_confusion_matrix(matrix: Any, labels: Sequence[str], path: Path, title: str = "") -> Path:
    """A confusion matrix as a PNG: rows are the true class, columns the predicted class.

    Cells are coloured by the fraction of their row (recall on the diagonal) and annotated with
    their counts up to ``ANNOTATE_MAX_CLASSES`` classes; the figure grows with the number of classes.

    Args:
        matrix: (C, C) counts: a torch tensor, a NumPy array or nested lists.
        labels: the C class names, in row order.
        path: the PNG to write (atomically).
        title: shown above the matrix.
    """
    import numpy as np
    from matplotlib.figure import Figure

    counts = np.asarray(matrix.tolist() if hasattr(matrix, "tolist") else matrix, dtype=np.int64)
    n = len(labels)
    if counts.ndim != 2 or counts.shape != (n, n):
        raise ValueError(f"matrix of shape {counts.shape} does not fit {n} labels")
    row_sums = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, row_sums, out=np.zeros(counts.shape, dtype=float), where=row_sums > 0)

    # inches: 0.45 per annotated cell, 0.15 per cell beyond (no counts), bounded for 1000 classes
    side = min(max(3.0 + 0.45 * min(n, ANNOTATE_MAX_CLASSES) + 0.15 * max(n - ANNOTATE_MAX_CLASSES, 0), 5.0), 30.0)
    fontsize = 10 if n <= 12 else 8 if n <= ANNOTATE_MAX_CLASSES else 6
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")

    short = [s if len(s) <= LABEL_MAX_CHARS else s[: LABEL_MAX_CHARS - 1] + "…" for s in map(str, labels)]
    if n <= TICK_LABELS_MAX_CLASSES:
        slanted = n > 6 or max(map(len, short), default=0) > 8  # long names would overlap side by side
        ax.set_xticks(range(n), short, rotation=45 if slanted else 0, ha="right" if slanted else "center",
                      rotation_mode="anchor")
        ax.set_yticks(range(n), short)
        ax.tick_params(labelsize=fontsize)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if n <= ANNOTATE_MAX_CLASSES:
        for (i, j), count in np.ndenumerate(counts):
            color = "white" if fractions[i, j] > 0.5 else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=color, fontsize=fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = int(counts.sum())
    accuracy = np.trace(counts) / total if total else 0.0
    subtitle = f"{total} images, accuracy {accuracy:.1%}"
    ax.set_title(f"{title}\n{subtitle}" if title else subtitle)
    return save_figure(fig, path)


def save_reliability_diagram(bins: Sequence[Any], path: Path, title: str = "", ece: float | None = None,
                             temperature: float | None = None) -> Path:
    """A reliability diagram: accuracy against mean confidence per confidence bin, as bars over the
    bin, with the diagonal of perfect calibration, the gap to it shaded, and each bin's image count.

    Args:
        bins: ``metrics.ReliabilityBin``s (lo, hi, count, confidence, accuracy), in order.
        path: the PNG to write (atomically).
        title: the first title line; the ECE and the temperature follow it.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 6.8), layout="constrained")
    ax, hist = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    full = [b for b in bins if b.count]
    width = [b.hi - b.lo for b in full]
    ax.bar([b.lo for b in full], [b.accuracy for b in full], width=width, align="edge", color="#4878cf",
           edgecolor="white", label="accuracy")
    gaps = [b.confidence - b.accuracy for b in full]
    ax.bar([b.lo for b in full], gaps, bottom=[b.accuracy for b in full], width=width, align="edge",
           facecolor="none", edgecolor="#d65f5f", hatch="//", label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="perfect calibration")
    ax.plot([b.confidence for b in full], [b.accuracy for b in full], "o", color="black", markersize=3,
            label="(mean confidence, accuracy)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    hist.bar([b.lo for b in full], [b.count for b in full], width=width, align="edge", color="#888888",
             edgecolor="white")
    for b in full:
        hist.text((b.lo + b.hi) / 2, b.count, str(b.count), ha="center", va="bottom", fontsize=7)
    hist.set_ylim(0, max((b.count for b in full), default=1) * 1.25)
    hist.set_xlabel("confidence (top-1 probability)")
    hist.set_ylabel("images")
    total = sum(b.count for b in bins)
    parts = [f"{total} images, {len(bins)} bins"]
    if ece is not None and math.isfinite(ece):
        parts.append(f"ECE {ece:.4f}")
    parts.append(f"temperature {temperature:.3g}" if temperature is not None else "no temperature")
    subtitle = ", ".join(parts)
    ax.set_title(f"{title}\n{subtitle}" if title else subtitle, fontsize=10)
    return save_figure(fig, path)


def save_mistakes_grid(mistakes: Sequence[Any], path: Path, title: str = "", columns: int = 5,
                       thumb: int = 160) -> Path:
    """The most confident mistakes as a grid of thumbnails, each captioned with its folder label,
    the predicted label and their probabilities, in order (most confident first, read by rows).

    Args:
        mistakes: ``evaluate.Mistake``s (path, label, predicted, prob, label_prob).
        path: the PNG to write (atomically).
        columns: thumbnails per row; thumb: the longest side of a thumbnail in pixels.
    """
    from matplotlib.figure import Figure
    from PIL import Image

    from vitcli.io.images import load_image

    n = len(mistakes)
    cols = max(1, min(columns, n))
    rows = max(1, math.ceil(n / cols))
    size = thumb / DPI + 0.2  # inches per panel, before the caption
    fig = Figure(figsize=(cols * size * 1.25, rows * (size + 0.75) + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= n:
            continue
        m = mistakes[i]
        try:
            image = load_image(m.path)
            image.thumbnail((thumb, thumb), Image.Resampling.BILINEAR)
            ax.imshow(image)
        except Exception:  # a file gone since it was scored: the caption still names it
            ax.text(0.5, 0.5, "(unreadable)", ha="center", va="center", transform=ax.transAxes)
        name = Path(m.path).name
        name = name if len(name) <= LABEL_MAX_CHARS else name[: LABEL_MAX_CHARS - 1] + "…"
        ax.set_title(f"#{i + 1} {name}\nlabel {_short(m.label)} ({m.label_prob:.2f})\n"
                     f"predicted {_short(m.predicted)} ({m.prob:.2f})", fontsize=7, loc="left")
    if n == 0:
        axes[0, 0].text(0.5, 0.5, "no mistakes", ha="center", va="center", transform=axes[0, 0].transAxes)
    fig.suptitle(title or "most confident mistakes", fontsize=10)
    return save_figure(fig, path)


def _short(label: str, limit: int = 18) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"
