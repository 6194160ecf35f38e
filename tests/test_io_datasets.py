"""vitcli.io.datasets on its own: layouts, class checks, stratified splits, class mapping, unreadable files."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import make_image
from vitcli.errors import DatasetError, UsageError
from vitcli.io.datasets import (
    FolderData,
    discover,
    drop_unreadable,
    find_eval_dir,
    map_classes,
    scan_class_folders,
    stratified_split,
)


def tree(root: Path, counts: dict[str, int], ext: str = "png") -> Path:
    """root/<class>/<class><i>.<ext> with ``counts[class]`` small images each."""
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            make_image(root / name / f"{name}{i}.{ext}", size=(8, 8), seed=10 * c + i)
    return root


def test_scan_skips_hidden_folders_and_non_images_and_searches_recursively(tmp_path):
    tree(tmp_path, {"cat": 2, ".cache": 1})
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    make_image(tmp_path / "cat" / "deeper" / "kitten.jpg", size=(8, 8))

    found = scan_class_folders(tmp_path)

    assert list(found) == ["cat"]
    assert [Path(p).name for p in found["cat"]] == ["cat0.png", "cat1.png", "kitten.jpg"]


def test_train_val_layout_maps_val_classes_by_name_and_warns_for_missing_ones(tmp_path):
    tree(tmp_path / "train", {"bee": 2, "ant": 3, "wasp": 1})
    tree(tmp_path / "validation", {"bee": 1, "ant": 1})  # no wasp images to validate on

    data = discover(tmp_path)

    assert data.layout == "train/val" and data.classes == ["ant", "bee", "wasp"]
    assert data.counts("train") == [3, 2, 1] and data.counts("val") == [1, 1, 0]
    assert all(Path(p).parent.name == data.classes[t] for p, t in data.train + data.val)
    assert any("wasp" in w for w in data.warnings)


def test_a_val_class_unknown_to_train_is_refused_by_name(tmp_path):
    tree(tmp_path / "train", {"ant": 1, "bee": 1})
    tree(tmp_path / "val", {"ant": 1, "moth": 1})

    with pytest.raises(DatasetError, match="val class\\(es\\) not in train: moth"):
        discover(tmp_path)


@pytest.mark.parametrize(("counts", "message"), [
    ({"only": 3}, "single class"),
    ({"ant": 2, "bee": 0}, "with no images in .*: bee"),
])
def test_unusable_class_folders_are_refused_before_anything_is_decoded(tmp_path, counts, message):
    tree(tmp_path, counts)
    for name in counts:
        (tmp_path / name).mkdir(exist_ok=True)

    with pytest.raises(DatasetError, match=message):
        discover(tmp_path)


def test_split_is_stratified_seeded_and_keeps_every_image_once(tmp_path):
    tree(tmp_path, {"ant": 10, "bee": 5, "wasp": 2})

    a = discover(tmp_path, val_split=0.2, seed=3)
    b = discover(tmp_path, val_split=0.2, seed=3)
    c = discover(tmp_path, val_split=0.2, seed=4)

    assert a.layout == "split" and a.counts("val") == [2, 1, 1]  # round(n * 0.2), at least 1 of 2+
    assert a.train == b.train and a.val == b.val
    assert a.val != c.val  # another seed, another split
    everything = sorted(p for p, _ in a.train + a.val)
    assert everything == sorted(str(p) for p in tmp_path.rglob("*.png")) and len(set(everything)) == 17


def test_stratified_split_never_empties_a_class_of_train():
    per_class = {"one": ["a"], "two": ["b", "c"]}

    train, val = stratified_split(per_class, {"one": 0, "two": 1}, val_split=0.9, seed=0)

    assert train == [("a", 0), ("b", 1)] or train == [("a", 0), ("c", 1)]
    assert len(val) == 1 and val[0][1] == 1


def test_folder_data_round_trips_through_json(tmp_path):
    data = discover(tree(tmp_path / "d", {"ant": 3, "bee": 3}), val_split=0.34, seed=1)
    data.skipped = [("x.jpg", "corrupt")]

    data.save(tmp_path / "split.json")
    back = FolderData.load(tmp_path / "split.json")

    assert back == data


def test_drop_unreadable_skips_or_fails_with_strict(tmp_path):
    good = str(make_image(tmp_path / "ok.png", size=(8, 8)))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")

    kept, skipped = drop_unreadable([(good, 0), (str(bad), 1)])

    assert kept == [(good, 0)] and skipped[0][0] == str(bad)
    with pytest.raises(DatasetError, match="unreadable image .*bad.jpg.*--strict"):
        drop_unreadable([(good, 0), (str(bad), 1)], strict=True)


def test_eval_dir_prefers_test_then_val_then_the_folder_itself(tmp_path):
    (tmp_path / "val").mkdir()
    assert find_eval_dir(tmp_path) == tmp_path / "val"
    (tmp_path / "test").mkdir()
    assert find_eval_dir(tmp_path) == tmp_path / "test"
    assert find_eval_dir(tmp_path, split="val") == tmp_path / "val"
    assert find_eval_dir(tmp_path / "val") == tmp_path / "val"
    with pytest.raises(DatasetError, match="has no 'train' folder"):
        find_eval_dir(tmp_path, split="train")


def test_map_classes_is_by_name_and_lists_the_model_labels_for_an_unknown_one():
    assert map_classes(["dog", "cat"], ["cat", "dog", "bird"]) == {"dog": 1, "cat": 0}
    with pytest.raises(DatasetError, match="unknown to the model: zebra; the model's labels are cat, dog"):
        map_classes(["zebra"], ["cat", "dog"])


def test_map_classes_refuses_a_label_held_twice_and_lets_a_folder_pick_one_by_index():
    labels = ["cat", "crane", "dog", "crane"]  # like ImageNet: "crane" the bird (1), the machine (3)
    with pytest.raises(UsageError, match=r"folder 'crane' names a label the model holds 2 times, at indices "
                                         r"1, 3; rename the folder crane_1 \(or 1\) to pick one"):
        map_classes(["cat", "crane"], labels)
    assert map_classes(["crane_1", "crane_3", "cat"], labels) == {"crane_1": 1, "crane_3": 3, "cat": 0}
    assert map_classes(["3", "0"], labels) == {"3": 3, "0": 0}
    with pytest.raises(DatasetError, match="unknown to the model: dog_3, crane_9, 4"):
        map_classes(["dog_3", "crane_9", "4"], labels)  # the label at 3 is not dog; 9 and 4 are out of range
    assert map_classes(["7"], ["7", "x"]) == {"7": 0}  # a label spelt as a number is matched by name first
