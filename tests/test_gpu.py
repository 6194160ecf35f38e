"""Real CUDA runs (marked `gpu`, skipped without a CUDA device): auto precision, exact fp32, the CUDA
benchmark rows. The same choices are tested with mocks in test_devices.py and test_benchmark.py."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from vitcli.models.resolve import load_model

    return load_model(str(tiny_model_dir))


def probs(loaded, images, **options) -> torch.Tensor:
    from vitcli.inference.predict import PredictOptions, predict

    records = list(predict(loaded, [str(p) for p in images], PredictOptions(top_k=3, workers=0, **options)))
    assert all(r.ok for r in records)
    return torch.tensor([[label.prob for label in sorted(r.top, key=lambda t: t.index)] for r in records])


def test_auto_precision_on_cuda_agrees_with_exact_fp32_and_fp32_matches_the_cpu(tiny, images):
    from vitcli.devices import resolve_precision

    cpu = probs(tiny, images, device="cpu", precision="fp32")
    fp32 = probs(tiny, images, device="cuda", precision="fp32")
    auto = probs(tiny, images, device="cuda")

    assert resolve_precision("auto", torch.device("cuda")) in ("bf16", "tf32")
    assert float((fp32 - cpu).abs().max()) < 1e-4  # TF32 off: the GPU's fp32 is the CPU's to rounding
    assert float((auto - fp32).abs().max()) < 0.05


def test_the_cuda_benchmark_rows_run_and_verify(tiny_model_dir):
    from vitcli.benchmark import run_benchmark

    result = run_benchmark(str(tiny_model_dir), batch_sizes=(2,), repeats=3, warmup=1,
                           backends=["torch-fp32", "cuda-fp32", "cuda-bf16"])
    ran = {r.backend: r for r in result.rows}
    assert ran["cuda-fp32"].verified and ran["cuda-fp32"].images_per_s > 0
    if torch.cuda.is_bf16_supported(including_emulation=False):
        assert ran["cuda-bf16"].images_per_s > 0
        assert result.default_backend == "cuda-bf16"
    else:
        assert "no native bf16" in result.skipped["cuda-bf16"]
