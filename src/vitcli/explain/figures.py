"""PNGs for `vitcli patches`: the patch grid, the token strip, attention heatmaps, rollout, Fig. 7.

One look with ``vitcli.charts``: matplotlib's object API on the Agg canvas (no pyplot state), the
same DPI and atomic writes (``charts.save_figure``). Heatmaps are blended over the preprocessed image at
its own aspect, every heatmap has a colour bar with units and every title names the model (and the
layer and head where there is one). Never prints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vitcli.charts import save_figure
from vitcli.explain.tokens import TokenLayout

HEAT_CMAP = "inferno"
HEAT_ALPHA = 0.6
STRIP_MAX_TOKENS = 30  # a longer sequence is drawn with an ellipsis in the middle
SIMILARITY_MAX_SIDE = 16  # Fig. 7 centre: at most 16 x 16 small maps (the paper's ViT-L/32 has 7 x 7)


def display_pixels(x: Any, data_config: dict[str, Any]) -> np.ndarray:
    """The model input (C, H, W), normalised as the model sees it -> (H, W, 3) RGB in [0, 1]."""
    arr = x.detach().float().cpu().numpy()
    mean = np.asarray(data_config.get("mean", (0.0,) * arr.shape[0]), dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(data_config.get("std", (1.0,) * arr.shape[0]), dtype=np.float32).reshape(-1, 1, 1)
    arr = np.clip(arr * std + mean, 0.0, 1.0)
    if arr.shape[0] == 1:
        arr = np.repeat(arr, 3, axis=0)
    return arr[:3].transpose(1, 2, 0)


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure (object API, constrained layout), for ``save_figure``."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def image_inches(pixels: np.ndarray, longest: float = 7.0) -> tuple[float, float]:
    """(width, height) in inches for an image drawn with its longest side ``longest`` inches."""
    h, w = pixels.shape[:2]
    return (longest, longest * h / w) if w >= h else (longest * w / h, longest)


def _grid_words(layout: TokenLayout) -> str:
    (ph, pw), (rows, cols) = layout.patch_size, layout.grid
    if layout.hybrid:
        return f"{rows}x{cols} ResNet feature cells, stride {ph} px (receptive fields overlap)"
    return f"{rows}x{cols} grid of {ph}x{pw} patches, N = {layout.num_patches}"


# ------------------------------------------------------------------------------- patches, tokens


def save_patch_grid(pixels: np.ndarray, layout: TokenLayout, path: Path) -> Path:
    """The preprocessed image with the patch boundaries drawn and each patch numbered in token order."""
    from matplotlib import patheffects

    h, w = pixels.shape[:2]
    (ph, pw), (rows, cols) = layout.patch_size, layout.grid
    width, height = image_inches(pixels)
    fig = new_figure(width, height + 1.0)
    ax = fig.subplots()
    ax.imshow(pixels, extent=(0, w, h, 0), interpolation="nearest")
    line = 0.8 if max(rows, cols) <= 40 else 0.4
    for r in range(rows + 1):
        ax.axhline(r * ph, color="white", linewidth=line, alpha=0.9)
    for c in range(cols + 1):
        ax.axvline(c * pw, color="white", linewidth=line, alpha=0.9)
    cell_points = min(pw / w * width, ph / h * height) * 72  # a cell's side in points
    digits = len(str(layout.num_patches - 1))
    fontsize = min(10.0, cell_points * 0.9 / max(digits, 2) * 1.6)
    outline = [patheffects.withStroke(linewidth=1.5, foreground="black")]
    if fontsize >= 5.5:
        cells = range(layout.num_patches)
    else:  # too small to read: number the first patch of each row and column, spaced apart enough to read
        fontsize = 6.0
        step_r = math.ceil(9.0 / cell_points)
        step_c = math.ceil(fontsize * 0.65 * len(str(cols)) * 1.4 / cell_points)
        cells = sorted({r * cols for r in range(0, rows, step_r)} | set(range(0, cols, step_c)))
    for index in cells:
        top, left, bottom, right = layout.patch_box(index)
        ax.text((left + right) / 2, (top + bottom) / 2, str(index), ha="center", va="center", color="white",
                fontsize=fontsize, path_effects=outline)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xlabel("x (pixels of the model input)")
    ax.set_ylabel("y (pixels)")
    ax.set_title(f"{layout.model}: {layout.input_size[1]}x{layout.input_size[2]} input\n{_grid_words(layout)}\n"
                 "numbered in token order (left to right, top to bottom)", fontsize=10)
    return save_figure(fig, path)


def save_token_strip(pixels: np.ndarray, layout: TokenLayout, path: Path) -> Path:
    """The token sequence: prefix tokens, then the patches in order (the middle elided when long)."""
    from matplotlib.patches import Rectangle

    n = layout.num_patches
    budget = max(STRIP_MAX_TOKENS - layout.prefix_tokens, 8)
    shown: list[int | None] = list(range(n)) if n <= budget else [*range(budget - 5), None, *range(n - 4, n)]
    slots = layout.prefix_names + shown  # str: prefix token; int: patch; None: ellipsis
    fig = new_figure(max(6.0, 0.52 * len(slots) + 0.6), 1.9)
    ax = fig.subplots()
    colours = {"CLS": "#d62728", "DIST": "#9467bd"}
    for k, slot in enumerate(slots):
        if isinstance(slot, str):
            ax.add_patch(Rectangle((k, 0), 0.9, 0.9, color=colours.get(slot, "#7f7f7f")))
            ax.text(k + 0.45, 0.45, slot, ha="center", va="center", color="white", fontsize=7, fontweight="bold")
            ax.text(k + 0.45, -0.25, f"t{k}", ha="center", va="center", fontsize=7, color="#555555")
        elif slot is None:
            ax.text(k + 0.45, 0.45, "...", ha="center", va="center", fontsize=14)
        else:
            top, left, bottom, right = layout.patch_box(slot)
            ax.imshow(pixels[top:bottom, left:right], extent=(k, k + 0.9, 0, 0.9), interpolation="nearest")
            ax.text(k + 0.45, -0.25, str(slot), ha="center", va="center", fontsize=7)
    ax.set_xlim(-0.2, len(slots))
    ax.set_ylim(-0.5, 1.0)
    ax.set_aspect("equal")
    ax.axis("off")
    prefix = f"{layout.prefix_tokens} prefix ({', '.join(layout.prefix_names)})" if layout.prefix_names else "no prefix"
    order = f"; patch k is token t(k+{layout.prefix_tokens})" if layout.prefix_tokens else ""
    ax.set_title(f"{layout.model}: token sequence, T = {prefix} + {n} patches = {layout.sequence_length}\n"
                 f"prefix tokens first, then the patches in reading order{order}", fontsize=10)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------- attention


def blend_heat(pixels: np.ndarray, heat: np.ndarray, layout: TokenLayout, norm: Any,
               size: tuple[int, int]) -> np.ndarray:
    """The image resized to ``size`` (h, w) with a (rows, cols) heatmap blended over its patches."""
    from matplotlib import colormaps
    from PIL import Image

    h, w = pixels.shape[:2]
    th, tw = size
    base = np.asarray(Image.fromarray((pixels * 255).astype(np.uint8)).resize((tw, th), Image.BILINEAR)) / 255.0
    ys = (np.arange(th) + 0.5) * h / th // layout.patch_size[0]  # the patch row under each output pixel
    xs = (np.arange(tw) + 0.5) * w / tw // layout.patch_size[1]
    inside = (ys[:, None] < layout.grid[0]) & (xs[None, :] < layout.grid[1])
    up = heat[np.minimum(ys, layout.grid[0] - 1).astype(int)][:, np.minimum(xs, layout.grid[1] - 1).astype(int)]
    rgb = colormaps[HEAT_CMAP](norm(up))[..., :3]
    alpha = np.where(inside, HEAT_ALPHA, 0.0)[..., None]
    return base * (1 - alpha) + rgb * alpha


def heat_norm(values: np.ndarray) -> Any:
    """Colour scale for maps in units of the uniform share: 0 to the 99.5th percentile (at least 2)."""
    from matplotlib.colors import Normalize

    return Normalize(vmin=0.0, vmax=max(float(np.percentile(values, 99.5)), 2.0))  # uniform (1) stays mid-scale


def save_attention_grid(pixels: np.ndarray, maps: Any, layers: Sequence[int], heads: Sequence[int],
                        layout: TokenLayout, source: str, path: Path) -> Path:
    """Attention of the query token(s) to each patch, one tile per (layer, head), over the image.

    Args:
        maps: (len(layers), len(heads), rows, cols), each map summing to 1 over the patches.
        layers, heads: the 1-based numbers of the rows and columns.
        source: what the query is, in words ("the CLS row").
    """
    from matplotlib.cm import ScalarMappable

    values = np.asarray(maps, dtype=np.float64) * layout.num_patches  # x uniform: 1 = attention spread evenly
    n_rows, n_cols = values.shape[:2]
    h, w = pixels.shape[:2]
    tile_w = int(min(w, max(96, 1400 // max(n_cols, 1))))
    tile_h = max(1, round(tile_w * h / w))
    gap = 4
    norm = heat_norm(values)
    mosaic = np.ones((n_rows * (tile_h + gap) - gap, n_cols * (tile_w + gap) - gap, 3))
    for i in range(n_rows):
        for j in range(n_cols):
            y, x = i * (tile_h + gap), j * (tile_w + gap)
            mosaic[y:y + tile_h, x:x + tile_w] = blend_heat(pixels, values[i, j], layout, norm, (tile_h, tile_w))
    # inches per tile: large for one map, at most 14 in of tiles across and 18 in down (ViT-B: 12 x 12 tiles)
    tile_in = 5.5 if n_rows * n_cols == 1 else min(1.8, 14.0 / n_cols, 18.0 / (n_rows * h / w))
    fig = new_figure(n_cols * tile_in + 3.2, max(n_rows * tile_in * h / w + 1.3, 4.0))  # room for the colour bar
    ax = fig.subplots()
    ax.imshow(mosaic, interpolation="bilinear" if n_rows * n_cols > 1 else "nearest")
    ax.set_xticks([j * (tile_w + gap) + tile_w / 2 for j in range(n_cols)], [f"head {k}" for k in heads])
    ax.set_yticks([i * (tile_h + gap) + tile_h / 2 for i in range(n_rows)], [f"layer {k}" for k in layers])
    ax.tick_params(length=0, labelsize=9, labeltop=True, labelbottom=False)
    if n_rows * n_cols == 1:  # the title names the layer and head
        ax.set_xticks([])
        ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.colorbar(ScalarMappable(norm=norm, cmap=HEAT_CMAP), ax=ax, shrink=0.6 if n_rows > 2 else 0.9,
                 label="share / uniform share (1 = even)")
    which = (f"layer{'s' if n_rows > 1 else ''} {_span(layers)}, "
             f"head{'s' if n_cols > 1 else ''} {_span(heads)}")
    ax.set_title(f"{layout.model}: attention of {source} to each patch\n{which}", fontsize=10)
    return save_figure(fig, path)


def save_rollout(pixels: np.ndarray, rollout: Any, layout: TokenLayout, head_fusion: str, discard_ratio: float,
                 source: str, top1: Any, path: Path) -> Path:
    """The preprocessed image beside its attention rollout (Abnar & Zuidema 2020) over all layers."""
    from matplotlib.cm import ScalarMappable

    values = np.asarray(rollout, dtype=np.float64) * layout.num_patches
    h, w = pixels.shape[:2]
    norm = heat_norm(values)
    width, height = image_inches(pixels, 5.0)
    fig = new_figure(2 * width + 1.4, height + 1.2)
    left, right = fig.subplots(1, 2)
    left.imshow(pixels, interpolation="nearest")
    left.set_title("model input", fontsize=10)
    right.imshow(blend_heat(pixels, values, layout, norm, (h, w)), interpolation="nearest")
    discard = f", lowest {discard_ratio:.0%} discarded" if discard_ratio > 0 else ""
    right.set_title(f"rollout over {layout.depth} layers, {layout.grid[0]}x{layout.grid[1]} tokens "
                    f"(heads: {head_fusion}{discard})", fontsize=10)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(ScalarMappable(norm=norm, cmap=HEAT_CMAP), ax=right, shrink=0.9,
                 label="share / uniform share (1 = even)")
    prediction = f"\ntop-1: {top1.label} ({top1.prob:.1%})" if top1 is not None else ""
    fig.suptitle(f"{layout.model}: attention rollout of {source}{prediction}", fontsize=11)
    return save_figure(fig, path)


def _span(numbers: Sequence[int]) -> str:
    numbers = list(numbers)
    if len(numbers) > 2 and numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{numbers[0]}-{numbers[-1]}"
    return ",".join(map(str, numbers))


# --------------------------------------------------------------------------------------- Fig. 7


def _tiles(tiles: np.ndarray, per_row: int, gap: int = 1, fill: float = 1.0) -> np.ndarray:
    """(n, h, w[, 3]) tiles -> one mosaic image, ``per_row`` tiles to a row, ``gap`` pixels apart."""
    n, th, tw = tiles.shape[:3]
    rows = math.ceil(n / per_row)
    out = np.full((rows * (th + gap) - gap, per_row * (tw + gap) - gap, *tiles.shape[3:]), fill, dtype=np.float64)
    for k in range(n):
        r, c = divmod(k, per_row)
        out[r * (th + gap):r * (th + gap) + th, c * (tw + gap):c * (tw + gap) + tw] = tiles[k]
    return out


def _message(ax: Any, text: str, title: str) -> None:
    import textwrap

    ax.text(0.5, 0.5, textwrap.fill(text, 42), ha="center", va="center", fontsize=9, color="#444444",
            transform=ax.transAxes)
    ax.set_title(title, fontsize=10)
    ax.axis("off")


def save_figure7(components: Any, similarity: Any, distance: Any, layout: TokenLayout, images: int,
                 path: Path) -> Path:
    """The ViT paper's Fig. 7 for this model; a panel given as a str shows that message instead.

    Args:
        components: (k, C, P, P) principal components of the patch-embedding filters.
        similarity: (rows, cols, rows, cols) position-embedding cosine similarities.
        distance: (L, h) mean attention distance in input pixels.
        images: how many images ``distance`` averages.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    fig = new_figure(17.0, 6.0)
    left, centre, right = fig.subplots(1, 3, width_ratios=[1.0, 1.15, 1.0])
    if isinstance(components, str):
        _message(left, components, "RGB embedding filters")
    else:
        comp = np.asarray(components, dtype=np.float64)  # (k, C, P, P)
        lo, hi = comp.min(axis=(1, 2, 3), keepdims=True), comp.max(axis=(1, 2, 3), keepdims=True)
        comp = (comp - lo) / np.maximum(hi - lo, 1e-12)  # each filter stretched to the full range
        rgb = comp[:, :3] if comp.shape[1] >= 3 else np.repeat(comp[:, :1], 3, axis=1)  # grey for 1-channel input
        comp = rgb.transpose(0, 2, 3, 1)  # (k, P, P, 3)
        left.imshow(_tiles(comp, per_row=7, gap=max(1, comp.shape[1] // 8)), interpolation="nearest")
        left.set_title(f"RGB embedding filters\n(first {len(comp)} principal components)", fontsize=10)
        left.axis("off")
    if isinstance(similarity, str):
        _message(centre, similarity, "Position embedding similarity")
    else:
        sim = np.asarray(similarity, dtype=np.float64)  # (rows, cols, rows, cols)
        rows, cols = sim.shape[:2]
        # a grid over 16 a side would need more small maps than pixels to draw them: show evenly spaced patches
        pick_r = np.unique(np.linspace(0, rows - 1, min(rows, SIMILARITY_MAX_SIDE)).round().astype(int))
        pick_c = np.unique(np.linspace(0, cols - 1, min(cols, SIMILARITY_MAX_SIDE)).round().astype(int))
        gap = 1 if rows > 20 else 2
        chosen = sim[pick_r][:, pick_c].reshape(len(pick_r) * len(pick_c), rows, cols)
        mosaic = _tiles(chosen, per_row=len(pick_c), gap=gap, fill=np.nan)
        image = centre.imshow(mosaic, cmap="viridis", vmin=-1.0, vmax=1.0, interpolation="nearest")
        step = max(1, round(len(pick_c) / 8))
        centre.set_xticks([k * (cols + gap) + cols / 2 for k in range(0, len(pick_c), step)],
                          [str(pick_c[k] + 1) for k in range(0, len(pick_c), step)])
        step_r = max(1, round(len(pick_r) / 8))
        centre.set_yticks([k * (rows + gap) + rows / 2 for k in range(0, len(pick_r), step_r)],
                          [str(pick_r[k] + 1) for k in range(0, len(pick_r), step_r)])
        centre.set_xlabel("input patch column")
        centre.set_ylabel("input patch row")
        subset = "" if (len(pick_r), len(pick_c)) == (rows, cols) else \
            f", {len(pick_r)}x{len(pick_c)} of the {rows}x{cols} patches"
        centre.set_title(f"Position embedding similarity\n(each small map: one patch vs all{subset})", fontsize=10)
        fig.colorbar(image, ax=centre, shrink=0.8, label="cosine similarity")
    if isinstance(distance, str):
        _message(right, distance, "Mean attention distance")
    else:
        dist = np.asarray(distance, dtype=np.float64)  # (L, h)
        depth, heads = dist.shape
        norm = Normalize(vmin=1, vmax=max(heads, 2))
        for head in range(heads):
            right.scatter(np.arange(1, depth + 1), dist[:, head], s=18, color=_head_colour(norm(head + 1)),
                          alpha=0.85, edgecolors="none", label=f"head {head + 1}" if heads <= 8 else None)
        right.plot(np.arange(1, depth + 1), dist.mean(axis=1), color="#333333", linewidth=1, label="mean of heads")
        right.set_xlabel("network depth (layer)")
        right.set_ylabel("mean attention distance (pixels)")
        right.set_ylim(0, max(float(dist.max()) * 1.1, 1.0))
        right.xaxis.get_major_locator().set_params(integer=True)
        right.grid(True, alpha=0.3)
        right.legend(loc="lower right", fontsize=8, ncols=2 if heads > 4 else 1)
        plural = "s" if images != 1 else ""
        right.set_title(f"Mean attention distance\n({images} image{plural}; dots: heads)", fontsize=10)
        if heads > 8:  # too many for a legend
            bar = fig.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=right, shrink=0.8, label="head")
            bar.ax.yaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"{layout.model}: ViT paper Fig. 7 ({_grid_words(layout)})", fontsize=11)
    return save_figure(fig, path)


def _head_colour(value: float) -> Any:
    from matplotlib import colormaps

    return colormaps["viridis"](value)
