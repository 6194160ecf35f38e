"""The CPU's instruction-set flags that decide which precisions run fast (no torch: the ONNX path uses it)."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

# what each reported feature means for inference, and the /proc/cpuinfo flags that give it
FEATURES = {
    "AVX2": ("avx2",),
    "AVX-512": ("avx512f",),
    "VNNI": ("avx512_vnni", "avx_vnni", "amx_int8"),  # int8 dot products (u8 x s8 without saturation)
    "BF16": ("avx512_bf16", "amx_bf16"),  # native bf16 matmul (avx_ne_convert only converts)
    "AMX": ("amx_tile",),
}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags line of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_features() -> dict[str, bool]:
    """{'AVX2': True, 'AVX-512': False, 'VNNI': False, 'BF16': False, 'AMX': False} for this CPU."""
    flags = cpu_flags()
    return {name: any(f in flags for f in wanted) for name, wanted in FEATURES.items()}


def describe_cpu() -> str:
    """'AVX2 (no AVX-512, VNNI, BF16, AMX)': the flags every recorded figure names."""
    features = cpu_features()
    have = [n for n, ok in features.items() if ok]
    lack = [n for n, ok in features.items() if not ok]
    return f"{', '.join(have) or 'no AVX2'}" + (f" (no {', '.join(lack)})" if lack else "")


def has_vnni() -> bool:
    return cpu_features()["VNNI"]
