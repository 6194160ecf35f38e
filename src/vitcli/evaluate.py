"""Evaluation of a classifier on a folder-per-class split: accuracy, loss, per-class metrics,
confusion matrix, calibration (NLL, ECE, reliability bins) and the most confident mistakes. Never prints.

Folder class names are mapped to the model's labels *by name* (``datasets.map_classes``), never by
folder order, so a model fine-tuned on ``DATA/train`` can be scored on ``DATA/test`` whatever
classes that folder happens to contain. The confusion matrix covers the classes of the folder
plus any other model class that was predicted, in the model's label order.

The counting is ``metrics.ScoreSums``, the same as finetune validation; images are read by predict's
tolerant dataset (``inference.batching.ImageSourceDataset``), so an unreadable file is skipped and named.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vitcli.devices import autocast, resolve_device, resolve_precision
from vitcli.distributed import Rank, close_distributed, init_distributed, on_every_rank
from vitcli.errors import DatasetError, UsageError
from vitcli.io.datasets import Sample, find_eval_dir, map_classes, scan_class_folders
from vitcli.metrics import ClassMetrics, ReliabilityBin, ScoreSums, most_confused, per_class_metrics
from vitcli.models.resolve import LoadedModel

if TYPE_CHECKING:
    from vitcli.calibration import Calibration

MISTAKES = 15  # the most confident mistakes listed by default
CONFUSED_PAIRS = 10


@dataclass(frozen=True)
class Mistake:
    """An image whose top-1 is not its folder's class, with both probabilities."""

    path: str
    label: str  # the folder's class
    predicted: str
    prob: float  # of the predicted class
    label_prob: float  # of the folder's class


@dataclass
class EvalResult:
    """Scores of a model on one folder. ``top1``/``top5`` are fractions; ``loss`` is mean cross-entropy.

    ``top5`` is None for models of 5 classes or fewer, where every image is in the top 5. ``nll``,
    ``ece``, ``reliability`` and the mistakes' probabilities use ``temperature`` (None: the plain
    softmax); ``loss`` is always the raw logits' cross-entropy, the NLL without a temperature.
    """

    top1: float
    top5: float | None
    loss: float
    n_images: int
    labels: list[str]  # rows/columns of ``matrix``, in the model's label order
    matrix: torch.Tensor  # (C, C) int64 counts, rows = true class, columns = predicted class
    per_class: list[ClassMetrics]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): unreadable images
    folder: str = ""
    temperature: float | None = None
    nll: float = 0.0
    ece: float = 0.0
    ece_uncalibrated: float | None = None  # the plain softmax's ECE, where a temperature was applied
    reliability: list[ReliabilityBin] = field(default_factory=list)
    mistakes: list[Mistake] = field(default_factory=list)  # most confident first
    confused: list[tuple[str, str, int]] = field(default_factory=list)  # (true, predicted, images), most first
    model: str = ""
    logits: torch.Tensor | None = None  # (N, C) fp32, with ``keep_logits`` (not in the JSON)
    targets: torch.Tensor | None = None  # (N,)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of ``vitcli evaluate --json``."""
        return {
            "top1": self.top1,
            "top5": self.top5,
            "loss": self.loss,
            "n_images": self.n_images,
            "folder": self.folder,
            "per_class": [asdict(m) for m in self.per_class],
            "confusion_matrix": {"labels": list(self.labels), "matrix": self.matrix.tolist()},
            "skipped": [{"path": path, "reason": reason} for path, reason in self.skipped],
            "calibration": {"temperature": self.temperature, "nll": self.nll, "ece": self.ece,
                            "ece_uncalibrated": self.ece_uncalibrated,
                            "reliability": [asdict(b) for b in self.reliability]},
            "mistakes": [asdict(m) for m in self.mistakes],
            "most_confused": [{"label": t, "predicted": p, "images": n} for t, p, n in self.confused],
        }


# ------------------------------------------------------------------------------------ folders


def eval_samples(data_dir: str | Path, labels: Sequence[str],
                 split: str | None = None) -> tuple[Path, list[Sample]]:
    """The folder to evaluate and its ``(path, model class index)`` samples, mapped by class name."""
    folder = find_eval_dir(data_dir, split)
    per_class = scan_class_folders(folder)
    if not per_class:
        raise DatasetError(f"'{folder}' has no class folders; expected {folder}/<class>/<images> "
                           "(or DATA/test/, DATA/val/ with class folders)")
    if split is None and folder == Path(data_dir).expanduser() and "train" in per_class and "train" not in labels:
        raise DatasetError(f"'{folder}' has a train/ folder but no test/ or val/ folder; "
                           "evaluate a held-out split, or pass --split train to score the training images")
    index = map_classes(list(per_class), labels)
    samples = [(path, index[name]) for name, files in per_class.items() for path in files]
    if not samples:
        raise DatasetError(f"no images in the class folders of '{folder}'")
    return folder, samples


# --------------------------------------------------------------------------------- evaluation


@dataclass
class _Share:
    """One rank's part: its sums, unreadable files, most confident mistakes and (if kept) logits."""

    sums: ScoreSums
    skipped: list[tuple[str, str]]
    mistakes: list[tuple[float, str, int, int, float]]  # (prob, path, target, predicted, target prob)
    logits: torch.Tensor | None = None
    targets: torch.Tensor | None = None


def evaluate_model(
    loaded: LoadedModel,
    data_dir: str | Path,
    split: str | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    strict: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
    dist: Rank | None = None,
    temperature: float | None = None,
    mistakes: int = MISTAKES,
    keep_logits: bool = False,
    engine: Callable[[Any], Any] | None = None,
) -> EvalResult:
    """Score ``loaded`` on a folder-per-class split.

    Args:
        loaded: the model from ``vitcli.models.resolve.load_model``; its labels name the classes.
        data_dir: a split folder of class sub-folders, or a dataset root (DATA/test, else
            DATA/val|validation|valid, else DATA itself; see ``datasets.find_eval_dir``).
        split: a sub-folder of ``data_dir`` to evaluate instead of the automatic choice.
        workers: CPU streams or GPU DataLoader processes, as for ``vitcli predict``.
        device, precision: as for ``vitcli predict`` (``auto``/``cpu``/``cuda``; ``auto``/``fp32``/``bf16``/...:
            ``vitcli.devices.resolve_precision``).
        strict: an unreadable image is fatal (checked before evaluating) instead of skipped.
        on_batch: called with (images done, total) after each batch, for progress bars.
        dist: under torchrun (a joined process group), this process's rank: each rank scores every
            N-th image and the ranks' counts are added up, so every rank returns the whole folder's
            result. A failure on any rank is raised on every rank.
        temperature: divides the logits for the probabilities (NLL, ECE, mistakes); None: plain softmax.
        mistakes: how many of the most confident mistakes to keep.
        keep_logits: also keep every image's fp32 logits and target (``result.logits``/``result.targets``).
        engine: another engine for the forward pass, float32 NumPy (B, 3, H, W) -> logits (B, C) (an
            OpenVINO model from ``inference.backend.choose_engine``); None runs ``loaded.model``.
    """
    from vitcli.io.datasets import drop_unreadable

    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if mistakes < 0:
        raise UsageError("--mistakes must be 0 or more")
    torch_device = resolve_device(device)
    precision = resolve_precision(precision, torch_device)  # auto -> what runs; checked for the device
    folder, samples = eval_samples(data_dir, loaded.labels, split)
    if strict:
        samples, _ = drop_unreadable(samples, strict=True)
    dist = dist or Rank()
    mine = samples[dist.rank::dist.world]  # strided: every rank gets a mix of the classes

    def score_mine() -> _Share:
        return _score(loaded, mine, batch_size, workers, torch_device, precision, temperature, mistakes,
                      keep_logits, on_batch if dist.main else None, engine)

    shares = on_every_rank(score_mine, dist)  # a failure on any rank stops every rank with it
    sums, skipped, worst = shares[0].sums, [], []
    for share in shares:
        if share is not shares[0]:
            sums.merge(share.sums)
        skipped += share.skipped
        worst += share.mistakes
    position = {path: i for i, (path, _) in enumerate(samples)}
    skipped.sort(key=lambda pair: position[pair[0]])  # the one-process order
    if sums.count == 0:
        raise DatasetError(f"none of the {len(samples)} images in '{folder}' could be read")

    # Keep the folder's classes and every class that was predicted: all counts stay in the matrix.
    keep = sorted({target for _, target in samples} | set(sums.matrix.sum(dim=0).nonzero().flatten().tolist()))
    labels = [loaded.labels[i] for i in keep]
    matrix = sums.matrix[keep][:, keep]
    result = EvalResult(
        top1=sums.top1, top5=sums.topk, loss=sums.loss, n_images=sums.count, labels=labels, matrix=matrix,
        per_class=per_class_metrics(matrix, labels), skipped=skipped, folder=str(folder),
        temperature=temperature, nll=sums.nll, ece=sums.ece, reliability=sums.reliability(),
        mistakes=[Mistake(path, loaded.labels[t], loaded.labels[p], prob, t_prob)
                  for prob, path, t, p, t_prob in sorted(worst, key=lambda m: (-m[0], m[1]))[:mistakes]],
        confused=most_confused(matrix, labels, CONFUSED_PAIRS), model=loaded.name,
    )
    if temperature is not None:
        result.ece_uncalibrated = sums.ece_uncalibrated
    if keep_logits:
        result.logits = torch.cat([s.logits for s in shares if s.logits is not None])
        result.targets = torch.cat([s.targets for s in shares if s.targets is not None])
    return result


def _score(loaded: LoadedModel, mine: list[Sample], batch_size: int, workers: int | None, device: torch.device,
           precision: str, temperature: float | None, n_mistakes: int, keep_logits: bool,
           on_batch: Callable[[int, int], None] | None, engine: Callable[[Any], Any] | None = None) -> _Share:
    """This rank's share, scored: counts, unreadable files, its most confident mistakes."""
    from vitcli.inference.batching import ImageSourceDataset, collate_images, scored_key_batches
    from vitcli.io.transforms import eval_transform

    model = loaded.model.to(device).eval()
    sums = ScoreSums(loaded.num_classes, temperature=temperature)
    dataset = ImageSourceDataset([path for path, _ in mine], eval_transform(loaded.data_config))

    def logits_of(batch: tuple[torch.Tensor | None, list]) -> tuple[torch.Tensor | None, list]:
        images, errors = batch  # runs in stream threads
        if images is None:
            return None, errors
        if engine is not None:  # a torch-free engine (OpenVINO): NumPy in, NumPy logits out
            return torch.from_numpy(engine(images.float().numpy())), errors
        with torch.inference_mode(), autocast(device, precision):  # per call: a fresh context per thread
            logits = model(images.to(device, non_blocking=True))  # (B, num_classes)
        return logits.float().cpu(), errors

    skipped: list[tuple[str, str]] = []
    worst: list[tuple[float, str, int, int, float]] = []  # a min-heap of the most confident mistakes
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    done = 0
    with torch.inference_mode():
        for chunk, (logits, errors) in scored_key_batches(dataset, range(len(mine)), batch_size, collate_images,
                                                          logits_of, device, workers):
            good = [i for i, reason in zip(chunk, errors, strict=True) if reason is None]
            skipped += [(mine[i][0], reason) for i, reason in zip(chunk, errors, strict=True) if reason is not None]
            if logits is not None:
                targets = torch.tensor([mine[i][1] for i in good], dtype=torch.long)
                preds = sums.add(logits, targets)
                probs = (logits.double() / (temperature or 1.0)).softmax(dim=1)  # (B, C)
                for row in (preds != targets).nonzero().flatten().tolist():
                    t, p = int(targets[row]), int(preds[row])
                    entry = (probs[row, p].item(), mine[good[row]][0], t, p, probs[row, t].item())
                    if len(worst) < n_mistakes:
                        heapq.heappush(worst, entry)
                    elif n_mistakes and entry[0] > worst[0][0]:
                        heapq.heapreplace(worst, entry)
                if keep_logits:
                    kept.append((logits, targets))
            done += len(chunk)
            if on_batch is not None:
                on_batch(done, len(mine))
    share = _Share(sums, skipped, worst)
    if keep_logits:
        share.logits = torch.cat([x for x, _ in kept]) if kept else torch.zeros(0, loaded.num_classes)
        share.targets = torch.cat([t for _, t in kept]) if kept else torch.zeros(0, dtype=torch.long)
    return share


# ---------------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class EvalRequest:
    """What ``vitcli evaluate`` asks for."""

    data: str | Path
    model: str
    weights: str | None = None
    split: str | None = None
    batch_size: int = 32
    workers: int | None = None
    device: str = "auto"
    precision: str = "auto"
    strict: bool = False
    calibrated: bool = True  # apply the model's stored temperature (False: plain softmax)
    mistakes: int = MISTAKES
    backend: str | None = None  # inference.backend: auto (OpenVINO on CPUs where it agrees), torch, openvino


def run_evaluate(request: EvalRequest, on_loaded: Callable[[LoadedModel], None] | None = None,
                 on_batch: Callable[[int, int], None] | None = None,
                 say: Callable[[str], None] | None = None) -> tuple[LoadedModel, EvalResult]:
    """Load the model and score it, under torchrun too: this process joins the group, and the load
    and the scoring go through ``on_every_rank``, so no rank waits for one that failed.

    ``on_loaded``, ``on_batch`` and ``say`` (the line saying which engine runs) are called on rank 0
    only. Every rank returns the whole result.
    """
    from vitcli.calibration import model_temperature
    from vitcli.inference.backend import choose_engine
    from vitcli.models.resolve import load_model

    dist, device = init_distributed(request.device)
    try:
        box: list[tuple[LoadedModel, float | None, Any]] = []

        def load() -> None:  # the model stays on this rank: nothing large travels between ranks
            loaded = load_model(request.model, request.weights)
            choice = choose_engine(request.model, request.weights, lambda: loaded, request.backend, str(device),
                                   request.precision)
            box.append((loaded, model_temperature(loaded), choice))

        on_every_rank(load, dist)
        loaded, temperature, choice = box[0]
        if on_loaded is not None and dist.main:
            on_loaded(loaded)
        if say is not None and choice.line and dist.main:
            say(choice.line)
        result = evaluate_model(
            loaded, request.data, split=request.split, batch_size=request.batch_size, workers=request.workers,
            device=str(device), precision=request.precision, strict=request.strict,
            on_batch=on_batch if dist.main else None, dist=dist,
            temperature=temperature if request.calibrated else None, mistakes=request.mistakes,
            engine=choice.openvino.logits if choice.openvino is not None else None)
        return loaded, result
    finally:
        close_distributed(dist)


def calibrate_folder(model: str, data: str | Path, weights: str | None = None, split: str | None = None,
                     batch_size: int = 32, workers: int | None = None, device: str = "auto",
                     on_batch: Callable[[int, int], None] | None = None) -> Calibration:
    """``vitcli calibrate``: fit a temperature for a model folder on a labelled folder and store it.

    The folder scored is DATA/SPLIT, else DATA/val (validation/, valid/), else as ``vitcli evaluate``
    picks it; the logits are fp32. An empty, one-class or unreadable split stores nothing and says why.
    """
    from vitcli.calibration import Calibration, calibrate_logits, store_temperature
    from vitcli.io.datasets import find_val_dir
    from vitcli.models.resolve import load_model

    loaded = load_model(model, weights)
    if loaded.folder is None or weights is not None:
        raise UsageError(f"'{model}' is not a model folder; the temperature is stored in a model folder's "
                         "config.json: give a folder (config.json + model.safetensors) or a finetune run folder")
    root = Path(data).expanduser()
    if split is None and root.is_dir() and (val := find_val_dir(root)) is not None:
        split = val.name
    try:
        result = evaluate_model(loaded, root, split=split, batch_size=batch_size, workers=workers, device=device,
                                precision="fp32", on_batch=on_batch, mistakes=0, keep_logits=True)
    except DatasetError as e:
        if "could be read" not in str(e) and "no images" not in str(e):
            raise  # a missing folder or unknown classes: the user's data is wrong, not merely empty
        return Calibration(None, str(e))
    fitted = calibrate_logits(result.logits, result.targets, loaded.labels,  # type: ignore[arg-type]
                              what=f"'{result.folder}'")
    if fitted.temperature is not None:
        store_temperature(loaded.folder, fitted.temperature)
        fitted.folders = [str(loaded.folder)]
    return fitted
