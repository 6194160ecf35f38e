"""The CPU's instruction-set flags that decide which precisions run fast (no torch: the ONNX and
OpenVINO paths use it)."""

from __future__ import annotations

import contextlib
import functools
import math
import os
from pathlib import Path

# what each reported feature means for inference, and the /proc/cpuinfo flags that give it
FEATURES = {
    "AVX2": ("avx2",),
    "AVX-512": ("avx512f",),
    "VNNI": ("avx512_vnni", "avx_vnni", "amx_int8"),  # int8 dot products (u8 x s8 without saturation)
    "BF16": ("avx512_bf16", "amx_bf16"),  # native bf16 matmul (avx_ne_convert only converts)
    "AMX": ("amx_tile",),
}


CPUINFO = Path("/proc/cpuinfo")  # tests point it at a file of another CPU's flags (and clear the cache)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags line of /proc/cpuinfo (x86 ``flags``, ARM ``Features``; empty where there is none, e.g. macOS)."""
    with contextlib.suppress(OSError):
        for line in CPUINFO.read_text().splitlines():
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


# bf16 is chosen only where it is native *and* measured faster than fp32 for that engine
# (benchmarks/engines.py; docs/engines.md has the figures): AVX512-BF16 or AMX, for torch autocast and
# OpenVINO alike. On a 2-core AMD Zen 4 (AVX512-BF16, no AMX) torch's bf16 ran DeiT-Tiny 1.69-1.84x
# fp32 (inference) and 1.44x (training step) at low load; an earlier 0.93x was taken at load 12-14.
# ARM (bf16 in Features on Neoverse V1/V2) and machines without /proc/cpuinfo stay fp32.
FAST_BF16_FLAGS = {
    "torch": ("avx512_bf16", "amx_bf16"),
    "openvino": ("avx512_bf16", "amx_bf16"),
}


def fast_bf16(engine: str = "torch") -> bool:
    """Whether ``engine`` ("torch" or "openvino") runs bf16 natively and faster than fp32 on this CPU.

    The rule behind ``--precision auto`` on CPUs (``vitcli.devices.resolve_precision``) and behind
    OpenVINO's bf16 inference-precision hint; see ``FAST_BF16_FLAGS`` for why the engines differ.
    """
    try:
        wanted = FAST_BF16_FLAGS[engine]
    except KeyError:
        raise ValueError(f"unknown engine '{engine}'; use {' or '.join(FAST_BF16_FLAGS)}") from None
    flags = cpu_flags()
    return any(f in flags for f in wanted)


# ------------------------------------------------------------------------------ usable CPUs

CGROUP_ROOT = Path("/sys/fs/cgroup")  # cgroup v2; tests point it at a folder of their own


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity set (taskset, Slurm, docker --cpuset-cpus), capped
    by a cgroup v2 CPU quota (docker --cpus, Kubernetes limits), rounded up; at least 1.

    ``os.cpu_count()`` counts every CPU of the machine, which overcommits a container or a job step.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(cpus, 1)


def cgroup_cpu_quota() -> float | None:
    """CPUs' worth of time a cgroup v2 ``cpu.max`` allows this process's cgroup and its parents (the
    smallest), or None without a quota. ``cpu.max`` holds ``QUOTA PERIOD`` in microseconds, or ``max``."""
    group = "/"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):  # the v2 hierarchy
                group = line[3:].strip() or "/"
    quotas = []
    folder = CGROUP_ROOT / group.lstrip("/")
    for path in (folder, *folder.parents):
        with contextlib.suppress(OSError, ValueError):
            quota, _, period = (path / "cpu.max").read_text().strip().partition(" ")
            if quota != "max":
                quotas.append(int(quota) / int(period or 100000))
        if path == CGROUP_ROOT:
            break
    return min(quotas) if quotas else None
