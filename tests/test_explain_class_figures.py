"""vitcli.explain.class_figures: explain.png puts the hot patch where it is; faithfulness.png has both panels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vitcli.explain.class_figures import save_explain, save_faithfulness
from vitcli.explain.faithfulness import FaithfulnessCurves
from vitcli.explain.tokens import TokenLayout


def layout(grid: tuple[int, int] = (4, 6)) -> TokenLayout:
    return TokenLayout(model="tiny_vit", input_size=(3, grid[0] * 16, grid[1] * 16), patch_size=(16, 16), grid=grid,
                       prefix_names=["CLS"], embed_dim=8, depth=2, num_heads=2)


def hot_pixels(png) -> np.ndarray:
    """(y, x) of the pixels in the colour map's top (bright yellow) colour blended over mid-grey."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mask = (r > 185) & (g > 185) & (b < 175) & (r - b > 35)
    return np.argwhere(mask)


def test_explain_png_shows_the_hot_patch_in_the_class_panel_at_its_place(tmp_path):
    t = layout()
    pixels = np.full((64, 96, 3), 0.5)
    flat = np.full(t.grid, 1 / 24)  # plain rollout: even
    hot = np.zeros(t.grid)
    hot[3, 5] = 1.0  # bottom-right patch

    png = save_explain(pixels, flat, hot, t, "dog", 1, 0.87, "mean", "the CLS row", tmp_path / "explain.png")

    width, height = Image.open(png).size
    assert width > 2.5 * height  # three panels side by side at the image's aspect
    ys, xs = hot_pixels(png).T
    low = ys > height * 0.5  # the colour bars' yellow is at their top; the hot patch is at the bottom
    assert low.sum() > 100
    # in the right-hand panel, right of its centre; nothing hot in the even rollout panel
    assert xs[low].min() > width * 0.55 and np.median(xs[low]) > width * 0.7


def test_explain_png_says_when_no_patch_has_positive_relevance(tmp_path):
    t = layout((2, 2))
    png = save_explain(np.full((32, 32, 3), 0.5), np.full((2, 2), 0.25), np.zeros((2, 2)), t, "cat", 0, 0.5, "max",
                       "the CLS row", tmp_path / "e.png")
    assert Image.open(png).size[0] > 0


def test_faithfulness_png_has_a_deletion_and_an_insertion_panel(tmp_path):
    curves = FaithfulnessCurves(target=1, fractions=[0, 0.5, 1.0], seeds=3,
                                deletion={"gradient_rollout": [0.9, 0.1, 0.0], "rollout": [0.9, 0.4, 0.0],
                                          "random": [0.9, 0.6, 0.0]},
                                insertion={"gradient_rollout": [0.0, 0.8, 0.9], "rollout": [0.0, 0.5, 0.9],
                                           "random": [0.0, 0.3, 0.9]})
    assert curves.auc("deletion")["gradient_rollout"] == pytest.approx(0.275)

    png = save_faithfulness(curves, layout(), "dog", tmp_path / "f.png")

    width, height = Image.open(png).size
    assert width > 2 * height
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    red = (rgb[..., 0] > 180) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)  # the gradient rollout lines
    xs = np.argwhere(red)[:, 1]
    assert (xs < width / 2).sum() > 50 and (xs > width / 2).sum() > 50  # drawn in both panels
