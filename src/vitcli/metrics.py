"""Classification metrics shared by ``vitcli evaluate`` and finetune validation. Never prints.

Everything that is summed over batches and torchrun ranks lives in ``ScoreSums``: the cross-entropy
sum, top-1 and top-k hit counts, the confusion matrix and the reliability bins (count, confidence
sum and hit count per confidence bin), all as counts or float64 sums, so the sum over ranks is the
one-process result. From the sums come accuracy, mean loss, per-class precision/recall/F1, the
expected calibration error and the most confused class pairs.

Calibration: one temperature T divides the logits (``softmax(logits / T)``); it changes the
probabilities, never the ranking, so top-1 is unchanged. ``fit_temperature`` minimises the NLL of
held-out logits over log T with LBFGS (Guo et al., "On Calibration of Modern Neural Networks", 2017).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TOP_K = 5  # the second accuracy reported, where there are more than K classes (else it is always 100%)
ECE_BINS = 15
T_MIN, T_MAX = 1e-2, 1e2  # the fitted temperature is kept in this range (a separable set drives T to 0)


# ---------------------------------------------------------------------------------- counting


def confusion_matrix(targets: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts; ``matrix[t, p]`` is the number of images of class t predicted as p."""
    targets = targets.reshape(-1).long().cpu()
    preds = preds.reshape(-1).long().cpu()
    if targets.shape != preds.shape:
        raise ValueError(f"targets and preds differ in length ({targets.numel()} vs {preds.numel()})")
    flat = targets * num_classes + preds  # (N,) index into the flattened matrix
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def top_k_hits(logits: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[int, int, torch.Tensor]:
    """(top-1 hits, top-k hits, top-1 predictions) of a batch; counts, not timm's batch percentages."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices  # (B, k)
    hits = top == targets[:, None]  # (B, k)
    return int(hits[:, 0].sum().item()), int(hits.any(dim=1).sum().item()), top[:, 0]


def loss_sum(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Summed cross-entropy of ``softmax(logits / temperature)``, in float64."""
    return F.cross_entropy(logits.double() / temperature, targets, reduction="sum").item()


@dataclass(frozen=True)
class ClassMetrics:
    """Precision, recall and F1 of one class (0.0 where undefined), and its number of images."""

    label: str
    precision: float
    recall: float
    f1: float
    support: int


def per_class_metrics(matrix: torch.Tensor | Sequence[Sequence[int]], labels: Sequence[str]) -> list[ClassMetrics]:
    """Precision, recall, F1 and support of each class of a confusion matrix (rows true).

    A ratio with a zero denominator (a class never predicted, or with no images) is 0.0.
    """
    m = torch.as_tensor(matrix, dtype=torch.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(labels):
        raise ValueError(f"matrix of shape {tuple(m.shape)} does not fit {len(labels)} labels")
    true_pos = m.diagonal()
    support = m.sum(dim=1)  # images per true class
    predicted = m.sum(dim=0)  # images per predicted class
    metrics = []
    for i, label in enumerate(labels):
        tp = true_pos[i].item()
        precision = tp / predicted[i].item() if predicted[i] > 0 else 0.0
        recall = tp / support[i].item() if support[i] > 0 else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        metrics.append(ClassMetrics(str(label), precision, recall, f1, int(support[i].item())))
    return metrics


def most_confused(matrix: torch.Tensor | Sequence[Sequence[int]], labels: Sequence[str],
                  n: int = 10) -> list[tuple[str, str, int]]:
    """The ``n`` largest off-diagonal cells as (true label, predicted label, count), largest first."""
    m = torch.as_tensor(matrix, dtype=torch.int64).clone()
    m.fill_diagonal_(0)
    counts, flat = m.flatten().sort(descending=True, stable=True)
    size = m.shape[1]
    return [(str(labels[i // size]), str(labels[i % size]), c)
            for c, i in zip(counts.tolist(), flat.tolist(), strict=True) if c > 0][:n]


# ------------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class ReliabilityBin:
    """Images whose top-1 probability lies in (lo, hi]: how many, their mean confidence and accuracy."""

    lo: float
    hi: float
    count: int
    confidence: float  # mean top-1 probability (0.0 for an empty bin)
    accuracy: float  # fraction whose top-1 is right (0.0 for an empty bin)


def bin_sums(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = ECE_BINS) -> torch.Tensor:
    """(n_bins, 3) float64 sums per equal-width confidence bin: count, confidence sum, hits."""
    confidence = confidence.double().cpu()
    index = (confidence * n_bins).ceil().long().clamp(1, n_bins) - 1  # (lo, hi] bins; 0 joins the first
    sums = torch.zeros(n_bins, 3, dtype=torch.float64)
    sums.index_add_(0, index, torch.stack([torch.ones_like(confidence), confidence, correct.double().cpu()], dim=1))
    return sums


def reliability_bins(sums: torch.Tensor) -> list[ReliabilityBin]:
    """The bins of ``bin_sums`` (or their sum over batches and ranks)."""
    n_bins = sums.shape[0]
    out = []
    for b, (count, conf, hits) in enumerate(sums.tolist()):
        out.append(ReliabilityBin(b / n_bins, (b + 1) / n_bins, int(count), conf / count if count else 0.0,
                                  hits / count if count else 0.0))
    return out


def expected_calibration_error(sums: torch.Tensor) -> float:
    """ECE: the image-weighted mean of |accuracy - confidence| over the bins of ``bin_sums``."""
    total = sums[:, 0].sum().item()
    if total == 0:
        return math.nan
    return (sums[:, 2] - sums[:, 1]).abs().sum().item() / total


def ece(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error (``n_bins`` equal-width bins) of ``softmax(logits / temperature)``."""
    conf, pred = (logits.double() / temperature).softmax(dim=1).max(dim=1)
    return expected_calibration_error(bin_sums(conf, pred == targets, n_bins))


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)``."""
    return loss_sum(logits, targets, temperature) / max(len(targets), 1)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature T that minimises the NLL of ``softmax(logits / T)``: LBFGS on log T.

    Kept within [T_MIN, T_MAX]: when every image is right with a margin, the NLL falls all the way
    to T -> 0, and a bound keeps the stored value finite and the probabilities usable.
    """
    logits = logits.detach().double().cpu()
    targets = targets.detach().long().cpu()
    if len(targets) == 0:
        raise ValueError("no logits to fit a temperature on")
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")
    lo, hi = math.log(T_MIN), math.log(T_MAX)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.clamp(lo, hi).exp(), targets)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    value = float(log_t.detach().clamp(lo, hi).exp().item())
    return value if math.isfinite(value) else 1.0


# --------------------------------------------------------------------------------- the sums


class ScoreSums:
    """Running sums of a classifier's scores over batches; ``reduce`` adds up the ranks' sums exactly.

    ``temperature`` (None: 1) is applied to the calibration sums (NLL, reliability bins) only; the
    raw cross-entropy (``loss``) and the hits never depend on it.
    """

    def __init__(self, num_classes: int, k: int = TOP_K, temperature: float | None = None, n_bins: int = ECE_BINS):
        self.num_classes = num_classes
        self.k = min(k, num_classes)
        self.temperature = temperature
        self.totals = torch.zeros(5, dtype=torch.float64)  # loss, top-1 hits, top-k hits, count, calibrated NLL
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.bins = torch.zeros(n_bins, 3, dtype=torch.float64)  # calibrated: count, confidence, hits
        self.raw_bins = torch.zeros(n_bins, 3, dtype=torch.float64)  # the same of the plain softmax

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Count a batch of fp32 logits (B, C); returns the top-1 predictions."""
        logits, targets = logits.float(), targets.to(logits.device)
        top1, topk, preds = top_k_hits(logits, targets, self.k)
        t = self.temperature or 1.0
        probs = logits.double().softmax(dim=1)
        calibrated = (logits.double() / t).softmax(dim=1) if t != 1.0 else probs
        self.totals += torch.tensor([loss_sum(logits, targets), top1, topk, len(targets),
                                     loss_sum(logits, targets, t)], dtype=torch.float64)
        self.matrix += confusion_matrix(targets, preds, self.num_classes)
        self.bins += bin_sums(calibrated.max(dim=1).values, preds == targets, self.bins.shape[0])
        self.raw_bins += bin_sums(probs.max(dim=1).values, preds == targets, self.bins.shape[0])
        return preds

    def reduce(self, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> ScoreSums:
        """Sum every counter over the ranks in place with ``all_reduce`` (e.g. ``distributed.all_reduce``)."""
        for tensor in (self.totals, self.matrix, self.bins, self.raw_bins):
            all_reduce(tensor)
        return self

    def merge(self, other: ScoreSums) -> ScoreSums:
        """Add another ScoreSums (of another rank) into this one."""
        self.totals += other.totals
        self.matrix += other.matrix
        self.bins += other.bins
        self.raw_bins += other.raw_bins
        return self

    @property
    def count(self) -> int:
        return int(self.totals[3].item())

    def _mean(self, i: int) -> float:
        return self.totals[i].item() / self.count if self.count else math.nan

    @property
    def loss(self) -> float:
        """Mean cross-entropy of the raw logits."""
        return self._mean(0)

    @property
    def top1(self) -> float:
        return self._mean(1)  # hit counts summed as float64: exact up to 2**53 images

    @property
    def topk(self) -> float | None:
        """Top-k accuracy, None where the model has k classes or fewer (always 100%)."""
        return self._mean(2) if self.num_classes > self.k else None

    @property
    def nll(self) -> float:
        """Mean NLL with the temperature applied (``loss`` when there is none)."""
        return self._mean(4)

    @property
    def ece(self) -> float:
        """Expected calibration error with the temperature applied."""
        return expected_calibration_error(self.bins)

    @property
    def ece_uncalibrated(self) -> float:
        """Expected calibration error of the plain softmax."""
        return expected_calibration_error(self.raw_bins)

    def reliability(self) -> list[ReliabilityBin]:
        return reliability_bins(self.bins)
