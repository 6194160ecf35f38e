"""The model to fine-tune: a new head (zeroed) for the classes, at the training size, and its preprocessing."""

from __future__ import annotations

from typing import Any

from torch import nn

from vitcli.finetune.config import FinetuneConfig
from vitcli.models.resolve import LoadedModel, load_model


def classifier_heads(model: nn.Module) -> list[nn.Module]:
    """The classifier head(s): timm's ``get_classifier()`` gives a (head, head_dist) pair for distilled DeiTs."""
    heads = model.get_classifier()
    return list(heads) if isinstance(heads, tuple | list) else [heads]


def build_model(config: FinetuneConfig, classes: list[str]) -> LoadedModel:
    """The pretrained model with a new head for ``classes``, at ``img_size`` if given.

    Models that take no ``img_size`` (CNNs) or ``drop_path_rate`` are built without them; a CNN
    then simply sees the larger input.
    """
    extra: dict[str, Any] = {"img_size": config.img_size, "drop_path_rate": config.drop_path or None}
    while True:
        try:
            loaded = load_model(config.model, config.weights, pretrained=config.pretrained,
                                num_classes=len(classes), labels=list(classes),
                                **{k: v for k, v in extra.items() if v is not None})
            break
        except TypeError as e:  # "__init__() got an unexpected keyword argument 'img_size'"
            bad = next((k for k, v in extra.items() if v is not None and f"'{k}'" in str(e)), None)
            if bad is None:
                raise
            extra[bad] = None
    # A new head starts at zero, as in the ViT paper's fine-tuning: the backbone gets no gradient until
    # the head has learned something, and the head's random init no longer adds run-to-run noise.
    # A model folder already trained on these same classes keeps its head.
    if config.zero_head and list(loaded.model.pretrained_cfg.get("label_names") or []) != list(classes):
        for head in classifier_heads(loaded.model):
            for p in head.parameters():
                nn.init.zeros_(p)
    return loaded


def model_data_config(model: nn.Module, img_size: int | None) -> dict[str, Any]:
    """Preprocessing for the model as built (a ViT made at 288 reports 288, not its pretrained 224)."""
    import timm.data

    return timm.data.resolve_input_data_config(model, args={"img_size": img_size} if img_size else None)

