"""vitcli.models.resolve: the one resolver for --model / --weights: folders, store, names, labels, run folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from conftest import TINY_LABELS
from vitcli.errors import (
    HubUnreachableError,
    UnknownModelError,
    UsageError,
)
from vitcli.models.folders import save_model_folder
from vitcli.models.names import check_arch
from vitcli.models.resolve import load_model
from vitcli.models.store import list_store, store_dir


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(x)


# ------------------------------------------------------------------------------- model folders


def test_local_model_folder_loads_with_labels_and_data_config(tiny_model_dir, batch):
    loaded = load_model(str(tiny_model_dir))

    assert loaded.source == "local-dir"
    assert loaded.arch == "test_vit"
    assert loaded.labels == TINY_LABELS and loaded.num_classes == 3
    assert loaded.data_config["input_size"] == (3, 160, 160)
    assert not loaded.model.training
    stored = safetensors.torch.load_file(tiny_model_dir / "model.safetensors")
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in stored.items())
    # plain timm loads the same folder to the same model
    plain = timm.create_model(f"local-dir:{tiny_model_dir}", pretrained=True)
    torch.testing.assert_close(logits(loaded.model, batch), logits(plain, batch), rtol=0, atol=0)


def test_local_dir_prefix_is_accepted(tiny_model_dir):
    loaded = load_model(f"local-dir:{tiny_model_dir}")

    assert loaded.source == "local-dir" and loaded.labels == TINY_LABELS


def test_folder_without_config_is_a_usage_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")

    with pytest.raises(UsageError, match="has no config.json"):
        load_model(str(tmp_path))


def test_missing_folder_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_model(str(tmp_path / "runs" / "nope"))


def test_save_model_folder_replaces_an_existing_folder(tmp_path):
    torch.manual_seed(0)
    first = timm.create_model("test_vit", pretrained=False, num_classes=2)
    second = timm.create_model("test_vit", pretrained=False, num_classes=4)
    folder = tmp_path / "m"

    save_model_folder(first, folder, ["a", "b"])
    save_model_folder(second, folder, ["w", "x", "y", "z"])

    assert load_model(str(folder)).labels == ["w", "x", "y", "z"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left behind


# ------------------------------------------------------------------------------- names and tags


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownModelError, match="did you mean vit_base_patch16_224") as info:
        load_model("vit_bse_patch16_224")
    assert "unknown model 'vit_bse_patch16_224'" in str(info.value)


def test_unknown_model_with_no_close_match_points_to_list_models():
    with pytest.raises(UnknownModelError, match="list_models"):
        check_arch("zzzzqqqq")


def test_unknown_pretrained_tag_suggests_valid_tags():
    with pytest.raises(UnknownModelError, match="unknown pretrained tag 'augreg_in21k_ft_in1' ") as info:
        check_arch("vit_base_patch16_224.augreg_in21k_ft_in1")
    assert "vit_base_patch16_224.augreg_in21k_ft_in1k" in str(info.value)
    assert check_arch("vit_base_patch16_224.augreg2_in21k_ft_in1k") == "vit_base_patch16_224"


# ---------------------------------------------------------------------------------- weights store


def test_store_folder_loads_offline_by_name(tiny_model_dir):
    import shutil

    shutil.copytree(tiny_model_dir, store_dir() / "my_tiny")

    loaded = load_model("my_tiny")

    assert loaded.source == "store" and loaded.arch == "test_vit"
    assert loaded.labels == TINY_LABELS
    assert [e["name"] for e in list_store()] == ["my_tiny"]
    assert list_store()[0]["architecture"] == "test_vit" and list_store()[0]["num_classes"] == 3


def test_store_weights_file_loads_offline_by_name(source_vit, batch):
    store_dir().mkdir(parents=True)
    safetensors.torch.save_file(source_vit.state_dict(), store_dir() / "test_vit.safetensors")

    loaded = load_model("test_vit")

    assert loaded.source == "store"
    torch.testing.assert_close(logits(loaded.model, batch), logits(source_vit, batch), rtol=0, atol=0)
    assert list_store() == [{"name": "test_vit", "path": str(store_dir() / "test_vit.safetensors"),
                             "architecture": "test_vit", "num_classes": "?",
                             "bytes": (store_dir() / "test_vit.safetensors").stat().st_size}]


def test_store_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VITCLI_WEIGHTS", str(tmp_path / "elsewhere"))
    assert store_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("VITCLI_WEIGHTS")
    assert store_dir() == Path("weights")


# ------------------------------------------------------------------------------------------ labels


def test_imagenet_sized_heads_get_imagenet_names():
    labels = load_model("test_vit", pretrained=False).labels

    assert len(labels) == 1000
    assert labels[0] == "tench" and labels[1] == "goldfish" and labels[985] == "daisy"


def test_other_head_sizes_without_stored_labels_get_class_n():
    assert load_model("test_vit", pretrained=False, num_classes=4).labels == [f"class_{i}" for i in range(4)]


def test_explicit_labels_win():
    assert load_model("test_vit", pretrained=False, num_classes=2, labels=["no", "yes"]).labels == ["no", "yes"]


# ------------------------------------------------------------------------------- any classifier


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_convnext"])
def test_any_timm_classifier_loads_from_weights_files(tmp_path, name):
    torch.manual_seed(0)
    source = timm.create_model(name, pretrained=False, num_classes=3).eval()
    path = tmp_path / f"{name}.safetensors"
    safetensors.torch.save_file(source.state_dict(), path)

    loaded = load_model(name, weights=path, num_classes=3)

    x = torch.randn(1, *loaded.data_config["input_size"])
    torch.testing.assert_close(logits(loaded.model, x), logits(source, x), rtol=0, atol=0)
    assert loaded.labels == ["class_0", "class_1", "class_2"]


@pytest.mark.parametrize(("name", "kwargs", "patch"), [
    ("test_vit", {"patch_size": 32}, 32),
    ("test_vit", {"patch_size": 8, "img_size": 96, "dynamic_img_size": False}, 8),  # a new resolution
    ("vit_tiny_r_s16_p8_224", {}, 8),  # hybrid: ResNet stem, then 8x8 patches of its features
])
def test_vit_patch_sizes_and_hybrids(name, kwargs, patch):
    loaded = load_model(name, pretrained=False, num_classes=3, **kwargs)

    size = loaded.data_config["input_size"]
    assert loaded.model.patch_embed.patch_size == (patch, patch)
    side = kwargs.get("img_size", 160)  # test_vit is built for 160x160, the hybrid for 224x224
    assert size == (3, side, side) if name == "test_vit" else size == (3, 224, 224)
    out = logits(loaded.model, torch.randn(2, *size))
    assert tuple(out.shape) == (2, 3)


# ---------------------------------------------------------------------- hub ids and run folders


@pytest.mark.parametrize("name", ["hf-hub:timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",
                                  "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"])
def test_hub_ids_reach_the_hub_not_the_folder_check(unreachable_hub, name):
    with pytest.raises(HubUnreachableError) as info:
        load_model(name)

    message = str(info.value)
    assert "'hf-hub:timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k'" in message
    assert "does not exist" not in message and "\n" not in message
    if not name.startswith("hf-hub:"):  # a plain org/name might have been meant as a folder: say it is not one
        assert "no local folder 'timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k'" in message


def test_an_org_slash_name_that_exists_locally_is_a_folder(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "org" / "tiny")
    monkeypatch.chdir(tmp_path)

    loaded = load_model("org/tiny")

    assert loaded.source == "local-dir" and loaded.labels == TINY_LABELS


@pytest.mark.parametrize("present", [("best", "last"), ("last",)])
def test_a_finetune_run_folder_stands_for_its_best_then_last_model(tiny_model_dir, tmp_path, present):
    import shutil

    run = tmp_path / "runs" / "finetune" / "exp"
    for sub in present:
        shutil.copytree(tiny_model_dir, run / sub)

    loaded = load_model(str(run))

    assert loaded.folder == run / present[0] and loaded.labels == TINY_LABELS


def test_model_folders_are_readable_by_the_team_and_survive_an_interrupted_swap(tmp_path, monkeypatch):
    """save_model_folder: the umask's permissions (not mkdtemp's 0700), and an old folder is never lost."""
    import stat

    import timm

    from vitcli.models.folders import save_model_folder

    model = timm.create_model("test_vit", num_classes=2)
    old_mask = os.umask(0o022)
    try:
        folder = save_model_folder(model, tmp_path / "best", ["a", "b"])
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o644}

    before = (folder / "model.safetensors").read_bytes()
    real, calls = Path.rename, []

    def rename(self, target):  # a second Ctrl-C between "best -> .best.old" and ".best.tmp -> best"
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save_model_folder(timm.create_model("test_vit", num_classes=2), folder, ["a", "b"])
    assert (folder / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
