"""Which backend, precision and batch size runs a model fastest here, and how close to the hardware.

Every backend runs the same random batch; timings interleave the backends repeat by repeat (so a
noisy, shared machine slows them alike), after warm-up. Each backend's logits on the verification
images (generated ones unless ``verify_images`` are given) are checked against torch eager fp32
with export's tolerances, and only verified options can be named fastest. The matrix-multiply rate
is measured per dtype on square products; each row's achieved FLOP rate (GFLOPs/image from torch's
FLOP counter, fused attention off) is shown as a fraction of it.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitcli.benchmark_runners import BACKENDS, CUDA_BACKENDS, build_backends, torch_runner
from vitcli.cpuinfo import cpu_features
from vitcli.errors import UsageError

INT8_TARGET = 0.98  # OpenVINO int8's top-1 agreement with fp32 on the calibration images (issue 15's rule)


@dataclass
class Row:
    backend: str
    dtype: str  # the matmul dtype its rate is compared with
    batch_size: int
    images_per_s: float
    p50_ms: float
    p90_ms: float
    fraction_of_peak: float | None
    verified: bool
    top1_agreement: float
    max_abs_logit: float


@dataclass
class BenchmarkResult:
    model: str
    parameters: int
    gflops_per_image: float
    threads: int
    cpu: dict[str, bool]
    matmul_gflops: dict[str, float]  # measured rate per dtype
    rows: list[Row] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # backend -> why
    default_backend: str = ""  # the row `vitcli predict` runs with no options on this machine
    decode_images_per_s: float | None = None  # predict's decoding and preprocessing, all cores

    def bound(self, backend: str | None = None) -> tuple[float, Row] | None:
        """The decode-once bound of ``backend`` (default: predict's) at its fastest batch size, and that row."""
        from vitcli.inference.pipeline import decode_once_bound

        rows = [r for r in self.rows if r.backend == (backend or self.default_backend)]
        if not rows or not self.decode_images_per_s:
            return None
        row = max(rows, key=lambda r: r.images_per_s)
        return decode_once_bound(self.decode_images_per_s, row.images_per_s), row

    def fastest(self) -> Row | None:
        verified = [r for r in self.rows if r.verified]
        return max(verified, key=lambda r: r.images_per_s) if verified else None

    def speedup(self, backend: str, batch_size: int, baseline: str = "torch-fp32") -> float | None:
        rows = {(r.backend, r.batch_size): r for r in self.rows}
        a, b = rows.get((backend, batch_size)), rows.get((baseline, batch_size))
        return a.images_per_s / b.images_per_s if a and b else None


# ------------------------------------------------------------------------------- measurements


def count_gflops(model: torch.nn.Module, input_size: Sequence[int]) -> float:
    """GFLOPs for one image (a multiply-add counts 2) with torch's FLOP counter; the model must have
    fused attention off, or scaled_dot_product_attention counts zero."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.zeros(1, *input_size))
    return counter.get_total_flops() / 1e9


def matmul_rate(dtype: str, device: str = "cpu", n: int = 1024, seconds: float = 0.5) -> float:
    """Measured GFLOP/s of an n x n x n matrix product: torch for fp32/bf16/fp16, ONNX Runtime's
    MatMulInteger (what its dynamic int8 runs on) for int8."""
    if dtype == "int8":
        return _ort_int8_rate(n, seconds)
    t = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    a, b = torch.randn(n, n, device=device).to(t), torch.randn(n, n, device=device).to(t)
    return _rate(lambda: torch.mm(a, b), 2 * n**3, seconds, device)


def _ort_int8_rate(n: int, seconds: float) -> float:
    import onnx
    from onnx import TensorProto, helper

    from vitcli.inference.onnx_engine import import_onnxruntime, session_options

    ort = import_onnxruntime()
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "mm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])],
        [onnx.numpy_helper.from_array(np.random.default_rng(0).integers(-64, 64, (n, n), dtype=np.int8), "b")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(proto.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).integers(0, 128, (n, n), dtype=np.uint8)
    return _rate(lambda: session.run(None, {"a": a}), 2 * n**3, seconds, "cpu")


def _rate(fn: Callable[[], Any], flops: float, seconds: float, device: str) -> float:
    fn()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


# ------------------------------------------------------------------------------------ the run


def predict_default_backend() -> str:
    """The row `vitcli predict` runs with no options here: on a CPU, OpenVINO (``--backend auto``, when
    the model converts and verifies) at bf16 where that is fast, else fp32; torch at ``--precision auto``
    on GPUs and under ``VITCLI_BACKEND=torch``."""
    from vitcli.devices import resolve_device, resolve_precision
    from vitcli.inference.backend import default_backend, openvino_precisions

    device = resolve_device("auto")
    precision = resolve_precision("auto", device)
    if device.type == "cuda":
        return "cuda-bf16" if precision == "bf16" else "cuda-fp32"
    backend = default_backend(None)
    if device.type == "cpu" and backend in ("auto", "openvino"):
        return f"openvino-{openvino_precisions('auto')[0]}"
    return "onnxruntime-fp32" if backend == "onnxruntime" else f"torch-{precision}"


def decode_rate(loaded: Any, sources: Sequence[str], seconds: float = 1.0, torch_free: bool = False) -> float | None:
    """Images per second that predict's decoding and preprocessing reach on ``sources`` through per-core
    streams, repeated for about ``seconds``; None without sources. The torch engine's path (the fast
    path, one torch thread per stream), or with ``torch_free`` the OpenVINO and ONNX Runtime one
    (Pillow and NumPy: timm's exact steps, ``io.preprocess``)."""
    from vitcli.cpuinfo import usable_cpus
    from vitcli.inference.batching import SourceImages, collate_images
    from vitcli.inference.pipeline import chunked, pipelined
    from vitcli.io.images import load_image
    from vitcli.io.preprocess import draft_size_for, preprocess
    from vitcli.io.transforms import eval_pipeline

    if not sources:
        return None
    if torch_free:
        def decode(chunk: list[str]) -> Any:
            return np.stack([preprocess(load_image(s), loaded.data_config) for s in chunk])
    else:
        pipeline = eval_pipeline(loaded.data_config, fast=True)
        images = SourceImages(pipeline.per_image, draft_size_for(loaded.data_config), pipeline.load)

        def decode(chunk: list[str]) -> Any:
            return collate_images([images[s] for s in chunk])
    streams, threads = usable_cpus(), torch.get_num_threads()
    per_round = list(sources) * max(1, -(-8 * streams // len(sources)))  # a few images per stream
    torch.set_num_threads(1)
    try:
        done, start = 0, time.perf_counter()
        while done == 0 or time.perf_counter() - start < seconds:
            for _ in pipelined(chunked(per_round, 4), decode, lambda b: None, streams=streams):
                pass
            done += len(per_round)
        return done / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def run_benchmark(name: str, weights: str | Path | None = None, batch_sizes: Sequence[int] = (1, 8, 32),
                  repeats: int = 10, warmup: int = 2, backends: Sequence[str] | None = None,
                  verify_images: Sequence[str] = (), say: Callable[[str], None] | None = None,
                  calibration: Sequence[str] = (), int8_target: float | None = INT8_TARGET) -> BenchmarkResult:
    """Time ``name`` on every backend and batch size; see the module docstring.

    ``calibration``: the images OpenVINO int8 is calibrated on (as export's ``--calibration``; never
    the verification images), without which that row is skipped; ``int8_target``: its top-1
    agreement target for NNCF's accuracy control (None: plain post-training quantization).
    """
    from vitcli.export.formats import data_config_of
    from vitcli.export.job import export_metadata, load_exportable
    from vitcli.export.options import TOLERANCES, ExportOptions
    from vitcli.export.verify import batch_of, compare, run_batched, verification_images

    say = say or (lambda _: None)
    if not batch_sizes or min(batch_sizes) < 1:
        raise UsageError("--batch-sizes must be positive integers, e.g. 1,8,32")
    if repeats < 3:
        raise UsageError("--repeats must be at least 3 (p90 needs several timings)")
    if int8_target is not None and not 0 < int8_target <= 1:
        raise UsageError(f"--int8-target {int8_target} must be a fraction in (0, 1], e.g. 0.98")
    names = list(backends) if backends else [*BACKENDS, *CUDA_BACKENDS]
    if calibration and "openvino-int8" in names:
        from vitcli.export.job import calibration_sources

        calibration = calibration_sources(calibration, _photo_sources(verify_images))
    say(f"loading {name}")
    loaded = load_exportable(name, weights)
    model = loaded.model.float().eval()
    meta = export_metadata(loaded, name, weights, ExportOptions())
    result = BenchmarkResult(
        model=name, parameters=sum(p.numel() for p in model.parameters()),
        gflops_per_image=count_gflops(model, meta["input_size"]), threads=torch.get_num_threads(),
        cpu=cpu_features(), matmul_gflops={})
    say("measuring the matrix-multiply rate")
    result.matmul_gflops["fp32"] = matmul_rate("fp32")
    if cpu_features()["BF16"]:
        result.matmul_gflops["bf16"] = matmul_rate("bf16")
    if any(n.startswith("onnxruntime") or n.endswith("int8") for n in names):
        with contextlib.suppress(Exception):  # without the export extra the ONNX rows are skipped below
            result.matmul_gflops["int8"] = matmul_rate("int8")
    if torch.cuda.is_available():
        for dtype in ("fp32", "fp16", "bf16"):
            result.matmul_gflops[f"cuda-{dtype}"] = matmul_rate(dtype, "cuda", n=4096)

    with tempfile.TemporaryDirectory(prefix="vitcli-bench-") as tmp:
        from vitcli.errors import MissingExtraError

        try:
            runners, result.skipped = build_backends(loaded, names, Path(tmp), say, calibration, int8_target)
        except MissingExtraError as e:
            onnx_names = [n for n in names if n.startswith("onnxruntime")]
            runners, result.skipped = build_backends(loaded, [n for n in names if n not in onnx_names], Path(tmp),
                                                     say, calibration, int8_target)
            result.skipped.update(dict.fromkeys(onnx_names, str(e)))
        verify = batch_of(verification_images(verify_images)[0], data_config_of(meta))
        reference = run_batched(runners["torch-fp32"][1] if "torch-fp32" in runners
                                else torch_runner(model, "cpu", None), verify, 16)
        checks = {}
        result.default_backend = predict_default_backend()
        say("timing predict's decoding")
        result.decode_images_per_s = decode_rate(loaded, _photo_sources(verify_images),
                                                 torch_free=result.default_backend.startswith(("openvino", "onnx")))
        for backend, (dtype, run) in runners.items():
            tolerance = TOLERANCES["int8" if dtype == "int8" else "fp32" if dtype == "fp32" else "fp16"]
            checks[backend] = compare(reference, run_batched(run, verify, 16), tolerance)
        for bs in batch_sizes:
            say(f"timing batch size {bs}")
            batch = np.random.default_rng(bs).standard_normal((bs, *meta["input_size"])).astype(np.float32)
            times = _interleaved(runners, batch, repeats, warmup)
            for backend, (dtype, _) in runners.items():
                t = np.asarray(times[backend])
                ips = bs / float(np.median(t))
                peak = result.matmul_gflops.get(f"cuda-{dtype}" if backend.startswith(("cuda", "onnxruntime-cuda"))
                                                else dtype)
                c = checks[backend]
                result.rows.append(Row(backend, dtype, bs, ips, float(np.percentile(t, 50) * 1e3),
                                       float(np.percentile(t, 90) * 1e3),
                                       ips * result.gflops_per_image / peak if peak else None,
                                       not c["failed"], c["top1_agreement"], c["max_abs_logit"]))
    return result


def _photo_sources(inputs: Sequence[str]) -> list[str]:
    """Photos to time decoding on: --verify-images, else the photos shipped for verification."""
    from vitcli.export.verify import PHOTOS_DIR, image_sources

    return list(image_sources(inputs, "--verify-images")) if inputs else sorted(map(str, PHOTOS_DIR.glob("*.jpg")))


def _interleaved(runners: dict[str, tuple[str, Callable]], batch: np.ndarray, repeats: int,
                 warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each runner, the runners taking turns within every repeat."""
    for _, run in runners.values():
        for _ in range(warmup):
            run(batch)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, (_, run) in runners.items():
            t0 = time.perf_counter()
            run(batch)
            times[name].append(time.perf_counter() - t0)
    return times
