"""Streaming predict: time to the first result, and peak memory as the number of inputs grows.

Runs `vitcli predict --files-from LIST --json` as a subprocess (the shipped default model unless
--model) on lists of N inputs, for each N in --sizes (300 and 3,000 by default), and reports:
  first    seconds from start until the first JSON line reaches stdout
  last     seconds until the last line
  peak RSS the child's peak resident memory (``wait4``), and its growth from the smallest N
The inputs are small generated PNGs, distinct files (so nothing is cached per path), listed in a file
that vitcli reads as it goes. Sizes run in turns (300, 3000, 300, 3000, ...) so that the load of
other processes on a shared machine hits each alike; the table shows the medians.

    python benchmarks/predict_memory.py [--sizes 300,3000] [--repeats 1] [--model NAME]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(folder: Path, n: int, size: int = 64) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def run(list_file: Path, model: str | None, batch_size: int) -> dict[str, float]:
    """One `vitcli predict` run: first/last line times, line count, peak RSS (MiB)."""
    command = [sys.executable, "-m", "vitcli", "predict", "--files-from", str(list_file), "--json", "--top-k", "1",
               "--batch-size", str(batch_size), *(["--model", model] if model else [])]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    first = None
    lines = 0
    for _ in process.stdout:
        lines += 1
        if first is None:
            first = time.perf_counter() - start
    last = time.perf_counter() - start
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"vitcli predict failed (status {status}): {' '.join(command)}")
    return {"first": first or 0.0, "last": last, "lines": lines, "rss_mib": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="300,3000", help="numbers of inputs, comma-separated")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--model", default=None, help="--model for vitcli (default: the shipped DeiT-Tiny)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    with tempfile.TemporaryDirectory(prefix="vitcli-memory-") as tmp:
        images = make_images(Path(tmp) / "images", max(sizes))
        lists = {}
        for n in sizes:
            lists[n] = Path(tmp) / f"list{n}.txt"
            lists[n].write_text("".join(f"{p}\n" for p in images[:n]))
        results: dict[int, list[dict[str, float]]] = {n: [] for n in sizes}
        for _ in range(args.repeats):
            for n in sizes:
                results[n].append(run(lists[n], args.model, args.batch_size))
                assert results[n][-1]["lines"] == n

    print(f"vitcli predict --files-from LIST --json, {os.cpu_count()} cores, batch {args.batch_size}, "
          f"model {args.model or 'default (DeiT-Tiny)'}; medians of {args.repeats}")
    header = ("inputs", 7), ("first s", 8), ("last s", 8), ("first/last", 10), ("img/s", 7), ("peak RSS MiB", 13), \
        ("growth", 8)
    print(" ".join(f"{name:>{width}}" for name, width in header))
    base = statistics.median(r["rss_mib"] for r in results[sizes[0]])
    for n in sizes:
        first = statistics.median(r["first"] for r in results[n])
        last = statistics.median(r["last"] for r in results[n])
        rss = statistics.median(r["rss_mib"] for r in results[n])
        print(f"{n:>7} {first:>8.2f} {last:>8.2f} {first / last:>10.3f} {n / (last - first):>7.1f} "
              f"{rss:>13.1f} {rss - base:>+8.1f}")


if __name__ == "__main__":
    main()
