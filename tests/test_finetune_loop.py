"""vitcli.finetune.loop: fit() end to end: the run folder, resume, NaN, --img-size, heads, the recipe."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from _finetune import SMALL, Recorder, class_folders, config
from conftest import DEIT_WEIGHTS, shared
from vitcli.errors import NonFiniteLossError, TrainingInterrupted, UsageError, VitcliError
from vitcli.finetune import loop
from vitcli.finetune.config import STATE_FILE, FinetuneConfig, resume_config
from vitcli.finetune.loop import fit
from vitcli.finetune.rundir import write_figures as WRITE_FIGURES
from vitcli.io.datasets import FolderData

pytestmark = pytest.mark.usefixtures("no_figures")


@pytest.fixture
def data(tmp_path) -> Path:
    """Two classes of 8 images, no val folder (split by --val-split)."""
    return class_folders(tmp_path / "data", {"ants": 8, "bees": 8})


# ---------------------------------------------------------------------------------- the run folder


def test_fit_writes_a_complete_run_folder(tmp_path, data, tiny_model_dir, monkeypatch):
    import timm

    from vitcli.finetune import rundir

    monkeypatch.setattr(rundir, "write_figures", WRITE_FIGURES)

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
    # 2 classes: no top-5 (every image is in the top 5), in the rows, metrics.csv or the table
    assert set(rows[0]) == {"epoch", "train_loss", "val_loss", "val_top1", "lr", "epoch_time", "img_s"}
    assert "val_top5" not in result.rows[0]
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


def test_patience_stops_early(tmp_path, data, tiny_model_dir):
    result = fit(config(tmp_path, data, tiny_model_dir, epochs=6, patience=1, lr=1e-9, warmup_epochs=0))
    assert result.stopped == "patience" and result.epochs_done == 2


def test_nan_loss_stops_and_keeps_the_last_good_state(tmp_path, data, tiny_model_dir, monkeypatch):
    build = loop.build_parts

    def poisoned(*args, **kwargs):
        parts = build(*args, **kwargs)
        loss_fn, calls = parts.loss_fn, []

        def nan_in_epoch_2(logits, targets):
            calls.append(1)
            loss = loss_fn(logits, targets)
            return loss * float("nan") if len(calls) > 3 else loss

        parts.loss_fn = nan_in_epoch_2
        return parts

    monkeypatch.setattr(loop, "build_parts", poisoned)
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
    from vitcli.models.folders import save_model_folder

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
    from vitcli.finetune.model import build_model

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

    from vitcli.models.folders import save_model_folder

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


def test_distilled_deit_trains_both_heads(tmp_path, data):
    """timm's get_classifier() is (head, head_dist) for distilled models: zero-init, --freeze and the LR cover both."""
    import timm

    from vitcli.finetune.model import build_model, classifier_heads
    from vitcli.finetune.parts import build_parts
    from vitcli.models.folders import save_model_folder

    torch.manual_seed(0)
    distilled = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=SMALL,
                                  num_classes=3, depth=2)
    folder = save_model_folder(distilled, tmp_path / "distilled", ["a", "b", "c"])
    cfg = config(tmp_path, data, folder)
    model = build_model(cfg, ["ants", "bees"]).model
    assert len(classifier_heads(model)) == 2
    assert not any(p.any() for head in (model.head, model.head_dist) for p in head.parameters())

    parts = build_parts(cfg, model, [6, 6], 3, torch.device("cpu"), "fp32", loop.Rank())
    lr_of = {id(p): group["lr"] for group in parts.optimizer.param_groups for p in group["params"]}
    assert lr_of[id(model.head_dist.weight)] == lr_of[id(model.head.weight)] == loop.current_lr(parts.optimizer)

    result = fit(config(tmp_path, data, folder, freeze=True, max_steps=2, lr=1e-2))
    before = timm.create_model(f"local-dir:{folder}", pretrained=True).state_dict()
    after = result.model.state_dict()
    assert after["head_dist.weight"].any() and after["head.weight"].any()  # both heads learned
    moved = [k for k in after if not k.startswith(("head.", "head_dist.")) and not torch.equal(before[k], after[k])]
    assert moved == []  # the backbone stayed frozen


class Logits(torch.nn.Module):
    """A 'model' whose input is already its logits: evaluate() on chosen scores."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_evaluate_reports_top5_only_above_5_classes():
    from vitcli.finetune.loop import evaluate

    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(40, 8, generator=g), torch.randint(0, 8, (40,), generator=g)
    batches = [(logits[:16], targets[:16]), (logits[16:], targets[16:])]
    metrics = evaluate(Logits(), batches, 8, torch.device("cpu"))
    ranks = (logits > logits.gather(1, targets[:, None])).sum(dim=1)  # classes scored above the true one
    assert metrics["val_top1"] == pytest.approx((ranks == 0).float().mean().item())
    assert metrics["val_top5"] == pytest.approx((ranks < 5).float().mean().item())
    assert metrics["confusion"].sum() == 40 and metrics["confusion"].trace() == (ranks == 0).sum()

    two = evaluate(Logits(), [(logits[:, :2], targets % 2)], 2, torch.device("cpu"))
    assert "val_top5" not in two and 0 <= two["val_top1"] <= 1


def test_resume_works_from_another_directory(tmp_path, tiny_model_dir, monkeypatch):
    """A run started with relative paths (data, model folder, project) resumes from anywhere."""
    work = tmp_path / "work"
    class_folders(work / "data", {"ants": 6, "bees": 6})
    shutil.copytree(tiny_model_dir, work / "model")
    monkeypatch.chdir(work)
    run = fit(config(tmp_path, "data", "model", project="runs", epochs=2, max_steps=1)).run_dir
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resumed = fit(resume_config(work / run))
    assert resumed.stopped == "done" and resumed.global_step == 4 and resumed.run_dir == work / run
    assert not (elsewhere / "runs").exists()


def test_early_stop_after_a_max_steps_stop_and_resume_counts_the_epoch_once(tmp_path, data, tiny_model_dir,
                                                                             monkeypatch):
    """Epoch 2 is cut by --max-steps and evaluated (0.9), then resumed and evaluated again at its end (0.7,
    better than epoch 1's 0.5): that is one epoch that improved, so --patience 1 goes on to epoch 3, and
    best/ holds epoch 2's final weights, not the partial ones."""
    scores = iter([0.5, 0.9, 0.7, 0.6, 0.6])
    seen: list[dict[str, torch.Tensor]] = []

    def scripted(model, batches, num_classes, device, precision="fp32", dist=None):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        top1 = next(scores)
        return {"val_loss": 1.0 - top1, "val_top1": top1, "confusion": torch.eye(num_classes, dtype=torch.long),
                "preds": torch.zeros(0), "targets": torch.zeros(0), "count": 4}

    monkeypatch.setattr(loop, "evaluate", scripted)
    cut = fit(config(tmp_path, data, tiny_model_dir, epochs=4, patience=1, max_steps=4))  # 3 steps an epoch
    assert cut.stopped == "max_steps" and [r["epoch"] for r in cut.rows] == [1, 2]
    assert cut.best_epoch == 1  # a partial evaluation does not replace a finished epoch's best

    resumed = fit(resume_config(cut.run_dir))

    assert [r["epoch"] for r in resumed.rows] == [1, 2, 3] and not any(r.get("partial") for r in resumed.rows)
    assert resumed.stopped == "patience" and resumed.epochs_done == 3
    assert (resumed.best_epoch, resumed.best_top1) == (2, 0.7)
    from safetensors.torch import load_file

    best = load_file(str(resumed.best_dir / "model.safetensors"))
    assert all(torch.equal(best[k], seen[2][k]) for k in best)  # the weights evaluated at epoch 2's end
    assert not all(torch.equal(best[k], seen[1][k]) for k in best)
