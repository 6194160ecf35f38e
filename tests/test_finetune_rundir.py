"""vitcli.finetune.rundir: run folder numbering, --exist-ok, metrics.csv."""

from __future__ import annotations

import pytest

from vitcli.finetune.config import FinetuneConfig

pytestmark = pytest.mark.usefixtures("no_figures")


def test_run_folders_are_numbered_unless_named(tmp_path):
    from vitcli.finetune.rundir import new_run_dir

    project = str(tmp_path / "runs")
    assert [new_run_dir(FinetuneConfig(project=project)).name for _ in range(3)] == ["exp", "exp2", "exp3"]
    assert new_run_dir(FinetuneConfig(project=project, name="ants")).name == "ants"
    assert new_run_dir(FinetuneConfig(project=project, name="ants")).name == "ants2"
    assert new_run_dir(FinetuneConfig(project=project, name="ants", exist_ok=True)).name == "ants"


def test_exist_ok_removes_the_previous_runs_files_first(tmp_path, tiny_model_dir, monkeypatch):
    """A reused folder must not keep the last run's state.pt/best/ for a --resume to mix with the new split."""
    from _finetune import class_folders, config
    from vitcli.errors import UsageError
    from vitcli.finetune import loop
    from vitcli.finetune.config import resume_config

    first = class_folders(tmp_path / "first", {"ants": 4, "bees": 4})
    second = class_folders(tmp_path / "second", {"cats": 4, "dogs": 4}, seed=7)
    run = loop.fit(config(tmp_path, first, tiny_model_dir, name="x", max_steps=1)).run_dir
    assert (run / "state.pt").is_file() and (run / "best").is_dir()
    (run / "notes.txt").write_text("mine")

    def crash(*args, **kwargs):
        raise RuntimeError("stopped before the first step")

    monkeypatch.setattr(loop, "train_one_epoch", crash)
    with pytest.raises(RuntimeError, match="before the first step"):
        loop.fit(config(tmp_path, second, tiny_model_dir, name="x", exist_ok=True))
    assert sorted(p.name for p in run.iterdir()) == ["args.json", "notes.txt", "split.json"]
    assert "cats" in (run / "split.json").read_text()
    with pytest.raises(UsageError, match="nothing to resume"):
        resume_config(run)


def test_metrics_csv_has_top5_only_when_the_rows_do(tmp_path):
    import csv

    from vitcli.finetune.rundir import write_metrics

    base = {"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "val_top1": 0.5, "lr": 1e-3, "epoch_time": 2.0,
            "img_s": 10.0}
    write_metrics(tmp_path / "two.csv", [base])
    write_metrics(tmp_path / "many.csv", [base | {"val_top5": 0.75}])
    with open(tmp_path / "two.csv") as f:
        assert "val_top5" not in next(csv.reader(f))
    with open(tmp_path / "many.csv") as f:
        assert list(csv.DictReader(f))[0]["val_top5"] == "0.75"
