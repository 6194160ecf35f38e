"""vitcli benchmark: rows per backend and batch size, skips with reasons, FLOPs, the fastest verified option."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vitcli.benchmark import count_gflops, matmul_rate, predict_default_backend, run_benchmark
from vitcli.cli.app import app
from vitcli.cpuinfo import cpu_features, describe_cpu

runner = CliRunner()


def test_gflops_count_attention_only_with_fused_attention_off():
    import timm

    unfused = timm.create_model("test_vit", pretrained=False, exportable=True).eval()
    fused = timm.create_model("test_vit", pretrained=False).eval()
    for m in fused.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    # test_vit: 160x160, patch 16 -> 101 tokens, dim 64; q @ k^T and attn @ v add 2 * 2 * 101^2 * 64 per block
    extra = count_gflops(unfused, (3, 160, 160)) - count_gflops(fused, (3, 160, 160))
    blocks = len(unfused.blocks)
    assert extra * 1e9 == pytest.approx(blocks * 2 * 2 * 101**2 * 64, rel=1e-6)


def test_matmul_rate_is_flops_over_the_fastest_timed_run_on_a_fake_clock(monkeypatch):
    """Each product "takes" a set time on a fake clock: the rate is 2 n^3 over the fastest timed run; the
    warm-up run (fastest of all here) is not timed, and runs stop once ``seconds`` have passed."""
    import torch

    import vitcli.benchmark as benchmark

    now = [0.0]
    durations = iter([0.001, 0.004, 0.002, 0.003, 0.0005])  # warm-up, three timed runs, one never reached
    calls = []
    real_mm = torch.mm

    def timed_mm(a, b):
        calls.append(a.shape)
        now[0] += next(durations)
        return real_mm(a, b)

    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(benchmark.torch, "mm", timed_mm)

    rate = matmul_rate("fp32", n=64, seconds=0.0085)

    assert len(calls) == 4 and calls[0] == (64, 64)
    assert rate == pytest.approx(2 * 64**3 / 0.002 / 1e9)


def test_cpu_features_name_the_relevant_flags():
    assert set(cpu_features()) == {"AVX2", "AVX-512", "VNNI", "BF16", "AMX"}
    assert describe_cpu().startswith(("AVX2", "no AVX2"))


def test_run_benchmark_times_every_backend_and_verifies_it(tiny_model_dir):
    result = run_benchmark(str(tiny_model_dir), batch_sizes=(1, 2), repeats=3, warmup=1,
                           backends=["torch-fp32", "torch-bf16", "openvino-fp32", "openvino-bf16", "onnxruntime-fp32",
                                     "onnxruntime-int8"])
    ran = ["torch-fp32", "openvino-fp32", "onnxruntime-fp32", "onnxruntime-int8"]
    if cpu_features()["BF16"]:
        ran.insert(1, "torch-bf16")
        ran.insert(3, "openvino-bf16")
    else:
        assert "no native bf16" in result.skipped["torch-bf16"]
        assert "no native bf16" in result.skipped["openvino-bf16"]
    assert [(r.backend, r.batch_size) for r in result.rows] == [(b, bs) for bs in (1, 2) for b in ran]
    for row in result.rows:
        assert row.images_per_s > 0 and 0 < row.p50_ms <= row.p90_ms
        assert row.fraction_of_peak is not None and row.fraction_of_peak > 0
    assert all(r.verified for r in result.rows if r.dtype == "fp32")
    assert result.parameters == sum(p.numel() for p in _tiny(tiny_model_dir).parameters())
    assert result.gflops_per_image > 0 and result.matmul_gflops["fp32"] > 0
    assert result.fastest() is not None and result.fastest().verified
    # the bound of the row predict runs: decoding and that model on the same cores, each image once
    assert result.default_backend == predict_default_backend() and result.decode_images_per_s > 0
    bound, row = result.bound()
    assert row.backend == result.default_backend
    assert bound == pytest.approx(1 / (1 / result.decode_images_per_s + 1 / row.images_per_s))


@pytest.mark.parametrize("cpu, cuda_bf16, backend, expected", [
    ("amx-xeon", None, "", "openvino-bf16"), ("zen4", None, "", "openvino-bf16"), ("avx2", None, "", "openvino-fp32"),
    ("amx-xeon", None, "torch", "torch-bf16"), ("zen4", None, "torch", "torch-bf16"),
    ("avx2", None, "torch", "torch-fp32"),
    ("zen4", True, "", "cuda-bf16"), ("zen4", False, "", "cuda-fp32")])
def test_the_row_predict_runs_by_default(monkeypatch, tmp_path, cpu, cuda_bf16, backend, expected):
    import torch

    from _cpus import forget_cpu, use_cpu

    if cuda_bf16 is not None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: cuda_bf16)
    monkeypatch.setenv("VITCLI_BACKEND", backend)
    use_cpu(monkeypatch, tmp_path, cpu)
    try:
        assert predict_default_backend() == expected
    finally:
        forget_cpu()


def _tiny(folder):
    from vitcli.models.resolve import load_model

    return load_model(str(folder)).model


def test_cli_benchmark_json_and_closing_line(tiny_model_dir):
    args = ["benchmark", "-m", str(tiny_model_dir), "-b", "1", "-r", "3", "--warmup", "0", "--backends", "torch-fp32"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["fastest"]["backend"] == "torch-fp32" and doc["rows"][0]["batch_size"] == 1
    assert set(doc["cpu"]) == {"AVX2", "AVX-512", "VNNI", "BF16", "AMX"}
    table = runner.invoke(app, args)
    assert table.exit_code == 0
    lines = table.stdout.strip().splitlines()
    assert lines[-1].startswith("fastest verified: torch-fp32 at batch 1")
    assert lines[-2].startswith(f"vitcli predict runs {predict_default_backend()} by default here")
    assert doc["default_backend"] == predict_default_backend()
    if doc["default_backend"] == "torch-fp32":  # the row that ran: its bound is printed beside it
        assert "decode-once bound" in lines[-2] and doc["decode_once_bound"] > 0


def test_cli_benchmark_bad_batch_sizes_exit_2(tiny_model_dir):
    result = runner.invoke(app, ["benchmark", "-m", str(tiny_model_dir), "-b", "1,x"])
    assert result.exit_code == 2 and "--batch-sizes '1,x'" in result.stderr


def test_cli_benchmark_on_a_cuda_machine_with_the_cpu_only_onnxruntime_skips_that_row(tiny_model_dir, monkeypatch):
    import onnxruntime
    import torch

    import vitcli.benchmark

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine ...
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])  # ... plain ort
    monkeypatch.setattr(vitcli.benchmark, "matmul_rate", lambda *args, **kwargs: 1.0)  # no GPU to time here

    result = runner.invoke(app, ["benchmark", "-m", str(tiny_model_dir), "-b", "1", "-r", "3", "--warmup", "0",
                                 "--backends", "torch-fp32,onnxruntime-cuda", "--json"])

    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [row["backend"] for row in doc["rows"]] == ["torch-fp32"]
    assert "no CUDA provider" in doc["skipped"]["onnxruntime-cuda"]
    assert "install onnxruntime-gpu" in doc["skipped"]["onnxruntime-cuda"]


def test_cli_benchmark_openvino_int8_row_calibrated_on_its_own_images(tiny_model_dir, tmp_path):
    from conftest import make_image

    calibration = tmp_path / "calibration"
    for i in range(4):
        make_image(calibration / f"{i}.png", size=(96, 80), seed=100 + i)
    result = runner.invoke(app, ["benchmark", "-m", str(tiny_model_dir), "-b", "2", "-r", "3", "--warmup", "1",
                                 "--backends", "torch-fp32,openvino-int8", "--calibration", str(calibration),
                                 "--json"])

    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["skipped"] == {}
    fp32, int8 = doc["rows"]
    assert int8["backend"] == "openvino-int8" and int8["dtype"] == "int8" and int8["batch_size"] == 2
    assert int8["images_per_s"] > 0 and 0 < int8["p50_ms"] <= int8["p90_ms"]
    assert int8["fraction_of_peak"] > 0 and 0 <= int8["top1_agreement"] <= 1
    assert int8["max_abs_logit"] > 1e-4  # quantized: not the fp32 model's logits
    assert doc["matmul_gflops"]["int8"] > 0
    assert "NNCF accuracy control on 4 calibration images (target 98.0% agreement)" in result.stderr
    if not int8["verified"]:
        assert doc["fastest"]["backend"] == "torch-fp32"


def test_cli_benchmark_without_calibration_skips_openvino_int8_with_the_reason(tiny_model_dir):
    result = runner.invoke(app, ["benchmark", "-m", str(tiny_model_dir), "-b", "1", "-r", "3", "--warmup", "0",
                                 "--backends", "torch-fp32,openvino-int8", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [row["backend"] for row in doc["rows"]] == ["torch-fp32"]
    assert doc["skipped"] == {"openvino-int8": "needs --calibration DIR: the images NNCF calibrates on"}


def test_cli_benchmark_refuses_calibration_images_that_it_verifies_on(tiny_model_dir, tmp_path):
    from conftest import make_image

    photos = tmp_path / "photos"
    make_image(photos / "a.png")
    result = runner.invoke(app, ["benchmark", "-m", str(tiny_model_dir), "--backends", "openvino-int8",
                                 "--calibration", str(photos), "--verify-images", str(photos)])
    assert result.exit_code == 2
    assert "--calibration and --verify-images share 1 images" in result.stderr


@pytest.mark.parametrize("int8_ips, says", [(50.0, True), (150.0, False)])
def test_cli_benchmark_says_when_openvino_int8_is_not_faster_than_bf16(monkeypatch, int8_ips, says):
    import vitcli.benchmark
    from vitcli.benchmark import BenchmarkResult, Row

    def row(backend, ips, verified=True):
        return Row(backend, backend.split("-")[1], 32, ips, 1.0, 1.0, None, verified, 1.0, 0.0)

    result = BenchmarkResult("m", 1, 1.0, 2, cpu_features(), {}, rows=[
        row("torch-fp32", 40.0), row("openvino-fp32", 60.0), row("openvino-bf16", 100.0),
        row("openvino-int8", int8_ips)])
    monkeypatch.setattr(vitcli.benchmark, "run_benchmark", lambda *args, **kwargs: result)

    out = runner.invoke(app, ["benchmark", "--backends", "torch-fp32"]).stdout

    line = f"OpenVINO int8 is not faster than openvino-bf16 at batch 32 on this CPU ({int8_ips / 100:.2f}x): " \
           "prefer openvino-bf16 here"
    assert (line in out) == says, out
    fastest = "openvino-bf16" if says else "openvino-int8"
    assert out.strip().splitlines()[-1].startswith(f"fastest verified: {fastest} at batch 32")


@pytest.mark.parametrize("backend, torch_free", [("auto", True), ("torch", False)])
def test_the_bound_times_the_decoding_of_the_engine_predict_runs(monkeypatch, tiny_model_dir, images, backend,
                                                                 torch_free):
    """OpenVINO's predict decodes with Pillow and NumPy (timm's exact steps), torch's with its fast path:
    the bound must time the decoding that predict's default engine really does."""
    import vitcli.io.preprocess
    from vitcli import benchmark

    monkeypatch.setenv("VITCLI_BACKEND", backend)
    numpy_decodes = []
    real = vitcli.io.preprocess.preprocess
    monkeypatch.setattr(vitcli.io.preprocess, "preprocess",
                        lambda img, config: numpy_decodes.append(1) or real(img, config))
    asked = []
    rate = benchmark.decode_rate
    monkeypatch.setattr(benchmark, "decode_rate", lambda *a, **k: asked.append(k["torch_free"]) or rate(*a, **k))

    result = run_benchmark(str(tiny_model_dir), batch_sizes=(1,), repeats=3, warmup=0, backends=["torch-fp32"],
                           verify_images=[str(p) for p in images])

    assert asked == [torch_free] and result.decode_images_per_s > 0
    assert bool(numpy_decodes) == torch_free
