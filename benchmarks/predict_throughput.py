"""Predict throughput: `vitcli predict`'s end-to-end img/s against the raw model-forward ceiling.

In one run, on one folder of real JPEGs, for fp32 and bf16 (bf16 where the CPU has native bf16):
  ceiling      forward + softmax on pre-decoded, pre-transformed tensors (no decoding at all)
  end-to-end   vitcli.predict.predict over the file paths (decode, transform, batch, forward,
               top-k): the code path of `vitcli predict`, default options (fast decode; on the CPU,
               per-core streams that each decode a batch and run the model on it)
  --exact      the same with fast_decode=False (timm's own Pillow transform, full JPEG decode)
  overlapped   the same work fed by DataLoader worker processes that decode beside the forward pass
               (how vitcli feeds a GPU, and how it fed the CPU before: kept for comparison)
  decode only  the decoding threads alone, no forward pass. On a CPU the decoding and the forward
               pass share the cores, so a pipeline that takes turns (decode a batch on all cores,
               then run the model on all cores; `vitcli evaluate` does this) cannot beat
               decode / (decode + ceiling) of the ceiling: printed as "turn-taking bound". Streams
               can, only because one-thread forward passes waste less than one two-thread pass.
  streams fwd  the model alone on pre-decoded tensors, fed by predict's CPU streams; with the decoding
               alone it gives the decode-once bound 1 / (1/decode + 1/max(ceiling, streams fwd))
  phases       the turn-taking loop timed phase by phase: seconds decoding, seconds in the forward pass
  CLI          `vitcli predict FOLDER --json` as a subprocess, timed from outside; it includes
               interpreter start-up, imports and model loading, so it is reported separately
and their ratios; bf16/fp32 speed; top-1 agreement and max prob difference of bf16 vs fp32 and of
the fast decode vs the exact one (on every image of the folder, all 1000 probabilities).

Repeats are interleaved (ceiling, end-to-end, ... then again) so that load from other processes
hits every mode alike; the table shows the best and the median of the repeats and their spread.

    python benchmarks/predict_throughput.py [FOLDER] [--repeats 4] [--no-cli]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from vitcli.devices import autocast, cpu_supports_bf16
from vitcli.inference.batching import ImageSourceDataset, collate_images, default_workers, scored_batches
from vitcli.inference.predict import PredictOptions, predict
from vitcli.io.images import load_image
from vitcli.io.inputs import expand_inputs
from vitcli.io.preprocess import draft_size_for
from vitcli.io.transforms import eval_pipeline, eval_transform
from vitcli.models.resolve import load_model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, one warm-up call each, then ``repeats`` rounds."""
    for fn in fns.values():
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def all_probs(loaded, sources: list[str], **options) -> torch.Tensor:
    """(N, num_classes) probabilities from vitcli.inference.predict (top_k = every class)."""
    k = loaded.num_classes
    probs = torch.zeros(len(sources), k)
    for i, r in enumerate(predict(loaded, sources, PredictOptions(top_k=k, device="cpu", **options))):
        if r.ok:
            probs[i, [label.index for label in r.top]] = torch.tensor([label.prob for label in r.top])
    return probs


def decoded_in_turns(dataset, batch_size: int):
    """Batches decoded by one thread per torch thread, all on one batch at a time (then the model runs)."""
    with ThreadPoolExecutor(torch.get_num_threads()) as pool:
        for first in range(0, len(dataset), batch_size):
            items = range(first, min(first + batch_size, len(dataset)))
            yield collate_images(list(pool.map(dataset.__getitem__, items)))


def time_phases(loaded, dataset, pipeline, batch_size: int, precision: str) -> tuple[float, float]:
    """Seconds spent waiting for decoded batches and seconds in the forward pass, taking turns on the CPU."""
    ctx = autocast(torch.device("cpu"), precision)
    decode_s = forward_s = 0.0
    with torch.inference_mode():
        batches = iter(decoded_in_turns(dataset, batch_size))
        while True:
            start = time.perf_counter()
            try:
                images, _ = next(batches)
            except StopIteration:
                return decode_s, forward_s
            decoded = time.perf_counter()
            with ctx:
                loaded.model(pipeline.to_batch(images)).float().softmax(dim=1).topk(5)
            decode_s += decoded - start
            forward_s += time.perf_counter() - decoded


def compare(a: torch.Tensor, b: torch.Tensor) -> str:
    agree = (a.argmax(1) == b.argmax(1)).float().mean().item()
    return f"top-1 agreement {agree * 100:5.1f}%   max |prob diff| {(a - b).abs().max().item():.4f}"


def run_cli(folder: str, args, precision: str) -> tuple[float, list[int]]:
    """Wall seconds of `vitcli predict FOLDER --json` and the top-1 index per image."""
    command = [sys.executable, "-m", "vitcli", "predict", folder, "--model", args.model, "--weights",
               args.weights, "--json", "--top-k", "1", "--batch-size", str(args.batch_size),
               "--precision", precision, "--device", "cpu"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"vitcli predict failed ({done.returncode}): {done.stderr[-2000:]}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    top1 = {row["source"]: row["predictions"][0]["index"] for row in rows if not row["error"]}
    return seconds, [top1.get(s, -1) for s in expand_inputs([folder])[0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=str(SHARED / "hymenoptera" / "val"))
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--weights", default=str(SHARED / "weights" / "deit_tiny_patch16_224.safetensors"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--no-cli", action="store_true", help="skip the `vitcli predict` subprocess timing")
    parser.add_argument("--agreement-folder", default=str(SHARED / "hymenoptera"),
                        help="a larger set for the bf16 vs fp32 agreement as well ('' to skip)")
    args = parser.parse_args()
    wall_start = time.perf_counter()

    loaded = load_model(args.model, args.weights)
    sources, _ = expand_inputs([args.folder])
    n = len(sources)
    if n == 0:
        raise SystemExit(f"no images in {args.folder}")
    transform = eval_transform(loaded.data_config)
    # the ceiling's input: the same images, decoded and transformed once, up front
    images = [transform(load_image(s)) for s in sources]
    batches = [torch.stack(images[i:i + args.batch_size]) for i in range(0, n, args.batch_size)]
    precisions = ["fp32", "bf16"] if cpu_supports_bf16() else ["fp32"]
    workers = min(default_workers(), n)
    pipeline = eval_pipeline(loaded.data_config, fast=True)
    dataset = ImageSourceDataset(sources, pipeline.per_image, draft_size_for(loaded.data_config), pipeline.load)
    print(f"{n} images from {args.folder}")
    print(f"{args.model}, batch {args.batch_size}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()} (= vitcli's CPU streams), DataLoader workers for "
          f"'overlapped' {workers}, native bf16: {cpu_supports_bf16()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print(f"{args.repeats} interleaved repeats after a warm-up; best and median of the repeats\n")

    rows: list[tuple[str, str, list[float]]] = []
    for precision in precisions:
        ctx = autocast(torch.device("cpu"), precision)

        def ceiling(ctx=ctx) -> None:
            with torch.inference_mode():
                for x in batches:
                    with ctx:
                        loaded.model(x).float().softmax(dim=1)

        def end_to_end(fast: bool, precision=precision) -> None:
            options = PredictOptions(batch_size=args.batch_size, device="cpu", precision=precision, fast_decode=fast)
            for _ in predict(loaded, sources, options):
                pass

        def overlapped(ctx=ctx) -> None:
            loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=workers,
                                                 collate_fn=collate_images, prefetch_factor=4)
            with torch.inference_mode():
                for images, _ in loader:
                    with ctx:
                        loaded.model(pipeline.to_batch(images)).float().softmax(dim=1).topk(5)

        def streams_forward(precision=precision) -> None:  # the model alone, fed as predict's CPU streams feed it
            def score(x: torch.Tensor) -> None:
                with torch.inference_mode(), autocast(torch.device("cpu"), precision):
                    loaded.model(x).float().softmax(dim=1).topk(5)

            for _ in scored_batches(images, args.batch_size, torch.stack, score, torch.device("cpu")):
                pass

        seconds = interleaved({"ceiling": ceiling, "forward only, CPU streams": streams_forward,
                               "end-to-end": lambda: end_to_end(True),
                               "end-to-end --exact-decode": lambda: end_to_end(False),
                               "overlapped (DataLoader)": overlapped}, args.repeats)
        rows += [(precision, mode, [n / s for s in values]) for mode, values in seconds.items()]

    def decode_only() -> None:
        for _ in decoded_in_turns(dataset, args.batch_size):
            pass

    decode = [n / s for s in interleaved({"decode": decode_only}, args.repeats)["decode"]]
    best = {(p, m): max(v) for p, m, v in rows}
    median = {(p, m): statistics.median(v) for p, m, v in rows}
    print(f"{'precision':9} {'mode':27} {'best img/s':>10} {'ratio':>6} {'median img/s':>12} {'ratio':>6}  repeats")
    for precision, mode, values in rows:
        print(f"{precision:9} {mode:27} {best[precision, mode]:10.1f} "
              f"{best[precision, mode] / best[precision, 'ceiling']:6.2f} {median[precision, mode]:12.1f} "
              f"{median[precision, mode] / median[precision, 'ceiling']:6.2f}  "
              f"{' '.join(f'{v:.0f}' for v in values)}")
    print("(ratio: to the same precision's ceiling; spread of the repeats = noise from other processes)")
    print(f"\ndecode only (vitcli's decoding threads, no model): best {max(decode):.1f} img/s, "
          f"median {statistics.median(decode):.1f} img/s")
    for precision in precisions:
        ceiling, streams = best[precision, "ceiling"], best[precision, "forward only, CPU streams"]
        print(f"  {precision}: turn-taking bound decode / (decode + ceiling) = "
              f"{max(decode) / (max(decode) + ceiling):.2f} of the ceiling; decode-once bound with the faster "
              f"forward, 1 / (1/decode + 1/max(ceiling, streams)) / ceiling = "
              f"{1 / (1 / max(decode) + 1 / max(ceiling, streams)) / ceiling:.2f}")
    print("\nwhere a turn-taking run spends its time (timed phase by phase; median of the repeats):")
    for precision in precisions:
        phases = [time_phases(loaded, dataset, pipeline, args.batch_size, precision) for _ in range(args.repeats)]
        decode_s, forward_s = (statistics.median(p[i] for p in phases) for i in (0, 1))
        print(f"  {precision}: decoding {decode_s:.2f} s + forward {forward_s:.2f} s for {n} images; decoding is "
              f"{decode_s / (decode_s + forward_s) * 100:.0f}% of the time")
    if "bf16" in precisions:
        print(f"\nbf16 / fp32 speed (best): ceiling {best['bf16', 'ceiling'] / best['fp32', 'ceiling']:.2f}x, "
              f"end-to-end {best['bf16', 'end-to-end'] / best['fp32', 'end-to-end']:.2f}x")

    print(f"\nagreement on all {n} images (all {loaded.num_classes} probabilities):")
    exact32 = all_probs(loaded, sources, precision="fp32", fast_decode=False)
    fast32 = all_probs(loaded, sources, precision="fp32")
    print(f"  fast decode vs exact decode, fp32:   {compare(fast32, exact32)}")
    if "bf16" in precisions:
        fast16 = all_probs(loaded, sources, precision="bf16")
        print(f"  bf16 vs fp32, default (fast) decode: {compare(fast16, fast32)}")
        print(f"  bf16 fast vs fp32 exact decode:      {compare(fast16, exact32)}")
        flips = (fast16.argmax(1) != fast32.argmax(1)).nonzero().flatten().tolist()
        for i in flips:  # how close the fp32 answer was: the gap between its top two probabilities
            top2 = fast32[i].topk(2).values
            print(f"    flipped: {Path(sources[i]).name}: fp32 top-2 margin {(top2[0] - top2[1]).item():.4f}")
        if args.agreement_folder and Path(args.agreement_folder).is_dir():
            wider, _ = expand_inputs([args.agreement_folder])
            a32, a16 = (all_probs(loaded, wider, precision=p) for p in ("fp32", "bf16"))
            print(f"  bf16 vs fp32 on all {len(wider)} images of {args.agreement_folder}: {compare(a16, a32)}")

    if not args.no_cli:
        print("\n`vitcli predict FOLDER --json` as a subprocess (start-up, imports, model load included):")
        for precision in precisions:
            seconds, top1 = run_cli(args.folder, args, precision)
            reference = (fast32 if precision == "fp32" else fast16).argmax(1).tolist()
            same = sum(a == b for a, b in zip(top1, reference, strict=True)) / n
            print(f"  {precision}: {seconds:.2f} s wall for {n} images = {n / seconds:.1f} img/s overall "
                  f"(in-process end-to-end: {n / best[precision, 'end-to-end']:.2f} s); "
                  f"top-1 same as in-process: {same * 100:.0f}%")
    print(f"\nbenchmark wall time {time.perf_counter() - wall_start:.0f} s")


if __name__ == "__main__":
    main()
