"""vitcli.finetune.data: layouts, data errors before any training, unreadable files, imbalance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _finetune import Recorder, class_folders, config
from conftest import make_image
from vitcli.distributed import Rank
from vitcli.errors import DatasetError
from vitcli.finetune.config import FinetuneConfig
from vitcli.finetune.loop import fit
from vitcli.io.datasets import FolderData

pytestmark = pytest.mark.usefixtures("no_figures")


@pytest.fixture
def data(tmp_path) -> Path:
    """Two classes of 8 images, no val folder (split by --val-split)."""
    return class_folders(tmp_path / "data", {"ants": 8, "bees": 8})


def test_train_val_layout_maps_classes_by_name(tmp_path, tiny_model_dir):
    root = tmp_path / "data"
    class_folders(root / "train", {"ants": 4, "bees": 4, "wasps": 4})
    class_folders(root / "valid", {"wasps": 2, "ants": 2}, seed=50)  # no bees in val
    class_folders(root / "test", {"ants": 1, "bees": 1})  # left for `vitcli evaluate`
    record = Recorder()
    result = fit(config(tmp_path, root, tiny_model_dir, max_steps=1), record)
    split = FolderData.load(result.run_dir / "split.json")
    assert split.layout == "train/val" and split.classes == ["ants", "bees", "wasps"]
    assert {Path(p).parts[-3] for p, _ in split.val} == {"valid"}
    assert all(Path(p).parts[-2] == split.classes[t] for p, t in split.train + split.val)
    assert any("bees" in w for w in record.first("start")["warnings"])


@pytest.mark.parametrize("layout, message", [
    ({"train/ants": 3, "train/bees": 3, "val/ants": 1, "val/wasps": 1}, r"val class\(es\) not in train: wasps"),
    ({"ants": 3, "bees": 0}, "with no images in .*: bees"),
    ({"ants": 4}, "single class"),
    ({"ants": 0, "bees": 0}, "no images"),
])
def test_data_errors_come_before_any_training(tmp_path, tiny_model_dir, layout, message):
    root = tmp_path / "data"
    root.mkdir()
    for folder, n in layout.items():
        (root / folder).mkdir(parents=True)
        for i in range(n):
            make_image(root / folder / f"{i}.png", size=(40, 32), seed=i)
    with pytest.raises(DatasetError, match=message):
        fit(config(tmp_path, root, tiny_model_dir))
    assert not (tmp_path / "runs").exists()


def test_missing_data_folder(tmp_path, tiny_model_dir):
    with pytest.raises(DatasetError, match="does not exist"):
        fit(config(tmp_path, tmp_path / "nope", tiny_model_dir))


def test_unreadable_files_are_skipped_once_or_fatal_with_strict(tmp_path, data, tiny_model_dir):
    (data / "ants" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (data / "bees" / "empty.png").write_bytes(b"")
    record = Recorder()
    result = fit(config(tmp_path, data, tiny_model_dir, max_steps=1), record)
    skipped = record.first("start")["skipped"]
    assert sorted(Path(p).name for p, _ in skipped) == ["broken.jpg", "empty.png"]
    split = FolderData.load(result.run_dir / "split.json")
    assert not any(p.endswith(("broken.jpg", "empty.png")) for p, _ in split.train + split.val)
    with pytest.raises(DatasetError, match="--strict"):
        fit(config(tmp_path, data, tiny_model_dir, strict=True))


def test_imbalance_is_reported_and_can_be_balanced(tmp_path, tiny_model_dir):
    import timm

    from vitcli.finetune.parts import build_parts

    root = class_folders(tmp_path / "data", {"common": 20, "rare": 5})
    record = Recorder()
    fit(config(tmp_path, root, tiny_model_dir, max_steps=1), record)
    start = record.first("start")
    assert start["train_counts"] == [16, 4]
    assert any("--balance" in w for w in start["warnings"])
    model = timm.create_model("test_vit", num_classes=2)
    parts = build_parts(FinetuneConfig(balance="loss"), model, [16, 4], 5, torch.device("cpu"), "fp32", Rank())
    assert parts.loss_fn.weight.tolist() == [20 / 32, 20 / 8]  # inverse frequency, mean 1


def test_the_leak_check_names_a_validation_photo_that_duplicates_a_training_one(tmp_path):
    """With the shipped model on real photos: the planted copy is found, nothing else."""
    import shutil

    from conftest import REPO
    from vitcli.finetune.data import leak_warnings
    from vitcli.models.resolve import load_model

    photos = {name: str(REPO / "examples" / f"{name}.jpg")
              for name in ("corgi", "german_shepherd", "grace_hopper", "samoyed")}
    leaked = tmp_path / "val" / "people" / "leaked.jpg"
    leaked.parent.mkdir(parents=True)
    shutil.copy(photos["grace_hopper"], leaked)
    data = FolderData(["dogs", "people"], train=[(photos["corgi"], 0), (photos["german_shepherd"], 0),
                                                 (photos["grace_hopper"], 1)],
                      val=[(photos["samoyed"], 0), (str(leaked), 1)], layout="train/val", root=str(tmp_path))
    loaded = load_model("deit_tiny_patch16_224")
    checked = FinetuneConfig(data=str(tmp_path), batch_size=2, workers=0)

    warnings = leak_warnings(checked, data, loaded, loaded.data_config, torch.device("cpu"), Rank())
    off = leak_warnings(FinetuneConfig(data=str(tmp_path), leak_check=False), data, loaded, loaded.data_config,
                        torch.device("cpu"), Rank())

    assert len(warnings) == 1 and off == []
    assert warnings[0].startswith("1 train/val pair(s) look like the same photo (cosine >= 0.95")
    assert f"e.g. {photos['grace_hopper']} and {leaked} (cosine 1.000)" in warnings[0]


def test_fit_warns_about_train_val_duplicates_before_training_unless_told_not_to(tmp_path, tiny_model_dir):
    import shutil

    root = tmp_path / "data"
    class_folders(root / "train", {"ants": 4, "bees": 4})
    class_folders(root / "val", {"ants": 2, "bees": 2}, seed=50)
    shutil.copy(root / "train" / "ants" / "0.png", root / "val" / "ants" / "copy.png")
    checked, unchecked = Recorder(), Recorder()

    fit(config(tmp_path, root, tiny_model_dir, max_steps=1), checked)
    fit(config(tmp_path, root, tiny_model_dir, max_steps=1, leak_check=False), unchecked)

    leak = [w for w in checked.first("start")["warnings"] if "train/val pair(s)" in w]
    assert len(leak) == 1 and "--no-leak-check" in leak[0]
    assert not any("train/val pair(s)" in w for w in unchecked.first("start")["warnings"])
