"""Where a model runs and at what precision: device choice, native-bf16 detection, autocast."""

from __future__ import annotations

import contextlib

import torch

from vitcli.errors import UsageError


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} was asked for but no CUDA device is available; use --device cpu")
    kind, _, index = device.partition(":")
    if kind == "cuda" and index.isdigit() and int(index) >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps was asked for but MPS is not available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"unknown --device '{device}'; use auto, cpu, cuda, cuda:N or mps") from e


def cpu_supports_bf16() -> bool:
    """Native bf16 matrix units (AVX512-BF16 or AMX) make CPU autocast worthwhile."""
    from vitcli.cpuinfo import cpu_features  # the one reading of /proc/cpuinfo (benchmark's table uses it too)

    return cpu_features()["BF16"] or torch.backends.cpu.get_cpu_capability() == "AVX512_BF16"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``--precision`` (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise UsageError(f"unknown --precision '{precision}'; use fp32, bf16 or fp16")
    if device.type == "cpu" and dtype is torch.float16:
        raise UsageError("--precision fp16 needs a GPU; on the CPU use bf16 (or fp32)")
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on CPUs and CUDA devices with native bf16, fp16 (trained with a GradScaler) on other
    CUDA devices, else fp32."""
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise UsageError("--precision fp16 needs a CUDA device; use bf16 (or fp32) here")
        return precision
    if device.type == "cuda":
        # V100 and T4 emulate bf16 (slowly): is_bf16_supported() counts that unless told not to
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if device.type == "cpu" and cpu_supports_bf16():
        return "bf16"
    return "fp32"
