"""vitcli export: every format loads back and agrees with PyTorch; metadata; verification; extras."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import DEIT_WEIGHTS, TINY_LABELS, shared
from vitcli.cli.app import app
from vitcli.export.formats import load_exported, read_metadata
from vitcli.export.job import export_metadata, export_model, load_exportable, output_path
from vitcli.export.options import TOLERANCES, ExportOptions
from vitcli.export.verify import compare

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    options = ExportOptions(formats=("onnx", "torchscript", "pt2", "timm"), quantize="int8",
                            output=tmp_path_factory.mktemp("exported") / "tiny")
    return export_model(str(tiny_model_dir), options=options)


def torch_logits(model_dir: Path, batch: np.ndarray) -> np.ndarray:
    from vitcli.models.resolve import load_model

    with torch.inference_mode():
        return load_model(str(model_dir)).model(torch.from_numpy(batch)).numpy()


def test_every_format_is_written_and_passes_verification(exported):
    kinds = [(f.format, f.precision) for f in exported.files]
    assert kinds == [("onnx", "fp32"), ("torchscript", "fp32"), ("pt2", "fp32"), ("timm", "fp32"), ("onnx", "int8")]
    assert [f.path.name for f in exported.files] == ["tiny.onnx", "tiny.torchscript.pt", "tiny.pt2", "tiny-timm",
                                                     "tiny.int8.onnx"]
    for f in exported.files:
        (v,) = f.verifications
        assert v.size == (160, 160) and v.images >= 12
        if f.precision == "fp32":
            assert f.ok, (f.path, f.verifications)
        else:  # a random tiny model has near-tied classes, so int8's top-1 agreement is luck; its logits are not
            assert v.max_abs_logit < 0.1 and v.mean_kl < 1e-3, v


def test_each_file_loads_back_with_the_source_models_logits(exported, tiny_model_dir):
    batch = np.random.default_rng(1).standard_normal((3, 3, 160, 160)).astype(np.float32)  # not the export batch of 2
    reference = torch_logits(tiny_model_dir, batch)
    for f in exported.files:
        got = load_exported(f.format, f.path)(batch)
        assert got.shape == (3, len(TINY_LABELS))
        limit = 1e-4 if f.precision == "fp32" else 0.1
        assert np.abs(got - reference).max() < limit, f.path


def test_metadata_is_inside_every_file(exported):
    for f in exported.files:
        meta = read_metadata(f.format, f.path)
        assert meta["labels"] == TINY_LABELS
        assert meta["input_size"] == [3, 160, 160]
        assert meta["architecture"] == "test_vit"
        assert meta["interpolation"] == "bicubic" and meta["crop_pct"] == pytest.approx(0.95)
        assert len(meta["mean"]) == 3 and len(meta["std"]) == 3
        assert meta["weights_source"]["kind"] == "local-dir"
        assert meta["precision"] == f.precision
    int8 = read_metadata("onnx", exported.files[-1].path)
    assert int8["quantization"]["weights"] == "int8 per-channel"  # re-applied after quantization
    assert int8["quantization"]["matmuls_int8"] > 0


def test_onnx_metadata_reads_back_through_onnxruntime(exported):
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported.files[0].path), providers=["CPUExecutionProvider"])
    raw = session.get_modelmeta().custom_metadata_map
    assert json.loads(raw["labels"]) == TINY_LABELS
    assert json.loads(raw["opset"]) >= 18
    assert session.get_inputs()[0].shape[0] == "batch"  # dynamic batch axis


def test_a_json_file_lies_beside_the_other_formats(exported):
    pt = exported.files[1].path
    assert json.loads(pt.with_name(pt.name + ".json").read_text())["labels"] == TINY_LABELS
    assert json.loads((exported.files[3].path / "vitcli.json").read_text())["format"] == "timm"


def test_compare_names_each_failed_check():
    reference = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    result = compare(reference, reference[:, ::-1].copy(), TOLERANCES["fp32"])
    assert result["top1_agreement"] == 0.5
    assert [m.split(" ")[0] for m in result["failed"]] == ["max", "top-1", "mean"]


def test_output_paths():
    assert output_path(Path("out/deit.onnx"), "onnx", ".int8") == Path("out/deit.int8.onnx")
    assert output_path(Path("out/deit"), "pt2") == Path("out/deit.pt2")
    assert output_path(Path("out/deit"), "timm") == Path("out/deit-timm")


def test_model_is_built_without_fused_attention(tiny_model_dir):
    model = load_exportable(str(tiny_model_dir)).model
    flags = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    assert flags and not any(flags)


# ----------------------------------------------------------------------------------------- CLI


def test_cli_verification_failure_exits_1_naming_the_check(tiny_model_dir, tmp_path):
    result = runner.invoke(app, ["export", "-m", str(tiny_model_dir), "-o", str(tmp_path / "t"),
                                 "--max-logit-diff", "1e-12"])
    assert result.exit_code == 1
    assert "Error: verification failed: t.onnx: max |Δlogit|" in result.stderr
    assert "> 1e-12" in result.stderr
    assert (tmp_path / "t.onnx").is_file()  # written, and said to be


def test_cli_usage_errors_exit_2(tiny_model_dir, tmp_path):
    result = runner.invoke(app, ["export", "-m", str(tiny_model_dir), "-f", "torchscript", "--dynamic-size"])
    assert result.exit_code == 2 and "TorchScript trace fixes the input size" in result.stderr
    result = runner.invoke(app, ["export", "-m", str(tiny_model_dir), "--quantize", "int8", "--int8-target", "0.98"])
    assert result.exit_code == 2 and "--calibration" in result.stderr


def test_cli_missing_extra_gives_the_install_line(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    result = runner.invoke(app, ["export", "-m", str(tiny_model_dir), "-o", str(tmp_path / "t")])
    assert result.exit_code == 1
    assert result.stderr.strip() == 'Error: ONNX support needs the export extra: pip install -e ".[export]"'


def test_calibration_must_not_be_the_verification_images(tiny_model_dir, images):
    from vitcli.errors import UsageError

    folder = str(images[0].parent)
    options = ExportOptions(quantize="int8", int8_target=0.9, calibration=(folder,), verify_images=(folder,))
    with pytest.raises(UsageError, match="share 3 images"):
        export_model(str(tiny_model_dir), options=options)


def test_fp16_files_are_verified_with_the_fp16_tolerance(tiny_model_dir, tmp_path):
    result = runner.invoke(app, ["export", "-m", str(tiny_model_dir), "--precision", "fp16", "-f", "onnx",
                                 "-o", str(tmp_path / "half"), "--json"])
    assert result.exit_code == 0, result.stderr
    (f,) = json.loads(result.stdout)["files"]
    assert f["path"].endswith("half.fp16.onnx") and f["precision"] == "fp16" and f["ok"]
    assert 0 < f["verifications"][0]["max_abs_logit"] < TOLERANCES["fp16"].max_abs_logit
    import onnxruntime as ort

    session = ort.InferenceSession(f["path"], providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float16)"


# ------------------------------------------------------------------------------- dynamic size


def test_dynamic_size_is_verified_at_three_sizes(tiny_model_dir, tmp_path):
    options = ExportOptions(formats=("onnx", "pt2"), dynamic_size=True, output=tmp_path / "dyn")
    result = export_model(str(tiny_model_dir), options=options)
    for f in result.files:
        assert [v.size for v in f.verifications] == [(160, 160), (128, 128), (192, 160)]
        assert f.ok, f.verifications
    # and at a size no check used, against the model PyTorch builds with dynamic_img_size
    batch = np.random.default_rng(2).standard_normal((2, 3, 96, 224)).astype(np.float32)
    reference = load_exportable(str(tiny_model_dir), dynamic_size=True).model(torch.from_numpy(batch)).detach().numpy()
    assert np.abs(load_exported("onnx", result.files[0].path)(batch) - reference).max() < 1e-4


# --------------------------------------------------------------------------------- real weights


@pytest.mark.slow
def test_deit_tiny_onnx_agrees_with_pytorch_on_every_real_image(tmp_path):
    weights = shared("weights", DEIT_WEIGHTS.name)
    images, val = shared("images"), shared("hymenoptera", "val")
    options = ExportOptions(output=tmp_path / "deit", verify_images=(str(images), str(val)))
    result = export_model("deit_tiny_patch16_224", weights, options)
    (v,) = result.files[0].verifications
    assert v.images > 150
    assert v.top1_agreement == 1.0
    assert v.max_abs_logit < 1e-3


# ------------------------------------------------------------------- names, metadata, photos


def test_cli_export_of_the_current_folder_is_named_after_it(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "home" / "me" / "mymodel"
    shutil.copytree(tiny_model_dir, folder)
    monkeypatch.chdir(folder)

    result = runner.invoke(app, ["export", "-m", ".", "-f", "onnx", "--no-verify"])

    assert result.exit_code == 0, result.output
    assert (folder / "exported" / "mymodel.onnx").is_file()
    assert not (folder / "exported.onnx").exists()
    meta = read_metadata("onnx", folder / "exported" / "mymodel.onnx")
    assert meta["model"] == meta["weights_source"]["model"] == "mymodel"


def test_metadata_keeps_names_not_the_users_directory_layout(tiny_model_dir, tmp_path):
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "private" / "projects" / "w.safetensors"
    weights.parent.mkdir(parents=True)
    save_file(timm.create_model("test_vit").state_dict(), str(weights))
    options = ExportOptions(formats=("onnx",), output=tmp_path / "out" / "m", verify=False)

    result = export_model("test_vit", str(weights), options)

    meta = read_metadata("onnx", result.files[0].path)
    assert meta["model"] == "test_vit" and meta["weights_source"]["weights"] == "w.safetensors"
    assert str(tmp_path) not in json.dumps(meta) and str(tiny_model_dir.parent) not in json.dumps(meta)
    folder = load_exportable(str(tiny_model_dir))
    assert export_metadata(folder, str(tiny_model_dir), None, ExportOptions())["model"] == tiny_model_dir.name


def test_verification_photos_ship_inside_the_package_and_are_found_outside_the_repository(tmp_path):
    """A copy of the package away from the repository (as a wheel installs it) verifies on the same photos."""
    import shutil
    import subprocess

    import tomllib

    import vitcli
    from vitcli.export.verify import PHOTOS_DIR, shipped_photos, verification_images

    photos = sorted(PHOTOS_DIR.glob("*.jpg"))
    assert len(photos) >= 3 and all(p.stat().st_size < 100_000 for p in photos)
    assert sum(p.stat().st_size for p in photos) < 200_000
    assert len(shipped_photos()) == len(photos)
    images, what = verification_images(())
    assert len(images) == 12 + len(photos) and what == f"12 generated images and {len(photos)} shipped photos"

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    declared = pyproject["tool"]["setuptools"]["package-data"]["vitcli.export"]
    package = Path(vitcli.__file__).parent
    assert all(any(p.relative_to(package / "export").match(g) for g in declared) for p in photos)

    site = tmp_path / "site-packages"
    shutil.copytree(package, site / "vitcli", ignore=shutil.ignore_patterns("embedded", "__pycache__"))
    code = ("from vitcli.export.verify import verification_images; import vitcli; "
            "print(vitcli.__file__); print(verification_images(())[1])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    where, said = proc.stdout.splitlines()
    assert where.startswith(str(site)) and said == what


def test_cli_int8_target_end_to_end_writes_a_file_that_meets_it_on_the_calibration_images(tiny_model_dir, tmp_path):
    from conftest import make_image
    from vitcli.export.formats import data_config_of
    from vitcli.export.verify import batch_of, load_readable

    calibration = [make_image(tmp_path / "calib" / f"{i}.jpg", size=(200, 160), seed=50 + i) for i in range(24)]
    result = runner.invoke(app, ["export", "-m", str(tiny_model_dir), "-f", "onnx", "--quantize", "int8",
                                 "--int8-target", "1.0", "--calibration", str(tmp_path / "calib"),
                                 "--min-agreement", "0", "-o", str(tmp_path / "t"), "--json"])

    assert result.exit_code == 0, result.output
    files = json.loads(result.stdout)["files"]
    assert [Path(f["path"]).name for f in files] == ["t.onnx", "t.int8.onnx"]
    meta = read_metadata("onnx", tmp_path / "t.int8.onnx")
    quant = meta["quantization"]
    assert quant["scheme"] == "dynamic, accuracy-aware" and quant["target"] == 1.0
    assert quant["calibration_images"] == 24 and quant["calibration_agreement"] == 1.0
    import onnx

    from vitcli.export.quantize import weight_matmuls

    assert quant["matmuls_int8"] + len(quant["matmuls_fp32"]) == len(weight_matmuls(onnx.load(tmp_path / "t.onnx")))
    assert quant["matmuls_int8"] > 0
    # the file written does what its metadata says: top-1 as fp32's on every calibration image
    batch = batch_of(load_readable([str(p) for p in calibration]), data_config_of(meta))
    fp32 = load_exported("onnx", tmp_path / "t.onnx")(batch)
    int8 = load_exported("onnx", tmp_path / "t.int8.onnx")(batch)
    assert (fp32.argmax(1) == int8.argmax(1)).all()
    assert "MatMuls kept fp32" in result.stderr and "target 100.0%" in result.stderr


def test_fp16_torchscript_and_pt2_are_half_precision_and_verified(tiny_model_dir, tmp_path):
    result = runner.invoke(app, ["export", "-m", str(tiny_model_dir), "--precision", "fp16", "-f", "torchscript",
                                 "-f", "pt2", "-o", str(tmp_path / "half"), "--json"])

    assert result.exit_code == 0, result.output
    files = json.loads(result.stdout)["files"]
    assert [Path(f["path"]).name for f in files] == ["half.fp16.torchscript.pt", "half.fp16.pt2"]
    for f in files:
        assert f["precision"] == "fp16" and f["ok"]
        assert 0 < f["verifications"][0]["max_abs_logit"] < TOLERANCES["fp16"].max_abs_logit
        assert read_metadata(f["format"], Path(f["path"]))["precision"] == "fp16"
    scripted = torch.jit.load(files[0]["path"])
    exported = torch.export.load(files[1]["path"]).module()
    for module in (scripted, exported):
        assert {p.dtype for p in module.parameters()} == {torch.float16}
    batch = torch.randn(2, 3, 160, 160)
    reference = torch.from_numpy(torch_logits(tiny_model_dir, batch.numpy()))
    for module in (scripted, exported):
        logits = module(batch.half())
        assert logits.dtype == torch.float16 and (logits.float() - reference).abs().max() < 0.25


def test_cli_openvino_int8_target_end_to_end_runs_nncf_accuracy_control(tiny_model_dir, tmp_path):
    """`-f openvino --quantize int8 --int8-target`: NNCF's accuracy control (it was called with
    quantize()'s keyword for the advanced parameters, and failed with a TypeError)."""
    from conftest import make_image
    from vitcli.export.formats import data_config_of
    from vitcli.export.verify import batch_of, load_readable

    calibration = [make_image(tmp_path / "calib" / f"{i}.jpg", size=(200, 160), seed=70 + i) for i in range(8)]
    result = runner.invoke(app, ["export", "-m", str(tiny_model_dir), "-f", "openvino", "--quantize", "int8",
                                 "--int8-target", "1.0", "--calibration", str(tmp_path / "calib"),
                                 "--min-agreement", "0", "-o", str(tmp_path / "t"), "--json"])

    assert result.exit_code == 0, result.output
    assert [Path(f["path"]).name for f in json.loads(result.stdout)["files"]] == ["t.xml", "t.int8.xml"]
    quant = read_metadata("openvino", tmp_path / "t.int8.xml")["quantization"]
    assert quant["scheme"] == "nncf static, accuracy control" and quant["target"] == 1.0
    assert quant["calibration_images"] == 8 and quant["calibration_agreement"] == 1.0
    assert quant["matmuls_int8"] > 0
    batch = batch_of(load_readable([str(p) for p in calibration]), data_config_of(read_metadata(
        "openvino", tmp_path / "t.xml")))
    fp32 = load_exported("openvino", tmp_path / "t.xml")(batch)
    int8 = load_exported("openvino", tmp_path / "t.int8.xml")(batch)
    assert (fp32.argmax(1) == int8.argmax(1)).all()
    assert np.abs(fp32 - int8).max() > 1e-4  # quantized, not the fp32 model again
    assert "MatMuls kept in floating point" in result.stderr and "target 100.0%" in result.stderr
