"""/proc/cpuinfo flags of real CPUs, for tests of the choices made from them (``use_cpu``)."""

from __future__ import annotations

from pathlib import Path

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


def use_cpu(monkeypatch: pytest.MonkeyPatch, folder: Path, name: str) -> None:
    """Make vitcli.cpuinfo read the flags of the named CPU until the test ends (``forget_cpu`` after)."""
    path = folder / f"cpuinfo-{name}"
    path.write_text(f"processor\t: 0\nmodel name\t: test\n{CPUS[name]}\n\n" if CPUS[name] else "")
    monkeypatch.setattr(cpuinfo, "CPUINFO", path)
    cpuinfo.cpu_flags.cache_clear()


def forget_cpu() -> None:
    cpuinfo.cpu_flags.cache_clear()  # the next test reads this machine's flags again
