"""The machine line every benchmark prints beside its figures: the CPU flags that decide the engines'
speed, and the load that other processes put on a shared machine. Torch-free."""

from __future__ import annotations

import os

from vitcli.cpuinfo import cpu_flags, usable_cpus


def flags_line() -> str:
    """The AVX2, AVX-512 and AMX flags of this CPU, sorted ("(none)" without them)."""
    wanted = sorted(f for f in cpu_flags() if f == "avx2" or f.startswith(("avx512", "amx")))
    return " ".join(wanted) or "(none)"


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {usable_cpus()} usable CPUs"
