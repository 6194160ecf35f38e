"""vitcli.explain.figures: the PNGs of `vitcli patches` open, have the image's aspect and grow with what they show."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitcli.charts import DPI
from vitcli.explain import figures
from vitcli.explain.tokens import Stage, TokenLayout


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()
        return img.size


def layout(grid=(4, 6), patch=(16, 16), prefix=("CLS",), depth=3, heads=2) -> TokenLayout:
    return TokenLayout(model="test_model", input_size=(3, grid[0] * patch[0], grid[1] * patch[1]), patch_size=patch,
                       grid=grid, prefix_names=list(prefix), embed_dim=32, depth=depth, num_heads=heads,
                       stages=[Stage("total", "", "", 1)])


def pixels_for(t: TokenLayout) -> np.ndarray:
    return np.random.default_rng(0).random((t.input_size[1], t.input_size[2], 3))


def test_display_pixels_undo_the_normalisation():
    config = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
    image = torch.rand(3, 8, 10)
    x = (image - torch.tensor(config["mean"]).view(3, 1, 1)) / torch.tensor(config["std"]).view(3, 1, 1)

    pixels = figures.display_pixels(x, config)

    assert pixels.shape == (8, 10, 3)
    np.testing.assert_allclose(pixels, image.permute(1, 2, 0).numpy(), atol=1e-6)


def test_patch_grid_keeps_the_image_aspect(tmp_path):
    wide = layout(grid=(4, 8))
    square = layout(grid=(6, 6))

    w1, h1 = png_size(figures.save_patch_grid(pixels_for(wide), wide, tmp_path / "wide.png"))
    w2, h2 = png_size(figures.save_patch_grid(pixels_for(square), square, tmp_path / "square.png"))

    assert w1 > 1.3 * h1  # a 64x128 input is drawn wide (plus room for the title)
    assert 0.8 < w2 / h2 < 1.1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic: no temp files left


def test_patch_grid_of_a_fine_grid_still_draws(tmp_path):
    fine = layout(grid=(56, 56), patch=(4, 4))  # Swin's 3136 patches: numbers thinned out

    assert png_size(figures.save_patch_grid(pixels_for(fine), fine, tmp_path / "fine.png"))[0] > 500


def test_token_strip_shows_prefix_then_patches_and_elides_long_sequences(tmp_path):
    short = layout(grid=(2, 3), prefix=("CLS", "DIST"))
    long = layout(grid=(14, 14), prefix=("CLS", "REG1", "REG2", "REG3", "REG4"))

    w_short, _ = png_size(figures.save_token_strip(pixels_for(short), short, tmp_path / "short.png"))
    w_long, h_long = png_size(figures.save_token_strip(pixels_for(long), long, tmp_path / "long.png"))

    assert w_long > w_short
    assert w_long < 0.6 * figures.STRIP_MAX_TOKENS * 120 + 200  # elided: not 201 tokens wide
    assert w_long > 4 * h_long


def test_attention_grid_grows_with_layers_and_heads(tmp_path):
    t = layout(depth=4, heads=3)
    maps = torch.rand(4, 3, *t.grid)
    maps = maps / maps.sum(dim=(-2, -1), keepdim=True)

    all_size = png_size(figures.save_attention_grid(pixels_for(t), maps, [1, 2, 3, 4], [1, 2, 3], t, "the CLS row",
                                                    tmp_path / "all.png"))
    one_size = png_size(figures.save_attention_grid(pixels_for(t), maps[2:3, 1:2], [3], [2], t, "the CLS row",
                                                    tmp_path / "one.png"))
    row_size = png_size(figures.save_attention_grid(pixels_for(t), maps[:1], [1], [1, 2, 3], t, "the CLS row",
                                                    tmp_path / "row.png"))

    assert all_size[1] > row_size[1]  # four layers are taller than one
    assert one_size[0] > 600  # a single map is drawn large
    assert row_size[0] > row_size[1]


def test_rollout_figure(tmp_path):
    t = layout()
    rollout = torch.rand(t.grid)
    rollout = rollout / rollout.sum()

    width, height = png_size(figures.save_rollout(pixels_for(t), rollout, t, "mean", 0.9, "the CLS row", None,
                                                  tmp_path / "rollout.png"))
    assert width > 1.5 * height  # image and heatmap side by side


@pytest.mark.parametrize("messages", [False, True])
def test_figure7_draws_three_panels_or_messages(tmp_path, messages):
    t = layout(grid=(3, 3))
    if messages:
        components, similarity, distance = "no RGB filters", "no position embeddings", "no attention map"
    else:
        components = torch.randn(28, 3, 16, 16)
        unit = torch.nn.functional.normalize(torch.randn(9, 8), dim=-1)
        similarity = (unit @ unit.T).reshape(3, 3, 3, 3)
        distance = torch.rand(3, 2) * 40

    width, height = png_size(figures.save_figure7(components, similarity, distance, t, 5, tmp_path / "f7.png"))

    assert (width, height) == (17 * DPI, 6 * DPI)


# --------------------------------------------------------------- content: what is drawn where


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The matplotlib Figures the figures module saves (to read back what was drawn, and where)."""
    figs: list = []
    real = figures.save_figure

    def keep(fig, path):
        figs.append(fig)
        return real(fig, path)

    monkeypatch.setattr(figures, "save_figure", keep)
    return figs


def png_pixel(path: Path, fig, ax, x: float, y: float) -> tuple[int, ...]:
    """The PNG's RGB pixel at data point (x, y) of ``ax`` (figure-fraction coordinates do not depend on DPI)."""
    fx, fy = fig.transFigure.inverted().transform(ax.transData.transform((x, y)))
    with Image.open(path) as img:
        rgb = img.convert("RGB")
        return rgb.getpixel((int(fx * rgb.width), int((1 - fy) * rgb.height)))


def hot_map(t: TokenLayout, row: int, col: int) -> torch.Tensor:
    heat = torch.zeros(t.grid)
    heat[row, col] = 1.0  # all of the attention on one patch
    return heat


def test_attention_heatmap_lights_the_hot_patch_in_the_png_and_nothing_else(tmp_path, drawn):
    t = layout(grid=(4, 6))  # not square: a transposed map cannot land on the same patch
    black = np.zeros((64, 96, 3))
    path = figures.save_attention_grid(black, hot_map(t, 1, 4)[None, None], [2], [1], t, "the CLS row",
                                       tmp_path / "one.png")
    fig = drawn[0]
    ax = fig.axes[0]

    def at(row: int, col: int) -> tuple[int, ...]:
        top, left, bottom, right = t.patch_box(row * t.grid[1] + col)
        return png_pixel(path, fig, ax, (left + right) / 2, (top + bottom) / 2)

    assert sum(at(1, 4)) > 250  # inferno's top colour, blended over black
    for row, col in [(1, 1), (4 - 1 - 1, 4), (0, 0), (3, 5), (2, 3)]:  # mirrored, flipped, corners, elsewhere
        assert sum(at(row, col)) < 40, (row, col)
    assert "layer 2, head 1" in ax.get_title()


def test_rollout_heatmap_lights_the_hot_patch_beside_the_untouched_image(tmp_path, drawn):
    t = layout(grid=(4, 6))
    pixels = np.zeros((64, 96, 3))
    pixels[:, :, 2] = 1.0  # a blue image
    path = figures.save_rollout(pixels, hot_map(t, 3, 0), t, "mean", 0.9, "the CLS row", None, tmp_path / "r.png")
    fig = drawn[0]
    left, right = fig.axes[:2]
    centre = (8, 3 * 16 + 8)  # patch (3, 0): bottom left
    r, g, b = png_pixel(path, fig, right, *centre)
    assert r > 150 and g > 150  # yellow over blue
    assert png_pixel(path, fig, right, 8, 8)[:2] < (40, 40)  # patch (0, 0), the vertical flip: still blue
    assert png_pixel(path, fig, left, *centre) == (0, 0, 255)  # the input panel is the image itself


def test_patch_numbers_sit_on_their_patches_in_reading_order(tmp_path, drawn):
    t = layout(grid=(3, 5))
    figures.save_patch_grid(pixels_for(t), t, tmp_path / "grid.png")
    ax = drawn[0].axes[0]
    numbers = {int(text.get_text()): text.get_position() for text in ax.texts if text.get_text().isdigit()}
    assert sorted(numbers) == list(range(15))
    for k, (x, y) in numbers.items():
        top, left, bottom, right = t.patch_box(k)
        assert (x, y) == ((left + right) / 2, (top + bottom) / 2)
    assert numbers[1][0] > numbers[0][0] and numbers[1][1] == numbers[0][1]  # left to right
    assert numbers[5][1] > numbers[4][1] and numbers[5][0] == numbers[0][0]  # then the next row down


def test_token_strip_draws_the_prefix_then_each_patch_in_token_order(tmp_path, drawn):
    t = layout(grid=(2, 3), prefix=("CLS", "DIST"))
    pixels = pixels_for(t)
    figures.save_token_strip(pixels, t, tmp_path / "strip.png")
    ax = drawn[0].axes[0]
    below = sorted((text.get_position()[0], text.get_text()) for text in ax.texts if text.get_position()[1] < 0)
    assert [label for _, label in below] == ["t0", "t1", "0", "1", "2", "3", "4", "5"]
    crops = sorted(ax.images, key=lambda image: image.get_extent()[0])
    assert len(crops) == 6
    for k, image in enumerate(crops):
        row, col = divmod(k, 3)  # reading order over the 2x3 grid of 16 px patches
        expected = pixels[16 * row:16 * (row + 1), 16 * col:16 * (col + 1)]
        np.testing.assert_array_equal(np.asarray(image.get_array()), expected)
        assert image.get_extent()[0] == pytest.approx(2 + k)  # slot 2 + k: after the two prefix tokens
