"""Speed and memory of `vitcli patches --attention` on the CPU.

1. Time, ViT-B/16 (random weights), one 224x224 image, repeats interleaved:
   - the plain fused forward pass (what predict runs);
   - the unfused forward with vitcli's capture (heads fused in the hook: query rows, running rollout);
   - the unfused forward keeping every (h, T, T) map and computing rollout afterwards;
   - the whole attention view (explain_image: preprocessing, capture, four PNGs), once per repeat.
2. Peak memory at large T: DINOv2-S/14 with 4 registers at 518x518 (T = 4 + 1 + 37*37 = 1374), each
   mode in a fresh process (peak RSS), heads fused in the hook versus keeping (h, T, T) per layer.

    python benchmarks/patches_speed.py [--repeats 5] [--image PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = REPO.parent / "shared" / "data" / "images" / "corgi.jpg"


def build(name: str, img_size: int | None, fused: bool) -> torch.nn.Module:
    import timm

    from vitcli.explain.attention import unfused_attention

    torch.manual_seed(0)
    kwargs = {"img_size": img_size} if img_size else {}
    if fused:
        return timm.create_model(name, pretrained=False, **kwargs).eval()
    with unfused_attention():
        return timm.create_model(name, pretrained=False, **kwargs).eval()


def layout_of(model: torch.nn.Module, size: int):
    from vitcli.explain.tokens import describe_tokens

    return describe_tokens(model, (3, size, size), "bench")


def run_mode(model: torch.nn.Module, x: torch.Tensor, mode: str, layout) -> None:
    from vitcli.explain.attention import AttentionCapture, attention_rollout

    with torch.inference_mode():
        if mode == "plain":
            model(x)
            return
        capture = AttentionCapture(model, layout.prefix_tokens, layout.query_tokens, keep_maps=mode == "keep",
                                   rollout=mode == "fused-in-hook")
        with capture:
            model(x)
        if mode == "keep":
            attention_rollout(capture.result.maps)


def time_views(repeats: int, image: Path) -> None:
    from vitcli.explain.patches import PatchesOptions, explain_image

    fused, unfused = build("vit_base_patch16_224", None, True), build("vit_base_patch16_224", None, False)
    layout = layout_of(unfused, 224)
    x = torch.randn(1, 3, 224, 224)
    cases = {"fused forward (predict)": (fused, "plain"), "capture, heads fused in hook": (unfused, "fused-in-hook"),
             "capture, keep (h,T,T) maps": (unfused, "keep")}
    for model, mode in cases.values():  # warm-up
        run_mode(model, x, mode, layout)
    times: dict[str, list[float]] = {k: [] for k in [*cases, "whole attention view (4 PNGs)"]}
    options = PatchesOptions(model="vit_base_patch16_224", pretrained=False, attention=True,
                             out_dir=Path(tempfile.mkdtemp(prefix="patches_bench_")))
    for _ in range(repeats):
        for label, (model, mode) in cases.items():
            start = time.perf_counter()
            run_mode(model, x, mode, layout)
            times[label].append(time.perf_counter() - start)
        start = time.perf_counter()
        explain_image(str(image), options)  # includes model building (random init) and drawing
        times["whole attention view (4 PNGs)"].append(time.perf_counter() - start)
    base = statistics.median(times["fused forward (predict)"])
    print(f"ViT-B/16, one 224x224 image, {torch.get_num_threads()} threads, {repeats} interleaved repeats")
    print(f"{'':32s} {'best s':>8s} {'median s':>9s} {'median / fused':>15s}")
    for label, values in times.items():
        med = statistics.median(values)
        print(f"{label:32s} {min(values):8.3f} {med:9.3f} {med / base:15.2f}")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def memory_child(mode: str) -> None:
    """Run in a fresh process: the resident-memory peak of one forward pass in ``mode`` (Linux).

    ru_maxrss would carry the parent's peak across fork, so the peak (VmHWM) is reset through
    /proc/self/clear_refs once the model is built and read back after the forward pass.
    """
    model = build("vit_small_patch14_reg4_dinov2", 518, mode == "plain-fused")
    layout = layout_of(model, 518)
    x = torch.randn(1, 3, 518, 518)
    run_mode(model, x, "plain" if mode.startswith("plain") else mode, layout)  # warm-up: allocator, kernels
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_mb("VmRSS")
    run_mode(model, x, "plain" if mode.startswith("plain") else mode, layout)
    print(json.dumps({"T": layout.sequence_length, "L": layout.depth, "h": layout.num_heads,
                      "before_mb": before, "peak_mb": _status_mb("VmHWM")}))


def measure_memory() -> None:
    results = {}
    for mode in ("plain-fused", "plain-unfused", "fused-in-hook", "keep"):
        out = subprocess.run([sys.executable, __file__, "--memory-child", mode], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    first = results["keep"]
    kept_mb = first["L"] * first["h"] * first["T"] ** 2 * 4 / 2**20
    print(f"\nDINOv2-S/14 + 4 registers at 518x518: T = {first['T']}, {first['L']} layers x {first['h']} heads; "
          f"all (h,T,T) maps in fp32 = {kept_mb:.0f} MB")
    print(f"{'mode':36s} {'peak RSS MB':>12s} {'growth in forward MB':>21s}")
    labels = {"plain-fused": "plain fused forward", "plain-unfused": "plain unfused forward",
              "fused-in-hook": "capture, heads fused in hook", "keep": "capture, keep (h,T,T) per layer"}
    for mode, r in results.items():
        print(f"{labels[mode]:36s} {r['peak_mb']:12.0f} {r['peak_mb'] - r['before_mb']:21.0f}")
    hook, keep = results["fused-in-hook"], results["keep"]
    print(f"peak ratio keep / fused-in-hook: {keep['peak_mb'] / hook['peak_mb']:.2f}; forward growth ratio: "
          f"{(keep['peak_mb'] - keep['before_mb']) / max(hook['peak_mb'] - hook['before_mb'], 1):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--skip-time", action="store_true")
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    if not args.skip_time:
        time_views(args.repeats, args.image)
    measure_memory()
    print("\nCPU: AVX2 only (no AVX-512/AMX); measured on a shared machine: compare ratios within one run.")


if __name__ == "__main__":
    main()
