"""Model folders in timm's hub layout (config.json + model.safetensors), and the labels a model carries."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import timm
from torch import nn

from vitcli.io.fileio import give_ordinary_permissions, replace_dir, temp_dir_beside

RUN_MODEL_NAMES = ("best", "last")  # model folders inside a `vitcli finetune` run, in order of preference


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def model_labels(model: nn.Module) -> list[str]:
    """Labels stored with the model, else ImageNet names for ImageNet-sized heads, else class_N."""
    num_classes = getattr(model, "num_classes", 0) or 0
    stored = model.pretrained_cfg.get("label_names")
    if stored and len(stored) == num_classes:
        return [str(s) for s in (stored.values() if isinstance(stored, dict) else stored)]
    subset = timm.data.infer_imagenet_subset(model)
    if subset:
        info = timm.data.ImageNetInfo(subset)
        return [info.index_to_description(i).split(",")[0] for i in range(num_classes)]
    return [f"class_{i}" for i in range(num_classes)]


def save_model_folder(model: nn.Module, folder: Path, labels: list[str],
                      data_config: dict[str, Any] | None = None) -> Path:
    """Write ``folder`` in timm's hub layout (config.json + model.safetensors), atomically.

    ``timm.create_model('local-dir:FOLDER')`` and ``vitcli --model FOLDER`` load it back,
    labels and preprocessing included.
    """
    from timm.models import save_for_hf

    folder = Path(folder)
    tmp = temp_dir_beside(folder)
    try:
        save_for_hf(model, tmp, model_config={"label_names": list(labels)},
                    safe_serialization=True, data_config=data_config)
        give_ordinary_permissions(tmp)  # not mkdtemp's private 0700, nor the 0600 of safetensors' writer
        replace_dir(tmp, folder)  # a complete folder at every instant, even on a second Ctrl-C
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
