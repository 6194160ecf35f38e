"""Patch grid and token arithmetic for any timm ViT, plus the embeddings the ViT paper's Fig. 7 reads.

"An image is worth 16x16 words": the input (C, H, W) is cut into a grid of P x P patches, each
flattened to P*P*C values and projected to D; prefix tokens (CLS, DeiT's distillation token,
registers) are put in front, so the sequence has T = prefix + N tokens. The grid is read from the
input actually fed to the model (``patch_embed.dynamic_feat_size``), never from ``grid_size``,
which keeps the pretraining grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from vitcli.errors import NotATransformerError


@dataclass(frozen=True)
class Stage:
    """One row of the arithmetic table."""

    name: str
    shape: str  # what comes out, e.g. "196 x 768"
    detail: str
    params: int


@dataclass
class TokenLayout:
    """How one model turns one input size into tokens."""

    model: str
    input_size: tuple[int, int, int]  # (C, H, W) fed to the model
    patch_size: tuple[int, int]  # input pixels per token (the effective stride for hybrids)
    grid: tuple[int, int]  # (rows, cols) of tokens
    prefix_names: list[str]  # in sequence order: "CLS", "DIST", "REG1", ...
    embed_dim: int
    depth: int
    num_heads: int | None
    hybrid: bool = False
    hierarchical: bool = False  # Swin-like: tokens are merged between stages
    stages: list[Stage] = field(default_factory=list)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def prefix_tokens(self) -> int:
        return len(self.prefix_names)

    @property
    def sequence_length(self) -> int:
        return self.prefix_tokens + self.num_patches

    @property
    def patch_values(self) -> int:
        """P*P*C values in one patch (for hybrids: values of one ResNet feature cell)."""
        return self.patch_size[0] * self.patch_size[1] * self.input_size[0]

    @property
    def query_tokens(self) -> tuple[int, ...]:
        """Rows whose attention explains the prediction: CLS (and DIST); none for pooled models."""
        return tuple(i for i, n in enumerate(self.prefix_names) if n in ("CLS", "DIST"))

    @property
    def registers(self) -> int:
        return sum(n.startswith("REG") for n in self.prefix_names)

    def patch_box(self, index: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) input pixels of patch ``index`` (token order: row by row)."""
        row, col = divmod(index, self.grid[1])
        ph, pw = self.patch_size
        return row * ph, col * pw, (row + 1) * ph, (col + 1) * pw


def is_token_model(model: nn.Module) -> bool:
    """Whether the model cuts its input into patch tokens (a ViT, DeiT, hybrid, Swin, ...)."""
    embed = getattr(model, "patch_embed", None)
    return embed is not None and hasattr(embed, "patch_size")


def require_token_model(model: nn.Module, name: str) -> None:
    if not is_token_model(model):
        raise NotATransformerError(
            f"'{name}' ({type(model).__name__}) is a convolutional network: it has no patch tokens to show; "
            "use a ViT such as deit_tiny_patch16_224, vit_base_patch16_224 or vit_base_r50_s16_224")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The attention blocks in depth order (``model.blocks``, else every module with an ``attn``)."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Module):
        return list(blocks)
    return [m for m in model.modules() if isinstance(getattr(m, "attn", None), nn.Module)]


def token_grid(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of patch tokens for an input of this size, as the model's own patch embedding computes it."""
    embed = model.patch_embed
    if hasattr(embed, "dynamic_feat_size"):
        rows, cols = embed.dynamic_feat_size((height, width))
        return int(rows), int(cols)
    ph, pw = _pair(embed.patch_size)
    return height // ph, width // pw


def prefix_names(model: nn.Module) -> list[str]:
    """Names of the prefix tokens in the order ``_pos_embed`` concatenates them."""
    names = ["CLS"] if getattr(model, "cls_token", None) is not None else []
    if getattr(model, "dist_token", None) is not None:
        names.append("DIST")
    reg = getattr(model, "reg_token", None)
    names += [f"REG{i + 1}" for i in range(reg.shape[1] if reg is not None else 0)]
    declared = getattr(model, "num_prefix_tokens", len(names))
    if declared != len(names):  # a family with prefix tokens this function does not know by name
        names += [f"PREFIX{i + 1}" for i in range(len(names), declared)]
    return names


def describe_tokens(model: nn.Module, input_size: tuple[int, int, int], name: str) -> TokenLayout:
    """The token layout and the parameter count of each stage for ``model`` fed (C, H, W)."""
    require_token_model(model, name)
    channels, height, width = (int(v) for v in input_size)
    embed = model.patch_embed
    hybrid = getattr(embed, "backbone", None) is not None
    patch = _hybrid_stride(embed) if hybrid else _pair(embed.patch_size)
    grid = token_grid(model, height, width)
    blocks = transformer_blocks(model)
    attn = getattr(blocks[0], "attn", None) if blocks else None
    heads = getattr(attn, "num_heads", None)
    dim = int(getattr(model, "embed_dim", 0) or getattr(model, "num_features", 0))
    layout = TokenLayout(model=name, input_size=(channels, height, width), patch_size=patch, grid=grid,
                         prefix_names=prefix_names(model), embed_dim=dim, depth=len(blocks),
                         num_heads=int(heads) if heads else None, hybrid=hybrid,
                         hierarchical=not isinstance(getattr(model, "blocks", None), nn.Module))
    layout.stages = _stages(model, layout, blocks)
    return layout


def _hybrid_stride(embed: nn.Module) -> tuple[int, int]:
    """Input pixels between neighbouring tokens of a hybrid: the backbone's reduction x the projection's patch."""
    info = getattr(embed.backbone, "feature_info", None)
    ph, pw = _pair(embed.patch_size)
    if info:  # timm's feat_ratio is img_size // feature_size, off by one when the input is no multiple of the stride
        reduction = int(info[-1]["reduction"])
        return reduction * ph, reduction * pw
    return _pair(embed.feat_ratio(as_scalar=False))


def _stages(model: nn.Module, t: TokenLayout, blocks: list[nn.Module]) -> list[Stage]:
    embed = model.patch_embed
    ph, pw = t.patch_size
    c = t.input_size[0]
    embed_params = _count(embed)
    prefix_params = sum(p.numel() for n, p in model.named_parameters(recurse=False)
                        if n in ("cls_token", "dist_token", "reg_token", "pos_embed"))
    total = _count(model)
    head_params = sum(_count(m) for n, m in model.named_children()
                      if n in ("norm", "fc_norm", "head", "head_dist", "attn_pool", "head_drop"))
    block_params = total - embed_params - prefix_params - head_params  # blocks (and Swin's patch merging)
    if t.hybrid:
        cells = f"{t.grid[0]} x {t.grid[1]} ResNet feature cells, stride {ph} px (overlapping receptive fields)"
        proj = f"ResNet stem + stages, then a {_pair(embed.patch_size)[0]}x{_pair(embed.patch_size)[1]} " \
               f"projection to D={t.embed_dim}"
    else:
        cells = f"{t.grid[0]} x {t.grid[1]} = {t.num_patches} patches of {ph}x{pw}x{c} = {t.patch_values} values"
        proj = f"linear {t.patch_values} -> {t.embed_dim} (a {ph}x{pw} conv with stride {ph})"
    prefix = " + ".join(_prefix_summary(t.prefix_names)) or "no prefix tokens"
    has_pos = getattr(model, "pos_embed", None) is not None
    stages = [
        Stage("input", f"{c} x {t.input_size[1]} x {t.input_size[2]}", "after the model's resize and crop", 0),
        Stage("patches", f"{t.num_patches} x {t.patch_values}", cells, 0),
        Stage("patch embedding", f"{t.num_patches} x {t.embed_dim}", proj, embed_params),
        Stage("+ prefix tokens", f"{t.sequence_length} x {t.embed_dim}",
              f"{prefix}{' + learned position embeddings' if has_pos else ''}; T = {t.prefix_tokens} + "
              f"{t.num_patches} = {t.sequence_length}", prefix_params),
    ]
    per_block = f" ({_count(blocks[0]) / 1e6:.2f}M each)" if blocks else ""
    heads = f" of {t.num_heads} heads (head dim {t.embed_dim // t.num_heads})" if t.num_heads else ""
    note = "; hierarchical: tokens are merged between stages" if t.hierarchical else ""
    stages.append(Stage("transformer", f"{t.sequence_length} x {t.embed_dim}",
                        f"{t.depth} blocks{heads}{per_block}{note}", block_params))
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    pool = getattr(model, "global_pool", "")
    reads = {"token": "the CLS token", "avg": "the mean of the patch tokens", "map": "an attention-pool query"}
    source = reads.get(pool, str(pool) or "the pooled features")
    if "DIST" in t.prefix_names:
        source = "CLS and DIST tokens (two heads, averaged)"
    stages.append(Stage("head", str(num_classes) if num_classes else "features",
                        f"final norm + {source} -> {num_classes or 'no'} classes", head_params))
    stages.append(Stage("total", "", "", total))
    return stages


def _prefix_summary(names: list[str]) -> list[str]:
    regs = sum(n.startswith("REG") for n in names)
    parts = [n for n in names if not n.startswith("REG")]
    return parts + ([f"{regs} register{'s' if regs > 1 else ''}"] if regs else [])


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[-1])


# ---------------------------------------------------------------------------- Fig. 7, left and centre


def embedding_components(model: nn.Module, count: int = 28) -> torch.Tensor:
    """Top principal components of the patch-embedding filters: (k, C, P, P), orthonormal as vectors.

    The D filters of the patch projection are vectors of P*P*C values; their principal components
    (right singular vectors of the centred (D, P*P*C) matrix) are what Fig. 7 (left) draws.
    Raises NotATransformerError for hybrids, whose projection reads ResNet features, not RGB.
    """
    embed = model.patch_embed
    if getattr(embed, "backbone", None) is not None:
        raise NotATransformerError("a hybrid ViT projects ResNet feature cells, not RGB pixels, "
                                   "so it has no RGB patch filters to show")
    proj = getattr(embed, "proj", None)
    weight = getattr(proj, "weight", None)
    if weight is None or weight.dim() != 4:
        raise NotATransformerError(f"{type(model).__name__} has no convolutional patch projection to decompose")
    d = weight.shape[0]
    flat = weight.detach().float().reshape(d, -1)  # (D, C*P*P)
    flat = flat - flat.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)  # rows of vh: components, by variance
    k = min(count, vh.shape[0])
    return vh[:k].reshape(k, *weight.shape[1:])  # (k, C, P, P)


def position_similarity(model: nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """Cosine similarity between the learned position embeddings of every pair of patches.

    Returns (rows, cols, rows, cols): ``sim[i, j]`` is the map of patch (i, j) against every patch.
    The grid is ``grid`` when the embeddings were resampled to it, else the model's own
    (``dynamic_img_size`` models resample on the fly and store the pretraining grid).
    Raises NotATransformerError when the model has no learned absolute position embeddings.
    """
    pos = getattr(model, "pos_embed", None)
    if not isinstance(pos, torch.Tensor) or pos.dim() != 3:
        raise NotATransformerError(f"{type(model).__name__} has no learned absolute position embeddings "
                                   "(it uses relative bias, RoPE or none), so there is no similarity map to show")
    emb = pos.detach().float()[0]  # (prefix + N, D) or (N, D) with no_embed_class
    if not getattr(model, "no_embed_class", False):
        emb = emb[getattr(model, "num_prefix_tokens", 0):]  # prefix rows removed
    n = emb.shape[0]
    if n != grid[0] * grid[1]:
        grid = _pair(getattr(model.patch_embed, "grid_size", (math.isqrt(n), math.isqrt(n))))
    if n != grid[0] * grid[1]:
        raise NotATransformerError(f"{n} position embeddings do not form a {grid[0]}x{grid[1]} grid")
    unit = torch.nn.functional.normalize(emb, dim=-1)
    return (unit @ unit.T).reshape(grid[0], grid[1], grid[0], grid[1])
