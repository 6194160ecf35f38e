"""vitcli against the transformers image-classification pipeline, end to end on hymenoptera/, offline.

    pip install -e '.[bench]'     # transformers
    python benchmarks/vs_transformers.py [--repeats 3] [--cli-repeats 3] [--no-cli] [--folder PATH]

The same model on both sides: the DeiT-Tiny that vitcli ships (timm ``deit_tiny_patch16_224``), laid
out as the Hub's facebook/deit-tiny-patch16-224 (a native ``ViTForImageClassification`` with that
model's DeiTImageProcessor; ``benchmarks/transformers_deit.py``), loaded by transformers and checked to
give timm's logits (max |diff| < 1e-3) on real photos; the run stops otherwise. No Hub access.

In one process, taking turns within every repeat (the median is printed), on every JPEG/PNG under the
folder, each model loaded and warmed before timing:
1. the transformers pipeline as a user builds it, ``pipeline("image-classification", model=...,
   image_processor=...)`` on the CPU with its defaults (no batch_size): "the default fp32";
2. the same pipeline called with batch_size=32;
3. vitcli with ``vitcli predict``'s defaults (``vitcli.inference.run.predictor_for``, backend auto:
   OpenVINO bf16 from the compiled-model cache where the CPU has native bf16, else what auto picks);
4. vitcli ``--precision fp32 --backend torch``.
Then, unless --no-cli, the wall time of two processes that both pay their start-up (caches warm):
``vitcli predict FOLDER --json`` with no options, and ``python benchmarks/transformers_deit.py DIR FOLDER``
(import transformers, build the pipeline from a saved folder, classify the folder, print JSON lines).
Printed: img/s, ratios to the transformers default, top-1 agreement between the sides (the two
preprocessings differ: transformers squashes every photo to 256x256, timm keeps the aspect ratio), the
CPU flags, usable CPUs and the load average at start and end.
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
from collections.abc import Callable
from pathlib import Path

from _machine import flags_line, load_line  # benchmarks/_machine.py, beside this script

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# ../shared/data beside the checkout (a worktree one level deeper finds it too), or $VITCLI_SHARED_DATA
SHARED = [up / "shared" / "data" for up in ROOT.parents[:2]]
DATA = Path(os.environ.get("VITCLI_SHARED_DATA") or next((d for d in SHARED if d.is_dir()), SHARED[0]))
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}

HF_DEFAULT = "transformers pipeline, default (fp32, batch_size unset)"
VITCLI_DEFAULT = "vitcli, predict defaults"
VITCLI_FP32 = "vitcli --precision fp32 --backend torch"
VITCLI_CLI = "vitcli predict (no options)"
HF_CLI = "transformers pipeline process (default)"

Top1 = tuple[str, float]  # label, probability
Run = Callable[[list[str]], list[Top1]]  # image paths -> the top-1 of each, in order


def wait_for_load(limit: float, patience_s: float = 600) -> None:
    """Sleep until the 1-minute load average is below ``limit`` (a shared machine), at most ``patience_s``."""
    deadline = time.monotonic() + patience_s
    while os.getloadavg()[0] >= limit and time.monotonic() < deadline:
        time.sleep(10)
    if os.getloadavg()[0] >= limit:
        print(f"the load average stayed at or above {limit} for {patience_s:.0f} s: measuring anyway")


def readable_photos(folder: Path) -> tuple[list[str], list[str]]:
    """(JPEG/PNG files Pillow decodes, everything else under ``folder`` with why it is left out)."""
    from PIL import Image

    kept, skipped = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix.lower() not in PHOTO_SUFFIXES:
            skipped.append(f"{path.relative_to(folder)} (not a JPEG/PNG; both CLIs below still read it)")
            continue
        try:
            with Image.open(path) as im:
                im.convert("RGB")
        except Exception as e:  # what the pipeline's loader cannot read either: skipped for both sides
            skipped.append(f"{path.relative_to(folder)} ({type(e).__name__}: {e})")
            continue
        kept.append(str(path))
    return kept, skipped


# ------------------------------------------------------------------------------------ the sides


def transformers_run(classify, **call) -> Run:
    def run(files: list[str]) -> list[Top1]:
        return [(top[0]["label"], top[0]["score"]) for top in classify(files, **call)]
    return run


def vitcli_run(options, backend: str | None, said: list[str]) -> Run:
    """``vitcli predict``'s predictor for the default model, built (and its engine loaded) now."""
    from vitcli.embedded import DEFAULT_MODEL
    from vitcli.inference.run import predictor_for

    predictor = predictor_for(DEFAULT_MODEL, None, options, backend=backend, say=said.append)()

    def run(files: list[str]) -> list[Top1]:
        out = []
        for record in predictor(iter(files)):
            if not record.ok:
                raise SystemExit(f"vitcli could not read {record.source}: {record.error}")
            out.append((record.top[0].label, record.top[0].prob))
        return out
    return run


def interleaved(sides: dict[str, Run], files: list[str], repeats: int) -> tuple[dict[str, float], dict]:
    """Median img/s of each side on ``files``, the sides taking turns within every repeat; top-1 labels."""
    import torch

    threads = torch.get_num_threads()
    for run in sides.values():  # warm-up: first-call costs, OpenVINO's first inference, file cache
        run(files[:32])
    times: dict[str, list[float]] = {name: [] for name in sides}
    labels: dict[str, list[Top1]] = {}
    for _ in range(repeats):
        for name, run in sides.items():
            torch.set_num_threads(threads)  # every side starts from the same thread count
            t0 = time.perf_counter()
            labels[name] = run(files)
            times[name].append(time.perf_counter() - t0)
    rates = {name: len(files) / statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"  {name}: {', '.join(f'{len(files) / s:.1f}' for s in t)} img/s per repeat")
    return rates, labels


def top1(record: dict) -> Top1:
    """The top-1 of a JSON line from either CLI: vitcli's {"label", "prob"} or transformers' {"label", "score"}."""
    if not record["predictions"]:
        return "(error)", 0.0
    first = record["predictions"][0]
    return first["label"], first.get("prob", first.get("score"))


def agreement(a: list[Top1], reference: list[Top1]) -> str:
    """Top-1 agreement overall and on the photos where ``reference``'s top-1 probability is >= 0.5."""
    same = [x[0] == y[0] for x, y in zip(a, reference, strict=True)]
    confident = [s for s, y in zip(same, reference, strict=True) if y[1] >= 0.5]
    return f"{sum(same) / len(same):.1%} ({sum(same)}/{len(same)}); confident: {sum(confident)}/{len(confident)}"


# ------------------------------------------------------------------------------------ the CLIs


def cli_walls(folder: Path, model_dir: Path, repeats: int) -> tuple[dict[str, float], dict[str, dict[str, Top1]]]:
    """Median wall seconds of each CLI on ``folder`` (start-up included) and their top-1 label per source."""
    env = {k: v for k, v in os.environ.items() if k != "VITCLI_BACKEND"}
    commands = {
        VITCLI_CLI: [sys.executable, "-m", "vitcli", "predict", "--json"],
        HF_CLI: [sys.executable, str(HERE / "transformers_deit.py"), str(model_dir)],
    }
    with tempfile.TemporaryDirectory() as one:  # warm-up: imports into the page cache, the OpenVINO entry
        os.symlink(ROOT / "examples" / "corgi.jpg", Path(one) / "corgi.jpg")
        for cmd in commands.values():
            subprocess.run([*cmd, one], capture_output=True, env=env, check=True)
    walls: dict[str, list[float]] = {name: [] for name in commands}
    labels: dict[str, dict[str, Top1]] = {}
    for _ in range(repeats):
        for name, cmd in commands.items():
            t0 = time.perf_counter()
            done = subprocess.run([*cmd, str(folder)], capture_output=True, text=True, env=env)
            walls[name].append(time.perf_counter() - t0)
            records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
            if done.returncode not in (0, 1) or not records:
                raise SystemExit(f"{name} failed (exit {done.returncode}): {done.stderr.strip()[-400:]}")
            labels[name] = {os.path.normpath(r["source"]): top1(r) for r in records}
    for name, w in walls.items():
        print(f"  {name}: {', '.join(f'{s:.1f}' for s in w)} s per repeat")
    if len({frozenset(v) for v in labels.values()}) != 1:
        raise SystemExit(f"the CLIs classified different files: { {k: len(v) for k, v in labels.items()} } images")
    return {name: statistics.median(w) for name, w in walls.items()}, labels


# ------------------------------------------------------------------------------------ the run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=DATA / "hymenoptera", help="photos to classify")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the in-process runs")
    parser.add_argument("--cli-repeats", type=int, default=3, help="interleaved repeats of the two processes")
    parser.add_argument("--no-cli", action="store_true", help="skip the two CLI processes")
    parser.add_argument("--max-load", type=float, default=None,
                        help="first wait (up to 10 min) until the 1-minute load average is below this")
    args = parser.parse_args()
    if args.max_load is not None:
        wait_for_load(args.max_load)

    if os.environ.pop("VITCLI_BACKEND", None):
        print("VITCLI_BACKEND was set: removed, so vitcli runs with its defaults")
    sys.path.insert(0, str(HERE))
    import openvino
    import torch
    import transformers
    import transformers_deit
    from transformers import pipeline

    from vitcli.cpuinfo import describe_cpu
    from vitcli.inference.predict import PredictOptions
    from vitcli.models.resolve import load_model

    print(f"CPU: {describe_cpu()}; flags: {flags_line()}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
          f"openvino {openvino.__version__}")
    print(f"start: {load_line()} (other sessions share this machine: compare ratios within the run)")
    files, skipped = readable_photos(args.folder)
    if not files:
        raise SystemExit(f"no JPEG/PNG photos under {args.folder}: pass --folder or set VITCLI_SHARED_DATA")
    print(f"{len(files)} JPEG/PNG photos under {args.folder}; left out of the in-process runs: "
          f"{'; '.join(skipped) or 'none'}")

    loaded = load_model()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = transformers_deit.write_hub_folder(loaded.model, loaded.labels, Path(tmp) / "deit-tiny")
        model, processor = transformers_deit.load_hub_folder(model_dir)
        diffs = [transformers_deit.check_logits(loaded.model, model, processor, photo)
                 for photo in (ROOT / "examples" / "corgi.jpg", Path(files[0]))]
        print(f"converted model = timm's: max |logit diff| {max(diffs):.2g} on 2 photos (limit 1e-3); "
              f"processor {type(processor).__name__} (resize to {processor.size.height}x{processor.size.width}, "
              f"crop {processor.crop_size.height}x{processor.crop_size.width})")

        classify = pipeline("image-classification", model=model, image_processor=processor, device="cpu")
        said: list[str] = []
        sides = {
            HF_DEFAULT: transformers_run(classify),
            "transformers pipeline, batch_size=32 (fp32)": transformers_run(classify, batch_size=32),
            VITCLI_DEFAULT: vitcli_run(PredictOptions(), None, said),
            VITCLI_FP32: vitcli_run(PredictOptions(precision="fp32"), "torch", said),
        }
        print(f"vitcli's defaults ran: {said[0] if said else '(no engine line)'}")
        print(f"\nin process, {len(files)} photos, {args.repeats} interleaved repeats (model loaded and warm):")
        rates, labels = interleaved(sides, files, args.repeats)
        base = rates[HF_DEFAULT]
        print("\n| run (in process) | img/s | vs transformers default | top-1 = transformers default (all; "
              "confident: where its top-1 prob >= 0.5) |")
        print("|---|---|---|---|")
        for name, rate in rates.items():
            print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {agreement(labels[name], labels[HF_DEFAULT])} |")
        same = agreement(labels[VITCLI_DEFAULT], labels[VITCLI_FP32])
        print(f"top-1 of vitcli's defaults = vitcli fp32 torch: {same}; "
              "transformers squashes each photo to 256x256 before its crop, timm keeps the aspect ratio, so "
              "near-ties can flip between the sides (the logits check above is the same-model proof)")

        if not args.no_cli:
            print(f"\nas processes (start-up included, caches warm), `... {args.folder}`, {args.cli_repeats} "
                  "interleaved repeats:")
            walls, cli_labels = cli_walls(args.folder, model_dir, args.cli_repeats)
            n = len(cli_labels[HF_CLI])
            print("\n| process | wall s | img/s | vs transformers process | vs transformers default in process |")
            print("|---|---|---|---|---|")
            for name, wall in walls.items():
                print(f"| {name} | {wall:.1f} | {n / wall:.1f} | {walls[HF_CLI] / wall:.2f}x | "
                      f"{n / wall / base:.2f}x |")
            sources = sorted(cli_labels[HF_CLI])
            same = agreement([cli_labels[VITCLI_CLI][s] for s in sources], [cli_labels[HF_CLI][s] for s in sources])
            print(f"{n} images each (every image file in the folder); top-1 agreement between the two processes: "
                  f"{same}")
    print(f"\nend: {load_line()}")


if __name__ == "__main__":
    main()
