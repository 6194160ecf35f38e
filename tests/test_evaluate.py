"""vitcli.evaluate and `vitcli evaluate`: metrics by hand, by-name class mapping, layouts, bad files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import DEIT_WEIGHTS, TINY_LABELS, make_image, shared
from vitcli.cli.app import app
from vitcli.errors import DatasetError, UsageError
from vitcli.evaluate import evaluate_model
from vitcli.io.images import load_image
from vitcli.io.transforms import eval_transform
from vitcli.metrics import ClassMetrics, confusion_matrix, per_class_metrics
from vitcli.models.resolve import LoadedModel, load_model

runner = CliRunner()
COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}


# ------------------------------------------------------------------------------------ helpers


class ChannelModel(torch.nn.Module):
    """An oracle classifier: class = the brightest RGB channel (0 red, 1 green, 2 blue)."""

    num_classes = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 3)
        return x.mean(dim=(2, 3)) * 4.0


def channel_model(labels: list[str] = TINY_LABELS) -> LoadedModel:
    config = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
              "std": (0.5, 0.5, 0.5), "crop_pct": 1.0, "crop_mode": "center"}
    return LoadedModel(ChannelModel(), "channel", "channel", "random", list(labels), config)


def solid(path: Path, colour: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), COLOURS[colour]).save(path)
    return path


def noise_folder(root: Path, counts: dict[str, int]) -> Path:
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            make_image(root / name / f"{name}{i}.png", seed=100 * c + i)
    return root


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> LoadedModel:
    return load_model(str(tiny_model_dir))


def invoke(*args: str):
    return runner.invoke(app, ["evaluate", *args])


# ---------------------------------------------------------------------------------- metrics


def test_confusion_matrix_rows_are_true_classes():
    targets = torch.tensor([0, 0, 1, 2, 2, 2])
    preds = torch.tensor([0, 1, 1, 2, 0, 2])
    matrix = confusion_matrix(targets, preds, 3)
    assert matrix.dtype == torch.int64
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_confusion_matrix_of_nothing_is_zeros():
    matrix = confusion_matrix(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 4)
    assert matrix.shape == (4, 4) and matrix.sum() == 0


def test_per_class_metrics_hand_computed():
    metrics = per_class_metrics(torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 2]]), ["a", "b", "c"])
    a, b, c = metrics
    assert a == ClassMetrics("a", 0.5, 0.5, 0.5, 2)
    assert (b.precision, b.recall, b.support) == (0.5, 1.0, 1)
    assert b.f1 == pytest.approx(2 / 3)
    assert (c.precision, c.support) == (1.0, 3)
    assert c.recall == pytest.approx(2 / 3)
    assert c.f1 == pytest.approx(0.8)


def test_per_class_metrics_zero_division_is_zero():
    # class a has no images but is predicted 3 times; class b is never predicted
    a, b = per_class_metrics([[0, 0], [3, 0]], ["a", "b"])
    assert (a.precision, a.recall, a.f1, a.support) == (0.0, 0.0, 0.0, 0)
    assert (b.precision, b.recall, b.f1, b.support) == (0.0, 0.0, 0.0, 3)


def test_per_class_metrics_rejects_a_matrix_that_does_not_fit_the_labels():
    with pytest.raises(ValueError, match="does not fit 3 labels"):
        per_class_metrics(torch.zeros(2, 2), ["a", "b", "c"])


# --------------------------------------------------------------------------- evaluate_model


def test_classes_are_mapped_by_name_not_folder_order(tmp_path):
    # folders sort as cat, dog (and the model's order is cat, dog, bird): give them colours
    # that make the oracle answer differently so a mix-up of rows would show
    data = tmp_path / "data"
    for i in range(2):
        solid(data / "cat" / f"red{i}.png", "red")  # -> cat (right)
    solid(data / "cat" / "green.png", "green")  # -> dog (wrong)
    for i in range(3):
        solid(data / "dog" / f"green{i}.png", "green")  # -> dog (right)
    solid(data / "dog" / "blue.png", "blue")  # -> bird (wrong, a class with no folder)
    result = evaluate_model(channel_model(), data, workers=0)
    assert result.labels == ["cat", "dog", "bird"]
    assert result.matrix.tolist() == [[2, 1, 0], [0, 3, 1], [0, 0, 0]]
    assert result.n_images == 7
    assert result.top1 == pytest.approx(5 / 7)
    assert result.top5 is None  # 3 classes: every image is in the top 5
    assert [m.support for m in result.per_class] == [3, 4, 0]
    assert result.per_class[0].precision == 1.0 and result.per_class[0].recall == pytest.approx(2 / 3)
    assert result.folder == str(data)


def test_labels_in_a_different_order_move_the_rows(tmp_path):
    data = tmp_path / "data"
    solid(data / "dog" / "g.png", "green")
    solid(data / "bird" / "b.png", "blue")
    solid(data / "bird" / "r.png", "red")
    # the model's class 0 (red) is "bird" here, class 1 (green) "dog", class 2 (blue) "cat"
    result = evaluate_model(channel_model(["bird", "dog", "cat"]), data, workers=0)
    assert result.labels == ["bird", "dog", "cat"]  # model order; "cat" only because it was predicted
    assert result.matrix.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    assert result.top1 == pytest.approx(2 / 3)


def test_matrix_keeps_only_folder_classes_and_predicted_ones(tmp_path):
    solid(tmp_path / "cat" / "a.png", "red")
    solid(tmp_path / "dog" / "a.png", "green")
    result = evaluate_model(channel_model(), tmp_path, workers=0)
    assert result.labels == ["cat", "dog"]  # "bird": no folder, never predicted
    assert result.matrix.tolist() == [[1, 0], [0, 1]]
    assert result.top1 == 1.0


def test_tiny_model_totals_match_an_independent_forward(tiny, tmp_path):
    from vitcli.inference.predict import PredictOptions, predict
    from vitcli.io.images import load_image
    from vitcli.io.transforms import eval_transform

    data = noise_folder(tmp_path / "data", {"dog": 5, "cat": 4, "bird": 3})
    result = evaluate_model(tiny, data, batch_size=5, workers=0, precision="fp32")  # exact: compared with fp32
    matrix = result.matrix
    assert result.n_images == 12 == int(matrix.sum())
    assert result.top1 == pytest.approx(matrix.trace().item() / matrix.sum().item())
    assert {m.label: m.support for m in result.per_class} == {"cat": 4, "dog": 5, "bird": 3}

    paths = sorted(str(p) for p in data.rglob("*.png"))
    truth = [Path(p).parent.name for p in paths]
    preds = list(predict(tiny, paths, PredictOptions(top_k=1, workers=0, fast_decode=False, precision="fp32")))
    assert result.top1 == pytest.approx(sum(p.top[0].label == t for p, t in zip(preds, truth, strict=True)) / 12)

    transform = eval_transform(tiny.data_config)
    images = torch.stack([transform(load_image(p)) for p in paths])
    targets = torch.tensor([tiny.labels.index(t) for t in truth])
    with torch.inference_mode():
        loss = torch.nn.functional.cross_entropy(tiny.model(images), targets).item()
    assert result.loss == pytest.approx(loss, rel=1e-4)
    assert result.top5 is None  # top-5 of 3 classes says nothing


def test_test_folder_is_preferred_over_val_and_split_picks_one(tmp_path):
    root = tmp_path / "data"
    solid(root / "test" / "cat" / "a.png", "red")
    solid(root / "val" / "dog" / "a.png", "green")
    solid(root / "val" / "dog" / "b.png", "green")
    model = channel_model()
    assert evaluate_model(model, root, workers=0).folder == str(root / "test")
    by_split = evaluate_model(model, root, split="val", workers=0)
    assert by_split.folder == str(root / "val") and by_split.n_images == 2
    shutil.rmtree(root / "test")
    assert evaluate_model(model, root, workers=0).folder == str(root / "val")
    with pytest.raises(DatasetError, match="has no 'nope' folder"):
        evaluate_model(model, root, split="nope", workers=0)


def test_a_root_with_only_train_asks_for_split(tmp_path):
    solid(tmp_path / "data" / "train" / "cat" / "a.png", "red")
    with pytest.raises(DatasetError, match="--split train"):
        evaluate_model(channel_model(), tmp_path / "data", workers=0)
    assert evaluate_model(channel_model(), tmp_path / "data", split="train", workers=0).n_images == 1


def test_unknown_class_lists_the_model_labels(tmp_path):
    solid(tmp_path / "cat" / "a.png", "red")
    solid(tmp_path / "horse" / "a.png", "red")
    with pytest.raises(DatasetError, match="unknown to the model: horse; the model's labels are cat, dog, bird"):
        evaluate_model(channel_model(), tmp_path, workers=0)


def test_unreadable_images_are_skipped_with_workers(tmp_path):
    solid(tmp_path / "cat" / "a.png", "red")
    solid(tmp_path / "dog" / "a.png", "green")
    bad = tmp_path / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    done = []
    result = evaluate_model(channel_model(), tmp_path, batch_size=2, workers=2,
                            on_batch=lambda n, total: done.append((n, total)))
    assert result.skipped == [(str(bad), "not an image Pillow can read")]
    assert result.n_images == 2 and result.top1 == 1.0
    assert done[-1] == (3, 3)
    with pytest.raises(DatasetError, match=r"broken\.jpg.*--strict"):
        evaluate_model(channel_model(), tmp_path, workers=0, strict=True)


def test_bad_batch_size_and_precision_are_usage_errors(tmp_path):
    solid(tmp_path / "cat" / "a.png", "red")
    with pytest.raises(UsageError, match="--batch-size"):
        evaluate_model(channel_model(), tmp_path, batch_size=0)
    with pytest.raises(UsageError, match="fp16 needs a GPU"):
        evaluate_model(channel_model(), tmp_path, device="cpu", precision="fp16")


# ---------------------------------------------------------------------------------------- CLI


@pytest.fixture
def dataset(tmp_path) -> Path:
    return noise_folder(tmp_path / "data" / "test", {"cat": 3, "dog": 2})


def test_cli_tables(tiny_model_dir, dataset):
    result = invoke(str(dataset.parent), "--model", str(tiny_model_dir), "--workers", "0")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert "top-3" not in result.stdout and "top-5" not in result.stdout  # 3 classes: all in any top 3
    for text in ("top-1", "precision", "recall", "support", "confusion matrix", "cat", "dog"):
        assert text in result.stdout


def test_cli_json_is_one_document(tiny_model_dir, dataset):
    result = invoke(str(dataset.parent), "-m", str(tiny_model_dir), "-j", "0", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc) == {"top1", "top5", "loss", "n_images", "folder", "per_class", "confusion_matrix", "skipped",
                        "calibration", "mistakes", "most_confused"}
    assert doc["n_images"] == 5 and doc["folder"] == str(dataset) and doc["skipped"] == []
    assert 0.0 <= doc["top1"] <= 1.0 and doc["top5"] is None and doc["loss"] > 0  # 3 classes: no top-5
    matrix = doc["confusion_matrix"]["matrix"]
    labels = doc["confusion_matrix"]["labels"]
    assert labels[:2] == ["cat", "dog"] and len(matrix) == len(labels)
    assert [sum(row) for row in matrix][:2] == [3, 2] and sum(map(sum, matrix)) == 5
    assert doc["top1"] == pytest.approx(sum(matrix[i][i] for i in range(len(labels))) / 5)
    assert set(doc["per_class"][0]) == {"label", "precision", "recall", "f1", "support"}


def test_cli_confusion_png(tiny_model_dir, dataset, tmp_path):
    png = tmp_path / "out" / "confusion.png"
    result = invoke(str(dataset), "-m", str(tiny_model_dir), "-j", "0", "--confusion-png", str(png))
    assert result.exit_code == 0, result.output
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 300 and img.height > 300
    assert f"wrote {png}" in result.stderr


def test_cli_run_folder_as_model(tiny_model_dir, dataset, tmp_path):
    run = tmp_path / "runs" / "exp"
    shutil.copytree(tiny_model_dir, run / "best")
    result = invoke(str(dataset), "--model", str(run), "-j", "0", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_images"] == 5
    assert f"using the model folder {run / 'best'}" in result.stderr


def test_cli_unknown_class_is_exit_1_with_one_line(tiny_model_dir, tmp_path):
    noise_folder(tmp_path / "data", {"cat": 1, "zebra": 1})
    result = invoke(str(tmp_path / "data"), "-m", str(tiny_model_dir), "-j", "0")
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines == ["Error: folder class(es) unknown to the model: zebra; the model's labels are cat, dog, bird"]


def test_cli_unreadable_image_is_reported_once_and_exit_1(tiny_model_dir, dataset):
    bad = dataset / "dog" / "empty.png"
    bad.write_bytes(b"")
    result = invoke(str(dataset), "-m", str(tiny_model_dir), "-j", "0", "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["n_images"] == 5
    assert doc["skipped"] == [{"path": str(bad), "reason": "file is empty (0 bytes)"}]
    assert result.stderr.count("empty.png") == 1
    assert f"Error: {bad}: file is empty (0 bytes)" in result.stderr

    strict = invoke(str(dataset), "-m", str(tiny_model_dir), "-j", "0", "--strict")
    assert strict.exit_code == 1 and strict.stdout == ""
    assert "--strict" in strict.stderr and "empty.png" in strict.stderr


@pytest.mark.parametrize("args", [["--precision", "fp64"], ["--batch-size", "0"]])
def test_cli_usage_errors_exit_2(tiny_model_dir, dataset, args):
    result = invoke(str(dataset), "--model", str(tiny_model_dir), *args)
    assert result.exit_code == 2
    assert result.stdout == ""


def test_cli_default_model_is_the_shipped_imagenet_deit_tiny(tmp_path):
    import shutil

    from conftest import REPO

    for name, photo in (("Samoyed", "samoyed.jpg"), ("German shepherd", "german_shepherd.jpg")):
        (tmp_path / "val" / name).mkdir(parents=True)
        shutil.copy(REPO / "examples" / photo, tmp_path / "val" / name / photo)

    result = invoke(str(tmp_path), "--json", "-j", "0")  # no --model: classes matched to ImageNet names

    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["n_images"] == 2 and doc["top1"] == 1.0
    assert doc["confusion_matrix"]["labels"] == ["German shepherd", "Samoyed"]


def test_cli_ambiguous_imagenet_folder_names_the_indices_and_an_index_picks_one(tmp_path):
    import shutil

    from conftest import REPO

    photo = REPO / "examples" / "samoyed.jpg"
    (tmp_path / "crane").mkdir()
    shutil.copy(photo, tmp_path / "crane" / "a.jpg")

    result = invoke(str(tmp_path), "--json", "-j", "0")  # ImageNet holds "crane" at 134 (bird) and 517

    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "Error: folder 'crane' names a label the model holds 2 times, at indices 134, 517; "
        "rename the folder crane_134 (or 134) to pick one"]

    (tmp_path / "crane").rename(tmp_path / "crane_517")
    (tmp_path / "258").mkdir()  # 258 is Samoyed
    shutil.copy(photo, tmp_path / "258" / "b.jpg")
    picked = invoke(str(tmp_path), "--json", "-j", "0")
    assert picked.exit_code == 0, picked.output
    doc = json.loads(picked.stdout)
    assert doc["n_images"] == 2
    assert {c["label"]: c["support"] for c in doc["per_class"]} == {"Samoyed": 1, "crane": 1}


def test_cli_missing_folder_is_exit_1(tiny_model_dir, tmp_path):
    result = invoke(str(tmp_path / "nowhere"), "-m", str(tiny_model_dir))
    assert result.exit_code == 1
    assert "does not exist" in result.stderr


def test_help_in_a_subprocess_imports_no_torch():
    help_run = subprocess.run([sys.executable, "-m", "vitcli", "evaluate", "--help"],
                              capture_output=True, text=True, timeout=60)
    assert help_run.returncode == 0
    assert "--confusion-png" in help_run.stdout and "one JSON document" in help_run.stdout
    check = "import sys, vitcli.cli.app; assert not {'torch', 'timm', 'matplotlib'} & set(sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], timeout=60).returncode == 0


@pytest.mark.slow
def test_imagenet_model_on_hymenoptera_names_the_unknown_classes():
    val = shared("hymenoptera", "val")
    if not DEIT_WEIGHTS.is_file():
        pytest.skip(f"shared weights not available: {DEIT_WEIGHTS}")
    result = invoke(str(val.parent), "--model", "deit_tiny_patch16_224", "--weights", str(DEIT_WEIGHTS))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("Error: folder class(es) unknown to the model: ants, bees; "
                                    "the model's labels are tench, goldfish, great white shark")
    assert len(result.stderr.strip().splitlines()) == 1


def test_top5_of_a_model_with_more_than_5_classes_counts_true_classes_in_the_top_5(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=8).eval()
    labels = [f"c{i}" for i in range(8)]
    loaded = LoadedModel(model, "test", "test_vit", "random", labels,
                         timm.data.resolve_model_data_config(model))
    paths = noise_folder(tmp_path / "data", dict.fromkeys(labels, 2))

    result = evaluate_model(loaded, paths, workers=0)

    transform = eval_transform(loaded.data_config)
    samples = [(p, labels.index(p.parent.name)) for p in sorted(paths.rglob("*.png"))]
    with torch.inference_mode():
        logits = model(torch.stack([transform(load_image(str(p))) for p, _ in samples]))
    targets = torch.tensor([t for _, t in samples])
    in_top5 = (logits.topk(5, dim=1).indices == targets[:, None]).any(dim=1).float().mean().item()
    assert result.top5 == pytest.approx(in_top5)
    assert result.top1 == pytest.approx((logits.argmax(dim=1) == targets).float().mean().item())


def test_cli_leaves_out_the_top5_column_for_two_classes(tiny_model_dir, tmp_path):
    import timm

    from vitcli.models.folders import save_model_folder

    two = save_model_folder(timm.create_model("test_vit", pretrained=False, num_classes=2).eval(),
                            tmp_path / "two", ["cat", "dog"])
    data = noise_folder(tmp_path / "data", {"cat": 2, "dog": 2})

    result = invoke(str(data), "-m", str(two), "-j", "0")

    assert result.exit_code == 0, result.output
    assert "top-1" in result.stdout and "top-5" not in result.stdout and "top-2" not in result.stdout


def test_cli_under_torchrun_sums_the_ranks_counts(tiny_model_dir, tmp_path):
    import os

    data = noise_folder(tmp_path / "data" / "val", {"cat": 4, "dog": 3, "bird": 2})
    (data / "dog" / "broken.png").write_text("not a png")
    one = invoke(str(data.parent), "--model", str(tiny_model_dir), "--json", "-j", "0", "-b", "2")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "vitcli", "evaluate", str(data.parent), "--model", str(tiny_model_dir), "--json", "-b", "2"]

    two = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})

    assert one.exit_code == 1 and two.returncode == 1, two.stderr  # the broken file, reported once
    assert two.stderr.count("broken.png: not an image Pillow can read") == 1
    expected, got = json.loads(one.stdout), json.loads(two.stdout)
    assert got["n_images"] == expected["n_images"] == 9
    assert got["confusion_matrix"] == expected["confusion_matrix"] and got["per_class"] == expected["per_class"]
    assert got["skipped"] == expected["skipped"]
    assert (got["top1"], got["top5"]) == (expected["top1"], expected["top5"])
    assert got["loss"] == pytest.approx(expected["loss"], abs=1e-6)


# ------------------------------------------------------------------------------------ mistakes


def test_planted_label_errors_come_first_among_the_mistakes(tmp_path):
    """Red images filed under green and blue are the most confident mistakes; a dull image the oracle
    gets wrong with little confidence comes after them."""
    root = tmp_path / "val"
    for i in range(3):
        solid(root / "red" / f"r{i}.png", "red")
        solid(root / "green" / f"g{i}.png", "green")
        solid(root / "blue" / f"b{i}.png", "blue")
    planted = [solid(root / "green" / "planted_red.png", "red"), solid(root / "blue" / "planted_green.png", "green")]
    dull = root / "red" / "dull.png"
    Image.new("RGB", (40, 40), (120, 128, 110)).save(dull)  # green by a hair: a mistake, but not a confident one

    result = evaluate_model(channel_model(["red", "green", "blue"]), root, workers=0, precision="fp32", mistakes=10)

    # the two planted images are equally sure (ties go by path: blue/ before green/), then the dull one
    assert [m.path for m in result.mistakes] == [str(planted[1]), str(planted[0]), str(dull)]
    first = result.mistakes[0]
    assert first.prob > 0.9 and first.label_prob < 0.05 and first.prob > result.mistakes[-1].prob
    assert result.mistakes[-1].path == str(dull) and result.mistakes[-1].prob < 0.5
    red = next(m for m in result.mistakes if m.path.endswith("planted_red.png"))
    assert (red.label, red.predicted) == ("green", "red")
    assert result.confused[0][2] == 1 and len(result.confused) == 3  # three off-diagonal cells of one image each
    assert len(evaluate_model(channel_model(["red", "green", "blue"]), root, workers=0, mistakes=1).mistakes) == 1


def test_cli_mistakes_in_json_and_table_and_the_png(tmp_path):
    import vitcli.models.resolve as resolve

    root = tmp_path / "val"
    for i in range(2):
        solid(root / "red" / f"r{i}.png", "red")
        solid(root / "green" / f"g{i}.png", "green")
    solid(root / "green" / "planted.png", "red")
    png = tmp_path / "mistakes.png"
    loaded = channel_model(["red", "green", "blue"])
    original = resolve.load_model
    resolve.load_model = lambda *a, **k: loaded  # the oracle as the CLI's model
    try:
        doc = json.loads(invoke(str(root), "--json", "-j", "0", "--mistakes", "5", "--precision", "fp32").stdout)
        table = invoke(str(root), "-j", "0", "--mistakes-png", str(png), "--precision", "fp32")
    finally:
        resolve.load_model = original
    assert doc["mistakes"] == [{"path": str(root / "green" / "planted.png"), "label": "green", "predicted": "red",
                                "prob": pytest.approx(doc["mistakes"][0]["prob"]),
                                "label_prob": pytest.approx(doc["mistakes"][0]["label_prob"])}]
    assert doc["most_confused"] == [{"label": "green", "predicted": "red", "images": 1}]
    assert table.exit_code == 0, table.output
    assert "most confident mistakes" in table.stdout and "planted.png" in table.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_label_audit_finds_photos_filed_under_the_wrong_class(tmp_path):
    """hymenoptera/val with 6 photos moved to the other class, scored by the shipped DeiT-Tiny restricted
    to ImageNet's ant (310) and bee (309) rows: at least 5 of the 6 are among the first 15 mistakes."""
    import random

    import timm

    from vitcli.models.folders import save_model_folder

    root = tmp_path / "val"
    shutil.copytree(shared("hymenoptera", "val"), root)
    rng = random.Random(0)
    moved = []
    for source, target in (("ants", "bees"), ("bees", "ants")):
        for path in rng.sample(sorted((root / source).iterdir()), 3):
            moved.append(str(root / target / path.name))
            path.rename(moved[-1])
    shipped = load_model()
    two = timm.create_model(shipped.arch, pretrained=False, num_classes=2)
    state = shipped.model.state_dict()
    state["head.weight"], state["head.bias"] = state["head.weight"][[310, 309]], state["head.bias"][[310, 309]]
    two.load_state_dict(state)
    folder = save_model_folder(two.eval(), tmp_path / "antbee", ["ants", "bees"], shipped.data_config)

    result = evaluate_model(load_model(str(folder)), root, mistakes=15, precision="fp32")

    found = [m.path for m in result.mistakes if m.path in moved]
    assert len(found) >= 5, [m.path for m in result.mistakes]
