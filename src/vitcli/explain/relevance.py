"""Class-specific relevance for timm ViTs: gradient-weighted attention rollout. Numbers, no pictures.

Chefer, Gur and Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers" (ICCV 2021), for a self-attention encoder: start from R = I and, for
each layer in depth order, R <- R + mean_heads(relu(dy_c/dA * A)) @ R, where A is that layer's
(h, T, T) softmax attention and y_c the logit of the class asked about. The query rows of R (CLS,
or CLS and distillation) over the patch columns are the map. Plain rollout (Abnar & Zuidema) comes
from the same forward pass and is the same whatever the class; this map is not.

The weights are taken where ``AttentionCapture`` takes them (the input of each block's
``attn.attn_drop``), so the model must be built inside ``unfused_attention()``, and their gradient
comes from ``torch.autograd.grad``: no parameter's ``.grad`` is touched.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitcli.errors import AttentionUnavailableError, UsageError
from vitcli.explain.attention import attention_modules, attention_rollout, patch_share

SUGGESTIONS = 5  # closest labels listed when --class names none


@dataclass
class ClassRelevance:
    """What one forward and backward pass gives, for a batch of images."""

    logits: torch.Tensor  # (B, classes)
    target: torch.Tensor  # (B,) the class explained for each image
    relevance: torch.Tensor  # (B, T, T) gradient-weighted rollout R
    rollout: torch.Tensor  # (B, T, T) plain attention rollout, for comparison

    def patch_maps(self, prefix: int, query_tokens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(gradient map, plain rollout map), each (B, N) over the patches and summing to 1 (or all 0)."""
        return patch_share(self.relevance, prefix, query_tokens), patch_share(self.rollout, prefix, query_tokens)


def relevance_step(running: torch.Tensor, attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """One layer of Chefer et al.'s rule: R + mean_heads(relu(grad * A)) @ R.

    Args:
        running: (B, T, T) relevance of the earlier layers (the identity before the first).
        attn, grad: (B, h, T, T) this layer's softmax attention and the class logit's gradient on it.
    """
    cam = (grad * attn).clamp_min(0).mean(dim=1)  # (B, T, T)
    return running + cam @ running


def require_classifier(model: nn.Module) -> None:
    """Refuse (exit 2) a model without a classifier head: its outputs are features, not classes to explain."""
    if getattr(model, "num_classes", None) == 0:
        raise AttentionUnavailableError(
            f"--explain needs class logits; {type(model).__name__} was built without a classifier head "
            "(num_classes=0, e.g. a DINOv2 backbone): fine-tune it on labelled folders first (vitcli finetune)")


def gradient_rollout(model: nn.Module, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None = None, *,
                     head_fusion: str = "mean", discard_ratio: float = 0.0) -> ClassRelevance:
    """Gradient-weighted attention rollout of ``model`` on ``x`` (B, C, H, W) for the class ``target``.

    Args:
        model: a timm ViT built inside ``unfused_attention()``, in eval mode.
        target: one class for every image, one per image, or None for each image's top-1.
        head_fusion, discard_ratio: how the plain rollout fuses heads (the gradient rule averages them).
    """
    modules = attention_modules(model, "--explain")
    require_classifier(model)
    maps: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple[Any, ...]) -> None:
        maps.append(args[0])  # (B, h, T, T), softmax output, still in the graph

    handles = [m.attn_drop.register_forward_pre_hook(keep) for m in modules]
    try:
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)  # a graph even when every parameter is frozen
            logits = model(x)  # (B, classes)
            if logits.dim() != 2 or logits.shape[1] == 0:
                raise AttentionUnavailableError(f"--explain needs class logits; {type(model).__name__} returns "
                                                f"features of shape {tuple(logits.shape)} (no classifier head)")
            if len(maps) != len(modules):
                raise AttentionUnavailableError(
                    f"captured attention from {len(maps)} of {len(modules)} blocks; the model computes attention "
                    "without explicit weights (fused attention?)")
            chosen = _targets(target, logits)
            score = logits.gather(1, chosen[:, None]).sum()  # images are independent: one backward for all
            grads = torch.autograd.grad(score, maps, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    running = torch.eye(maps[0].shape[-1], dtype=torch.float32).expand(x.shape[0], -1, -1).clone()
    for attn, grad in zip(maps, grads, strict=True):
        if grad is not None:  # a block the logit does not depend on (none in a ViT) adds nothing
            running = relevance_step(running, attn.detach().float().cpu(), grad.float().cpu())
    rollout = attention_rollout([a.detach().float().cpu() for a in maps], head_fusion, discard_ratio)
    return ClassRelevance(logits=logits.detach().float().cpu(), target=chosen.cpu(), relevance=running,
                          rollout=rollout)


def _targets(target: int | Sequence[int] | torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    batch, classes = logits.shape
    if target is None:
        return logits.detach().argmax(dim=1)
    chosen = torch.as_tensor(target, dtype=torch.long, device=logits.device).reshape(-1).expand(batch)
    if ((chosen < 0) | (chosen >= classes)).any():
        raise UsageError(f"class index {int(chosen.max())} is out of range: the model has classes 0..{classes - 1}")
    return chosen


def class_index(wanted: str, labels: Sequence[str], num_classes: int | None = None) -> int:
    """The class a ``--class`` value names: a label (any case) or an index, else a UsageError with the closest labels.

    A label the model holds twice (ImageNet's two 'crane's) must be given by index; the error names both.
    """
    text = wanted.strip()
    count = num_classes if num_classes is not None else len(labels)
    if text.isdigit():
        index = int(text)
        if index >= count:
            raise UsageError(f"--class {index} is out of range: the model has classes 0..{count - 1}")
        return index
    folded = [label.casefold() for label in labels]
    hits = [i for i, label in enumerate(folded) if label == text.casefold()]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise UsageError(f"--class '{text}' names {len(hits)} classes ({', '.join(map(str, hits))}); "
                         f"give the index instead, e.g. --class {hits[0]}")
    raise UsageError(f"unknown --class '{text}': the model has no such label; {_closest(text, labels)}")


def _closest(text: str, labels: Sequence[str]) -> str:
    key = text.casefold()
    folded = [label.casefold() for label in labels]
    containing = [i for i, label in enumerate(folded) if key and key in label]
    close = difflib.get_close_matches(key, folded, n=SUGGESTIONS, cutoff=0.5)
    picks = list(dict.fromkeys(containing + [folded.index(c) for c in close]))[:SUGGESTIONS]
    if not picks:
        picks = [i for i, _ in sorted(enumerate(folded), key=lambda p: -difflib.SequenceMatcher(None, key, p[1])
                                      .ratio())[:SUGGESTIONS]]
    if not picks:
        return "the model has no labels; give a class index"
    return "closest: " + ", ".join(f"'{labels[i]}' ({i})" for i in picks) + " (a label or an index)"
