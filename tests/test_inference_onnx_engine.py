"""The torch-free ONNX predictor: preprocessing equal to timm's, predictions equal to PyTorch's, no torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import TINY_LABELS, make_image, predict_without_torch
from vitcli.cli.app import app
from vitcli.cpuinfo import usable_cpus
from vitcli.inference.onnx_engine import load_onnx, predict_onnx
from vitcli.io.preprocess import preprocess

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_onnx(tiny_model_dir, tmp_path_factory) -> Path:
    from vitcli.export.job import export_model
    from vitcli.export.options import ExportOptions

    result = export_model(str(tiny_model_dir), options=ExportOptions(output=tmp_path_factory.mktemp("onnx") / "tiny"))
    return result.files[0].path


CONFIGS = [
    {"input_size": (3, 160, 160), "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center"},
    {"input_size": (3, 224, 224), "interpolation": "bilinear", "crop_pct": 0.9, "crop_mode": "center"},
    {"input_size": (3, 96, 128), "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center"},
    {"input_size": (3, 112, 112), "interpolation": "bilinear", "crop_pct": 0.95, "crop_mode": "squash"},
    {"input_size": (3, 112, 112), "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "border"},
    {"input_size": (3, 64, 64), "interpolation": "lanczos", "crop_pct": None, "crop_mode": None},
]
SIZES = [(320, 240), (240, 320), (57, 91), (182, 182), (400, 90)]  # down- and upscaling, tall, wide, square


NORMS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
         "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
         "half": ((0.5,) * 3, (0.5,) * 3)}


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c['crop_mode']}-{c['interpolation']}-{c['input_size'][1]}")
def test_preprocess_equals_timms_eval_transform(config, norm):
    """Bit for bit, every pixel level included (the normalization is a lookup table per channel)."""
    from timm.data import create_transform

    config = {**config, "mean": NORMS[norm][0], "std": NORMS[norm][1]}
    transform = create_transform(**config, is_training=False)
    rng = np.random.default_rng(0)
    for width, height in SIZES:
        img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
        expected = transform(img).numpy()
        got = preprocess(img, config)
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


def test_predict_on_onnx_equals_predict_on_the_source_model(tiny_onnx, tiny_model_dir, images):
    args = ["predict", *map(str, images), "--json", "--top-k", "3"]
    onnx = runner.invoke(app, [*args, "--model", str(tiny_onnx)])
    torch_ = runner.invoke(app, [*args, "--model", str(tiny_model_dir), "--exact-decode", "--workers", "0",
                                 "--precision", "fp32"])
    assert onnx.exit_code == 0 and torch_.exit_code == 0, onnx.stderr + torch_.stderr
    a = [json.loads(line) for line in onnx.stdout.splitlines()]
    b = [json.loads(line) for line in torch_.stdout.splitlines()]
    assert [r["source"] for r in a] == [r["source"] for r in b] == [str(p) for p in images]
    for ra, rb in zip(a, b, strict=True):
        assert [p["index"] for p in ra["predictions"]] == [p["index"] for p in rb["predictions"]]
        assert [p["label"] for p in ra["predictions"]] == [p["label"] for p in rb["predictions"]]
        assert [p["label"] for p in ra["predictions"]][0] in TINY_LABELS
        np.testing.assert_allclose([p["prob"] for p in ra["predictions"]], [p["prob"] for p in rb["predictions"]],
                                   atol=1e-5)


def test_bad_images_get_one_line_each_and_the_rest_are_predicted(tiny_onnx, tmp_path):
    good = make_image(tmp_path / "good.jpg")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    result = runner.invoke(app, ["predict", str(broken), str(good), str(tmp_path / "missing.png"),
                                 "--model", str(tiny_onnx), "--json"])
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["error"] is None for r in records] == [False, True, False]
    assert len(records[1]["predictions"]) == 3
    errors = result.stderr.splitlines()
    assert len(errors) == 2 and all(line.startswith("Error: ") for line in errors)


def test_predict_onnx_top_k_and_labels_from_metadata(tiny_onnx, images):
    model = load_onnx(tiny_onnx)
    assert model.labels == TINY_LABELS
    assert model.data_config["input_size"] == [3, 160, 160]
    (p,) = list(predict_onnx(model, [str(images[0])], top_k=10))
    assert [label.rank for label in p.top] == [1, 2, 3]  # capped at the number of classes
    assert sum(label.prob for label in p.top) == pytest.approx(1.0, abs=1e-5)


def test_an_onnx_file_without_vitcli_metadata_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from vitcli.errors import ModelLoadError

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "plain.onnx")
    with pytest.raises(ModelLoadError, match="no vitcli metadata"):
        load_onnx(tmp_path / "plain.onnx")


def test_predict_onnx_missing_extra_gives_the_install_line(tiny_onnx, images, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    result = runner.invoke(app, ["predict", str(images[0]), "--model", str(tiny_onnx)])
    assert result.exit_code == 1
    assert result.stderr.strip() == 'Error: ONNX support needs the export extra: pip install -e ".[export]"'


@pytest.mark.parametrize("form", ["--model", "first argument", "--output and --shard"])
def test_predict_onnx_never_imports_torch_or_timm(tiny_onnx, images, tmp_path, form):
    argv = {"--model": [str(images[0]), "--model", str(tiny_onnx)],
            "first argument": [str(tiny_onnx), str(images[0])],
            "--output and --shard": [str(tiny_onnx), str(images[0]), "-o", str(tmp_path / "o.jsonl"),
                                     "--shard", "0/1"]}[form]
    proc = predict_without_torch(argv)
    assert proc.stderr.splitlines()[-1].strip() == "EXIT 0 HEAVY", proc.stderr  # no torch, timm or torchvision
    record = json.loads(proc.stdout)
    assert record["error"] is None and record["predictions"][0]["label"] in TINY_LABELS


@pytest.mark.parametrize(("flag", "value"), [("--weights", "w.safetensors"), ("--precision", "bf16"),
                                             ("--workers", "2")])
def test_options_that_mean_nothing_for_an_onnx_file_are_usage_errors(tiny_onnx, images, flag, value):
    result = runner.invoke(app, ["predict", str(tiny_onnx), str(images[0]), flag, *([value] if value else [])])

    assert result.exit_code == 2
    assert f"{flag} do(es) not apply to an .onnx model" in result.stderr


def test_device_cuda_without_a_cuda_provider_is_a_usage_error_not_a_model_load_error(tiny_onnx, images,
                                                                                      monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    for device in ("cuda", "cuda:1"):
        result = runner.invoke(app, ["predict", str(tiny_onnx), str(images[0]), "--device", device])

        assert result.exit_code == 2, result.stderr
        assert f"--device {device} was asked for but this ONNX Runtime has no CUDA provider" in result.stderr
        assert "install onnxruntime-gpu" in result.stderr and "not a loadable ONNX model" not in result.stderr


def test_cuda_n_picks_that_gpu_and_auto_takes_cuda_only_where_the_runtime_has_it(monkeypatch):
    import onnxruntime

    from vitcli.errors import UsageError
    from vitcli.inference.onnx_engine import providers

    gpu_build = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: gpu_build)
    assert providers("cuda:1") == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(UsageError, match="does not apply to an .onnx model"):
        providers("mps")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert providers("auto") == ["CPUExecutionProvider"]


def test_on_the_cpu_batches_run_a_stream_each_and_predictions_do_not_change(tiny_onnx, tmp_path):
    """Two streams (each on its share of the intra-op threads) score batches at once while the next
    ones decode; the records equal those of one batch at a time."""
    import threading

    from vitcli.inference.numpy_predict import predict_model

    photos = [str(make_image(tmp_path / f"p{i}.jpg", size=(90, 70), seed=i)) for i in range(13)]
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    photos.insert(5, str(tmp_path / "bad.jpg"))
    one = load_onnx(tiny_onnx, "cpu", streams=0)
    two = load_onnx(tiny_onnx, "cpu", streams=2)
    assert (one.streams, two.streams) == (0, 2)
    assert two.session.get_session_options().intra_op_num_threads == max(1, usable_cpus() // 2)
    threads, real_run = set(), two.run

    def run(batch):
        threads.add(threading.current_thread().name)
        return real_run(batch)

    two.run = run
    for tta in (False, True):
        a = list(predict_model(one, photos, top_k=3, batch_size=3, tta=tta))
        b = list(predict_model(two, photos, top_k=3, batch_size=3, tta=tta))
        assert [(r.source, r.error) for r in a] == [(r.source, r.error) for r in b] and b[5].error
        for ra, rb in zip(a, b, strict=True):
            assert [x.index for x in ra.top or []] == [x.index for x in rb.top or []]
            np.testing.assert_allclose([x.prob for x in ra.top or []], [x.prob for x in rb.top or []], atol=1e-6)
    assert threads and all(name.startswith("vitcli-onnx") for name in threads)  # never the caller's thread
    x = np.random.default_rng(0).standard_normal((5, 3, 160, 160)).astype(np.float32)
    np.testing.assert_allclose(two.logits(x), one.logits(x), atol=1e-5)  # a part per stream
