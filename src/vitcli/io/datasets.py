"""Folder-per-class image data: layouts, class checks, seeded stratified splits, a Dataset.

Accepted layouts for training:
  * ``DATA/train/<class>/...`` with ``DATA/val/`` (or ``validation/``, ``valid/``); ``test/`` is
    left for ``vitcli evaluate``;
  * ``DATA/<class>/...`` (or ``DATA/train/`` alone), split into train/val by a stratified,
    seeded fraction; the split is saved with the run (``split.json``) so it can be reproduced.

Class names come from the train folders, sorted; a val folder is mapped by *name*, never by order.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitcli.errors import DatasetError, ImageLoadError, UsageError
from vitcli.io.images import load_image
from vitcli.io.inputs import is_image_path

VAL_DIR_NAMES = ("val", "validation", "valid")
TEST_DIR_NAME = "test"
Sample = tuple[str, int]  # (image path, class index)


@dataclass
class FolderData:
    """Train and val samples over one ordered list of classes, and what was noticed on the way."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    layout: str  # "train/val" (folders given) or "split" (split here, by val_split and seed)
    root: str
    val_split: float | None = None
    seed: int | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): unreadable files
    warnings: list[str] = field(default_factory=list)

    def counts(self, which: str = "train") -> list[int]:
        """Images per class in the train or val samples."""
        return class_counts(getattr(self, which), len(self.classes))

    def save(self, path: Path) -> None:
        from vitcli.io.fileio import atomic_open

        with atomic_open(path) as f:
            json.dump(asdict(self), f, indent=1)

    @classmethod
    def load(cls, path: Path) -> FolderData:
        raw: dict[str, Any] = json.loads(Path(path).read_text())
        raw["train"] = [tuple(s) for s in raw["train"]]
        raw["val"] = [tuple(s) for s in raw["val"]]
        raw["skipped"] = [tuple(s) for s in raw.get("skipped", [])]
        return cls(**raw)


def class_counts(samples: Sequence[Sample], num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for _, target in samples:
        counts[target] += 1
    return counts


def scan_class_folders(root: Path) -> dict[str, list[str]]:
    """``{class name: sorted image paths}`` for each visible sub-folder of ``root`` (searched recursively)."""
    classes = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        classes[sub.name] = sorted(str(p) for p in sub.rglob("*") if p.is_file() and is_image_path(p))
    return classes


def _checked_classes(root: Path, what: str) -> dict[str, list[str]]:
    """Class folders of ``root``, refusing empty classes, a single class or no images at all."""
    per_class = scan_class_folders(root)
    if not per_class:
        raise DatasetError(f"{what} '{root}' has no class folders; expected {root}/<class>/<images>")
    empty = [name for name, files in per_class.items() if not files]
    if len(empty) == len(per_class):
        raise DatasetError(f"{what} '{root}' has no images in its class folders")
    if empty:
        raise DatasetError(f"class folder(s) with no images in '{root}': {', '.join(empty)}; "
                           "add images or remove the folder(s)")
    if len(per_class) < 2:
        raise DatasetError(f"{what} '{root}' has a single class ({next(iter(per_class))}); "
                           "a classifier needs at least two class folders")
    return per_class


def find_val_dir(root: Path) -> Path | None:
    return next((root / n for n in VAL_DIR_NAMES if (root / n).is_dir()), None)


def discover(data_dir: str | Path, val_split: float = 0.2, seed: int = 0) -> FolderData:
    """Find the train/val layout of ``data_dir`` and return its samples (nothing is decoded here)."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data folder '{root}' does not exist; expected DATA/train/<class>/... "
                           "(+ DATA/val/) or DATA/<class>/...")
    train_dir = root / "train" if (root / "train").is_dir() else root
    val_dir = find_val_dir(root) if train_dir != root else None
    per_class = _checked_classes(train_dir, "train folder" if train_dir != root else "data folder")
    classes = list(per_class)
    index = {name: i for i, name in enumerate(classes)}
    if val_dir is None:
        if not 0.0 < val_split < 1.0:
            raise DatasetError(f"--val-split must be between 0 and 1 (got {val_split}) when "
                               f"'{root}' has no val/ folder")
        train, val = stratified_split(per_class, index, val_split, seed)
        data = FolderData(classes, train, val, "split", str(root), val_split, seed)
    else:
        val_classes = scan_class_folders(val_dir)
        unknown = [c for c in val_classes if c not in index]
        if unknown:
            raise DatasetError(f"val class(es) not in train: {', '.join(unknown)} (in '{val_dir}'); "
                               f"train classes are {', '.join(classes)}: rename or remove them")
        train = [(p, index[c]) for c, files in per_class.items() for p in files]
        val = [(p, index[c]) for c, files in val_classes.items() for p in files]
        data = FolderData(classes, train, val, "train/val", str(root))
        missing = [c for c in classes if not val_classes.get(c)]
        if missing:
            data.warnings.append(f"class(es) with no val images: {', '.join(missing)}; "
                                 "their accuracy is not measured")
    if not data.val:
        raise DatasetError(f"no validation images in '{root}'; add a val/ folder or use --val-split")
    return data


def stratified_split(per_class: dict[str, list[str]], index: dict[str, int], val_split: float,
                     seed: int) -> tuple[list[Sample], list[Sample]]:
    """Per class, a seeded shuffle sends ``round(n * val_split)`` images (at least 1 if n >= 2) to val."""
    rng = random.Random(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for name, files in per_class.items():
        files = list(files)
        rng.shuffle(files)
        n_val = min(max(round(len(files) * val_split), 1 if len(files) >= 2 else 0), len(files) - 1)
        val += [(p, index[name]) for p in sorted(files[:n_val])]
        train += [(p, index[name]) for p in sorted(files[n_val:])]
    return train, val


def drop_unreadable(samples: Sequence[Sample], strict: bool = False) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Decode each image once, at reduced JPEG scale (fast); unreadable files are skipped or fatal."""
    good, skipped = [], []
    for path, target in samples:
        try:
            load_image(path, draft_size=(32, 32))
            good.append((path, target))
        except ImageLoadError as e:
            if strict:
                raise DatasetError(f"unreadable image {e} (--strict); fix or remove it") from e
            skipped.append((path, e.reason))
    return good, skipped


def map_classes(folder_classes: Sequence[str], model_labels: Sequence[str]) -> dict[str, int]:
    """Folder class name -> the model's class index, by name (evaluation of a trained model).

    A name the model holds more than once (ImageNet's "crane" is a bird, 134, and a machine, 517)
    is refused, naming the indices; a folder named ``crane_134`` or ``134`` picks one.
    """
    where: dict[str, list[int]] = {}
    for i, name in enumerate(model_labels):
        where.setdefault(name, []).append(i)
    index, unknown, ambiguous = {}, [], []
    for c in folder_classes:
        found = where.get(c) or _picked_index(c, model_labels)
        if not found:
            unknown.append(c)
        elif len(found) > 1:
            ambiguous.append(c)
        else:
            index[c] = found[0]
    if ambiguous:
        c = ambiguous[0]
        indices = where[c]
        listed = ", ".join(str(i) for i in indices)
        more = f" (and {', '.join(ambiguous[1:])})" if len(ambiguous) > 1 else ""
        raise UsageError(f"folder '{c}'{more} names a label the model holds {len(indices)} times, "
                         f"at indices {listed}; rename the folder {c}_{indices[0]} (or {indices[0]}) "
                         "to pick one")
    if unknown:
        shown = ", ".join(list(model_labels)[:10]) + (", ..." if len(model_labels) > 10 else "")
        raise DatasetError(f"folder class(es) unknown to the model: {', '.join(unknown)}; "
                           f"the model's labels are {shown}")
    return index


def _picked_index(folder: str, model_labels: Sequence[str]) -> list[int]:
    """``[i]`` for a folder named ``i`` or ``<label i>_i`` (a class picked by its index), else ``[]``."""
    name, _, number = folder.rpartition("_")
    if not number.isascii() or not number.isdigit():
        return []
    i = int(number)
    if i >= len(model_labels) or (name and model_labels[i] != name):
        return []
    return [i]


def find_eval_dir(data_dir: str | Path, split: str | None = None) -> Path:
    """The folder to evaluate: DATA/SPLIT if given, else DATA/test, DATA/val..., else DATA itself."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data folder '{root}' does not exist")
    if split is not None:
        if not (root / split).is_dir():
            raise DatasetError(f"'{root}' has no '{split}' folder")
        return root / split
    for name in (TEST_DIR_NAME, *VAL_DIR_NAMES):
        if (root / name).is_dir():
            return root / name
    return root


class LabeledImages(torch.utils.data.Dataset):
    """``(image tensor, class index)`` for (path, target) samples through a transform."""

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Any], torch.Tensor]):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[i]
        return self.transform(load_image(path)), target
