"""The OpenVINO engine: IR export with vitcli's metadata in rt_info, torch-free predict on .xml, NNCF int8."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
from typer.testing import CliRunner

import vitcli
from conftest import TINY_LABELS, make_image, predict_without_torch, shared
from vitcli.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_ir(tiny_model_dir, tmp_path_factory) -> Path:
    from vitcli.export.job import ExportOptions, export_model

    out = tmp_path_factory.mktemp("ir") / "tiny"
    result = export_model(str(tiny_model_dir), options=ExportOptions(formats=("openvino",), output=out))
    (f,) = result.files
    assert f.ok and f.path == out.with_name("tiny.xml"), f.verifications
    return f.path


def test_ir_metadata_round_trip(tiny_ir, tiny_model_dir):
    from vitcli.export.formats import read_metadata
    from vitcli.inference.openvino_engine import load_openvino

    meta = read_metadata("openvino", tiny_ir)
    assert meta["labels"] == TINY_LABELS
    assert meta["format"] == "openvino" and meta["precision"] == "fp32"
    assert meta["input_size"] == [3, 160, 160] and len(meta["mean"]) == 3
    assert meta["weights_source"]["kind"] == "local-dir"
    assert json.loads(tiny_ir.with_name("tiny.xml.json").read_text()) == meta  # the copy beside it
    model = load_openvino(tiny_ir)
    assert model.labels == TINY_LABELS and model.data_config["crop_pct"] == meta["crop_pct"]


def test_set_and_read_metadata_keep_every_json_type(tiny_ir, tmp_path):
    from vitcli.inference.openvino_engine import import_openvino, read_metadata, save_ir

    ov = import_openvino()
    model = ov.Core().read_model(str(tiny_ir))
    meta = {"labels": ["a \u00e9", "b\n[red]x[/]", "c"], "temperature": 1.5, "crop_pct": None,
            "nested": {"k": [1, 2.5, True]}, "input_size": [3, 160, 160], "mean": [0.5] * 3, "std": [0.25] * 3}
    save_ir(model, tmp_path / "m.xml", meta)
    got = read_metadata(ov.Core().read_model(str(tmp_path / "m.xml")))
    assert {k: got[k] for k in meta} == meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]  # no temporary folder left


def test_openvino_logits_equal_torch_and_temperature_is_applied(tiny_ir, tiny_model_dir, images, tmp_path):
    import torch

    from vitcli.inference.numpy_predict import predict_model
    from vitcli.inference.openvino_engine import import_openvino, load_openvino, read_metadata, save_ir
    from vitcli.io.images import load_image
    from vitcli.io.preprocess import preprocess
    from vitcli.models.resolve import load_model

    model = load_openvino(tiny_ir)
    x = np.stack([preprocess(load_image(str(p)), model.data_config) for p in images])
    with torch.inference_mode():
        expected = load_model(str(tiny_model_dir)).model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.logits(x), expected, atol=1e-4)

    ov = import_openvino()
    hot = ov.Core().read_model(str(tiny_ir))
    save_ir(hot, tmp_path / "t.xml", {**read_metadata(hot), "temperature": 2.0})
    (record,) = list(predict_model(load_openvino(tmp_path / "t.xml"), [str(images[0])], top_k=3))
    z = expected[0] / 2.0
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    got = {label.index: label.prob for label in record.top}
    np.testing.assert_allclose([got[i] for i in range(3)], probs, atol=1e-5)


def test_predict_on_xml_equals_predict_on_the_source_model(tiny_ir, tiny_model_dir, images):
    args = ["predict", *map(str, images), "--json", "--top-k", "3"]
    ov = runner.invoke(app, ["predict", str(tiny_ir), *args[1:]])
    torch_ = runner.invoke(app, [*args, "--model", str(tiny_model_dir), "--exact-decode", "--workers", "0",
                                 "--backend", "torch", "--precision", "fp32"])
    assert ov.exit_code == 0 and torch_.exit_code == 0, ov.stderr + torch_.stderr
    a = [json.loads(line) for line in ov.stdout.splitlines()]
    b = [json.loads(line) for line in torch_.stdout.splitlines()]
    assert [r["source"] for r in a] == [r["source"] for r in b] == [str(p) for p in images]
    for ra, rb in zip(a, b, strict=True):
        assert [p["index"] for p in ra["predictions"]] == [p["index"] for p in rb["predictions"]]
        np.testing.assert_allclose([p["prob"] for p in ra["predictions"]], [p["prob"] for p in rb["predictions"]],
                                   atol=1e-5)


@pytest.mark.parametrize("form", ["--model", "first argument", "--output and --shard"])
def test_predict_xml_never_imports_torch_or_timm(tiny_ir, images, tmp_path, form):
    argv = {"--model": [str(images[0]), "--model", str(tiny_ir)],
            "first argument": [str(tiny_ir), str(images[0]), str(images[1])],
            "--output and --shard": [str(tiny_ir), str(images[0]), "-o", str(tmp_path / "o.jsonl"),
                                     "--shard", "0/1"]}[form]
    proc = predict_without_torch(argv)
    assert proc.stderr.splitlines()[-1].strip() == "EXIT 0 HEAVY", proc.stderr  # no torch, timm or torchvision
    record = json.loads(proc.stdout.splitlines()[0])
    assert record["error"] is None and record["predictions"][0]["label"] in TINY_LABELS
    if form == "--output and --shard":
        assert json.loads((tmp_path / "o.jsonl").read_text())["source"] == str(images[0])


def test_an_ir_without_vitcli_metadata_or_without_its_bin_is_refused(tiny_ir, tmp_path, images):
    import shutil

    from vitcli.inference.openvino_engine import import_openvino

    ov = import_openvino()
    plain = ov.Core().read_model(str(tiny_ir))
    for key in list(plain.get_rt_info()["vitcli"]):
        plain.set_rt_info("", ["vitcli", key])  # rt_info cannot drop a key: blank every value
    ov.save_model(plain, str(tmp_path / "plain.xml"))
    result = runner.invoke(app, ["predict", str(tmp_path / "plain.xml"), str(images[0])])
    assert result.exit_code == 1
    assert "was not written for vitcli" in result.stderr or "has no vitcli metadata" in result.stderr, result.stderr

    shutil.copy(tiny_ir, tmp_path / "lonely.xml")
    result = runner.invoke(app, ["predict", str(tmp_path / "lonely.xml"), str(images[0])])
    assert result.exit_code == 1 and "has no weights file beside it (lonely.bin)" in result.stderr


def test_options_that_mean_nothing_for_an_xml_file_are_usage_errors(tiny_ir, images):
    for extra in (["--weights", "w.safetensors"], ["--precision", "fp16"], ["--backend", "torch"],
                  ["--device", "cuda"]):
        result = runner.invoke(app, ["predict", str(tiny_ir), str(images[0]), *extra])
        assert result.exit_code == 2, (extra, result.stderr)
        assert result.stderr.startswith("Error: "), result.stderr


def test_export_int8_openvino_needs_calibration_images(tiny_model_dir, tmp_path):
    result = runner.invoke(app, ["export", "-m", str(tiny_model_dir), "-f", "openvino", "--quantize", "int8",
                                 "-o", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "--quantize int8 with --format openvino needs --calibration DIR" in result.stderr


def test_export_int8_openvino_through_nncf_reports_what_stayed_in_float(tiny_model_dir, tmp_path):
    calibration = [make_image(tmp_path / "cal" / f"{i}.png", (96, 80), seed=10 + i) for i in range(8)]
    verify = [make_image(tmp_path / "ver" / f"{i}.png", (96, 80), seed=50 + i) for i in range(4)]
    result = runner.invoke(app, ["export", "-m", str(tiny_model_dir), "-f", "openvino", "--quantize", "int8",
                                 "--calibration", str(tmp_path / "cal"), "--verify-images", str(tmp_path / "ver"),
                                 "--min-agreement", "0", "-o", str(tmp_path / "m"), "--json"])
    assert result.exit_code == 0, result.stderr
    files = {Path(f["path"]).name: f for f in json.loads(result.stdout)["files"]}
    assert set(files) == {"m.xml", "m.int8.xml"}
    assert files["m.int8.xml"]["precision"] == "int8"
    from vitcli.export.formats import read_metadata

    quant = read_metadata("openvino", tmp_path / "m.int8.xml")["quantization"]
    assert quant["calibration_images"] == len(calibration) and quant["model_type"] == "transformer"
    assert quant["matmuls_int8"] > 0 and isinstance(quant["matmuls_float"], list)
    assert "MatMuls kept in floating point" in result.stderr
    assert len(verify) == 4


@pytest.mark.slow
def test_openvino_agrees_with_torch_fp32_on_the_shared_photos():
    """DeiT-Tiny on the shared photos: OpenVINO fp32 and (where the CPU has it) bf16 pass the issue's rule."""
    import torch

    from vitcli.cpuinfo import fast_bf16
    from vitcli.export.openvino import convert
    from vitcli.export.verify import agreement, batch_of, image_sources, run_batched
    from vitcli.inference.openvino_engine import compile_model
    from vitcli.io.images import load_image
    from vitcli.models.resolve import load_model

    photos = [load_image(s) for s in image_sources([str(shared("images"))], "photos")]
    loaded = load_model("deit_tiny_patch16_224")
    batch = batch_of(photos, loaded.data_config)
    with torch.inference_mode():
        reference = run_batched(lambda x: loaded.model(torch.from_numpy(x)).numpy(), batch)
    converted = convert(loaded.model, torch.zeros(1, 3, 224, 224))
    for precision in ["fp32", *(["bf16"] if fast_bf16("openvino") else [])]:
        compiled = compile_model(converted, precision)
        result = agreement(reference, run_batched(lambda x, c=compiled: c(x)[0], batch))
        assert result["ok"], (precision, result)
        assert result["confident_flips"] == 0 and result["same_top1"] >= 0.98


def test_compiling_an_openvino_model_keeps_the_threads_signal_stack():
    """OpenVINO points the compiling thread's alternate signal stack at memory it frees later; Python's
    handlers run on that stack, so a later Ctrl-C or SIGTERM crashed with SIGSEGV (pytest itself did)."""
    script = textwrap.dedent("""
        import ctypes, faulthandler
        import torch, timm, openvino as ov
        from vitcli.inference.openvino_engine import compile_model
        class S(ctypes.Structure):
            _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]
        def stack():
            s = S(); ctypes.CDLL(None).sigaltstack(None, ctypes.byref(s)); return (s.sp, s.flags, s.size)
        faulthandler.enable()  # as pytest does: Python's own alternate stack
        before = stack()
        model = timm.create_model("test_vit", pretrained=False).eval()
        compiled = compile_model(ov.convert_model(model, example_input=torch.zeros(1, 3, 160, 160)))
        print(before == stack(), before, stack())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(vitcli.__file__).parents[1])})
    assert out.returncode == 0 and out.stdout.startswith("True"), (out.stdout, out.stderr[-500:])


def test_batches_run_a_stream_each_and_come_back_right_in_any_order(tiny_ir):
    """``start`` queues on a ring of infer requests (two per stream); results collected late, after
    their request was reused, or in reverse order are still each batch's own logits."""
    from vitcli.inference.openvino_engine import load_openvino
    from vitcli.inference.pipeline import default_streams

    model = load_openvino(tiny_ir)
    assert model.streams == default_streams()
    batches = [np.random.default_rng(i).standard_normal((i % 3 + 1, 3, 160, 160)).astype(np.float32)
               for i in range(2 * model.streams + 3)]  # more than the ring holds
    expected = [np.asarray(model.compiled(b)[0]) for b in batches]
    waits = [model.start(b) for b in batches]
    for wait, want in reversed(list(zip(waits, expected, strict=True))):
        np.testing.assert_allclose(wait(), want, atol=1e-5)
    x = np.concatenate(batches)
    np.testing.assert_allclose(model.logits(x), np.concatenate(expected), atol=1e-5)  # cut into a part per stream


class _Request:
    """An infer request that records which thread uses it (logits: the sum of each image's pixels)."""

    def __init__(self, threads):
        self.threads, self.x = threads, None

    def set_input_tensor(self, tensor):
        self.threads.add(threading.get_ident())
        self.x = np.array(tensor.data)

    def start_async(self):
        self.threads.add(threading.get_ident())

    def wait(self):
        self.threads.add(threading.get_ident())

    def get_output_tensor(self, _):
        self.threads.add(threading.get_ident())
        return SimpleNamespace(data=self.x.reshape(len(self.x), 3, -1).sum(axis=2))


def test_predict_decodes_in_threads_but_enters_openvino_from_one(images, tmp_path):
    """Two threads each calling ``infer`` on their own request hung one run in four inside OpenVINO's
    input dispatcher; now decoding runs in threads and every request call stays in the caller's."""
    from vitcli.inference.numpy_predict import predict_model, predict_numpy
    from vitcli.inference.openvino_engine import OpenVinoModel
    from vitcli.io.preprocess import preprocess

    threads: set[int] = set()
    compiled = SimpleNamespace(get_property=lambda name: {"NUM_STREAMS": 2}[name],
                               create_infer_request=lambda: _Request(threads))
    meta = {"labels": ["r", "g", "b"], "input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3,
            "interpolation": "bilinear", "crop_pct": 1.0}
    model = OpenVinoModel(compiled, tmp_path / "m.xml", meta)
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    sources = [str(p) for p in [*images, tmp_path / "bad.jpg", *images] * 5]
    decoders: set[str] = set()

    def spy(img, config):
        decoders.add(threading.current_thread().name)
        return preprocess(img, config)

    with mock.patch("vitcli.inference.numpy_predict.preprocess", spy):
        got = list(predict_model(model, sources, top_k=3, batch_size=4, tta=True))
    want = list(predict_numpy(lambda b: b.reshape(len(b), 3, -1).sum(axis=2), model.labels, model.data_config,
                              sources, top_k=3, batch_size=4, tta=True))  # one batch after another

    assert threads == {threading.get_ident()}
    assert any(name.startswith("vitcli-stream") for name in decoders)  # decoding did run in threads
    assert [(r.source, r.error, [(label.index, round(label.prob, 6)) for label in r.top or []]) for r in got] == \
        [(r.source, r.error, [(label.index, round(label.prob, 6)) for label in r.top or []]) for r in want]
    assert sum(r.error is not None for r in got) == 5


@pytest.mark.parametrize("cpus, local_world, streams, threads", [(2, None, 2, 2), (16, None, 8, 16), (1, None, 1, 1),
                                                                  (8, "2", 4, 4), (2, "4", 1, 1)])
def test_compiled_with_a_stream_per_cpu_shared_among_torchrun_processes(monkeypatch, cpus, local_world, streams,
                                                                        threads):
    from vitcli.inference import openvino_engine

    monkeypatch.setattr("vitcli.cpuinfo.usable_cpus", lambda: cpus)
    for name, value in {"WORLD_SIZE": local_world, "LOCAL_WORLD_SIZE": local_world, "RANK": "0"}.items():
        if local_world:
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)
    config = openvino_engine.compile_config("bf16")
    assert (config["NUM_STREAMS"], config["INFERENCE_NUM_THREADS"]) == (str(streams), str(threads))
    assert config["INFERENCE_PRECISION_HINT"] == "bf16"


@pytest.mark.parametrize("engine", ["openvino", "onnx"])
def test_jpegs_are_decoded_at_a_reduced_scale_unless_exact_decode(tiny_ir, tiny_model_dir, tmp_path, jpeg_drafts,
                                                                  engine):
    """As torch's predict: 640x480 JPEGs for a 160x160 model decode at 1/2 scale (320x240) by default
    (a 12-megapixel photo at 1/8: most of its decoding time); --exact-decode decodes every pixel."""
    model = tiny_ir
    if engine == "onnx":
        from vitcli.export.job import ExportOptions, export_model

        (f,) = export_model(str(tiny_model_dir), options=ExportOptions(output=tmp_path / "m")).files
        model = f.path
    photos = [make_image(tmp_path / f"p{i}.jpg", size=(640, 480), seed=i) for i in range(3)]
    drafted = jpeg_drafts
    args = ["predict", str(model), *map(str, photos), "--json", "--top-k", "3"]
    fast = runner.invoke(app, args)
    assert fast.exit_code == 0, fast.stderr
    assert drafted == [(320, 240)] * 3
    drafted.clear()
    exact = runner.invoke(app, [*args, "--exact-decode"])
    assert exact.exit_code == 0, exact.stderr
    assert drafted == []
    for a, b in zip(map(json.loads, fast.stdout.splitlines()), map(json.loads, exact.stdout.splitlines()), strict=True):
        assert a["source"] == b["source"]
        probs = {p["index"]: p["prob"] for p in b["predictions"]}
        assert all(abs(p["prob"] - probs[p["index"]]) < 0.05 for p in a["predictions"])


def test_callers_in_several_threads_take_turns_in_openvino(tmp_path):
    """evaluate's per-core streams call ``logits`` from two threads: calls into OpenVINO never overlap,
    and each caller gets its own batch's logits."""
    from concurrent.futures import ThreadPoolExecutor

    from vitcli.inference.openvino_engine import OpenVinoModel

    inside, most = [0], [0]

    class Slow(_Request):
        def set_input_tensor(self, tensor):
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            time.sleep(0.002)  # a window for another thread to enter
            super().set_input_tensor(tensor)
            inside[0] -= 1

    compiled = SimpleNamespace(get_property=lambda name: {"NUM_STREAMS": 2}[name],
                               create_infer_request=lambda: Slow(set()))
    model = OpenVinoModel(compiled, tmp_path / "m.xml", {})
    batches = [np.full((3, 3, 4, 4), i, dtype=np.float32) for i in range(40)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(model.logits, batches))
    assert most[0] == 1
    for i, logits in enumerate(got):
        np.testing.assert_array_equal(logits, np.full((3, 3), 16.0 * i))
