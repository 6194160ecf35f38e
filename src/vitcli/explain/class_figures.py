"""PNGs for `vitcli patches --explain`: the class map beside plain rollout, and the faithfulness curves.

The same look as ``vitcli.explain.figures`` (whose heatmap blend, colour scale and writer they use):
heatmaps over the preprocessed image at its aspect, a colour bar with units, titles that name the
model and the class. Never prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vitcli.charts import save_figure
from vitcli.explain.figures import HEAT_CMAP, blend_heat, heat_norm, image_inches, new_figure
from vitcli.explain.tokens import TokenLayout

METHOD_NAMES = {"gradient_rollout": "gradient rollout", "rollout": "rollout", "random": "random order"}
METHOD_STYLES = {"gradient_rollout": {"color": "#d62728", "linewidth": 2.2},
                 "rollout": {"color": "#1f77b4", "linewidth": 1.8},
                 "random": {"color": "#7f7f7f", "linewidth": 1.5, "linestyle": "--"}}


def save_explain(pixels: np.ndarray, rollout: Any, relevance: Any, layout: TokenLayout, label: str, index: int,
                 prob: float, head_fusion: str, source: str, path: Path) -> Path:
    """The model input, plain rollout and the gradient-weighted rollout for one class, side by side.

    Args:
        rollout, relevance: (rows, cols) maps over the patches, each summing to 1 (relevance may be all 0).
        label, index, prob: the class explained and its probability.
        source: the query rows read, in words ("the CLS row").
    """
    from matplotlib.cm import ScalarMappable

    h, w = pixels.shape[:2]
    width, height = image_inches(pixels, 4.2)
    fig = new_figure(3 * width + 2.4, height + 1.5)
    axes = fig.subplots(1, 3)
    axes[0].imshow(pixels, interpolation="nearest")
    axes[0].set_title("model input", fontsize=10)
    panels = ((axes[1], rollout, f"rollout (heads: {head_fusion}): any class"),
              (axes[2], relevance, f"gradient rollout: class '{label}'"))
    for ax, values, title in panels:
        values = np.asarray(values, dtype=np.float64) * layout.num_patches  # x uniform share
        norm = heat_norm(values)
        ax.imshow(blend_heat(pixels, values, layout, norm, (h, w)), interpolation="nearest")
        ax.set_title(title, fontsize=10)
        fig.colorbar(ScalarMappable(norm=norm, cmap=HEAT_CMAP), ax=ax, shrink=0.85,
                     label="share / uniform share (1 = even)")
        if not values.any():
            ax.text(0.5, 0.5, "no patch has positive relevance", ha="center", va="center", color="white",
                    fontsize=10, transform=ax.transAxes)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{layout.model}: why '{label}' (class {index}, p = {prob:.1%})?\n"
                 f"gradient-weighted attention rollout (Chefer et al. 2021) beside plain rollout of {source}, "
                 f"{layout.depth} layers, {layout.grid[0]}x{layout.grid[1]} tokens", fontsize=11)
    return save_figure(fig, path)


def save_faithfulness(curves: Any, layout: TokenLayout, label: str, path: Path) -> Path:
    """Deletion and insertion curves, one line per method, with each curve's area in the legend.

    Args:
        curves: vitcli.explain.faithfulness.FaithfulnessCurves.
        label: the class whose probability the curves record.
    """
    fig = new_figure(12.0, 4.8)
    panels = fig.subplots(1, 2, sharey=True)
    fractions = np.asarray(curves.fractions) * 100
    words = {"deletion": ("Deletion: most relevant patch tokens removed first", "patch tokens removed (%)",
                          "lower AUC = more faithful"),
             "insertion": ("Insertion: most relevant patch tokens added first", "patch tokens shown (%)",
                           "higher AUC = more faithful")}
    for ax, kind in zip(panels, ("deletion", "insertion"), strict=True):
        areas = curves.auc(kind)
        for method, probs in getattr(curves, kind).items():
            seeds = f", mean of {curves.seeds} seeds" if method == "random" else ""
            ax.plot(fractions, probs, marker="o", markersize=3, label=f"{METHOD_NAMES.get(method, method)}"
                    f"{seeds}: AUC {areas[method]:.3f}", **METHOD_STYLES.get(method, {}))
        title, xlabel, better = words[kind]
        ax.set_title(f"{title}\n({better})", fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_xlim(0, 100)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right" if kind == "deletion" else "lower right", fontsize=9)
    panels[0].set_ylabel(f"probability of '{label}'")
    panels[0].set_ylim(0, 1.02)
    kept = ", ".join(layout.prefix_names) or "no prefix tokens"
    fig.suptitle(f"{layout.model}: faithfulness for class '{label}' ({layout.num_patches} patch tokens, "
                 f"{len(curves.fractions) - 1} steps; position embeddings kept, {kept} always kept)", fontsize=11)
    return save_figure(fig, path)
