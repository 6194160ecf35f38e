"""io.inputs and io.transforms: input expansion (eager and lazy), list files, JPEG draft sizes, transforms."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import make_image
from vitcli.errors import UsageError
from vitcli.io.images import load_image
from vitcli.io.inputs import expand_inputs, iter_path_list
from vitcli.io.preprocess import draft_size_for
from vitcli.io.transforms import eval_transform

# ------------------------------------------------------------------------------ input expansion


def test_expand_folder_is_recursive_sorted_and_filters_by_extension(tmp_path):
    root = tmp_path / "photos"
    a = make_image(root / "a.jpg")
    b = make_image(root / "sub" / "b.png")
    c = make_image(root / "sub" / "deeper" / "c.JPEG")  # extension match is case-insensitive
    (root / "sub" / "notes.txt").write_text("not an image")
    (root / "sub" / "deeper" / "model.safetensors").write_bytes(b"\0" * 8)

    sources, problems = expand_inputs([str(root)])

    assert sources == sorted([str(a), str(b), str(c)])
    assert problems == []


def test_expand_keeps_argument_order_and_explicit_files_whatever_their_extension(tmp_path):
    first = make_image(tmp_path / "z.png")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    folder = tmp_path / "dir"
    inner = make_image(folder / "a.jpg")

    sources, problems = expand_inputs([str(first), str(folder), str(notes), "https://example.com/cat.jpg"])

    assert sources == [str(first), str(inner), str(notes), "https://example.com/cat.jpg"]
    assert problems == []


def test_expand_glob_patterns(tmp_path):
    make_image(tmp_path / "a.jpg")
    b = make_image(tmp_path / "b.png")
    c = make_image(tmp_path / "x" / "y" / "c.png")

    sources, problems = expand_inputs([str(tmp_path / "**" / "*.png")])

    assert sources == sorted([str(b), str(c)])
    assert problems == []


def test_expand_reports_missing_paths_empty_folders_and_unmatched_globs(tmp_path):
    good = make_image(tmp_path / "good.jpg")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    missing = str(tmp_path / "missing.jpg")
    pattern = str(tmp_path / "*.webp")

    sources, problems = expand_inputs([missing, str(good), str(empty), pattern])

    assert sources == [str(good)]
    assert [p.source for p in problems] == [missing, str(empty), pattern]
    assert problems[0].reason == "no such file or directory"
    assert "folder has no images" in problems[1].reason
    assert problems[2].reason == "no image matches this pattern"


def test_iter_path_list_skips_blank_lines_and_comments(tmp_path):
    list_file = tmp_path / "list.txt"
    list_file.write_text("# my photos\na.jpg\n\n   b.png  \n  # indented comment\nhttps://x/y.jpg\n")

    assert list(iter_path_list(str(list_file))) == ["a.jpg", "b.png", "https://x/y.jpg"]


def test_iter_path_list_dash_reads_stdin(monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("one.jpg\n# skip\ntwo.jpg\n"))

    assert list(iter_path_list("-")) == ["one.jpg", "two.jpg"]


def test_iter_path_list_missing_file_is_a_usage_error_naming_it(tmp_path):
    with pytest.raises(UsageError, match=r"--files-from '.*nope.txt' does not exist") as info:
        iter_path_list(str(tmp_path / "nope.txt"))  # at once, before any line is read
    assert info.value.exit_code == 2


# ------------------------------------------------------------------------------ fast JPEG decode


def test_draft_decode_shrinks_large_jpegs_but_never_below_the_target(tmp_path):
    path = make_image(tmp_path / "large.jpg", size=(1024, 768))

    img = load_image(str(path), draft_size=(257, 257))

    assert img.size == (512, 384)  # libjpeg's 1/2 scale; 1/4 (256 x 192) would be below 257
    assert load_image(str(path)).size == (1024, 768)


def test_draft_decode_leaves_small_jpegs_and_other_formats_alone(tmp_path):
    small = make_image(tmp_path / "small.jpg", size=(200, 150))
    png = make_image(tmp_path / "large.png", size=(1024, 768))

    np.testing.assert_array_equal(np.asarray(load_image(str(small), (257, 257))),
                                  np.asarray(load_image(str(small))))
    assert load_image(str(png), (257, 257)).size == (1024, 768)


def test_draft_size_covers_the_resize_before_the_center_crop():
    config = {"input_size": (3, 224, 224), "crop_pct": 0.875}

    assert draft_size_for(config) == (257, 257)  # 224 / 0.875 = 256, plus one for rounding
    # no crop_pct: timm's eval transform uses DEFAULT_CROP_PCT (0.875), so the draft must cover 320 / 0.875 = 365
    assert draft_size_for({"input_size": (3, 160, 320), "crop_pct": None}) == (366, 366)


def test_eval_transform_follows_the_model_data_config(tmp_path):
    path = make_image(tmp_path / "a.jpg", size=(300, 200))
    config = {"input_size": (3, 96, 96), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5),
              "std": (0.5, 0.5, 0.5), "crop_pct": 0.9, "crop_mode": "center"}

    x = eval_transform(config)(load_image(str(path)))

    assert tuple(x.shape) == (3, 96, 96)


def test_eval_transform_normalises_with_the_models_own_mean_and_std(tmp_path):
    path = tmp_path / "solid.png"
    Image.new("RGB", (120, 80), (51, 102, 204)).save(path)  # 0.2, 0.4, 0.8 after ToTensor
    config = {"input_size": (3, 64, 64), "interpolation": "bilinear", "mean": (0.1, 0.2, 0.3),
              "std": (0.5, 0.25, 0.125), "crop_pct": 1.0, "crop_mode": "center"}

    x = eval_transform(config)(load_image(str(path)))

    expected = [(0.2 - 0.1) / 0.5, (0.4 - 0.2) / 0.25, (0.8 - 0.3) / 0.125]  # 0.2, 0.8, 4.0
    for channel, value in enumerate(expected):
        np.testing.assert_allclose(x[channel].numpy(), value, rtol=0, atol=1e-5)


def test_iter_inputs_streams_in_the_order_of_expand_inputs(tmp_path):
    from vitcli.io.inputs import iter_inputs, iter_path_list

    for name in ("b/x.png", "a-b/y.png", "a/z.jpg", "a/sub/w.png", "a.png", "c.txt"):
        make_image(tmp_path / "root" / name) if name.endswith(("png", "jpg")) else (tmp_path / "root" / name).touch()
    listed = tmp_path / "list.txt"
    listed.write_text(f"{tmp_path / 'root'}\n# comment\n\n{tmp_path / 'gone.jpg'}\n")

    items = iter_inputs(iter_path_list(str(listed)))
    first = next(items)
    rest = list(items)

    sources, problems = expand_inputs([str(tmp_path / "root"), str(tmp_path / "gone.jpg")])
    assert [first, *rest[:-1]] == sources == sorted(sources)
    assert rest[-1].source == str(tmp_path / "gone.jpg") and problems[0].before == len(sources)
