"""`vitcli patches`: happy path, --json keys, usage errors (exit 2), job errors (exit 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import error_line, make_image
from vitcli.cli.app import app

runner = CliRunner()
KEYS = {"model", "input_size", "patch_size", "grid", "num_patches", "prefix_tokens", "sequence_length", "embed_dim",
        "depth", "num_heads", "files"}


def invoke(*args):
    return runner.invoke(app, ["patches", *map(str, args)])


def test_json_has_the_documented_keys_and_the_pngs_exist(tiny_model_dir, tmp_path):
    image = make_image(tmp_path / "cat.jpg", size=(300, 200))
    out = tmp_path / "out"

    result = invoke(image, "--model", tiny_model_dir, "--attention", "--figure7", "--json", "--out", out, "-k", "2")

    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert KEYS | {"predictions", "rollout", "mean_attention_distance"} <= set(doc)
    # test_vit: 160 px input, patch 16, 6 blocks of 2 heads, dim 64
    assert doc["input_size"] == [3, 160, 160] and doc["patch_size"] == [16, 16] and doc["grid"] == [10, 10]
    assert (doc["num_patches"], doc["prefix_tokens"], doc["sequence_length"]) == (100, 1, 101)
    assert (doc["embed_dim"], doc["depth"], doc["num_heads"]) == (64, 6, 2)
    assert [Path(f).name for f in doc["files"]] == ["patches.png", "tokens.png", "attention.png", "rollout.png",
                                                    "figure7.png"]
    assert all(Path(f).is_file() and Path(f).parent == out for f in doc["files"])
    assert [p["label"] for p in doc["predictions"]][0] in ("cat", "dog", "bird") and len(doc["predictions"]) == 2
    assert len(doc["rollout"]) == 10 and all(len(row) == 10 for row in doc["rollout"])
    assert sum(map(sum, doc["rollout"])) == pytest.approx(1.0, abs=1e-5)
    distance = doc["mean_attention_distance"]
    assert len(distance) == 6 and all(len(row) == 2 and all(0 < v < 160 * 1.5 for v in row) for row in distance)


def test_summary_table_and_default_out_dir(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image(tmp_path / "dog.png", size=(120, 90))

    result = invoke("dog.png", "--model", tiny_model_dir)

    assert result.exit_code == 0, result.output
    for text in ("patch embedding", "+ prefix tokens", "T = 1 + 100 = 101", "6 blocks of 2 heads", "total"):
        assert text in result.stdout
    assert sorted(p.name for p in (tmp_path / "patches" / "dog").iterdir()) == ["patches.png", "tokens.png"]


def test_layer_and_head_select_and_a_folder_is_averaged(tiny_model_dir, tmp_path, monkeypatch):
    from vitcli.explain import figures

    for i in range(3):
        make_image(tmp_path / "imgs" / f"{i}.png", seed=i)
    drawn: list[tuple] = []
    real_grid = figures.save_attention_grid

    def spy(pixels, maps, layers, heads, *args, **kwargs):
        drawn.append((maps.clone(), list(layers), list(heads)))
        return real_grid(pixels, maps, layers, heads, *args, **kwargs)

    monkeypatch.setattr(figures, "save_attention_grid", spy)
    every = invoke(tmp_path / "imgs" / "0.png", "--model", tiny_model_dir, "--attention", "--out", tmp_path / "a")
    assert every.exit_code == 0, every.output

    result = invoke(tmp_path / "imgs", "--model", tiny_model_dir, "--attention", "--layer", "6", "--head", "2",
                    "--figure7", "--max-images", "2", "--json", "--out", tmp_path / "o")

    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["image"].endswith("0.png") and doc["images_averaged"] == 2
    (all_maps, all_layers, all_heads), (maps, layers, heads) = drawn
    assert (all_layers, all_heads, tuple(all_maps.shape)) == ([1, 2, 3, 4, 5, 6], [1, 2], (6, 2, 10, 10))
    assert (layers, heads, tuple(maps.shape)) == ([6], [2], (1, 1, 10, 10))
    # layer 6, head 2 of the same image; a random test_vit's maps are near uniform (0.01), but differ by head/layer
    assert (maps[0, 0] - all_maps[5, 1]).abs().max() < 1e-7
    assert (maps[0, 0] - all_maps[5, 0]).abs().max() > 1e-4  # not head 1
    assert (maps[0, 0] - all_maps[4, 1]).abs().max() > 1e-4  # not layer 5


@pytest.mark.parametrize(("args", "message"), [
    (["--attention", "--layer", "7"], "--layer 7 is out of range: .* has layers 1..6"),
    (["--attention", "--head", "0"], "--head 0 is out of range: .* has heads 1..2"),
    (["--img-size", "big"], "--img-size 'big' is not a size"),
])
def test_usage_errors_exit_2(tiny_model_dir, tmp_path, args, message):
    import re

    result = invoke(make_image(tmp_path / "a.png"), "--model", tiny_model_dir, "--out", tmp_path / "o", *args)

    assert result.exit_code == 2
    assert re.search(message, error_line(result))


def test_a_cnn_is_one_line_and_exit_2(tmp_path):
    result = invoke(make_image(tmp_path / "a.png"), "--model", "resnet18", "--no-pretrained", "--out", tmp_path / "o")

    assert result.exit_code == 2
    assert "convolutional network: it has no patch tokens" in error_line(result)
    assert not (tmp_path / "o").exists()


def test_a_missing_image_is_one_line_and_exit_1(tiny_model_dir, tmp_path):
    result = invoke(tmp_path / "nope.jpg", "--model", tiny_model_dir)

    assert result.exit_code == 1
    assert error_line(result) == f"Error: {tmp_path / 'nope.jpg'}: no such file or directory"


def test_an_unreadable_image_is_one_line_and_exit_1(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")

    result = invoke(bad, "--model", tiny_model_dir, "--out", tmp_path / "o")

    assert result.exit_code == 1
    assert "bad.jpg: not an image Pillow can read" in error_line(result)


def test_non_square_img_size_through_the_cli(tmp_path):
    image = make_image(tmp_path / "a.png", size=(200, 100))

    result = invoke(image, "--model", "vit_tiny_patch16_224", "--no-pretrained", "--img-size", "64x96", "--json",
                    "--out", tmp_path / "o")

    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["input_size"] == [3, 64, 96] and doc["grid"] == [4, 6] and doc["sequence_length"] == 25
    with Image.open(doc["files"][0]) as png:
        assert png.width > png.height


def test_help_in_a_subprocess_shows_the_example():
    result = subprocess.run([sys.executable, "-m", "vitcli", "patches", "--help"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "COLUMNS": "120"})

    assert result.returncode == 0, result.stderr
    for text in ("Example: vitcli patches", "--attention", "--figure7", "--head-fusion", "--discard-ratio",
                 "--no-pretrained", "--img-size", "--max-images"):
        assert text in result.stdout


def test_attention_on_swin_names_the_reason_and_exit_2(tmp_path):
    result = invoke(make_image(tmp_path / "a.png"), "--model", "swin_tiny_patch4_window7_224", "--no-pretrained",
                    "--attention", "--out", tmp_path / "o")

    assert result.exit_code == 2
    assert "shifted local windows" in error_line(result) and "patch view (without --attention) still works" in \
        error_line(result)
    assert not (tmp_path / "o").exists()  # refused before anything is drawn
