"""`vitcli predict model.onnx one.jpg` wall time against the torch path, measured from outside.

Both commands run as fresh subprocesses (interpreter start, imports, model load, one image,
rendering), taking turns repeat by repeat so that load from other processes hits both alike. Also
prints, in-process, where the ONNX path's time goes: imports, session creation, one image.

    python benchmarks/onnx_predict_startup.py MODEL.onnx IMAGE --torch-model deit_tiny_patch16_224 \
        --torch-weights deit.safetensors [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

PHASES = r"""
import time, sys
t0 = time.perf_counter()
import numpy, PIL.Image, onnxruntime, typer, rich.console
t1 = time.perf_counter()
from vitcli.inference.onnx_engine import load_onnx, predict_onnx
model = load_onnx(sys.argv[1])
t2 = time.perf_counter()
list(predict_onnx(model, [sys.argv[2]], top_k=5))
t3 = time.perf_counter()
heavy = [m for m in ("torch", "timm", "torchvision") if m in sys.modules]
print(f"{t1 - t0:.3f} {t2 - t1:.3f} {t3 - t2:.3f} {','.join(heavy) or '-'}")
"""


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr}")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx")
    parser.add_argument("image")
    parser.add_argument("--torch-model", default="deit_tiny_patch16_224")
    parser.add_argument("--torch-weights", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    vitcli = [sys.executable, "-m", "vitcli", "predict"]
    onnx_cmd = [*vitcli, args.onnx, args.image]
    torch_cmd = [*vitcli, args.image, "--model", args.torch_model]
    if args.torch_weights:
        torch_cmd += ["--weights", args.torch_weights]
    onnx_times, torch_times, phases = [], [], []
    wall(onnx_cmd)  # warm the file cache for both
    wall(torch_cmd)
    for _ in range(args.repeats):
        onnx_times.append(wall(onnx_cmd))
        torch_times.append(wall(torch_cmd))
        out = subprocess.run([sys.executable, "-c", PHASES, args.onnx, args.image], capture_output=True, text=True,
                             check=True).stdout.split()
        phases.append(out)
    load = os.getloadavg()[0]
    print(f"load average {load:.1f} on {os.cpu_count()} cores, {args.repeats} repeats, median (min)")
    print(f"vitcli predict model.onnx one.jpg : {statistics.median(onnx_times):.2f} s ({min(onnx_times):.2f} s)")
    print(f"vitcli predict one.jpg -m (torch) : {statistics.median(torch_times):.2f} s ({min(torch_times):.2f} s)")
    print(f"torch path / onnx path            : {statistics.median(torch_times) / statistics.median(onnx_times):.2f}x")
    imports, session, one = (statistics.median(float(p[i]) for p in phases) for i in range(3))
    print(f"onnx path in-process: imports (numpy, Pillow, onnxruntime, typer, rich) {imports:.2f} s, "
          f"session {session:.2f} s, one image {one:.3f} s; torch/timm imported: {phases[-1][3]}")


if __name__ == "__main__":
    main()
