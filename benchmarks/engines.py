"""Engines side by side on DeiT-Tiny: model-only speed, agreement with torch fp32, and the decode-once bound.

    python benchmarks/engines.py [--repeats 5] [--batch 32] [--no-cli] [--calibration-images 100] [--no-int8]

In one process, with interleaved repeats (a loaded machine slows every engine alike):
1. model-only img/s at batch 32 for torch fp32, torch bf16 autocast, OpenVINO fp32, OpenVINO bf16,
   OpenVINO int8 (NNCF with accuracy control towards --int8-target agreement, through `vitcli export`'s code,
   calibrated on photos of hymenoptera/train; run with its float parts at fp32 as predict runs the
   file, and at bf16 where that is native) and ONNX Runtime fp32 (the file `vitcli export` writes),
   with ratios to torch fp32;
2. top-1 agreement and max |delta prob| with torch fp32 on the photos of ../shared/data (images/ and
   hymenoptera/) that int8 was not calibrated on, timm's exact eval transform, and the issue's
   verification rule (the same top-1 wherever fp32's top-1 probability is >= 0.5, >= 98% overall,
   max |delta prob| <= 0.05);
3. the decode-once bound (``vitcli.inference.pipeline.decode_once_bound``) for torch and for
   OpenVINO, each against what the pipeline reaches on hymenoptera/ (in process, start-up excluded);
4. unless --no-cli, `vitcli predict hymenoptera/` end to end (wall, start-up included) with the
   defaults against `--precision fp32` (and `--backend torch` where predict has --backend).
The CPU flags, usable CPUs and the load average are printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _machine import flags_line, load_line  # benchmarks/_machine.py, beside this script

from vitcli.cpuinfo import describe_cpu, fast_bf16, usable_cpus
from vitcli.inference.pipeline import chunked, decode_once_bound, pipelined

DATA = Path(os.environ.get("VITCLI_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def photos(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def torch_engine(model: torch.nn.Module, bf16: bool):
    def run(batch: np.ndarray) -> np.ndarray:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
        with torch.inference_mode(), ctx:
            return model(torch.from_numpy(batch)).float().numpy()
    return run


def openvino_model(model: torch.nn.Module, size: tuple[int, int]):
    import openvino as ov

    return ov.convert_model(model, example_input=torch.zeros(1, 3, *size), input=[(-1, 3, *size)])


def openvino_engine(ov_model, precision: str, streams: int | None = None):
    """A compiled model; LATENCY (one request on every core) unless ``streams`` asks for throughput."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": precision}
    if streams:
        config.update(NUM_STREAMS=str(streams), INFERENCE_NUM_THREADS=str(usable_cpus()))
    else:
        config["PERFORMANCE_HINT"] = "LATENCY"
    compiled = ov.Core().compile_model(ov_model, "CPU", config)
    if streams:
        return compiled
    request = compiled.create_infer_request()
    return lambda batch: np.asarray(request.infer([batch])[0], dtype=np.float32)


def onnx_engine(loaded, workdir: Path):
    from vitcli.export.formats import export_onnx
    from vitcli.export.job import export_metadata, load_exportable
    from vitcli.export.options import ExportOptions
    from vitcli.inference.onnx_engine import load_onnx

    exportable = load_exportable(loaded.name)
    path = workdir / "deit.onnx"
    _, h, w = exportable.data_config["input_size"]
    options = ExportOptions()
    export_onnx(exportable.model.eval(), torch.randn(2, 3, h, w), path, export_metadata(exportable, loaded.name,
                                                                                         None, options), options)
    return load_onnx(path, device="cpu", spin=False).logits


# ------------------------------------------------------------------------------- measurements


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def probabilities(run, inputs: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([softmax(run(inputs[i:i + batch])) for i in range(0, len(inputs), batch)])


def agreement(reference: np.ndarray, probs: np.ndarray) -> dict[str, float | bool]:
    ref_top, top = reference.argmax(1), probs.argmax(1)
    confident = reference.max(1) >= 0.5
    same = ref_top == top
    delta = float(np.abs(probs - reference).max())
    return {"top1": float(same.mean()), "confident": float(same[confident].mean()), "n_confident": int(confident.sum()),
            "max_delta": delta, "verified": bool(same[confident].all() and same.mean() >= 0.98 and delta <= 0.05)}


def interleaved(engines: dict, batch: np.ndarray, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median img/s of each engine on ``batch``, the engines taking turns within every repeat."""
    for run in engines.values():
        for _ in range(warmup):
            run(batch)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(repeats):
        for name, run in engines.items():
            t0 = time.perf_counter()
            run(batch)
            times[name].append(time.perf_counter() - t0)
    return {name: len(batch) / float(np.median(t)) for name, t in times.items()}


def bound_rounds(files: list[str], batch: int, decode, infer, end_to_end, rounds: int,
                 model=None, extra: dict | None = None) -> dict[str, float]:
    """Median img/s of decoding alone (the pipeline's per-core streams), the model alone (on one decoded
    batch: through the streams too, or ``model(batch)`` for an engine that spreads a batch over the
    cores itself) and end to end, taking turns within every round, and the decode-once bound."""
    streams = usable_cpus()
    chunks = list(chunked(files, batch))
    ready = decode(chunks[0])
    modes = {
        "decode": lambda: list(pipelined(chunks, decode, lambda b: None, streams=streams)),
        "model": (lambda: [model(ready) for _ in chunks]) if model is not None
        else lambda: list(pipelined(chunks, lambda c: ready, infer, streams=streams)),
        "e2e": end_to_end,
        **(extra or {}),
    }
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(rounds):
        for name, run in modes.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    result = {name: len(files) / float(np.median(t)) for name, t in times.items()}
    result["bound"] = decode_once_bound(result["decode"], result["model"])
    result["of_bound"] = result["e2e"] / result["bound"]
    return result


def torch_bound(loaded, files: list[str], batch: int, rounds: int) -> dict[str, float]:
    """torch as `vitcli.inference.predict` runs it: the fast decode path, one torch thread per stream."""
    from vitcli.devices import autocast, resolve_precision
    from vitcli.inference.batching import SourceImages, collate_images
    from vitcli.inference.predict import PredictOptions, predict
    from vitcli.io.preprocess import draft_size_for
    from vitcli.io.transforms import eval_pipeline

    pipeline = eval_pipeline(loaded.data_config, fast=True)
    images = SourceImages(pipeline.per_image, draft_size_for(loaded.data_config), pipeline.load)
    cpu = torch.device("cpu")
    precision = resolve_precision("auto", cpu)
    model = loaded.model.eval()

    def infer(batch_pixels):
        with torch.inference_mode(), autocast(cpu, precision):
            return model(pipeline.to_batch(batch_pixels[0])).float().argmax(1)

    threads = torch.get_num_threads()

    def end_to_end():  # predict sets its streams' share of the threads itself, from the full count
        torch.set_num_threads(threads)
        try:
            list(predict(loaded, files, PredictOptions(batch_size=batch)))
        finally:
            torch.set_num_threads(max(1, threads // usable_cpus()))

    torch.set_num_threads(max(1, threads // usable_cpus()))  # as predict's streams run
    try:
        return bound_rounds(files, batch, lambda c: collate_images([images[s] for s in c]), infer, end_to_end, rounds)
    finally:
        torch.set_num_threads(threads)


def openvino_bound(ov_model, config: dict, files: list[str], batch: int, precision: str,
                   rounds: int) -> dict[str, float]:
    """OpenVINO as `vitcli predict` runs it: compiled with ``compile_config`` (a stream per core), the
    NumPy decode (Pillow, timm's exact steps) in threads ahead of ``OpenVinoModel.start`` (the
    ``inference.pipeline.overlapped`` path); "turns" is the same engine with decoding and the
    model taking turns (what predict did before)."""
    from vitcli.inference.numpy_predict import predict_model, predict_numpy
    from vitcli.inference.openvino_engine import OpenVinoModel, compile_model
    from vitcli.io.images import load_image
    from vitcli.io.preprocess import preprocess

    meta = {**config, "labels": [str(i) for i in range(1000)]}
    model = OpenVinoModel(compile_model(ov_model, {"f32": "fp32", "bf16": "bf16"}[precision]), Path("m.xml"), meta,
                          precision)

    def decode(chunk: list[str]) -> np.ndarray:
        return np.stack([preprocess(load_image(s), config) for s in chunk])

    def turns():
        list(predict_numpy(model.logits, model.labels, model.data_config, files, batch_size=batch))

    return bound_rounds(files, batch, decode, None, lambda: list(predict_model(model, files, batch_size=batch)),
                        rounds, model=model.logits, extra={"turns": turns})


def cli_runs(folder: Path, repeats: int) -> dict[str, float]:
    """Wall seconds of `vitcli predict FOLDER` (start-up included), defaults against exact fp32 torch."""
    has_backend = "--backend" in subprocess.run([sys.executable, "-m", "vitcli", "predict", "--help"],
                                                capture_output=True, text=True).stdout
    variants = {"default": [], "fp32 torch": ["--precision", "fp32", *(["--backend", "torch"] if has_backend else [])]}
    walls: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            for name, extra in variants.items():
                out = Path(tmp) / f"{name.replace(' ', '-')}-{i}.jsonl"
                t0 = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", "vitcli", "predict", str(folder), "-o", str(out), *extra],
                                      capture_output=True, text=True)
                walls[name].append(time.perf_counter() - t0)
                if done.returncode != 0:
                    print(f"  {name}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
                elif i == 0:
                    said = [line for line in done.stderr.splitlines() if line.strip()]
                    print(f"  {name} ({' '.join(extra) or 'no options'}): stderr says: {said[-1] if said else '-'}")
    return {name: float(np.median(w)) for name, w in walls.items()}


# ------------------------------------------------------------------------------------ the run


def calibration_photos(count: int) -> list[Path]:
    """``count`` photos of hymenoptera/train spread over its classes (every k-th in name order)."""
    train = photos(DATA / "hymenoptera" / "train")
    step = max(1, len(train) // max(1, count))
    return train[::step][:count]


def openvino_int8_engines(loaded, calibration: list[Path], target: float, workdir: Path) -> dict:
    """OpenVINO int8 through export's code (``vitcli.benchmark_runners.openvino_int8_ir``: NNCF's
    accuracy control towards ``target`` top-1 agreement on the calibration photos), compiled with its float
    parts at fp32 (as `vitcli predict model.int8.xml` runs it) and at bf16 where that is native."""
    import openvino as ov

    from vitcli.benchmark_runners import openvino_int8_ir
    from vitcli.export.job import load_exportable

    t0 = time.perf_counter()
    path = openvino_int8_ir(load_exportable(loaded.name), [str(p) for p in calibration], target, workdir,
                            lambda msg: print(f"  {msg}"))
    print(f"  int8 IR built in {time.perf_counter() - t0:.0f} s on {len(calibration)} hymenoptera/train photos")
    int8 = ov.Core().read_model(str(path))
    engines = {"openvino int8 (float parts fp32)": openvino_engine(int8, "f32")}
    if fast_bf16("openvino"):
        engines["openvino int8 (float parts bf16)"] = openvino_engine(int8, "bf16")
    return engines


def model_table(loaded, ov_model, batch: int, repeats: int, calibration_images: int, int8_target: float) -> None:
    """Model-only img/s of every engine, interleaved, and its agreement with torch fp32 on the shared photos
    (those int8 was not calibrated on)."""
    import timm
    from PIL import Image

    model = loaded.model.eval()
    calibration = calibration_photos(calibration_images)
    held = set(calibration)
    paths = [p for p in photos(DATA / "images") + photos(DATA / "hymenoptera") if p not in held]
    transform = timm.data.create_transform(**loaded.data_config, is_training=False)
    inputs = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]).numpy()
    print(f"{len(paths)} photos from {DATA} (images/, hymenoptera/), timm's exact eval transform"
          + (f"; the {len(calibration)} int8 calibration photos of hymenoptera/train left out" if calibration else ""))

    engines = {"torch fp32": torch_engine(model, False), "torch bf16 autocast": torch_engine(model, True),
               "openvino fp32": openvino_engine(ov_model, "f32"), "openvino bf16": openvino_engine(ov_model, "bf16")}
    with tempfile.TemporaryDirectory() as tmp:
        if calibration:
            engines.update(openvino_int8_engines(loaded, calibration, int8_target, Path(tmp)))
        engines["onnxruntime fp32"] = onnx_engine(loaded, Path(tmp))
        reference = probabilities(engines["torch fp32"], inputs, batch)
        checks = {name: agreement(reference, probabilities(run, inputs, batch)) for name, run in engines.items()}
        speed = interleaved(engines, inputs[:batch], repeats)
    base = speed["torch fp32"]
    print(f"\nmodel only, DeiT-Tiny batch {batch}, {repeats} interleaved repeats (median):")
    print("| engine | img/s | vs torch fp32 | top-1 agreement | on confident | max abs delta prob | verified |")
    print("|---|---|---|---|---|---|---|")
    for name, ips in speed.items():
        c = checks[name]
        print(f"| {name} | {ips:.1f} | {ips / base:.2f}x | {c['top1']:.1%} | {c['confident']:.0%} of "
              f"{c['n_confident']} | {c['max_delta']:.4f} | {'yes' if c['verified'] else 'no'} |")
    for name in (n for n in speed if n.startswith("openvino int8")):
        print(f"{name}: {speed[name] / speed['openvino bf16']:.2f}x OpenVINO bf16, "
              f"{speed[name] / speed['openvino fp32']:.2f}x OpenVINO fp32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cli-repeats", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the bound measurement")
    parser.add_argument("--bound-images", type=int, default=128, help="hymenoptera photos the bound is measured on")
    parser.add_argument("--no-models", action="store_true", help="skip the model-only table and agreement")
    parser.add_argument("--no-cli", action="store_true", help="skip the `vitcli predict` subprocess runs")
    parser.add_argument("--no-bound", action="store_true", help="skip the decode-once bound")
    parser.add_argument("--calibration-images", type=int, default=100,
                        help="hymenoptera/train photos OpenVINO int8 is calibrated on (0: no int8 rows)")
    parser.add_argument("--int8-target", type=float, default=0.98,
                        help="int8 accuracy-control target: top-1 agreement with fp32 on the calibration photos")
    args = parser.parse_args()

    import openvino

    from vitcli.models.resolve import load_model

    print(f"CPU: {describe_cpu()}; flags: {flags_line()}; torch {torch.__version__}, openvino {openvino.__version__}")
    print(f"start: {load_line()} (other jobs share this machine: compare ratios, not img/s)")
    print(f"auto precision: torch {'bf16' if fast_bf16('torch') else 'fp32'}, "
          f"openvino {'bf16' if fast_bf16('openvino') else 'fp32'}")
    loaded = load_model()
    model = loaded.model.eval()
    size = tuple(loaded.data_config["input_size"][1:])
    ov_model = openvino_model(model, size)
    if not args.no_models:
        model_table(loaded, ov_model, args.batch, args.repeats, args.calibration_images, args.int8_target)

    hymenoptera = [str(p) for p in photos(DATA / "hymenoptera")]
    if args.no_bound:
        if not args.no_cli:
            print("(--no-bound: the `vitcli predict` runs are skipped too)")
        print(f"\nend: {load_line()}")
        return
    files = hymenoptera[:args.bound_images]
    print(f"\ndecode-once bound, {len(files)} photos of hymenoptera/, in process (start-up excluded), decode, model "
          f"and end to end through the same {usable_cpus()} streams, {args.rounds} interleaved rounds (median):")
    rows = {"torch (vitcli.inference.predict, fast decode)": torch_bound(loaded, files, args.batch, args.rounds)}
    for precision, key in (("f32", "openvino fp32"), ("bf16", "openvino bf16")):
        if precision == "bf16" and not fast_bf16("openvino"):
            continue
        rows[f"{key} (predict's overlap, Pillow decode)"] = openvino_bound(ov_model, loaded.data_config, files,
                                                                          args.batch, precision, args.rounds)
    print("| path | decode img/s | model img/s | bound img/s | reached img/s | of bound | taking turns |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        turns = f"{r['turns']:.1f} ({r['turns'] / r['bound']:.2f})" if "turns" in r else "-"
        print(f"| {name} | {r['decode']:.1f} | {r['model']:.1f} | {r['bound']:.1f} | {r['e2e']:.1f} | "
              f"{r['of_bound']:.2f} | {turns} |")
    torch_row = rows["torch (vitcli.inference.predict, fast decode)"]
    best = max(rows.values(), key=lambda r: r["bound"])
    print(f"the highest bound here is {best['bound'] / torch_row['bound']:.2f}x torch's bound and "
          f"{best['bound'] / torch_row['e2e']:.2f}x what torch predict reaches: no engine takes predict further on "
          "this CPU while decoding shares its cores")

    if not args.no_cli:
        print(f"\n`vitcli predict {DATA / 'hymenoptera'}` end to end (wall, start-up included):")
        walls = cli_runs(DATA / "hymenoptera", args.cli_repeats)
        n = len(hymenoptera)
        for name, wall in walls.items():
            print(f"  {name}: {wall:.1f} s, {n / wall:.1f} img/s ({walls['fp32 torch'] / wall:.2f}x fp32 torch)")
    print(f"\nend: {load_line()}")


if __name__ == "__main__":
    main()
