"""vitcli.cpuinfo: CPU features and the bf16 rule per engine, from /proc/cpuinfo flags of real CPUs (mocked)."""

from __future__ import annotations

import pytest

from _cpus import forget_cpu, use_cpu
from vitcli import cpuinfo


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """``cpu(name)``: vitcli.cpuinfo reads the flags of that CPU (from _cpus.CPUS)."""
    yield lambda name: use_cpu(monkeypatch, tmp_path, name)
    forget_cpu()


@pytest.mark.parametrize("name, torch_bf16, openvino_bf16", [
    ("amx-xeon", True, True),
    ("zen4", True, True),  # AVX512-BF16 without AMX: both gain (torch 1.7-1.8x, measured)
    ("icelake", False, False),
    ("avx2", False, False),
    ("avx_ne_convert", False, False),
    ("arm", False, False),
    ("none", False, False),
])
def test_fast_bf16_per_engine_and_cpu(cpu, name, torch_bf16, openvino_bf16):
    cpu(name)
    assert cpuinfo.fast_bf16("torch") is torch_bf16
    assert cpuinfo.fast_bf16("openvino") is openvino_bf16


def test_fast_bf16_names_the_engines_it_knows():
    with pytest.raises(ValueError, match="torch or openvino"):
        cpuinfo.fast_bf16("tensorrt")


def test_cpu_features_read_the_flags_and_the_arm_features_line(cpu):
    cpu("zen4")
    assert cpuinfo.cpu_features() == {"AVX2": True, "AVX-512": True, "VNNI": True, "BF16": True, "AMX": False}
    assert cpuinfo.describe_cpu() == "AVX2, AVX-512, VNNI, BF16 (no AMX)"
    cpu("arm")
    assert "bf16" in cpuinfo.cpu_flags() and "sve" in cpuinfo.cpu_flags()
    assert not any(cpuinfo.cpu_features().values())
    cpu("none")
    assert cpuinfo.cpu_flags() == frozenset()
