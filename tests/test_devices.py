"""vitcli.devices: device choice, autocast and the precision chosen for training."""

from __future__ import annotations

import pytest
import torch

from vitcli.devices import autocast, resolve_device
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


@pytest.mark.parametrize("native, emulated, expected", [(True, True, "bf16"), (False, True, "fp16"),
                                                        (False, False, "fp16")],
                         ids=["ampere-native-bf16", "v100-t4-emulated-bf16", "no-bf16"])
def test_auto_precision_on_cuda_wants_native_bf16(monkeypatch, native, emulated, expected):
    """is_bf16_supported() is True on V100/T4, which only emulate bf16: auto must choose fp16 there."""
    from vitcli.devices import resolve_precision

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return emulated if including_emulation else native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve_precision("auto", torch.device("cuda")) == expected
    assert resolve_precision("fp32", torch.device("cuda")) == "fp32"


def test_fp16_training_gets_timms_grad_scaler():
    import timm
    from timm.utils import NativeScaler

    from vitcli.distributed import Dist
    from vitcli.finetune.config import FinetuneConfig
    from vitcli.finetune.loop import build_parts

    model = timm.create_model("test_vit", num_classes=2)
    cpu = torch.device("cpu")
    fp16 = build_parts(FinetuneConfig(), model, [1, 1], 2, cpu, "fp16", Dist())  # the scaler, built on any device
    assert isinstance(fp16.scaler, NativeScaler)
    assert build_parts(FinetuneConfig(), model, [1, 1], 2, cpu, "bf16", Dist()).scaler is None


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
