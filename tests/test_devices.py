"""vitcli.devices: device choice, autocast and the precision `auto` chooses for inference and training."""

from __future__ import annotations

import pytest
import torch

from _cpus import forget_cpu, use_cpu
from vitcli.devices import autocast, resolve_device, resolve_precision
from vitcli.errors import UsageError


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(UsageError, match="unknown --device"):
        resolve_device("tpu")


def test_autocast_precisions_on_cpu():
    cpu = torch.device("cpu")
    with autocast(cpu, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu")
    with pytest.raises(UsageError, match="fp16 needs a GPU"):
        autocast(cpu, "fp16")
    with pytest.raises(UsageError, match="unknown --precision"):
        autocast(cpu, "fp8")


@pytest.mark.parametrize("native, emulated, inference, training", [
    (True, True, "bf16", "bf16"), (False, True, "tf32", "fp16"), (False, False, "tf32", "fp16")],
    ids=["ampere-native-bf16", "v100-t4-emulated-bf16", "no-bf16"])
def test_auto_precision_on_cuda_wants_native_bf16(monkeypatch, native, emulated, inference, training):
    """is_bf16_supported() is True on V100/T4, which only emulate bf16: auto must not choose bf16 there.
    Inference then runs fp32 with TF32 matmuls; training fp16 with a GradScaler."""
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return emulated if including_emulation else native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    cuda = torch.device("cuda")
    assert resolve_precision("auto", cuda) == inference
    assert resolve_precision("auto", cuda, training=True) == training
    assert resolve_precision("fp32", cuda) == "fp32"


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    yield lambda name: use_cpu(monkeypatch, tmp_path, name)
    forget_cpu()


@pytest.mark.parametrize("name, expected", [
    ("amx-xeon", "bf16"),
    ("zen4", "bf16"),  # native AVX512-BF16 without AMX: torch's bf16 is 1.7-1.8x fp32 there
    ("icelake", "fp32"), ("avx2", "fp32"), ("avx_ne_convert", "fp32"), ("arm", "fp32"), ("none", "fp32")])
def test_auto_precision_on_each_cpu(cpu, name, expected):
    cpu(name)
    cpu_device = torch.device("cpu")
    assert resolve_precision("auto", cpu_device) == expected
    assert resolve_precision("auto", cpu_device, training=True) == expected
    assert resolve_precision("fp32", cpu_device) == "fp32"  # explicit choices are kept
    assert resolve_precision("bf16", cpu_device) == "bf16"
    assert resolve_precision("auto", torch.device("mps")) == "fp32"


def test_explicit_precisions_are_checked_for_the_device():
    cpu_device = torch.device("cpu")
    with pytest.raises(UsageError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu_device)
    with pytest.raises(UsageError, match="tf32 needs a CUDA device"):
        resolve_precision("tf32", cpu_device)
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):  # the GradScaler is CUDA's
        resolve_precision("fp16", torch.device("mps"), training=True)
    with pytest.raises(UsageError, match="unknown --precision 'fp8'; use auto, fp32, tf32, bf16, fp16"):
        resolve_precision("fp8", cpu_device)


def test_tf32_only_inside_its_context_and_fp32_on_cuda_is_exact():
    """The flags are process-wide: tf32 turns TF32 on for its duration, fp32 turns it off (cuDNN's
    convolutions default to TF32), and both put back what was there."""
    cuda = torch.device("cuda")  # a device object needs no GPU; the flags are set without one
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    try:
        matmul.allow_tf32, cudnn.allow_tf32 = False, True
        with autocast(cuda, "tf32"):
            assert (matmul.allow_tf32, cudnn.allow_tf32) == (True, True)
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, True)
        with autocast(cuda, "fp32"):
            assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, False)
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, True)
        with autocast(torch.device("cpu"), "fp32"):  # the CPU has no TF32: nothing changes
            assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, True)
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


def test_fp16_training_gets_timms_grad_scaler():
    import timm
    from timm.utils import NativeScaler

    from vitcli.distributed import Rank
    from vitcli.finetune.config import FinetuneConfig
    from vitcli.finetune.parts import build_parts

    model = timm.create_model("test_vit", num_classes=2)
    cpu = torch.device("cpu")
    fp16 = build_parts(FinetuneConfig(), model, [1, 1], 2, cpu, "fp16", Rank())  # the scaler, built on any device
    assert isinstance(fp16.scaler, NativeScaler)
    assert build_parts(FinetuneConfig(), model, [1, 1], 2, cpu, "bf16", Rank()).scaler is None


def test_cuda_n_is_accepted_by_the_cli_and_a_gpu_the_machine_lacks_is_a_usage_error(tiny_model_dir, tmp_path,
                                                                                    monkeypatch):
    import torch
    from typer.testing import CliRunner

    from conftest import make_image
    from vitcli.cli.app import app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    image = make_image(tmp_path / "a.png")

    result = CliRunner().invoke(app, ["predict", str(image), "--model", str(tiny_model_dir), "--device", "cuda:2"])
    assert result.exit_code == 2
    assert "--device cuda:2: this machine has 2 CUDA device(s), cuda:0 to cuda:1" in result.stderr

    result = CliRunner().invoke(app, ["predict", str(image), "--device", "gpu0"])
    assert result.exit_code == 2 and "gpu0" in result.stderr
