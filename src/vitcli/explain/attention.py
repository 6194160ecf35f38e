"""Attention capture, attention rollout and mean attention distance for timm ViTs: numbers, no pictures.

Fused attention (``F.scaled_dot_product_attention``) never materialises the (h, T, T) weights, so a
hook sees nothing. The model must therefore be built with ``timm.layers.set_fused_attn(False)``
(``unfused_attention()``); the maths is then timm's own non-fused path and the logits are the same.

The capture hooks each block's ``attn.attn_drop``, whose input is the softmax output (B, h, T, T),
and reduces it inside the hook: the per-head query rows over the patches, one running rollout
product and the mean attention distance per head. Keeping every (h, T, T) tensor (``keep_maps``)
costs L * h * T^2 floats (544 MB for DINOv2-S at 518 px); the reduced capture keeps O(T^2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vitcli.errors import AttentionUnavailableError

HEAD_FUSIONS = ("mean", "max", "min")

# module names (lower case) of timm families whose attention is not one image-wide token-to-token map
_UNSUPPORTED = {
    "swin": "Swin attends inside shifted local windows, so there is no image-wide token-to-token map",
    "xcit": "XCiT's attention is cross-covariance attention between channels, not between tokens",
    "beit": "BEiT adds a learned relative position bias inside attention; its CLS maps are not comparable "
            "with a plain ViT's and rollout assumes pure token mixing",
    "eva": "EVA-style models rotate queries and keys (RoPE) and add relative terms inside attention; "
           "a plain token map and rollout would misread them",
}


@contextlib.contextmanager
def unfused_attention() -> Iterator[None]:
    """Build models inside this block so their attention modules compute explicit weights."""
    from timm.layers import set_fused_attn, use_fused_attn

    experimental, enabled = use_fused_attn(experimental=True), use_fused_attn()  # timm's public getter
    set_fused_attn(False)
    try:
        yield
    finally:
        set_fused_attn(enabled, experimental=experimental)


def attention_modules(model: nn.Module, option: str = "--attention") -> list[nn.Module]:
    """Each block's attention module, in depth order, or raise why this model has no token map.

    ``option`` names what was asked for (``--attention``, ``--explain``) in the refusal.
    """
    module = type(model).__module__.rsplit(".", 1)[-1].lower()
    for family, reason in _UNSUPPORTED.items():
        if module.startswith(family):
            raise AttentionUnavailableError(f"{option} is not available for {type(model).__name__}: {reason}; "
                                            f"the patch view (without {option}) still works")
    if getattr(model, "attn_pool", None) is not None:
        raise AttentionUnavailableError(
            f"{option} is not available for {type(model).__name__} with an attention-pool head (SigLIP-style "
            "'map' pooling): the class comes from the pool's own query, which no token map shows")
    blocks = getattr(model, "blocks", None)
    attns = [getattr(b, "attn", None) for b in blocks] if blocks is not None else []
    if not attns or any(a is None or not isinstance(getattr(a, "attn_drop", None), nn.Module) for a in attns):
        raise AttentionUnavailableError(f"{option} needs a ViT whose blocks use timm's Attention module; "
                                        f"{type(model).__name__} does not expose its attention weights")
    if any(getattr(a, "fused_attn", False) for a in attns):
        raise AttentionUnavailableError("the model was built with fused attention, which never materialises "
                                        "its weights; build it inside vitcli.explain.attention.unfused_attention()")
    return attns


# ------------------------------------------------------------------------------------------ maths


def fuse_heads(attn: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """(B, h, T, T) -> (B, T, T) by the mean, max or min over heads."""
    if head_fusion == "mean":
        return attn.mean(dim=1)
    if head_fusion == "max":
        return attn.amax(dim=1)
    if head_fusion == "min":
        return attn.amin(dim=1)
    raise ValueError(f"unknown head fusion '{head_fusion}'; use one of {', '.join(HEAD_FUSIONS)}")


def discard_lowest(attn: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the lowest ``ratio`` share of each (T, T) matrix's weights (Gildenblat's ``discard_ratio``)."""
    if ratio <= 0:
        return attn
    flat = attn.flatten(1).clone()  # (B, T*T)
    k = int(flat.shape[1] * ratio)
    if k:
        lowest = flat.topk(k, dim=1, largest=False).indices
        flat.scatter_(1, lowest, 0.0)
    return flat.view_as(attn)


def rollout_step(running: torch.Tensor | None, attn: torch.Tensor) -> torch.Tensor:
    """One layer of Abnar & Zuidema's rollout: A + I, rows renormalised, left-multiplied onto the product.

    Args:
        running: (B, T, T) product of the earlier layers, or None before the first.
        attn: (B, T, T) this layer's attention, heads already fused.
    """
    eye = torch.eye(attn.shape[-1], dtype=attn.dtype, device=attn.device)
    a = attn + eye
    a = a / a.sum(dim=-1, keepdim=True)
    return a if running is None else a @ running


def attention_rollout(attentions: Sequence[torch.Tensor], head_fusion: str = "mean",
                      discard_ratio: float = 0.0) -> torch.Tensor:
    """Rollout over layers in order: (L x (B, h, T, T)) -> (B, T, T), the product A_L ... A_1."""
    running = None
    for attn in attentions:
        running = rollout_step(running, discard_lowest(fuse_heads(attn, head_fusion), discard_ratio))
    if running is None:
        raise ValueError("attention_rollout needs at least one layer")
    return running


def patch_share(rows: torch.Tensor, prefix: int, query_tokens: Sequence[int]) -> torch.Tensor:
    """The query tokens' attention over the patch columns, as a share summing to 1.

    Args:
        rows: (..., T, T) attention or rollout.
        prefix: number of prefix tokens (CLS, distillation, registers) before the patches.
        query_tokens: rows to average (CLS; CLS and distillation); empty: the mean over patch rows.
    Returns:
        (..., N) non-negative, summing to 1 over the N patches.
    """
    if query_tokens:
        source = rows[..., list(query_tokens), :].mean(dim=-2)  # (..., T)
    else:
        source = rows[..., prefix:, :].mean(dim=-2)  # no CLS (global average pool): every patch asks
    patches = source[..., prefix:]  # (..., N): prefix columns (CLS, dist, registers) are no image area
    return patches / patches.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def patch_distances(grid: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """(N, N) Euclidean distances between patch centres in input pixels, patches in token order."""
    rows, cols = grid
    ys, xs = torch.meshgrid(torch.arange(rows, dtype=torch.float64) * stride[0],
                            torch.arange(cols, dtype=torch.float64) * stride[1], indexing="ij")
    centres = torch.stack([ys.flatten(), xs.flatten()], dim=1)  # (N, 2); the half-patch offset cancels
    return torch.cdist(centres, centres).float()


def mean_attention_distance(attn: torch.Tensor, distances: torch.Tensor, prefix: int) -> torch.Tensor:
    """Mean attention distance per head: (B, h, T, T) -> (B, h), in the units of ``distances``.

    For each query patch, the distance to every key patch weighted by the attention between them
    (patch-to-patch weights renormalised to sum to 1, since part of each row goes to prefix tokens),
    averaged over the query patches. Dosovitskiy et al. 2021, Fig. 7 right.
    """
    a = attn[..., prefix:, prefix:]  # (B, h, N, N), a view
    # einsum instead of (a / rowsum * d).sum(-1): no (B, h, N, N) temporaries at large T
    weighted = torch.einsum("...qk,qk->...q", a, distances.to(a.dtype))  # (B, h, N)
    return (weighted / a.sum(dim=-1).clamp_min(1e-12)).mean(dim=-1)


# ---------------------------------------------------------------------------------------- capture


@dataclass
class CapturedAttention:
    """What one forward pass left behind, per layer."""

    query_attention: list[torch.Tensor] = field(default_factory=list)  # L x (B, h, N): query rows per head
    mean_distance: list[torch.Tensor] = field(default_factory=list)  # L x (B, h), input pixels
    rollout: torch.Tensor | None = None  # (B, T, T), product over all layers
    maps: list[torch.Tensor] = field(default_factory=list)  # L x (B, h, T, T), only with keep_maps

    @property
    def num_layers(self) -> int:
        return max(len(self.query_attention), len(self.mean_distance), len(self.maps))


class AttentionCapture:
    """Hooks on every block's attention that reduce (B, h, T, T) as it passes.

    Use as a context manager around forward passes; ``result`` holds the last pass's numbers (call
    ``reset()`` between passes, or let each ``with`` block start afresh).

    Args:
        model: a timm ViT built inside ``unfused_attention()``.
        prefix: prefix tokens before the patches.
        query_tokens: the rows whose attention the maps show (see ``patch_share``).
        distances: (N, N) pixel distances between patches, to compute mean attention distance.
        rollout: keep the running rollout product.
        head_fusion, discard_ratio: how rollout fuses the heads of each layer.
        keep_maps: also keep every (B, h, T, T) tensor (a baseline for the benchmark; memory-hungry).
    """

    def __init__(self, model: nn.Module, prefix: int, query_tokens: Sequence[int] = (0,), *,
                 distances: torch.Tensor | None = None, rollout: bool = True, head_fusion: str = "mean",
                 discard_ratio: float = 0.0, keep_maps: bool = False):
        if head_fusion not in HEAD_FUSIONS:
            raise ValueError(f"unknown head fusion '{head_fusion}'; use one of {', '.join(HEAD_FUSIONS)}")
        self.modules = attention_modules(model)
        self.prefix, self.query_tokens = prefix, tuple(query_tokens)
        self.distances, self.do_rollout = distances, rollout
        self.head_fusion, self.discard_ratio, self.keep_maps = head_fusion, discard_ratio, keep_maps
        self.result = CapturedAttention()
        self._handles: list[Any] = []

    def reset(self) -> None:
        self.result = CapturedAttention()

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        attn = args[0].detach().float()  # (B, h, T, T), softmax output, rows sum to 1
        r = self.result
        r.query_attention.append(patch_share(attn, self.prefix, self.query_tokens).cpu())
        if self.distances is not None:
            r.mean_distance.append(mean_attention_distance(attn, self.distances.to(attn.device), self.prefix).cpu())
        if self.do_rollout:
            fused = discard_lowest(fuse_heads(attn, self.head_fusion), self.discard_ratio)
            r.rollout = rollout_step(r.rollout, fused)
        if self.keep_maps:
            r.maps.append(attn.cpu())

    def __enter__(self) -> AttentionCapture:
        self.reset()
        self._handles = [a.attn_drop.register_forward_pre_hook(self._hook) for a in self.modules]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if exc[0] is None and len(self.result.query_attention) != len(self.modules):
            raise AttentionUnavailableError(
                f"captured attention from {len(self.result.query_attention)} of {len(self.modules)} blocks; "
                "the model computes attention without explicit weights (fused attention?)")
