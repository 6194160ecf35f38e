"""vitcli.train: data layouts and errors, the run folder, resume, NaN, --img-size, the recipe pieces."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import DEIT_WEIGHTS, make_image, shared
from vitcli import train
from vitcli.datasets import FolderData
from vitcli.errors import DatasetError, UsageError, VitcliError
from vitcli.train import (
    STATE_FILE,
    Dist,
    EpochSampler,
    FinetuneConfig,
    NonFiniteLossError,
    TrainingInterrupted,
    fit,
    resume_config,
    rng_state,
    set_rng_state,
)

SMALL = 64  # train test_vit at 64x64 (pos_embed resampled from its 160): fast on two cores
WRITE_FIGURES = train._write_figures


@pytest.fixture(autouse=True)
def _no_figures(monkeypatch):
    """matplotlib takes half the time of a tiny fit(); only the tests that check the PNGs draw them."""
    monkeypatch.setattr(train, "_write_figures", lambda *args: None)


def class_folders(root: Path, counts: dict[str, int], ext: str = "png", seed: int = 0) -> Path:
    """root/<class>/<i>.<ext> random-noise images."""
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            make_image(root / name / f"{i}.{ext}", size=(40, 32), seed=seed + 100 * c + i)
    return root


@pytest.fixture
def data(tmp_path) -> Path:
    """Two classes of 8 images, no val folder (split by --val-split)."""
    return class_folders(tmp_path / "data", {"ants": 8, "bees": 8})


def config(tmp_path: Path, data: Path, model: Path, **overrides) -> FinetuneConfig:
    base = {"data": str(data), "model": str(model), "img_size": SMALL, "epochs": 1, "batch_size": 4,
            "workers": 0, "precision": "fp32", "project": str(tmp_path / "runs"), "warmup_epochs": 0.5}
    return FinetuneConfig(**(base | overrides))


class Recorder:
    """A fit() callback that keeps the events (and can raise a signal at a chosen one)."""

    def __init__(self, signal_at: tuple[str, int] | None = None):
        self.events: list[tuple[str, dict]] = []
        self.signal_at = signal_at

    def __call__(self, event: str, info: dict) -> None:
        self.events.append((event, info))
        if self.signal_at is None:
            return
        kind, n = self.signal_at
        if event == kind and (info.get("global_step") == n or info.get("row", {}).get("epoch") == n):
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does: fit() stops at the next step boundary

    def first(self, event: str) -> dict:
        return next(info for e, info in self.events if e == event)


# ---------------------------------------------------------------------------------- the run folder


def test_fit_writes_a_complete_run_folder(tmp_path, data, tiny_model_dir, monkeypatch):
    import timm

    monkeypatch.setattr(train, "_write_figures", WRITE_FIGURES)
    record = Recorder()
    result = fit(config(tmp_path, data, tiny_model_dir, epochs=2), record)

    run = tmp_path / "runs" / "exp"
    assert result.run_dir == run and result.epochs_done == 2 and result.stopped == "done"
    for name in ("args.json", "split.json", "metrics.csv", STATE_FILE, "curves.png", "confusion_matrix.png",
                 "best/config.json", "best/model.safetensors", "last/config.json", "last/model.safetensors"):
        assert (run / name).is_file(), name
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "epoch_time", "img_s"}
    args = json.loads((run / "args.json").read_text())
    assert args["config"]["epochs"] == 2 and args["resolved"]["arch"] == "test_vit"
    split = FolderData.load(run / "split.json")
    assert split.layout == "split" and split.classes == ["ants", "bees"] and len(split.val) == 4
    config_json = json.loads((run / "best" / "config.json").read_text())
    assert config_json["label_names"] == ["ants", "bees"] and config_json["architecture"] == "test_vit"
    assert config_json["pretrained_cfg"]["input_size"] == [3, SMALL, SMALL]

    # plain timm loads last/ and predicts exactly what the in-memory model does
    reloaded = timm.create_model(f"local-dir:{run / 'last'}", pretrained=True).eval()
    x = torch.randn(2, 3, SMALL, SMALL)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), result.model.eval()(x), atol=1e-6)

    start = record.first("start")
    assert start["train_counts"] == [6, 6] and start["val_counts"] == [2, 2]
    steps = [info for e, info in record.events if e == "step"]
    assert len(steps) == 6 and steps[-1]["global_step"] == 6 and math.isfinite(steps[0]["loss"])


def test_run_folders_are_numbered_unless_named(tmp_path):
    from vitcli.train import _new_run_dir

    project = str(tmp_path / "runs")
    assert [_new_run_dir(FinetuneConfig(project=project)).name for _ in range(3)] == ["exp", "exp2", "exp3"]
    assert _new_run_dir(FinetuneConfig(project=project, name="ants")).name == "ants"
    assert _new_run_dir(FinetuneConfig(project=project, name="ants")).name == "ants2"
    assert _new_run_dir(FinetuneConfig(project=project, name="ants", exist_ok=True)).name == "ants"


# ------------------------------------------------------------------------------------ data layouts


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

    from vitcli.train import build_parts

    root = class_folders(tmp_path / "data", {"common": 20, "rare": 5})
    record = Recorder()
    fit(config(tmp_path, root, tiny_model_dir, max_steps=1), record)
    start = record.first("start")
    assert start["train_counts"] == [16, 4]
    assert any("--balance" in w for w in start["warnings"])
    model = timm.create_model("test_vit", num_classes=2)
    parts = build_parts(FinetuneConfig(balance="loss"), model, [16, 4], 5, torch.device("cpu"), "fp32", Dist())
    assert parts.loss_fn.weight.tolist() == [20 / 32, 20 / 8]  # inverse frequency, mean 1


def test_weighted_sampler_draws_classes_equally():
    targets = [0] * 90 + [1] * 10
    weights = torch.tensor([1 / 90 if t == 0 else 1 / 10 for t in targets], dtype=torch.float64)
    sampler = EpochSampler(len(targets), shuffle=True, weights=weights, seed=0)
    drawn = [targets[i] for i in sampler]
    assert len(drawn) == 100 and 35 <= sum(drawn) <= 65


def test_epoch_sampler_is_a_function_of_seed_and_epoch_and_shards_ranks():
    a, b = EpochSampler(10, shuffle=True, seed=1), EpochSampler(10, shuffle=True, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b) and sorted(a) == list(range(10))
    b.set_epoch(4)
    assert list(a) != list(b)
    b.set_epoch(3, start=4)
    assert list(b) == list(a)[4:]
    ranks = [EpochSampler(10, shuffle=True, seed=1, dist=Dist(r, r, 2)) for r in range(2)]
    for s in ranks:
        s.set_epoch(3)
    assert len(ranks[0]) == len(ranks[1]) == 5
    assert sorted(list(ranks[0]) + list(ranks[1])) == list(range(10))
    val = [EpochSampler(5, shuffle=False, dist=Dist(r, r, 2), pad=False) for r in range(2)]
    assert sorted(list(val[0]) + list(val[1])) == list(range(5))  # no duplicates in evaluation


# ------------------------------------------------------------------------------------------ resume


def _state(run: Path) -> dict:
    return torch.load(run / STATE_FILE, map_location="cpu", weights_only=True)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# EMA, mixup (numpy RNG), stochastic depth and augmentation (torch RNG) all have to line up
RESUME_RECIPE = {"epochs": 2, "ema": True, "mixup": 0.4, "drop_path": 0.2, "randaugment": "rand-m5-n1"}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_model_dir):
    """The uninterrupted 2-epoch run for the resume tests, by worker count (computed once)."""
    root = tmp_path_factory.mktemp("resume")
    data = class_folders(root / "data", {"ants": 8, "bees": 8})
    runs = {}

    def get(workers: int):
        if workers not in runs:
            runs[workers] = fit(config(root, data, tiny_model_dir, name="straight", workers=workers,
                                       **RESUME_RECIPE))
        return runs[workers]

    return root, data, get


# a signal during step 4's callback is seen by step 5, which is then the last one before the stop
@pytest.mark.parametrize("interrupt_at, workers", [(("epoch_end", 1), 0), (("step", 4), 0), (("epoch_end", 1), 2)],
                         ids=["epoch-boundary", "mid-epoch", "epoch-boundary-with-workers"])
def test_resume_after_ctrl_c_ends_with_the_same_weights(straight_run, tiny_model_dir, interrupt_at, workers):
    root, data, get_straight = straight_run
    straight = get_straight(workers)
    cfg = config(root, data, tiny_model_dir, name="stopped", workers=workers, **RESUME_RECIPE)
    with pytest.raises(TrainingInterrupted, match="--resume") as info:
        fit(cfg, Recorder(signal_at=interrupt_at))
    assert info.value.exit_code == 130
    run = info.value.run_dir
    saved = _state(run)["progress"]
    assert (saved["epoch"], saved["batch"]) == ((1, 0) if interrupt_at[0] == "epoch_end" else (1, 2))

    record = Recorder()
    resumed = fit(resume_config(run), record)
    assert record.first("start")["resumed_epoch"] == 1
    assert resumed.global_step == straight.global_step == 6
    _assert_same_weights(_state(straight.run_dir)["model"], _state(resumed.run_dir)["model"])
    _assert_same_weights(_state(straight.run_dir)["ema"], _state(resumed.run_dir)["ema"])
    assert [r["epoch"] for r in resumed.rows] == [1, 2]
    assert resumed.rows[-1]["val_loss"] == pytest.approx(straight.rows[-1]["val_loss"])


def test_resume_from_a_damaged_state_file_is_one_clear_error(tmp_path, data, tiny_model_dir):
    run = fit(config(tmp_path, data, tiny_model_dir, epochs=1, max_steps=1)).run_dir
    state = run / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])

    with pytest.raises(VitcliError, match=r"cannot resume: '.*state.pt' is corrupt or truncated") as info:
        fit(resume_config(run))
    assert info.value.exit_code == 1 and "\n" not in str(info.value)


def test_max_steps_stops_mid_epoch_and_resume_finishes_it(tmp_path, data, tiny_model_dir):
    result = fit(config(tmp_path, data, tiny_model_dir, epochs=2, max_steps=2))
    assert result.stopped == "max_steps" and result.global_step == 2 and result.rows[0].get("partial")
    assert (result.run_dir / "best" / "model.safetensors").is_file()
    resumed = fit(resume_config(result.run_dir))
    assert resumed.stopped == "done" and resumed.global_step == 6
    assert [r["epoch"] for r in resumed.rows] == [1, 2]


def test_resume_with_more_epochs_stretches_the_schedule(tmp_path, data, tiny_model_dir):
    run = fit(config(tmp_path, data, tiny_model_dir, epochs=1)).run_dir  # 3 steps, LR annealed to min_lr
    record = Recorder()
    resumed = fit(resume_config(run, epochs=2), record)
    lrs = [info["lr"] for e, info in record.events if e == "step"]
    assert resumed.global_step == 6 and len(lrs) == 3
    assert lrs[0] > 10 * FinetuneConfig.min_lr  # the cosine now spans 2 epochs: step 4 is mid-schedule


def test_resume_refuses_changed_options_and_allows_more_epochs(tmp_path, data, tiny_model_dir):
    run = fit(config(tmp_path, data, tiny_model_dir, max_steps=1)).run_dir
    with pytest.raises(UsageError, match="--lr cannot change"):
        resume_config(run, lr=0.1)
    with pytest.raises(UsageError, match="trained on"):
        resume_config(run, data=str(tmp_path))
    assert resume_config(run, epochs=5, data=str(data)).epochs == 5
    with pytest.raises(UsageError, match="not a finetune run folder"):
        resume_config(tmp_path)


def test_rng_state_survives_weights_only_load(tmp_path):
    import random

    import numpy as np

    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_patience_stops_early(tmp_path, data, tiny_model_dir):
    result = fit(config(tmp_path, data, tiny_model_dir, epochs=6, patience=1, lr=1e-9, warmup_epochs=0))
    assert result.stopped == "patience" and result.epochs_done == 2


def test_nan_loss_stops_and_keeps_the_last_good_state(tmp_path, data, tiny_model_dir, monkeypatch):
    build = train.build_parts

    def poisoned(*args, **kwargs):
        parts = build(*args, **kwargs)
        loss_fn, calls = parts.loss_fn, []

        def nan_in_epoch_2(logits, targets):
            calls.append(1)
            loss = loss_fn(logits, targets)
            return loss * float("nan") if len(calls) > 3 else loss

        parts.loss_fn = nan_in_epoch_2
        return parts

    monkeypatch.setattr(train, "build_parts", poisoned)
    with pytest.raises(NonFiniteLossError, match="loss became nan .*last good state") as info:
        fit(config(tmp_path, data, tiny_model_dir, epochs=2))
    assert info.value.exit_code == 1
    state = _state(tmp_path / "runs" / "exp")
    assert state["progress"]["epoch"] == 1 and state["progress"]["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# ------------------------------------------------------------------------------- model and recipe


def test_img_size_resamples_pos_embed_and_predicts_at_the_new_size(tmp_path, data):
    import timm
    from typer.testing import CliRunner

    from vitcli.cli.app import app
    from vitcli.models import save_model_folder

    torch.manual_seed(0)
    pretrained = timm.create_model("test_vit", img_size=224, num_classes=3)  # "224-pretrained"
    folder = save_model_folder(pretrained, tmp_path / "vit224", ["a", "b", "c"])
    result = fit(config(tmp_path, data, folder, img_size=288, max_steps=1, batch_size=8))
    best = result.run_dir / "best"
    saved = json.loads((best / "config.json").read_text())
    assert saved["pretrained_cfg"]["input_size"] == [3, 288, 288]
    model = timm.create_model(f"local-dir:{best}", pretrained=True)
    assert model.pos_embed.shape[1] == 1 + (288 // 16) ** 2  # patch size kept, grid 18x18
    out = CliRunner().invoke(app, ["predict", str(data / "ants" / "0.png"), "--model", str(best), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout.splitlines()[0])["predictions"][0]["label"] in ("ants", "bees")


def test_a_new_head_starts_at_zero_and_a_matching_one_is_kept(tiny_model_dir):
    from conftest import TINY_LABELS
    from vitcli.train import build_model

    new = build_model(FinetuneConfig(model=str(tiny_model_dir), img_size=SMALL), ["ants", "bees"]).model
    assert not new.head.weight.any() and not new.head.bias.any()
    random = build_model(FinetuneConfig(model=str(tiny_model_dir), zero_head=False), ["ants", "bees"]).model
    assert random.head.weight.any()
    same = build_model(FinetuneConfig(model=str(tiny_model_dir)), TINY_LABELS).model  # continue training
    assert same.head.weight.any() and same.head.weight.shape[0] == len(TINY_LABELS)


@pytest.mark.parametrize("arch", ["test_resnet", "test_efficientnet"])
def test_cnns_fine_tune_too_at_another_size(tmp_path, data, arch):
    """BatchNorm CNNs take no img_size argument: they are built as they are and fed 96x96 images."""
    import timm

    from vitcli.models import save_model_folder

    folder = save_model_folder(timm.create_model(arch, num_classes=3), tmp_path / arch, ["a", "b", "c"])
    result = fit(config(tmp_path, data, folder, img_size=96, max_steps=2))
    saved = json.loads((result.run_dir / "best" / "config.json").read_text())
    assert saved["architecture"] == arch and saved["pretrained_cfg"]["input_size"] == [3, 96, 96]
    assert result.global_step == 2 and math.isfinite(result.rows[-1]["val_loss"])


def test_freeze_trains_the_head_only(tmp_path, data, tiny_model_dir):
    import timm

    result = fit(config(tmp_path, data, tiny_model_dir, freeze=True, max_steps=2, lr=1e-2, img_size=None))
    before = timm.create_model(f"local-dir:{tiny_model_dir}", pretrained=True).state_dict()
    after = result.model.state_dict()
    assert after["head.weight"].shape == (2, before["head.weight"].shape[1])  # a new head (3 -> 2 classes)
    moved = [k for k in after if not k.startswith("head.") and not torch.equal(before[k], after[k])]
    assert moved == []


def test_gradient_accumulation_counts_optimizer_steps(tmp_path, data, tiny_model_dir):
    # (with the class-balanced sampler, which draws as many samples per epoch as there are images)
    result = fit(config(tmp_path, data, tiny_model_dir, batch_size=2, accum_steps=2, balance="sampler"))
    assert result.global_step == 3  # 12 images / 2 per batch = 6 batches = 3 steps


@pytest.mark.parametrize("bad, message", [
    ({"balance": "loss", "mixup": 0.8}, "--balance loss cannot be combined"),
    ({"precision": "fp16", "device": "cpu"}, "fp16 needs a CUDA device"),
    ({"layer_decay": 1.5}, "--layer-decay"),
    ({"opt": "adamx"}, "unknown --opt 'adamx'; did you mean"),
    ({"sched": "plateau"}, "unknown --sched"),
])
def test_bad_option_values_are_usage_errors(tmp_path, data, tiny_model_dir, bad, message):
    with pytest.raises(UsageError, match=message):
        fit(config(tmp_path, data, tiny_model_dir, **bad))


# ---------------------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_hymenoptera_default_recipe_reaches_95_percent_in_3_epochs(tmp_path):
    """deit_tiny (ImageNet-pretrained) on ants vs bees: 245 train (one GIF), 153 val images, CPU."""
    hymenoptera = shared("hymenoptera")
    weights = shared("weights", DEIT_WEIGHTS.name)
    result = fit(FinetuneConfig(data=str(hymenoptera), model="deit_tiny_patch16_224", weights=str(weights),
                                epochs=3, project=str(tmp_path / "runs")))
    top1 = [round(r["val_top1"], 4) for r in result.rows]
    print(f"val top-1 per epoch: {top1}; train img/s: {[round(r['img_s'], 1) for r in result.rows]}")
    assert result.best_top1 >= 0.95, top1
