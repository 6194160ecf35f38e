"""Is a map faithful? Token deletion and insertion curves for timm ViTs, with no pixel inpainting.

Pixel deletion (Petsiuk et al., RISE 2018) has to paint something where a patch was, and the paint
is itself evidence. A ViT can simply be shown fewer tokens: after timm's own ``patch_embed`` and
``_pos_embed`` every patch token carries its position embedding, so dropping tokens from the
sequence removes those patches and nothing else. The prefix tokens (CLS, distillation, registers)
are always kept. The rest of the forward pass is timm's: ``norm_pre``, ``blocks``, ``norm``,
``forward_head``.

Deletion drops the patches in the order a map ranks them (most relevant first) and records the
probability of the explained class; insertion starts from the prefix tokens alone and adds them in
the same order. The area under each curve (trapezoid over the fraction of patch tokens) scores the
map: low deletion AUC and high insertion AUC mean faithful. A random order (mean over seeds) is the
baseline any map should beat.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vitcli.errors import AttentionUnavailableError

DEFAULT_STEPS = 15
RANDOM_SEEDS = (0, 1, 2)
RANDOM = "random"


@dataclass
class FaithfulnessCurves:
    """Deletion and insertion curves of one image, one per order (method)."""

    target: int
    fractions: list[float]  # share of the patch tokens deleted (or inserted) at each step, 0 .. 1
    deletion: dict[str, list[float]] = field(default_factory=dict)  # method -> class probability per step
    insertion: dict[str, list[float]] = field(default_factory=dict)
    seeds: int = 0  # random orders averaged into the "random" curve

    def auc(self, curve: str) -> dict[str, float]:
        """Area under each method's ``"deletion"`` or ``"insertion"`` curve, in [0, 1]."""
        return {method: trapezoid(self.fractions, probs) for method, probs in getattr(self, curve).items()}

    def to_json(self) -> dict[str, Any]:
        return {"class_index": self.target, "steps": len(self.fractions) - 1, "random_seeds": self.seeds,
                "fractions": self.fractions,
                "deletion": {m: {"auc": a, "probs": self.deletion[m]} for m, a in self.auc("deletion").items()},
                "insertion": {m: {"auc": a, "probs": self.insertion[m]} for m, a in self.auc("insertion").items()}}


def trapezoid(xs: list[float], ys: list[float]) -> float:
    """Area under the polyline through (xs, ys), by the trapezoid rule."""
    return float(sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:], strict=False)))


def require_token_pieces(model: nn.Module) -> None:
    """Refuse (exit 2) a model whose forward pass cannot be run on a subset of its tokens through timm's pieces."""
    missing = [name for name in ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head")
               if getattr(model, name, None) is None]
    if missing:
        raise AttentionUnavailableError(
            f"--explain cannot score {type(model).__name__}: token deletion runs timm's ViT pieces (patch_embed, "
            f"_pos_embed, blocks, norm, forward_head) and this model has no {', '.join(missing)}")
    if getattr(model, "attn_pool", None) is not None:
        raise AttentionUnavailableError(f"--explain cannot score {type(model).__name__}: its attention-pool head "
                                        "reads the tokens through its own query")


def embed_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, T, D): patch tokens with their position embeddings, behind the prefix tokens."""
    return model._pos_embed(model.patch_embed(x))


def forward_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The rest of timm's ViT forward on any token sequence (B, T', D) -> logits (B, classes)."""
    tokens = model.norm_pre(tokens) if getattr(model, "norm_pre", None) is not None else tokens
    return model.forward_head(model.norm(model.blocks(tokens)))


def min_patches(model: nn.Module, prefix: int) -> int:
    """Fewest patch tokens the head can read: 0 when it reads a prefix token, 1 when it pools the patches."""
    pool = getattr(model, "global_pool", "token")
    return 0 if prefix and pool == "token" else 1


def keep_patches(tokens: torch.Tensor, prefix: int, patches: torch.Tensor) -> torch.Tensor:
    """(T, D) tokens -> the prefix tokens and the given patch indices, in sequence order: (prefix + k, D)."""
    index = torch.cat([torch.arange(prefix), prefix + patches.sort().values])
    return tokens.index_select(0, index.to(tokens.device))


def step_counts(num_patches: int, steps: int) -> tuple[list[float], list[int]]:
    """Fractions 0, 1/steps, .., 1 and the number of patch tokens each stands for (rounded)."""
    fractions = [i / steps for i in range(steps + 1)]
    return fractions, [round(f * num_patches) for f in fractions]


def random_orders(num_patches: int, seeds: tuple[int, ...] = RANDOM_SEEDS) -> list[torch.Tensor]:
    """One reproducible random ranking of the patches per seed."""
    return [torch.randperm(num_patches, generator=torch.Generator().manual_seed(s)) for s in seeds]


def rank_patches(patch_map: torch.Tensor) -> torch.Tensor:
    """Patch indices from the most to the least relevant (ties keep token order)."""
    return torch.argsort(patch_map.flatten(), descending=True, stable=True)


@torch.inference_mode()
def deletion_insertion(model: nn.Module, x: torch.Tensor, target: int, orders: Mapping[str, torch.Tensor], *,
                       prefix: int, steps: int = DEFAULT_STEPS,
                       seeds: tuple[int, ...] = RANDOM_SEEDS) -> FaithfulnessCurves:
    """Deletion and insertion curves of one image for each ranking in ``orders`` and for random orders.

    Args:
        x: (1, C, H, W) the preprocessed image.
        target: the class whose probability is recorded.
        orders: method -> (N,) patch indices, most relevant first.
        prefix: prefix tokens in front of the patches (always kept).
        steps: points along each curve after the first (15: every 1/15 of the patch tokens).
        seeds: random orders averaged into the ``"random"`` curve (none: no random curve).
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    require_token_pieces(model)
    tokens = embed_tokens(model, x)[0]  # (T, D)
    n = tokens.shape[0] - prefix
    floor = min_patches(model, prefix)
    ranked = {name: order.flatten().long().cpu() for name, order in orders.items()}
    for name, order in ranked.items():
        if sorted(order.tolist()) != list(range(n)):
            raise ValueError(f"order '{name}' is not a ranking of the {n} patch tokens")
    randoms = random_orders(n, seeds)
    all_orders = [*ranked.values(), *randoms]
    fractions, counts = step_counts(n, steps)
    curves = FaithfulnessCurves(target=target, fractions=fractions, seeds=len(seeds))
    for kind in ("deletion", "insertion"):
        rows: list[list[float]] = []
        for count in counts:
            keep = n - count if kind == "deletion" else count
            keep = min(max(keep, floor), n)
            # one batch per step: every order keeps the same number of tokens
            batch = torch.stack([keep_patches(tokens, prefix, order[n - keep:] if kind == "deletion" else order[:keep])
                                 for order in all_orders])
            probs = forward_tokens(model, batch).float().softmax(dim=-1)[:, target]  # (orders,)
            rows.append(probs.cpu().tolist())
        per_order = list(zip(*rows, strict=True))  # orders x steps
        named = getattr(curves, kind)
        for name, values in zip(ranked, per_order, strict=False):
            named[name] = list(values)
        if randoms:
            mean = torch.tensor(per_order[len(ranked):]).mean(dim=0)
            named[RANDOM] = mean.tolist()
    return curves


GRADIENT, ROLLOUT = "gradient_rollout", "rollout"


@dataclass
class ClassExplanation:
    """One image explained for one class: both maps over the patches and, when scored, their curves."""

    relevance: Any  # vitcli.explain.relevance.ClassRelevance for this image
    gradient_map: torch.Tensor  # (N,) gradient-weighted rollout, sums to 1 (all 0 when no relevance is positive)
    rollout_map: torch.Tensor  # (N,) plain rollout, sums to 1
    curves: FaithfulnessCurves | None = None

    @property
    def target(self) -> int:
        return int(self.relevance.target[0])

    @property
    def probability(self) -> float:
        return float(self.relevance.logits[0].softmax(dim=-1)[self.target])


def explain_class(model: nn.Module, x: torch.Tensor, prefix: int, query_tokens: tuple[int, ...],
                  target: int | None = None, *, steps: int | None = DEFAULT_STEPS, head_fusion: str = "mean",
                  discard_ratio: float = 0.0, seeds: tuple[int, ...] = RANDOM_SEEDS) -> ClassExplanation:
    """Gradient rollout and plain rollout of one image (1, C, H, W) for ``target`` (None: top-1), scored
    by deletion and insertion (``steps=None``: not scored)."""
    from vitcli.explain.relevance import gradient_rollout

    if steps is not None:
        require_token_pieces(model)  # refused before the backward pass, not after
    relevance = gradient_rollout(model, x, target, head_fusion=head_fusion, discard_ratio=discard_ratio)
    gradient_map, rollout_map = (m[0] for m in relevance.patch_maps(prefix, query_tokens))
    explained = ClassExplanation(relevance, gradient_map, rollout_map)
    if steps is not None:
        orders = {GRADIENT: rank_patches(gradient_map), ROLLOUT: rank_patches(rollout_map)}
        explained.curves = deletion_insertion(model, x, explained.target, orders, prefix=prefix, steps=steps,
                                              seeds=seeds)
    return explained
