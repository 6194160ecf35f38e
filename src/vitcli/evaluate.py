"""Evaluation of a classifier on a folder-per-class split: accuracy, loss, per-class metrics,
confusion matrix. Never prints.

Folder class names are mapped to the model's labels *by name* (``datasets.map_classes``), never by
folder order, so a model fine-tuned on ``DATA/train`` can be scored on ``DATA/test`` whatever
classes that folder happens to contain. The confusion matrix covers the classes of the folder
plus any other model class that was predicted, in the model's label order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitcli.devices import autocast, resolve_device, resolve_precision
from vitcli.errors import DatasetError, ImageLoadError, UsageError
from vitcli.inference.shards import Rank
from vitcli.io.datasets import LabeledImages, Sample, find_eval_dir, map_classes, scan_class_folders
from vitcli.models.resolve import LoadedModel


@dataclass(frozen=True)
class ClassMetrics:
    """Precision, recall and F1 of one class (0.0 where undefined), and its number of images."""

    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class EvalResult:
    """Scores of a model on one folder. ``top1``/``top5`` are fractions; ``loss`` is mean cross-entropy.

    ``top5`` is None for models of 5 classes or fewer, where every image is in the top 5.
    """

    top1: float
    top5: float | None
    loss: float
    n_images: int
    labels: list[str]  # rows/columns of ``matrix``, in the model's label order
    matrix: torch.Tensor  # (C, C) int64 counts, rows = true class, columns = predicted class
    per_class: list[ClassMetrics]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): unreadable images
    folder: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of ``vitcli evaluate --json``."""
        return {
            "top1": self.top1,
            "top5": self.top5,
            "loss": self.loss,
            "n_images": self.n_images,
            "folder": self.folder,
            "per_class": [asdict(m) for m in self.per_class],
            "confusion_matrix": {"labels": list(self.labels), "matrix": self.matrix.tolist()},
            "skipped": [{"path": path, "reason": reason} for path, reason in self.skipped],
        }


# ----------------------------------------------------------------------------------- metrics


def confusion_matrix(targets: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts; ``matrix[t, p]`` is the number of images of class t predicted as p."""
    targets = targets.reshape(-1).long().cpu()
    preds = preds.reshape(-1).long().cpu()
    if targets.shape != preds.shape:
        raise ValueError(f"targets and preds differ in length ({targets.numel()} vs {preds.numel()})")
    flat = targets * num_classes + preds  # (N,) index into the flattened matrix
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_metrics(matrix: torch.Tensor | Sequence[Sequence[int]], labels: Sequence[str]) -> list[ClassMetrics]:
    """Precision, recall, F1 and support of each class of a confusion matrix (rows true).

    A ratio with a zero denominator (a class never predicted, or with no images) is 0.0.
    """
    m = torch.as_tensor(matrix, dtype=torch.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(labels):
        raise ValueError(f"matrix of shape {tuple(m.shape)} does not fit {len(labels)} labels")
    true_pos = m.diagonal()
    support = m.sum(dim=1)  # images per true class
    predicted = m.sum(dim=0)  # images per predicted class
    metrics = []
    for i, label in enumerate(labels):
        tp = true_pos[i].item()
        precision = tp / predicted[i].item() if predicted[i] > 0 else 0.0
        recall = tp / support[i].item() if support[i] > 0 else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        metrics.append(ClassMetrics(str(label), precision, recall, f1, int(support[i].item())))
    return metrics


# ------------------------------------------------------------------------------------ folders


def eval_samples(data_dir: str | Path, labels: Sequence[str],
                 split: str | None = None) -> tuple[Path, list[Sample]]:
    """The folder to evaluate and its ``(path, model class index)`` samples, mapped by class name."""
    folder = find_eval_dir(data_dir, split)
    per_class = scan_class_folders(folder)
    if not per_class:
        raise DatasetError(f"'{folder}' has no class folders; expected {folder}/<class>/<images> "
                           "(or DATA/test/, DATA/val/ with class folders)")
    if split is None and folder == Path(data_dir).expanduser() and "train" in per_class and "train" not in labels:
        raise DatasetError(f"'{folder}' has a train/ folder but no test/ or val/ folder; "
                           "evaluate a held-out split, or pass --split train to score the training images")
    index = map_classes(list(per_class), labels)
    samples = [(path, index[name]) for name, files in per_class.items() for path in files]
    if not samples:
        raise DatasetError(f"no images in the class folders of '{folder}'")
    return folder, samples


class _TolerantImages(LabeledImages):
    """LabeledImages that yields ``(None, target, reason)`` for an unreadable image instead of raising."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str | None]:  # type: ignore[override]
        try:
            image, target = super().__getitem__(i)
            return image, target, None
        except ImageLoadError as e:
            return None, self.samples[i][1], e.reason
        except Exception as e:  # a transform that chokes on a pathological image
            return None, self.samples[i][1], f"could not preprocess ({type(e).__name__}: {e})"


def _collate(items: list[tuple[torch.Tensor | None, int, str | None]]):
    """Stack the readable images and their targets; keep every item's error (None where it loaded)."""
    good = [(x, t) for x, t, _ in items if x is not None]
    images = torch.stack([x for x, _ in good]) if good else None
    targets = torch.tensor([t for _, t in good], dtype=torch.long)
    return images, targets, [reason for _, _, reason in items]


# --------------------------------------------------------------------------------- evaluation


def evaluate_model(
    loaded: LoadedModel,
    data_dir: str | Path,
    split: str | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    strict: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
    rank: Rank | None = None,
    group: Any = None,
) -> EvalResult:
    """Score ``loaded`` on a folder-per-class split.

    Args:
        loaded: the model from ``vitcli.models.resolve.load_model``; its labels name the classes.
        data_dir: a split folder of class sub-folders, or a dataset root (DATA/test, else
            DATA/val|validation|valid, else DATA itself; see ``datasets.find_eval_dir``).
        split: a sub-folder of ``data_dir`` to evaluate instead of the automatic choice.
        workers: CPU streams or GPU DataLoader processes, as for ``vitcli predict``.
        device, precision: as for ``vitcli predict`` (``auto``/``cpu``/``cuda``; ``auto``/``fp32``/``bf16``/...:
            ``vitcli.devices.resolve_precision``).
        strict: an unreadable image is fatal (checked before evaluating) instead of skipped.
        on_batch: called with (images done, total) after each batch, for progress bars.
        rank, group: under torchrun, this process's rank and a gloo process group: each rank scores
            every N-th image and the counts (confusion matrix, loss, hits, unreadable files) are
            summed over the ranks, so every rank returns the whole folder's result.
    """
    from vitcli.inference.batching import scored_batches
    from vitcli.io.datasets import drop_unreadable
    from vitcli.io.transforms import eval_transform

    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    torch_device = resolve_device(device)
    precision = resolve_precision(precision, torch_device)  # auto -> what runs; checked for the device
    folder, samples = eval_samples(data_dir, loaded.labels, split)
    if strict:
        samples, _ = drop_unreadable(samples, strict=True)
    rank = rank or Rank()
    mine = samples[rank.rank::rank.world]  # strided: every rank gets a mix of the classes

    num_classes = loaded.num_classes
    k = min(5, num_classes)  # top-5 where there are more than 5 classes; top1 is hits[:, 0] either way
    model = loaded.model.to(torch_device).eval()

    def logits_of(batch):  # (images, targets, errors) -> (fp32 logits on the CPU or None, targets, errors)
        images, targets, errors = batch
        if images is None:
            return None, targets, errors
        with torch.inference_mode(), autocast(torch_device, precision):  # per call: stream threads run this
            logits = model(images.to(torch_device, non_blocking=True))  # (B, num_classes)
        return logits.float().cpu(), targets, errors

    scored = scored_batches(_TolerantImages(mine, eval_transform(loaded.data_config)), batch_size, _collate,
                            logits_of, torch_device, workers)
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    sums = torch.zeros(3, dtype=torch.float64)  # loss, top-1 hits, top-k hits
    skipped: list[tuple[str, str]] = []
    done = 0
    with torch.inference_mode():
        for logits, targets, errors in scored:
            skipped += [(mine[done + i][0], reason) for i, reason in enumerate(errors) if reason is not None]
            done += len(errors)
            if logits is not None:
                # one topk gives the hit counts and the top-1 predictions the matrix needs
                # (timm.utils.accuracy returns batch percentages, not counts or predictions)
                top = logits.topk(k, dim=1).indices  # (B, k)
                hits = top == targets[:, None]  # (B, k)
                sums += torch.tensor([torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item(),
                                      hits[:, 0].sum().item(), hits.any(dim=1).sum().item()], dtype=torch.float64)
                matrix += confusion_matrix(targets, top[:, 0], num_classes)
            if on_batch is not None:
                on_batch(done, len(mine))
    if rank.enabled:
        matrix, sums, skipped = _summed_over_ranks(matrix, sums, skipped, group)
        position = {path: i for i, (path, _) in enumerate(samples)}
        skipped.sort(key=lambda pair: position[pair[0]])  # the one-process order

    n_images = int(matrix.sum().item())
    if n_images == 0:
        raise DatasetError(f"none of the {len(samples)} images in '{folder}' could be read")
    loss_sum, correct1, correct_k = sums.tolist()
    # Keep the folder's classes and every class that was predicted: all counts stay in the matrix.
    keep = sorted({target for _, target in samples} | set(matrix.sum(dim=0).nonzero().flatten().tolist()))
    labels = [loaded.labels[i] for i in keep]
    matrix = matrix[keep][:, keep]
    return EvalResult(
        top1=correct1 / n_images,  # hit counts summed as float64: exact up to 2**53 images
        top5=correct_k / n_images if num_classes > 5 else None,
        loss=loss_sum / n_images,
        n_images=n_images,
        labels=labels,
        matrix=matrix,
        per_class=per_class_metrics(matrix, labels),
        skipped=skipped,
        folder=str(folder),
    )


def _summed_over_ranks(matrix: torch.Tensor, sums: torch.Tensor, skipped: list[tuple[str, str]],
                       group: Any) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """Every rank's counts added up (CPU tensors over a gloo group), unreadable files of all ranks."""
    import torch.distributed as dist

    dist.all_reduce(matrix, group=group)
    dist.all_reduce(sums, group=group)
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, skipped, group=group)
    return matrix, sums, [pair for part in everyone for pair in part]
