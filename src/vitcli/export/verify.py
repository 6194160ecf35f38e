"""Verification images and the comparison of an exported file's logits with PyTorch's."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vitcli.errors import ImageLoadError, UsageError
from vitcli.export.quantize import mean_kl, top1_agreement
from vitcli.io.images import load_image
from vitcli.io.inputs import expand_inputs
from vitcli.io.preprocess import preprocess

# a few small photos shipped inside the package (package data), so editable and wheel installs verify alike
PHOTOS_DIR = Path(__file__).resolve().parent / "photos"
GENERATED_IMAGES = 12


def generated_images(n: int = GENERATED_IMAGES) -> list[Image.Image]:
    """Deterministic test images: smooth gradients, blobs and noise at several sizes and aspects."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        w, h = [(320, 240), (240, 320), (256, 256), (500, 180)][i % 4]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, 3)
        freq = rng.uniform(0.01, 0.08, 3)
        smooth = np.stack([np.sin(freq[c] * (xx + (c + 1) * yy) + phase[c]) for c in range(3)], -1)
        noise = rng.normal(0, 0.25 if i % 3 else 0.6, (h, w, 3))
        arr = np.clip((smooth * 0.5 + 0.5 + noise * 0.5) * 255, 0, 255).astype(np.uint8)
        images.append(Image.fromarray(arr, "RGB"))
    return images


def image_sources(inputs: Sequence[str], what: str) -> list[str]:
    """Files, folders and globs -> image paths; a name that matches nothing is a usage error."""
    sources, problems = expand_inputs(inputs)
    if problems:
        raise UsageError(f"{what} '{problems[0].source}': {problems[0].reason}")
    return sources


def verification_images(inputs: Sequence[str]) -> tuple[list[Image.Image], str]:
    """The images verification runs on and a description: the given ones, else the built-in set."""
    if inputs:
        images = load_readable(image_sources(inputs, "--verify-images"))
        return images, f"{len(images)} images from --verify-images"
    images = generated_images()
    photos = shipped_photos()
    return images + photos, f"{len(images)} generated images and {len(photos)} shipped photos"


def shipped_photos() -> list[Image.Image]:
    """The photos in ``export/photos/``, in name order."""
    return load_readable(sorted(str(p) for p in PHOTOS_DIR.glob("*.jpg")))


def load_readable(sources: Sequence[str]) -> list[Image.Image]:
    """The images among ``sources`` that load; unreadable ones are left out."""
    images = []
    for source in sources:
        try:
            images.append(load_image(source))
        except ImageLoadError:
            continue  # verification uses what can be read; unreadable files are predict's business
    return images


def batch_of(images: Sequence[Image.Image], config: dict[str, Any]) -> np.ndarray:
    """float32 (N, 3, H, W): timm's eval transform of every image (``runtime.preprocess``)."""
    return np.stack([preprocess(img, config) for img in images])


def run_batched(run: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, size: int = 16) -> np.ndarray:
    return np.concatenate([run(batch[i:i + size]) for i in range(0, len(batch), size)])


def compare(reference: np.ndarray, logits: np.ndarray, tolerance: Any) -> dict[str, Any]:
    """max |Δlogit|, top-1 agreement and mean KL, and the checks past ``tolerance`` in words."""
    max_abs = float(np.abs(reference.astype(np.float64) - logits).max())
    agreement = top1_agreement(reference, logits)
    kl = mean_kl(reference, logits)
    failed = []
    if tolerance.max_abs_logit is not None and not max_abs <= tolerance.max_abs_logit:
        failed.append(f"max |Δlogit| {max_abs:.3g} > {tolerance.max_abs_logit:g}")
    if not agreement >= tolerance.min_top1:
        failed.append(f"top-1 agreement {agreement:.1%} < {tolerance.min_top1:.1%}")
    if not kl <= tolerance.max_kl:
        failed.append(f"mean KL {kl:.3g} > {tolerance.max_kl:g}")
    return {"max_abs_logit": max_abs, "top1_agreement": agreement, "mean_kl": kl, "failed": failed}


# the rule a converted model must meet to replace torch fp32 (issue 15): the same top-1 on every image
# where fp32 is confident, nearly always the same top-1 elsewhere, probabilities within a few hundredths
CONFIDENT_PROB = 0.5
MIN_SAME_TOP1 = 0.98
MAX_PROB_DELTA = 0.05


def agreement(reference: np.ndarray, logits: np.ndarray) -> dict[str, Any]:
    """How ``logits`` agree with the fp32 ``reference`` logits (N, C), and whether that passes the rule.

    Returns {"images", "flips", "confident_flips", "same_top1", "max_prob_delta", "ok", "reason"}.
    """
    def probs(x: np.ndarray) -> np.ndarray:
        z = x.astype(np.float64) - x.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    p, q = probs(reference), probs(logits)
    same = p.argmax(1) == q.argmax(1)  # (N,)
    confident = p.max(1) >= CONFIDENT_PROB
    finite = bool(np.isfinite(logits).all())
    delta = float(np.abs(p - q).max()) if finite else float("inf")
    flips, confident_flips = int((~same).sum()), int((~same & confident).sum())
    result = {"images": len(same), "flips": flips, "confident_flips": confident_flips,
              "same_top1": float(same.mean()), "max_prob_delta": delta}
    reasons = []
    if not finite:
        reasons.append("its outputs are not finite")
    elif confident_flips or same.mean() < MIN_SAME_TOP1:
        reasons.append(f"disagreed on {flips} of {len(same)} photos")
    elif delta > MAX_PROB_DELTA:
        reasons.append(f"max |Δprob| {delta:.3f} > {MAX_PROB_DELTA}")
    return {**result, "ok": not reasons, "reason": "; ".join(reasons)}
