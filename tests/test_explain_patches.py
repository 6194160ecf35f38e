"""vitcli.explain.patches: the `vitcli patches` job end to end, and the paper's findings on real DeiT-Tiny weights."""

from __future__ import annotations

import pytest
import torch

from conftest import DEIT_WEIGHTS, make_image, shared
from vitcli.explain.patches import PatchesOptions, default_out_dir, explain_image, load_token_model, mean_distance_over
from vitcli.explain.tokens import describe_tokens

# Object boxes (x0, y0, x1, y1) in the 224x224 DeiT input (resize 248, centre crop), read off the
# preprocessed images with a 16 px grid drawn over them.
BOXES = {
    "n02165456_ladybug.JPEG": (100, 100, 210, 185),
    "n02056570_king_penguin.JPEG": (40, 35, 165, 215),
    "n03063599_coffee_mug.JPEG": (45, 90, 180, 224),
    "n02279972_monarch.JPEG": (5, 65, 150, 224),
    "golden_retriever_puppy.jpg": (55, 30, 180, 224),
    "n01818515_macaw.JPEG": (80, 40, 215, 224),
}


def deit_options(**kwargs) -> PatchesOptions:
    if not DEIT_WEIGHTS.is_file():
        pytest.skip(f"shared data not available: {DEIT_WEIGHTS}")
    return PatchesOptions(model="deit_tiny_patch16_224", weights=DEIT_WEIGHTS, **kwargs)


def box_mask(box: tuple[int, int, int, int], grid: tuple[int, int], patch: int) -> torch.Tensor:
    """1 for the patches whose centre lies in the box."""
    x0, y0, x1, y1 = box
    ys = torch.arange(grid[0]) * patch + patch / 2
    xs = torch.arange(grid[1]) * patch + patch / 2
    return ((ys[:, None] >= y0) & (ys[:, None] < y1) & (xs[None, :] >= x0) & (xs[None, :] < x1)).float()


def test_default_out_dir():
    assert str(default_out_dir("photos/cat.jpg")) == "patches/cat"
    assert str(default_out_dir("/tmp/")) == "patches/tmp"


def test_a_folder_skips_unreadable_images_and_says_so(tiny_model_dir, tmp_path):
    for i in range(3):
        make_image(tmp_path / "imgs" / f"{i}.png", seed=i)
    (tmp_path / "imgs" / "3.jpg").write_bytes(b"garbage")

    report = explain_image(str(tmp_path / "imgs"), PatchesOptions(model=str(tiny_model_dir), figure7=True,
                                                                   batch_size=2, out_dir=tmp_path / "o"))

    assert report.images_averaged == 3
    assert any("skipped 1 unreadable" in note for note in report.notes)
    assert torch.tensor(report.mean_attention_distance).shape == (6, 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BOXES))
def test_deit_rollout_mass_falls_on_the_object(name, tmp_path):
    image = shared("images", name)

    # one drawn tile (layer 12, head 1) keeps the test on the rollout, which covers every layer anyway
    report = explain_image(str(image), deit_options(attention=True, layers=[12], heads=[1], out_dir=tmp_path))

    rollout = torch.tensor(report.rollout)  # (14, 14), sums to 1
    inside = box_mask(BOXES[name], report.layout.grid, 16)
    concentration = float((rollout * inside).sum() / inside.mean())  # mass in box / box's share of the image
    assert concentration > 1.0, f"{name}: {concentration:.2f}"
    assert report.predictions[0].index == _label_index(name)  # the attention explains a right answer


def _label_index(name: str) -> int:
    for line in shared("images", "LABELS.tsv").read_text().splitlines()[1:]:
        filename, index, *_ = line.split("\t")
        if filename == name:
            return int(index)
    raise KeyError(name)


@pytest.mark.slow
def test_deit_attends_further_in_the_last_third_of_layers():
    sources = [str(shared("images", name)) for name in sorted(BOXES)]
    loaded = load_token_model(deit_options())
    layout = describe_tokens(loaded.model, loaded.data_config["input_size"], "deit")

    distance, used = mean_distance_over(loaded.model, loaded.data_config, sources, layout, batch_size=4)

    assert used == len(sources) and distance.shape == (12, 3)
    per_layer = distance.mean(dim=1)
    assert per_layer[8:].mean() > per_layer[:4].mean(), per_layer.tolist()
