"""Which engine runs a model for predict and evaluate: ``--backend auto|torch|openvino|onnxruntime``.

``auto`` on a CPU runs the model through OpenVINO when it converts and agrees with torch fp32 on the
verification photos (``export.verify.agreement``: the same top-1 wherever fp32 is confident, >= 98%
the same overall, probabilities within 0.05), else torch. On GPUs ``auto`` is torch. The converted
model is built once and kept in the compiled-model cache (``inference.cache``), refusals included,
so later runs skip torch entirely. ``choose_engine`` returns the choice and one line saying what
runs and why; the CLI prints it. Torch-free at import, and on a cache hit.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcli.errors import UsageError, first_line
from vitcli.inference import cache
from vitcli.inference.openvino_engine import IR_SUFFIX, OpenVinoModel, compile_model, import_blob, openvino_version

if TYPE_CHECKING:
    from vitcli.models.resolve import LoadedModel

BACKENDS = ("auto", "torch", "openvino", "onnxruntime")
BACKEND_ENV = "VITCLI_BACKEND"  # the default --backend (e.g. torch for a test suite), else auto
EXPORTED = {".onnx": "onnxruntime", IR_SUFFIX: "openvino"}  # exported files run on their own engine


@dataclass
class Choice:
    """What runs: the engine, its precision, the line for stderr, and the model in that engine's form."""

    engine: str  # "torch", "openvino" or "onnxruntime"
    precision: str  # what the engine runs at ("": torch, at the precision asked for)
    line: str = ""
    openvino: OpenVinoModel | None = None
    loaded: LoadedModel | None = None  # the torch model, when it was loaded (to build, or to run)


def exported_engine(model: str) -> str | None:
    """The engine of an exported file given as --model (``.onnx``, ``.xml``), else None."""
    return EXPORTED.get(Path(model).suffix.lower())


def openvino_precisions(precision: str) -> list[str]:
    """The OpenVINO inference precisions to try, best first: ``auto`` is bf16 where it is native and
    fast (``cpuinfo.fast_bf16``), falling back to fp32 if bf16 disagrees with torch."""
    from vitcli.cpuinfo import fast_bf16

    if precision == "auto":
        return ["bf16", "fp32"] if fast_bf16("openvino") else ["fp32"]
    if precision in ("fp32", "bf16"):
        return [precision]
    return []


def gpu_present() -> bool:
    """Whether torch would pick a GPU for ``--device auto``; asks torch only where a GPU may exist."""
    if sys.platform == "darwin" or Path("/dev/nvidia0").exists() or Path("/dev/kfd").exists():
        import torch

        mps = getattr(torch.backends, "mps", None)
        return torch.cuda.is_available() or bool(mps and mps.is_available())
    return False


def default_backend(backend: str | None) -> str:
    """``--backend`` as given, else ``$VITCLI_BACKEND``, else ``auto``."""
    if backend:
        return backend
    backend = os.environ.get(BACKEND_ENV, "").strip() or "auto"
    if backend not in BACKENDS:
        raise UsageError(f"{BACKEND_ENV}={backend} is not a backend; use {', '.join(BACKENDS)}")
    return backend


def choose_engine(name: str, weights: str | Path | None, load: Callable[[], LoadedModel],
                  backend: str | None = None, device: str = "auto", precision: str = "fp32") -> Choice:
    """Pick the engine for ``--model name [--weights]`` (not for exported files: they run on their own).

    ``load()`` loads the torch model; it is called only when torch runs or a cache entry must be built.
    Raises UsageError for a backend that cannot run this model (``--backend openvino`` on a GPU
    device, or a model OpenVINO cannot convert; ``--backend onnxruntime`` without an .onnx file).
    """
    backend = default_backend(backend)
    if backend not in BACKENDS:
        raise UsageError(f"unknown --backend '{backend}'; use {', '.join(BACKENDS)}")
    if backend == "onnxruntime":
        raise UsageError("--backend onnxruntime runs exported .onnx files; export the model with "
                         "`vitcli export -f onnx` and predict with the .onnx file as --model")
    if backend == "torch":
        return Choice("torch", "")
    precisions = openvino_precisions(precision)
    if backend == "openvino":  # on the CPU, even where torch would pick a GPU
        if device not in ("auto", "cpu"):
            raise UsageError(f"--backend openvino runs on the CPU; drop --device {device} or use --backend torch")
        if not precisions:
            raise UsageError(f"--precision {precision} does not run on OpenVINO's CPU plugin; use fp32 or bf16")
    elif gpu := device if device not in ("auto", "cpu") else ("a GPU" if device == "auto" and gpu_present() else ""):
        return Choice("torch", "", f"torch on {gpu}")
    elif not precisions:
        return Choice("torch", "", f"torch: OpenVINO has no {precision}")
    return _through_openvino(name, weights, load, precisions, explicit=backend == "openvino")


@dataclass
class _Build:
    """The torch side of building entries, loaded once for every precision tried."""

    name: str
    weights: str | Path | None
    load: Callable[[], LoadedModel]
    loaded: LoadedModel | None = None
    converted: Any = None
    convert_error: str | None = None
    reference: Any = None
    batch: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    def model(self) -> LoadedModel:
        if self.loaded is None:
            self.loaded = self.load()
        return self.loaded

    def digest(self) -> str:
        """Weights digest of the loaded model (for hub names, whose files timm alone resolves)."""
        import hashlib

        h = hashlib.sha256()
        for key, tensor in sorted(self.model().model.state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def prepare(self) -> None:
        """Convert the torch model to OpenVINO (once) and compute torch fp32's logits on the photos."""
        if self.converted is not None or self.convert_error is not None:
            return
        import torch

        from vitcli.export.job import export_metadata
        from vitcli.export.openvino import convert
        from vitcli.export.options import ExportOptions
        from vitcli.export.verify import batch_of, run_batched, verification_images

        loaded = self.model()
        self.meta = {**export_metadata(loaded, self.name, self.weights, ExportOptions()), "format": "openvino"}
        images, _ = verification_images(())
        self.batch = batch_of(images, loaded.data_config)
        model = loaded.model.float().eval()

        def reference(x):
            with torch.inference_mode():
                return model(torch.from_numpy(x)).float().numpy()

        self.reference = run_batched(reference, self.batch)
        _, height, width = self.meta["input_size"]
        try:
            self.converted = convert(model, torch.zeros(1, 3, height, width))
        except Exception as e:  # the converter raises anything: OpConversionFailure, RuntimeError, ...
            self.convert_error = f"could not convert the model ({first_line(e)})"

    def verify(self, compiled: Any) -> dict[str, Any]:
        from vitcli.export.verify import agreement, run_batched

        try:
            got = run_batched(lambda x: compiled(x)[0], self.batch)
        except Exception as e:
            return {"ok": False, "reason": f"does not run ({first_line(e)})"}
        return agreement(self.reference, got)


def _through_openvino(name: str, weights: str | Path | None, load: Callable[[], LoadedModel],
                      precisions: list[str], explicit: bool) -> Choice:
    files = cache.model_files(name, weights)
    build = _Build(name, weights, load)
    digest = cache.files_digest(files) if files else build.digest()
    arch = name if weights is not None or (files and len(files) == 1) else None  # a bare weights file
    root, version = cache.cache_root(), openvino_version()
    notes: list[str] = []
    refused: list[tuple[str, dict[str, Any]]] = []
    for precision in precisions:
        key = cache.cache_key(digest, arch, precision, version)
        try:
            entry = cache.read_entry(root, key)
        except cache.EntryDamaged as e:
            notes.append(f"a damaged cache entry was rebuilt: {e}")
            cache.discard(root, key)
            entry = None
        except OSError:
            entry = None
        how = "cached"
        if entry is None:
            entry, how = _build_entry(root, key, build, precision, notes)
        for rebuilt in (False, True):
            if isinstance(entry, Choice):  # built in memory: the cache could not hold it
                if entry.engine == "openvino":
                    entry.line = _joined(entry.line, notes)
                    return entry
                if explicit:
                    raise UsageError(f"--backend openvino cannot run {name}: OpenVINO {entry.line}; "
                                     "use --backend torch")
                refused.append((precision, {"reason": entry.line}))
                break
            if not (entry.ok or (explicit and entry.has_model)):
                if explicit:
                    raise UsageError(f"--backend openvino cannot run {name}: OpenVINO {entry.reason}; "
                                     "use --backend torch")
                refused.append((precision, {"reason": entry.reason}))
                break
            blob = entry.folder / cache.BLOB_NAME
            try:
                compiled = import_blob(blob, precision)
            except Exception as e:  # a foreign blob: another OpenVINO build or CPU, or garbage that checks out
                if rebuilt:  # never loop: the entry built just now does not import either
                    reason = f"could not import the compiled model it built ({first_line(e)})"
                    if explicit:
                        raise UsageError(f"--backend openvino cannot run {name}: OpenVINO {reason}; "
                                         "use --backend torch") from e
                    refused.append((precision, {"reason": reason}))
                    break
                notes.append(f"a cache entry OpenVINO could not import was rebuilt: {first_line(e)}")
                entry, how = _build_entry(root, key, build, precision, notes, stale=entry.manifest.get("files"))
                continue
            took = entry.manifest.get("built_s")
            line = (f"openvino {precision}, cached" if how == "cached"
                    else f"openvino {precision}, built and verified in {took:.0f} s")
            if not entry.ok:
                line = f"openvino {precision} (asked for; it {entry.reason} against torch fp32)"
            model = OpenVinoModel(compiled, blob, entry.manifest["metadata"], precision)
            notes += [f"{p} {r['reason']}" for p, r in refused]
            return Choice("openvino", precision, _joined(line, notes), openvino=model, loaded=build.loaded)
    reasons = "; ".join(f"openvino {p} {r['reason']}" if len(refused) > 1 else f"openvino {r['reason']}"
                        for p, r in refused)
    return Choice("torch", "", _joined(f"torch: {reasons}", notes), loaded=build.loaded)


def _build_entry(root: Path, key: cache.CacheKey, build: _Build, precision: str,
                 notes: list[str], stale: Any = None) -> tuple[Any, str]:
    """Build, verify and store the entry of ``key`` under its lock -> (Entry, "built"), or (the entry
    another process built meanwhile, "cached"), or (a Choice compiled in memory where the cache
    folder cannot be written). An entry whose manifest lists the files ``stale`` (one OpenVINO could
    not import) is discarded first; one another process rebuilt meanwhile is kept."""
    try:
        with cache.build_lock(root, key):
            try:
                entry = cache.read_entry(root, key)
            except cache.EntryDamaged:
                cache.discard(root, key)
                entry = None
            if entry is not None and stale is not None and entry.manifest.get("files") == stale:
                cache.discard(root, key)
                entry = None
            if entry is not None:
                return entry, "cached"
            tmp = cache.new_entry_dir(root, key)
            try:
                return cache.commit_entry(root, key, tmp, _fill(tmp, build, precision)), "built"
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except OSError as e:
        notes.append(f"cache {root} not writable ({e.strerror or first_line(e)}): compiled in memory")
        return _in_memory(build, precision), "built"


def _fill(tmp: Path, build: _Build, precision: str) -> dict[str, Any]:
    """Convert, compile and verify, and write the compiled blob into ``tmp``: the manifest's verdict."""
    from vitcli.inference.openvino_engine import export_blob, set_metadata

    started = time.perf_counter()
    build.prepare()
    if build.converted is None:
        return {"status": "failed", "reason": build.convert_error, "precision": precision}
    set_metadata(build.converted, build.meta)
    compiled = compile_model(build.converted, precision)
    verdict = build.verify(compiled)
    export_blob(compiled, tmp / cache.BLOB_NAME)
    return {"status": "ok" if verdict["ok"] else "refused", "reason": verdict["reason"], "precision": precision,
            "verification": {k: v for k, v in verdict.items() if k not in ("ok", "reason")},
            "metadata": build.meta, "built_s": time.perf_counter() - started, "pid": os.getpid()}


def _in_memory(build: _Build, precision: str) -> Choice:
    """The same build without the cache: compiled in memory, verified, used for this run only."""
    from vitcli.inference.openvino_engine import set_metadata

    started = time.perf_counter()
    build.prepare()
    if build.converted is None:
        return Choice("torch", "", str(build.convert_error), loaded=build.loaded)
    set_metadata(build.converted, build.meta)
    compiled = compile_model(build.converted, precision)
    verdict = build.verify(compiled)
    if not verdict["ok"]:
        return Choice("torch", "", str(verdict["reason"]), loaded=build.loaded)
    return Choice("openvino", precision, f"openvino {precision}, built and verified in "
                  f"{time.perf_counter() - started:.0f} s", openvino=OpenVinoModel(
                      compiled, Path("<memory>"), build.meta, precision), loaded=build.loaded)


def _joined(line: str, notes: list[str]) -> str:
    return f"{line} ({'; '.join(notes)})" if notes else line
