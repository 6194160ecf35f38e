"""vitcli.cpuinfo: CPU features and the bf16 rule per engine, from /proc/cpuinfo flags of real CPUs (mocked)."""

from __future__ import annotations

import pytest

from vitcli import cpuinfo

# the flags lines that matter, abridged from real /proc/cpuinfo files
CPUS = {
    "amx-xeon": "flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 avx_vnni amx_bf16 "
                "amx_tile amx_int8",  # Sapphire Rapids
    "zen4": "flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16",  # AMD EPYC 9004
    "icelake": "flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni",  # AVX-512 and VNNI, no bf16
    "avx2": "flags\t\t: fpu sse4_2 avx avx2 fma",  # AMD EPYC 7003, Haswell..Skylake client
    "avx_ne_convert": "flags\t\t: fpu avx avx2 avx_vnni avx_ne_convert",  # converts bf16, no bf16 matmul
    "arm": "Features\t: fp asimd evtstrm aes sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm sve i8mm bf16",
    "none": "",  # macOS, or /proc/cpuinfo unreadable
}


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """Make vitcli.cpuinfo read the flags of the named CPU."""
    def use(name: str) -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nmodel name\t: test\n{CPUS[name]}\n\n" if CPUS[name] else "")
        monkeypatch.setattr(cpuinfo, "CPUINFO", path)
        cpuinfo.cpu_flags.cache_clear()

    yield use
    cpuinfo.cpu_flags.cache_clear()  # the next test reads this machine's flags again


@pytest.mark.parametrize("name, torch_bf16, openvino_bf16", [
    ("amx-xeon", True, True),
    ("zen4", False, True),  # AVX512-BF16 without AMX: OpenVINO gains, torch autocast does not
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
