"""Predict throughput: `vitcli predict`'s end-to-end img/s against the raw model-forward ceiling.

In one run, on one folder of real JPEGs, for fp32 and bf16:
  ceiling     forward + softmax on pre-decoded, pre-transformed tensors (no decoding at all)
  end-to-end  vitcli.predict.predict over the file paths (decode, transform, batch, forward, top-k)
and their ratio; plus bf16/fp32 speed and top-1 agreement, and what fast JPEG decoding changes.

    python benchmarks/predict_throughput.py [FOLDER] [--model deit_tiny_patch16_224] [--weights FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from vitcli.data import eval_transform, expand_inputs, load_image
from vitcli.models import autocast, cpu_supports_bf16, load_model
from vitcli.predict import PredictOptions, predict

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=str(SHARED / "hymenoptera" / "val"))
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--weights", default=str(SHARED / "weights" / "deit_tiny_patch16_224.safetensors"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    loaded = load_model(args.model, args.weights)
    sources, _ = expand_inputs([args.folder])
    n = len(sources)
    transform = eval_transform(loaded.data_config)
    # the ceiling's input: the same images, decoded and transformed once, up front
    batches = [torch.stack([transform(load_image(s)) for s in sources[i:i + args.batch_size]])
               for i in range(0, n, args.batch_size)]
    print(f"{n} images from {args.folder}; {args.model}, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}, bf16 CPU support: {cpu_supports_bf16()}")

    precisions = ["fp32", "bf16"]
    rate: dict[tuple[str, str], float] = {}
    top1: dict[tuple[str, bool], list[int]] = {}
    for precision in precisions:
        ctx = autocast(torch.device("cpu"), precision)

        def ceiling(ctx=ctx) -> None:
            with torch.inference_mode():
                for x in batches:
                    with ctx:
                        loaded.model(x).float().softmax(dim=1)

        rate[precision, "ceiling"] = n / timed(ceiling, args.repeats)
        for fast in (True, False):
            options = PredictOptions(batch_size=args.batch_size, device="cpu", precision=precision, fast_decode=fast)
            results: list = []
            mode = "end-to-end" if fast else "end-to-end --exact-decode"
            rate[precision, mode] = n / timed(lambda o=options: results.__setitem__(
                slice(None), list(predict(loaded, sources, o))), args.repeats)
            top1[precision, fast] = [r.top[0].index if r.ok else -1 for r in results]

    print(f"\n{'precision':10} {'mode':28} {'img/s':>8} {'ratio to ceiling':>17}")
    for (precision, mode), value in rate.items():
        print(f"{precision:10} {mode:28} {value:8.1f} {value / rate[precision, 'ceiling']:17.2f}")

    def agree(a, b) -> float:
        return sum(x == y for x, y in zip(a, b, strict=True)) / n

    print(f"\nbf16 / fp32 speed: ceiling {rate['bf16', 'ceiling'] / rate['fp32', 'ceiling']:.2f}x, "
          f"end-to-end {rate['bf16', 'end-to-end'] / rate['fp32', 'end-to-end']:.2f}x")
    print(f"top-1 agreement bf16 vs fp32 (default decode): {agree(top1['bf16', True], top1['fp32', True]):.3f}")
    print(f"top-1 agreement fast vs exact decode (fp32):   {agree(top1['fp32', True], top1['fp32', False]):.3f}")


if __name__ == "__main__":
    main()
