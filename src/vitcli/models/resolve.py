"""The one resolver of ``--model``/``--weights`` that every command reuses, in this order of lookup.

``--model`` may be
  1. a timm name with an optional pretrained tag (``vit_base_patch16_224.augreg2_in21k_ft_in1k``),
     whose weights come from the Hugging Face Hub through timm and are cached;
  2. a model folder in timm's hub layout (``config.json`` + ``model.safetensors``), as
     ``timm.models.save_for_hf`` and ``vitcli finetune`` write it (``local-dir:`` prefix optional);
  3. any of those names plus ``--weights FILE`` (.safetensors, .pth/.pt/.bin state dicts, JAX .npz);
  4. a name found in the local model store (``weights/`` or ``$VITCLI_WEIGHTS``), loaded offline;
  5. the name of a model shipped inside the package (``vitcli.embedded``: the default, DeiT-Tiny),
     loaded offline; the store and explicit paths come first, the hub after;
  6. a Hugging Face Hub repository, ``hf-hub:org/name`` (or a plain ``org/name`` that is no local path).
A finetune run folder stands for its ``best/`` model (else ``last/``).

Names live in ``names``, the hub in ``hub``, the store in ``store``, model folders and labels in ``folders``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
from torch import nn

from vitcli.embedded import DEFAULT_MODEL, embedded_model
from vitcli.errors import ModelLoadError, UsageError, first_line, note
from vitcli.models.folders import RUN_MODEL_NAMES, is_model_folder, model_labels, own_input_size, read_folder_config
from vitcli.models.hub import create_from_hub
from vitcli.models.metadata import check_data_config
from vitcli.models.names import as_hub_id, check_arch, split_name
from vitcli.models.store import find_in_store, store_dir
from vitcli.models.weightfiles import WEIGHT_SUFFIXES, load_weights

# how torch's load_state_dict words a weight of another shape
SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from "
                           r"checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)")
__all__ = ["DEFAULT_MODEL", "LoadedModel", "load_model"]


@dataclass
class LoadedModel:
    """A built model and everything needed to use it: labels, preprocessing, where it came from."""

    model: nn.Module
    name: str  # what the user asked for
    arch: str  # timm architecture name
    source: str  # "hub", "local-dir", "store", "embedded", "weights", "random"
    labels: list[str]
    data_config: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None  # the model folder it was loaded from (a run folder's best/, ...)

    @property
    def num_classes(self) -> int:
        return len(self.labels)


# ------------------------------------------------------------------------------------ resolving


def load_model(
    name: str = DEFAULT_MODEL,
    weights: str | Path | None = None,
    *,
    pretrained: bool = True,
    num_classes: int | None = None,
    img_size: int | None = None,
    labels: list[str] | None = None,
    **model_kwargs: Any,
) -> LoadedModel:
    """Build a timm model from any form of ``--model`` (see module docstring).

    Args:
        name: timm name[.tag], a model folder, ``local-dir:PATH``, ``hf-hub:ID`` or a store entry.
        weights: a weights file applied to the architecture ``name``.
        pretrained: False builds the architecture with random weights (training from scratch).
        num_classes: a new classifier size; pretrained heads of another size are dropped.
        img_size: input resolution; ViT position embeddings are resampled by timm to fit.
        labels: class names for a new head (default: the model's own, ImageNet's, or class_N).
        model_kwargs: passed to ``timm.create_model`` (drop_path_rate, ...).
    """
    kwargs = {k: v for k, v in dict(model_kwargs, num_classes=num_classes, img_size=img_size).items()
              if v is not None}
    entry: Path | None = None
    hub_id = as_hub_id(name) if weights is None else None
    folder = _as_model_folder(name) if hub_id is None else None
    if weights is not None:
        arch = check_arch(name)
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_weights(model, Path(weights), new_head=num_classes is not None)
        source = "weights"
    elif folder is not None:
        _note_shadowing(name, folder, "a folder here")
        model = _create_from_folder(folder, pretrained, kwargs)
        arch = model.pretrained_cfg.get("architecture", split_name(name)[0])
        source = "local-dir"
    elif (entry := find_in_store(name)) is not None:
        _note_shadowing(name, entry, "the model store")
        if entry.is_dir():
            model = _create_from_folder(entry, pretrained, kwargs)
            arch = model.pretrained_cfg.get("architecture", split_name(name)[0])
        else:
            arch = check_arch(name)
            model = timm.create_model(name, pretrained=False, **kwargs)
            if pretrained:
                load_weights(model, entry, new_head=num_classes is not None)
        source = "store"
    elif (shipped := embedded_model(name)) is not None:
        model = _create(f"local-dir:{shipped}", pretrained=pretrained, **kwargs)
        arch, source = model.pretrained_cfg.get("architecture", name), "embedded"
    elif hub_id is not None:
        model = create_from_hub(hub_id, pretrained, kwargs, store=store_dir(), implicit=hub_id != name)
        arch, source = model.pretrained_cfg.get("architecture", hub_id), "hub" if pretrained else "random"
    else:
        if Path(name).suffix in WEIGHT_SUFFIXES and Path(name).is_file():
            raise UsageError(f"'{name}' is a weights file; name its architecture too: "
                             f"--model ARCH --weights {name}")
        arch = check_arch(name)
        model = create_from_hub(name, pretrained, kwargs, store=store_dir())
        source = "hub" if pretrained else "random"
    model.eval()
    # pretrained_cfg keeps the source resolution: a ViT built at 288 must be fed 288, not its pretrained 224
    data_config = (timm.data.resolve_input_data_config(model, args={"img_size": img_size}) if img_size
                   else timm.data.resolve_model_data_config(model))
    if source in ("local-dir", "store") and (folder or entry).is_dir():  # type: ignore[union-attr]
        check_data_config(data_config, f"'{(folder or entry) / 'config.json'}'", own_input_size(model))
    return LoadedModel(
        model=model,
        name=name,
        arch=arch,
        source=source,
        labels=labels or model_labels(model),
        data_config=data_config,
        folder=folder if folder is not None else (entry if entry is not None and entry.is_dir() else None),
    )


def _as_model_folder(name: str) -> Path | None:
    """The folder meant by ``name`` if it is a path (or ``local-dir:`` path) to one.

    A `vitcli finetune` run folder stands for its ``best/`` model (else ``last/``).
    """
    raw = name.removeprefix("local-dir:")
    looks_like_path = raw != name or os.sep in raw or raw.startswith(".") or Path(raw).is_dir()
    if not looks_like_path:
        return None
    path = Path(raw).expanduser()
    if is_model_folder(path):
        return path
    if path.is_dir():
        for sub in RUN_MODEL_NAMES:
            if is_model_folder(path / sub):
                return path / sub
        raise UsageError(f"model folder '{path}' has no config.json; expected timm's hub layout "
                         "(config.json + model.safetensors) as `vitcli finetune` writes it, or a "
                         "finetune run folder with best/ or last/")
    if raw != name or not (path.suffix in WEIGHT_SUFFIXES and path.is_file()):
        raise UsageError(f"model folder '{path}' does not exist; give a timm name "
                         f"(e.g. {DEFAULT_MODEL}) or a folder with config.json + model.safetensors")
    return None


def _note_shadowing(name: str, found: Path, where: str) -> None:
    """Say which folder is loaded when ``name`` is also a shipped model or a timm name (a ``weights/NAME``
    folder silently replacing the shipped default could show any labels it likes)."""
    raw = name.removeprefix("local-dir:")
    if raw != name or os.sep in raw or raw.startswith("."):
        return  # a path, meant as one
    if embedded_model(raw) is not None or timm.is_model(split_name(raw)[0]):
        kind = "shipped" if embedded_model(raw) is not None else "timm"
        note(f"'{name}' is loaded from {where}, '{found}', which comes before the {kind} model of that name; "
             "rename or remove it to use the other")


def _create_from_folder(folder: Path, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """timm.create_model on a model folder whose config.json was checked first (``read_folder_config``);
    what timm then fails on (weights of other shapes, a damaged model.safetensors) is one line naming it."""
    read_folder_config(folder)
    try:
        return timm.create_model(f"local-dir:{folder.resolve()}", pretrained=pretrained, **kwargs)
    except Exception as e:  # timm and safetensors raise anything: RuntimeError, SafetensorError, TypeError, ...
        if isinstance(e, TypeError) and "unexpected keyword argument" in str(e):
            raise  # an option this architecture does not take (a CNN's img_size): the caller may drop it
        mismatches = [f"{key} has shape ({got}), model expects ({want})"
                      for key, got, want in SIZE_MISMATCH.findall(str(e))]
        if mismatches:
            more = f" (+{len(mismatches) - 3} more)" if len(mismatches) > 3 else ""
            raise ModelLoadError(f"'{folder / 'model.safetensors'}' does not fit the architecture in its "
                                 f"config.json: {'; '.join(mismatches[:3])}{more}; save the model again") from e
        if "safetensor" in type(e).__name__.lower() or "header" in str(e).lower():
            raise ModelLoadError(f"'{folder / 'model.safetensors'}' is damaged ({first_line(e)}); "
                                 "copy or save the model again") from e
        raise ModelLoadError(f"could not load the model folder '{folder}': {first_line(e)}; check its "
                             "config.json and model.safetensors, or save the model again") from e


def _create(name: str, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(name, **kwargs)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise ModelLoadError(f"could not load model '{name.removeprefix('local-dir:')}': "
                             f"{first_line(e)}") from e
