"""`vitcli patches --explain [--class]`: the class map, its faithfulness scores, and the refusals (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TINY_LABELS, error_line, make_image
from vitcli.cli.app import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["patches", *map(str, args)])


def test_explain_writes_both_pngs_and_the_aucs_in_json(tiny_model_dir, tmp_path):
    image = make_image(tmp_path / "cat.jpg", size=(300, 200))

    result = invoke(image, "--model", tiny_model_dir, "--explain", "--steps", "4", "--json", "--out", tmp_path / "o")

    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [Path(f).name for f in doc["files"]] == ["patches.png", "tokens.png", "explain.png", "faithfulness.png"]
    assert all(Path(f).is_file() for f in doc["files"])
    explain = doc["explain"]
    top1 = doc["predictions"][0]
    assert explain["class"] == {"index": top1["index"], "label": top1["label"], "prob": pytest.approx(top1["prob"])}
    assert len(explain["relevance"]) == 10 and sum(map(sum, explain["relevance"])) == pytest.approx(1.0, abs=1e-5)
    assert sum(map(sum, explain["rollout"])) == pytest.approx(1.0, abs=1e-5)
    faith = explain["faithfulness"]
    assert faith["steps"] == 4 and faith["fractions"] == [0, 0.25, 0.5, 0.75, 1.0] and faith["random_seeds"] == 3
    for kind in ("deletion", "insertion"):
        assert set(faith[kind]) == {"gradient_rollout", "rollout", "random"}
        for curve in faith[kind].values():
            assert 0.0 <= curve["auc"] <= 1.0 and len(curve["probs"]) == 5
    # the first deletion point and the last insertion point are the full image: the top-1 probability
    assert faith["deletion"]["rollout"]["probs"][0] == pytest.approx(top1["prob"], abs=1e-5)
    assert faith["insertion"]["gradient_rollout"]["probs"][-1] == pytest.approx(top1["prob"], abs=1e-5)


@pytest.mark.parametrize(("wanted", "index"), [("dog", 1), ("BIRD", 2), ("0", 0)])
def test_class_picks_the_class_by_label_or_index_and_implies_explain(tiny_model_dir, tmp_path, wanted, index):
    result = invoke(make_image(tmp_path / "a.png"), "--model", tiny_model_dir, "--class", wanted, "--steps", "2",
                    "--json", "--out", tmp_path / "o")

    assert result.exit_code == 0, result.output
    explain = json.loads(result.stdout)["explain"]
    assert explain["class"]["index"] == index and explain["class"]["label"] == TINY_LABELS[index]
    assert explain["faithfulness"]["class_index"] == index


def test_the_table_names_the_class_and_each_maps_aucs(tiny_model_dir, tmp_path):
    result = invoke(make_image(tmp_path / "a.png"), "--model", tiny_model_dir, "--explain", "--class", "bird",
                    "--steps", "2", "--out", tmp_path / "o")

    assert result.exit_code == 0, result.output
    assert "explained class: bird (index 2" in result.stdout
    for text in ("faithfulness", "gradient rollout", "random (3 seeds)", "deletion AUC", "insertion AUC"):
        assert text in result.stdout
    assert "explain.png" in result.stdout and "faithfulness.png" in result.stdout


def test_an_unknown_class_is_a_usage_error_listing_the_closest_labels(tiny_model_dir, tmp_path):
    result = invoke(make_image(tmp_path / "a.png"), "--model", tiny_model_dir, "--class", "dogs",
                    "--out", tmp_path / "o")

    assert result.exit_code == 2
    assert error_line(result).startswith("Error: unknown --class 'dogs'") and "closest: 'dog' (1)" in result.stderr
    assert not (tmp_path / "o").exists()  # refused before anything is drawn


def test_a_class_index_out_of_range_is_a_usage_error(tiny_model_dir, tmp_path):
    result = invoke(make_image(tmp_path / "a.png"), "--model", tiny_model_dir, "--class", "3", "--out", tmp_path / "o")

    assert result.exit_code == 2
    assert "--class 3 is out of range: the model has classes 0..2" in error_line(result)


@pytest.mark.parametrize(("model", "reason"), [
    ("resnet18", "convolutional network: it has no patch tokens"),
    ("swin_tiny_patch4_window7_224", "--explain is not available for SwinTransformer: Swin attends inside shifted"),
])
def test_models_it_cannot_explain_are_refused_with_the_reason(tmp_path, model, reason):
    result = invoke(make_image(tmp_path / "a.png"), "--model", model, "--no-pretrained", "--explain",
                    "--out", tmp_path / "o")

    assert result.exit_code == 2
    assert reason in error_line(result)
    assert not (tmp_path / "o").exists()


def test_prefix_tokens_and_a_non_square_input_are_explained(tmp_path):
    """DeiT's distillation token: the map reads the mean of the CLS and DIST rows; 64x96 gives a 4x6 grid."""
    result = invoke(make_image(tmp_path / "a.png", size=(200, 100)), "--model", "deit_tiny_distilled_patch16_224",
                    "--no-pretrained", "--img-size", "64x96", "--explain", "--steps", "3", "--json",
                    "--out", tmp_path / "o")

    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["prefix"] == ["CLS", "DIST"] and doc["grid"] == [4, 6]
    assert len(doc["explain"]["relevance"]) == 4 and len(doc["explain"]["relevance"][0]) == 6
    assert doc["explain"]["faithfulness"]["deletion"]["random"]["probs"][-1] == pytest.approx(
        doc["explain"]["faithfulness"]["insertion"]["random"]["probs"][0], abs=1e-6)  # both: CLS and DIST alone


def test_help_names_the_explain_options():
    result = runner.invoke(app, ["patches", "--help"], env={"COLUMNS": "120"})

    assert result.exit_code == 0
    for text in ("--explain", "--class", "--steps", "faithfulness.png"):
        assert text in result.stdout
