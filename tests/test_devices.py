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
