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
    """Native bf16 matrix units (AVX512-BF16 or AMX): bf16 runs at all (the benchmark's torch-bf16 row).
    Whether it also runs faster than fp32 is ``vitcli.cpuinfo.fast_bf16``."""
    from vitcli.cpuinfo import cpu_features  # the one reading of /proc/cpuinfo (benchmark's table uses it too)

    return cpu_features()["BF16"] or torch.backends.cpu.get_cpu_capability() == "AVX512_BF16"


PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context for a resolved ``--precision``: bf16/fp16 autocast; tf32 (CUDA fp32 with TF32 matmuls);
    fp32 exact (on CUDA, TF32 off for the duration, cuDNN's convolutions included)."""
    if precision in ("fp32", "tf32"):
        if precision == "tf32" and device.type != "cuda":
            raise UsageError("--precision tf32 needs a CUDA device; use fp32 here")
        return _tf32(precision == "tf32") if device.type == "cuda" else contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise UsageError(f"unknown --precision '{precision}'; use {', '.join(PRECISIONS)}")
    if device.type == "cpu" and dtype is torch.float16:
        raise UsageError("--precision fp16 needs a GPU; on the CPU use bf16 (or fp32)")
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def _tf32(enabled: bool):
    """TF32 matmuls and convolutions on or off, restored after (process-wide flags: the CUDA path scores
    in one thread)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def resolve_precision(precision: str, device: torch.device, training: bool = False) -> str:
    """What ``--precision`` runs on ``device``; ``auto`` is the fastest that agrees with fp32.

    ``auto``: on CUDA, bf16 where the GPU has it natively, else fp32 with TF32 matmuls (``tf32``;
    for training, fp16 with a GradScaler); on CPUs, bf16 only where torch's bf16 is native and
    measured faster (``vitcli.cpuinfo.fast_bf16('torch')``: AMX); fp32 elsewhere (MPS included).
    An explicit precision is kept (``fp32`` stays exact) once the device is checked for it.
    """
    from vitcli.cpuinfo import fast_bf16

    if precision not in PRECISIONS:
        raise UsageError(f"unknown --precision '{precision}'; use {', '.join(PRECISIONS)}")
    if precision != "auto":
        if training and precision == "fp16" and device.type != "cuda":  # its GradScaler is CUDA's
            raise UsageError("--precision fp16 needs a CUDA device; use bf16 (or fp32) here")
        autocast(device, precision)  # fp16 on the CPU, tf32 off CUDA: usage errors
        return precision
    if device.type == "cuda":
        # V100 and T4 emulate bf16 (slowly): is_bf16_supported() counts that unless told not to
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16"
        return "fp16" if training else "tf32"
    if device.type == "cpu" and fast_bf16("torch"):
        return "bf16"
    return "fp32"
