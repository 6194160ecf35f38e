"""Model folders in timm's hub layout (config.json + model.safetensors), and the labels a model carries."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import timm
from torch import nn

from vitcli.errors import ModelLoadError
from vitcli.io.fileio import give_ordinary_permissions, replace_dir, temp_dir_beside

RUN_MODEL_NAMES = ("best", "last")  # model folders inside a `vitcli finetune` run, in order of preference


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_folder_config(folder: Path) -> dict[str, Any]:
    """A model folder's config.json, checked before timm reads it: valid JSON, the field types timm
    expects, labels as strings (one per class), and a model size and data config within bounds
    (``vitcli.models.metadata``). Raises ModelLoadError naming the file and the key."""

    from vitcli.models.metadata import MAX_SIDE, MIN_SIDE, check_data_config, check_labels, parse_json_value

    path = folder / "config.json"
    where = f"'{path}'"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{where} cannot be read ({e.strerror if isinstance(e, OSError) else e}); "
                             "check the folder, or save the model again") from e
    config = parse_json_value("config.json", text, where)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{where} is not a JSON object of model settings; save the model again "
                             "(vitcli finetune and timm's save_for_hf write it)")
    expected = {"architecture": str, "num_classes": int, "num_features": int, "model_args": dict,
                "pretrained_cfg": dict, "label_names": list}
    for key, kind in expected.items():
        if key in config and (not isinstance(config[key], kind) or isinstance(config[key], bool)):
            raise ModelLoadError(f"{where}: '{key}' is {type(config[key]).__name__}, but must be "
                                 f"{'an object' if kind is dict else 'a list' if kind is list else kind.__name__}; "
                                 "fix the file or save the model again")
    classes = config.get("num_classes")
    if "label_names" in config:
        check_labels(config["label_names"], where, classes, key="label_names")
    img_size = config.get("model_args", {}).get("img_size")
    sides = img_size if isinstance(img_size, (list, tuple)) else [img_size] if img_size is not None else []
    if not all(isinstance(v, int) and not isinstance(v, bool) and MIN_SIDE <= v <= MAX_SIDE for v in sides):
        raise ModelLoadError(f"{where}: 'model_args.img_size' is {img_size!r}, but must be {MIN_SIDE} to "
                             f"{MAX_SIDE} pixels; fix the file or save the model again")
    data = {k: v for k, v in config.get("pretrained_cfg", {}).items()
            if k in ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")}
    if data:
        check_data_config({"input_size": [3, 224, 224], "mean": [0.5], "std": [0.5], **data}, where)
    return config


def own_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The (height, width) a model's graph is built for, where it has a fixed one (a ViT's patch grid)."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if size is None or getattr(embed, "dynamic_img_size", False) or not getattr(embed, "strict_img_size", True):
        return None
    return (size, size) if isinstance(size, int) else tuple(size)[:2]


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
