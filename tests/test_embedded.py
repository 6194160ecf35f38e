"""vitcli.embedded: the default model ships inside the package and loads offline from anywhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEIT_WEIGHTS, REPO, make_image, shared
from vitcli.embedded import DEFAULT_MODEL, EMBEDDED_DIR, embedded_model


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache: only local files can load."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")


def test_the_default_model_is_shipped_as_a_hub_layout_folder():
    folder = embedded_model(DEFAULT_MODEL)

    shipped = sorted(p.name for p in EMBEDDED_DIR.iterdir() if (p / "config.json").is_file())
    assert DEFAULT_MODEL == "deit_tiny_patch16_224" and shipped == [DEFAULT_MODEL]
    assert folder == EMBEDDED_DIR / DEFAULT_MODEL and folder.is_relative_to(REPO / "src" / "vitcli")
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors"}
    assert embedded_model("vit_base_patch16_224") is None and embedded_model("../embedded") is None


def test_the_default_model_loads_offline_from_another_working_directory(tmp_path, monkeypatch, unreachable_hub):
    import torch

    from vitcli.models.resolve import load_model

    monkeypatch.chdir(tmp_path)

    loaded = load_model()

    assert (loaded.name, loaded.arch, loaded.source) == (DEFAULT_MODEL, "deit_tiny_patch16_224", "embedded")
    assert loaded.num_classes == 1000 and loaded.labels[263] == "Pembroke" and loaded.labels[235] == "German shepherd"
    assert loaded.data_config["input_size"] == (3, 224, 224)
    assert loaded.data_config["interpolation"] == "bicubic" and loaded.data_config["crop_pct"] == 0.9
    assert sum(p.numel() for p in loaded.model.parameters()) == 5_717_416  # ViT-Ti/16 with its 1000-class head
    with torch.inference_mode():
        assert torch.isfinite(loaded.model(torch.zeros(1, 3, 224, 224))).all()


def test_a_store_entry_of_the_same_name_wins(tiny_model_dir):
    from vitcli.models.resolve import load_model
    from vitcli.models.store import store_dir

    shutil.copytree(tiny_model_dir, store_dir() / DEFAULT_MODEL)

    loaded = load_model(DEFAULT_MODEL)

    assert loaded.source == "store" and loaded.arch == "test_vit"


def test_a_new_head_on_the_default_model_for_fine_tuning():
    from vitcli.models.resolve import load_model

    loaded = load_model(DEFAULT_MODEL, num_classes=3, labels=["a", "b", "c"])

    assert loaded.num_classes == 3 and loaded.model.get_classifier().out_features == 3


def test_the_module_imports_no_torch():
    code = "import sys, vitcli.embedded, vitcli.cli.options; assert 'torch' not in sys.modules"

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_the_shipped_weights_are_the_official_deit_tiny_arrays():
    import safetensors.torch

    from vitcli.models.resolve import load_model

    official = safetensors.torch.load_file(shared("weights", DEIT_WEIGHTS.name))
    shipped = load_model().model.state_dict()

    assert set(official) == set(shipped)
    assert all(official[k].equal(shipped[k]) for k in official)


@pytest.mark.slow
def test_a_regular_non_editable_install_finds_the_default_model(tmp_path):
    """`pip install .` (a wheel, no -e) into a fresh venv; run vitcli from elsewhere, offline."""
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # torch, timm, ... come from the test's environment, appended after the venv's own site-packages
    # (a plain path line: that environment's editable-install hook is not run, so vitcli comes from the wheel)
    Path(purelib, "parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    source = tmp_path / "source"  # a clean copy of the tree: no build/ or egg-info left in the worktree
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "runs",
                                                                "__pycache__", ".*_cache", "tests", "benchmarks"))
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-build-isolation", "--no-cache-dir", "--quiet", str(source)],
                             capture_output=True, text=True, timeout=300, env=env)
    assert install.returncode == 0, install.stderr
    shutil.rmtree(source)
    photo = make_image(tmp_path / "elsewhere" / "photo.png")

    where = subprocess.run([python, "-c", "import vitcli.embedded as e; print(e.EMBEDDED_DIR)"],
                           capture_output=True, text=True, env=env, cwd=photo.parent, timeout=60)
    run = subprocess.run([venv / "bin" / "vitcli", "predict", "photo.png", "--json", "--top-k", "1"],
                         capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"}, cwd=photo.parent,
                         timeout=300)

    assert Path(where.stdout.strip()).is_relative_to(purelib), where.stdout + where.stderr
    assert run.returncode == 0, run.stderr
    assert '"source": "photo.png"' in run.stdout and '"rank": 1' in run.stdout
