"""Calibration: ECE/NLL/temperature (vitcli.metrics), the stored temperature (vitcli.calibration) and
where it is applied: predict (torch and ONNX Runtime), evaluate, export metadata, finetune, `vitcli calibrate`."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _finetune import class_folders, config
from conftest import make_image
from vitcli.calibration import calibrate_logits, read_temperature, store_temperature
from vitcli.cli.app import app
from vitcli.errors import ModelLoadError
from vitcli.metrics import ScoreSums, bin_sums, ece, expected_calibration_error, fit_temperature, nll

runner = CliRunner()


def overconfident(n: int = 2000, classes: int = 4, accuracy: float = 0.7, scale: float = 12.0, seed: int = 0,
                  noise: float = 1.0):
    """Logits of a model right ``accuracy`` of the time but always ~certain: top-1 prob near 1."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, classes, (n,), generator=g)
    wrong = (targets + torch.randint(1, classes, (n,), generator=g)) % classes
    right = torch.rand(n, generator=g) < accuracy
    top = torch.where(right, targets, wrong)
    logits = noise * torch.randn(n, classes, generator=g)
    logits[torch.arange(n), top] += scale
    return logits, targets


# ------------------------------------------------------------------------------------- metrics


def test_temperature_lowers_nll_and_ece_of_an_overconfident_model():
    logits, targets = overconfident()
    t = fit_temperature(logits, targets)
    assert t > 2  # overconfident: the probabilities are flattened
    assert nll(logits, targets, t) < 0.6 * nll(logits, targets)
    assert ece(logits, targets, t) < 0.05 < 0.2 < ece(logits, targets)
    # the fitted T is the minimum of the NLL: a little either side is worse
    assert nll(logits, targets, t) < min(nll(logits, targets, t * 0.9), nll(logits, targets, t * 1.1))
    assert torch.equal((logits / t).argmax(dim=1), logits.argmax(dim=1))  # top-1 unchanged


def test_temperature_of_an_underconfident_model_is_below_one():
    logits, targets = overconfident(accuracy=0.97, scale=1.0, noise=0.1)  # top-1 right, prob ~0.5
    t = fit_temperature(logits, targets)
    assert t < 1 and nll(logits, targets, t) < nll(logits, targets)


def test_ece_by_hand():
    # 4 images: confidences 0.9 (right), 0.9 (wrong), 0.55 (right), 0.15 (right) in 5 bins
    conf = torch.tensor([0.9, 0.9, 0.55, 0.15], dtype=torch.float64)
    correct = torch.tensor([True, False, True, True])
    sums = bin_sums(conf, correct, n_bins=5)
    assert sums[:, 0].tolist() == [1, 0, 1, 0, 2]  # (0,.2], (.2,.4], (.4,.6], (.6,.8], (.8,1]
    expected = (2 * abs(0.5 - 0.9) + abs(1 - 0.55) + abs(1 - 0.15)) / 4
    assert expected_calibration_error(sums) == pytest.approx(expected)


def test_score_sums_of_two_halves_equal_the_whole():
    logits, targets = overconfident(n=101, classes=7)
    whole = ScoreSums(7, temperature=2.0)
    whole.add(logits, targets)
    first, second = ScoreSums(7, temperature=2.0), ScoreSums(7, temperature=2.0)
    first.add(logits[:40], targets[:40])
    second.add(logits[40:], targets[40:])
    merged = first.merge(second)
    assert torch.equal(merged.matrix, whole.matrix) and merged.count == 101
    assert merged.top1 == whole.top1 and merged.topk == whole.topk
    assert merged.nll == pytest.approx(nll(logits, targets, 2.0), abs=1e-9)
    assert merged.loss == pytest.approx(nll(logits, targets), abs=1e-9)
    assert merged.ece == pytest.approx(ece(logits, targets, 2.0), abs=1e-12)
    assert merged.ece_uncalibrated == pytest.approx(ece(logits, targets), abs=1e-12)


def test_one_class_or_no_images_is_not_fitted_and_says_why():
    logits, targets = overconfident(n=20)
    one = calibrate_logits(logits, torch.zeros(20, dtype=torch.long), ["ants", "bees", "c", "d"])
    assert one.temperature is None and "one class only (ants)" in one.reason
    empty = calibrate_logits(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), ["a", "b", "c", "d"])
    assert empty.temperature is None and "no readable images" in empty.reason
    fitted = calibrate_logits(logits, targets, ["a", "b", "c", "d"])
    assert fitted.temperature is not None and fitted.nll_after < fitted.nll_before


# ------------------------------------------------------------------------------ stored and applied


@pytest.fixture
def calibrated_dir(tiny_model_dir, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    store_temperature(folder, 0.25)
    return folder


def test_stored_temperature_round_trips_and_plain_timm_still_loads_the_folder(calibrated_dir, tiny_model_dir):
    import timm

    assert read_temperature(calibrated_dir) == 0.25 and read_temperature(tiny_model_dir) is None
    model = timm.create_model(f"local-dir:{calibrated_dir}", pretrained=True)
    plain = timm.create_model(f"local-dir:{tiny_model_dir}", pretrained=True)
    x = torch.randn(1, 3, *model.pretrained_cfg["input_size"][1:])
    assert torch.equal(model.eval()(x), plain.eval()(x))
    store_temperature(calibrated_dir, None)
    assert read_temperature(calibrated_dir) is None


@pytest.mark.parametrize("bad", ["0", "-1", "\"hot\"", "true"])
def test_a_bad_stored_temperature_is_a_load_error_naming_the_file(calibrated_dir, bad):
    path = calibrated_dir / "config.json"
    path.write_text(path.read_text().replace("0.25", bad))
    with pytest.raises(ModelLoadError, match="config.json.*positive number"):
        read_temperature(calibrated_dir)


def test_predict_applies_the_stored_temperature_and_no_calibration_shows_the_raw_softmax(calibrated_dir, tmp_path):
    from vitcli.inference.predict import PredictOptions, predict
    from vitcli.models.resolve import load_model

    image = str(make_image(tmp_path / "a.png", seed=3))
    loaded = load_model(str(calibrated_dir))
    opts = {"top_k": 3, "workers": 0, "precision": "fp32", "fast_decode": False}
    cal = next(predict(loaded, [image], PredictOptions(**opts)))
    raw = next(predict(loaded, [image], PredictOptions(**opts, calibrated=False)))
    assert [x.index for x in cal.top] == [x.index for x in raw.top]  # the ranking is the model's
    raw_p = torch.tensor([x.prob for x in raw.top])
    logits = raw_p.log()  # log-softmax = logits + const: softmax(logits / T) from the raw probabilities
    expected = (logits / 0.25).softmax(dim=0)
    assert [x.prob for x in cal.top] == pytest.approx(expected.tolist(), abs=1e-5)
    assert cal.top[0].prob > raw.top[0].prob

    result = runner.invoke(app, ["predict", image, "-m", str(calibrated_dir), "--json", "--no-calibration",
                                 "--precision", "fp32", "--exact-decode", "-j", "0"])
    assert result.exit_code == 0, result.output
    probs = [p["prob"] for p in json.loads(result.stdout.splitlines()[0])["predictions"]]
    assert probs == pytest.approx(raw_p.tolist(), abs=1e-6)


class FakeSession:
    def __init__(self, logits: np.ndarray):
        self.logits = logits

    def get_inputs(self):
        return [type("Input", (), {"name": "x", "type": "tensor(float)"})()]

    def run(self, _, feed):
        return [self.logits[: len(feed["x"])]]


def test_onnx_predictor_applies_the_temperature_of_its_metadata(tmp_path):
    from vitcli.inference.onnx_engine import OnnxModel, predict_onnx

    meta = {"labels": ["a", "b", "c"], "input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3,
            "crop_pct": 1.0, "temperature": 2.0}
    logits = np.array([[3.0, 1.0, 0.0]], dtype=np.float32)
    model = OnnxModel(FakeSession(logits), tmp_path / "m.onnx", meta)
    image = str(make_image(tmp_path / "a.png"))
    cal = next(predict_onnx(model, [image], top_k=3))
    raw = next(predict_onnx(model, [image], top_k=3, calibrated=False))
    assert [x.prob for x in cal.top] == pytest.approx(torch.tensor([1.5, 0.5, 0.0]).softmax(0).tolist(), abs=1e-6)
    assert [x.prob for x in raw.top] == pytest.approx(torch.tensor([3.0, 1.0, 0.0]).softmax(0).tolist(), abs=1e-6)
    del meta["temperature"]
    assert [x.prob for x in next(predict_onnx(model, [image], top_k=3)).top] == [x.prob for x in raw.top]


def test_export_metadata_carries_the_temperature(calibrated_dir, tiny_model_dir):
    from vitcli.export.job import ExportOptions, export_metadata, load_exportable

    meta = export_metadata(load_exportable(str(calibrated_dir)), "m", None, ExportOptions())
    assert meta["temperature"] == 0.25
    assert export_metadata(load_exportable(str(tiny_model_dir)), "m", None, ExportOptions())["temperature"] is None


def noise_split(root: Path, counts: dict[str, int]) -> Path:
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            make_image(root / name / f"{name}{i}.png", seed=100 * c + i)
    return root


def test_evaluate_reports_ece_and_nll_with_the_stored_temperature(calibrated_dir, tmp_path):
    data = noise_split(tmp_path / "data" / "val", {"cat": 4, "dog": 3, "bird": 3})
    base = ["evaluate", str(data), "-m", str(calibrated_dir), "--json", "-j", "0", "--precision", "fp32"]
    cal = json.loads(runner.invoke(app, base).stdout)
    raw = json.loads(runner.invoke(app, [*base, "--no-calibration"]).stdout)
    assert cal["calibration"]["temperature"] == 0.25 and raw["calibration"]["temperature"] is None
    assert cal["top1"] == raw["top1"] and cal["loss"] == raw["loss"]  # top-1 and the raw loss never move
    assert raw["calibration"]["nll"] == pytest.approx(raw["loss"])
    assert cal["calibration"]["nll"] != pytest.approx(raw["calibration"]["nll"])
    assert cal["calibration"]["ece_uncalibrated"] == pytest.approx(raw["calibration"]["ece"])
    assert sum(b["count"] for b in cal["calibration"]["reliability"]) == cal["n_images"] == 10
    assert len(cal["calibration"]["reliability"]) == 15


def test_cli_calibrate_stores_a_temperature_that_evaluate_then_applies(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    data = noise_split(tmp_path / "data" / "val", {"cat": 5, "dog": 5, "bird": 5})
    result = runner.invoke(app, ["calibrate", str(data.parent), "-m", str(folder), "-j", "0", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    t = read_temperature(folder)
    assert t == doc["temperature"] and doc["n_images"] == 15 and doc["stored_in"] == [str(folder)]
    assert doc["nll"]["after"] <= doc["nll"]["before"]
    evaluated = json.loads(runner.invoke(app, ["evaluate", str(data), "-m", str(folder), "--json", "-j", "0",
                                               "--precision", "fp32"]).stdout)
    assert evaluated["calibration"]["temperature"] == t
    assert evaluated["calibration"]["nll"] == pytest.approx(doc["nll"]["after"], abs=1e-6)


def test_cli_calibrate_refuses_one_class_and_names_that_are_no_folder(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    data = noise_split(tmp_path / "one", {"cat": 4})
    result = runner.invoke(app, ["calibrate", str(data), "-m", str(folder), "-j", "0"])
    assert result.exit_code == 1 and "one class only (cat)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and read_temperature(folder) is None
    named = runner.invoke(app, ["calibrate", str(data), "-m", "deit_tiny_patch16_224"])
    assert named.exit_code == 2 and "not a model folder" in named.stderr


@pytest.mark.usefixtures("no_figures")
def test_finetune_stores_the_temperature_in_best_and_last(tiny_model_dir, tmp_path):
    import timm

    from vitcli.finetune.loop import fit

    data = class_folders(tmp_path / "data", {"ants": 6, "bees": 6})
    events = []
    result = fit(config(tmp_path, data, tiny_model_dir, max_steps=2, val_split=0.5),
                 lambda event, info: events.append((event, info)))
    fitted = next(info for event, info in events if event == "calibrated")["temperatures"]
    assert set(fitted) == {"best", "last"}
    for name in ("best", "last"):
        t = read_temperature(result.run_dir / name)
        assert t is not None and math.isfinite(t) and t == fitted[name].temperature
        timm.create_model(f"local-dir:{result.run_dir / name}", pretrained=True)  # plain timm still loads it


@pytest.mark.usefixtures("no_figures")
def test_finetune_with_a_one_class_validation_split_skips_the_temperature_with_the_reason(tiny_model_dir,
                                                                                        tmp_path):
    from vitcli.finetune.loop import fit

    data = tmp_path / "data"
    class_folders(data / "train", {"ants": 4, "bees": 4})
    class_folders(data / "val", {"ants": 2})
    events = []
    result = fit(config(tmp_path, data, tiny_model_dir, max_steps=1), lambda event, info: events.append((event, info)))
    fitted = next(info for event, info in events if event == "calibrated")["temperatures"]
    assert all(f.temperature is None and "one class only (ants)" in f.reason for f in fitted.values())
    assert read_temperature(result.run_dir / "last") is None
