"""vitcli.finetune.config: defaults without torch, CLI normalisation, checks, resume_config."""

from __future__ import annotations

from pathlib import Path

import pytest

from _finetune import class_folders, config
from vitcli.errors import UsageError
from vitcli.finetune.config import resume_config
from vitcli.finetune.loop import fit

pytestmark = pytest.mark.usefixtures("no_figures")


@pytest.fixture
def data(tmp_path) -> Path:
    return class_folders(tmp_path / "data", {"ants": 8, "bees": 8})


def test_resume_refuses_changed_options_and_allows_more_epochs(tmp_path, data, tiny_model_dir):
    run = fit(config(tmp_path, data, tiny_model_dir, max_steps=1)).run_dir
    with pytest.raises(UsageError, match="--lr cannot change"):
        resume_config(run, lr=0.1)
    with pytest.raises(UsageError, match="trained on"):
        resume_config(run, data=str(tmp_path))
    assert resume_config(run, epochs=5, data=str(data)).epochs == 5
    with pytest.raises(UsageError, match="not a finetune run folder"):
        resume_config(tmp_path)


def test_config_imports_no_torch_and_its_default_model_is_the_resolvers():
    import subprocess
    import sys

    code = "import sys, vitcli.finetune.config; assert 'torch' not in sys.modules and 'timm' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    from vitcli.finetune.config import DEFAULT_MODEL, FinetuneConfig
    from vitcli.models.resolve import DEFAULT_MODEL as RESOLVER_DEFAULT

    assert DEFAULT_MODEL == RESOLVER_DEFAULT == FinetuneConfig().model


def test_from_cli_turns_options_into_a_config(tmp_path, data, tiny_model_dir):
    from enum import Enum

    from vitcli.finetune.config import FinetuneConfig, from_cli

    class Balance(str, Enum):
        sampler = "sampler"

    made = from_cli({"data": data, "balance": Balance.sampler, "clip_grad": 0.0, "lr": None, "project": tmp_path})
    assert made == FinetuneConfig(data=str(data), balance="sampler", clip_grad=None, project=str(tmp_path))
    assert from_cli({"data": data, "clip_grad": 2.0}).clip_grad == 2.0
    with pytest.raises(UsageError, match="missing DATA"):
        from_cli({"epochs": 3})
    run = fit(config(tmp_path, data, tiny_model_dir, max_steps=1)).run_dir
    resumed = from_cli({"resume": run, "epochs": 4})
    assert resumed.resume == str(run) and resumed.epochs == 4 and resumed.max_steps is None
    with pytest.raises(UsageError, match="--lr cannot change"):
        from_cli({"resume": run, "lr": 0.5})


def test_new_runs_keep_absolute_paths(tmp_path, data, tiny_model_dir, monkeypatch):
    import json
    import os
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    run = fit(config(tmp_path, "data", "model", project="runs", max_steps=1)).run_dir
    saved = json.loads((tmp_path / run / "args.json").read_text())["config"]
    assert saved["data"] == str(tmp_path / "data") and saved["model"] == str(tmp_path / "model")
    assert os.path.isabs(saved["data"])
