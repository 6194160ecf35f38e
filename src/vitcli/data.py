"""Inputs in, tensors out: input expansion (files, folders, globs, URLs, lists) and the model's
transforms. Loading one image is ``vitcli.images`` (Pillow only)."""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vitcli.errors import UsageError
from vitcli.images import is_url, load_image, load_image_fast

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm", ".pbm", ".jfif"})


# ------------------------------------------------------------------------------ input expansion


@dataclass(frozen=True)
class InputProblem:
    """An input argument that named no image (a missing path, an empty folder, a glob with no match)."""

    source: str
    reason: str
    before: int = 0  # how many image sources the inputs before it expanded to: its place among them


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def read_path_list(list_file: str) -> list[str]:
    """Paths from a text file, one per line (``-`` reads stdin); blank lines and # comments skipped."""
    return list(iter_path_list(list_file))


def iter_path_list(list_file: str) -> Iterator[str]:
    """``read_path_list`` one line at a time (a list of millions of paths is never held whole).

    A missing list file is reported here, at once, not when the first line is read.
    """
    if list_file == "-":
        return _paths_in(sys.stdin)
    path = Path(list_file)
    if not path.exists() or path.is_dir():  # a named pipe is fine: it is read as the lines arrive
        raise UsageError(f"--files-from '{list_file}' does not exist; give a text file with one image path "
                         "or URL per line ('-' reads them from stdin)")
    return _paths_in_file(path)


def _paths_in_file(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as lines:
        yield from _paths_in(lines)


def _paths_in(lines: Iterable[str]) -> Iterator[str]:
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            yield line


def expand_inputs(inputs: Iterable[str]) -> tuple[list[str], list[InputProblem]]:
    """Files, folders (recursive, by extension), glob patterns and URLs -> image sources, in order.

    Explicit files are kept whatever their extension (a non-image then fails when read, by name).
    """
    sources: list[str] = []
    problems: list[InputProblem] = []
    for item in iter_inputs(inputs):
        if isinstance(item, InputProblem):
            problems.append(InputProblem(item.source, item.reason, len(sources)))
        else:
            sources.append(item)
    return sources, problems


def iter_inputs(inputs: Iterable[str]) -> Iterator[str | InputProblem]:
    """``expand_inputs`` as a stream: each image source, or an InputProblem in its place, in order.

    Folders are walked lazily, one directory listing at a time, in the order of their sorted paths.
    """
    for raw in inputs:
        if is_url(raw):
            yield raw
            continue
        path = Path(raw).expanduser()
        if path.is_dir():
            found = False
            for source in _walk_images(str(path)):
                found = True
                yield source
            if not found:
                yield InputProblem(raw, f"folder has no images ({', '.join(sorted(IMAGE_EXTENSIONS)[:6])}, ...)")
        elif path.exists():
            yield str(path)
        elif glob.has_magic(raw):
            matches = sorted(p for p in glob.iglob(str(path), recursive=True)
                             if Path(p).is_file() and is_image_path(Path(p)))
            if not matches:
                yield InputProblem(raw, "no image matches this pattern")
            yield from matches
        else:
            yield InputProblem(raw, "no such file or directory")


def _walk_images(folder: str) -> Iterator[str]:
    """Image files under ``folder``, recursively, in the order ``sorted(str(path))`` gives them.

    Sorting each listing by name, with "/" after directory names, and descending in that order,
    yields exactly the sorted full paths (a directory's paths all start with "name/") while holding
    one listing per level only. Symlinked directories are not followed (as ``Path.rglob``).
    """
    try:
        with os.scandir(folder) as listing:
            entries = [(e.name + "/" if e.is_dir(follow_symlinks=False) else e.name, e) for e in listing]
    except OSError:
        return
    for key, entry in sorted(entries, key=lambda pair: pair[0]):
        if key.endswith("/"):
            yield from _walk_images(entry.path)
        elif entry.is_file() and is_image_path(Path(entry.name)):
            yield entry.path


# -------------------------------------------------------------------------------- transforms


def eval_transform(data_config: dict[str, Any]) -> Callable[[Image.Image], Any]:
    """timm's own eval transform for the model's data config (resize, center crop, normalize)."""
    from timm.data import create_transform

    return create_transform(**data_config, is_training=False)


def train_transform(data_config: dict[str, Any], **overrides: Any) -> Callable[[Image.Image], Any]:
    """timm's train transform (RandomResizedCrop, flip, optional RandAugment) for the data config."""
    from timm.data import create_transform

    return create_transform(**data_config, is_training=True, **overrides)


def draft_size_for(data_config: dict[str, Any]) -> tuple[int, int]:
    """The smallest decode size that keeps the eval resize a downscale (no upsampling)."""
    _, height, width = data_config["input_size"]
    crop_pct = data_config.get("crop_pct") or 1.0
    side = int(max(height, width) / crop_pct) + 1
    return side, side


# ------------------------------------------------------------------ batched eval preprocessing


@dataclass(frozen=True)
class EvalPipeline:
    """timm's eval transform split in two, so that workers ship 8-bit images and the main process
    converts and normalizes whole batches (4x less to copy between processes, vectorized maths).

    ``per_image(img)`` gives a uint8 tensor (C, H, W), or a float one when the
    transform is not the usual resize/crop/to-tensor/normalize chain (then ``mean`` is None and
    ``to_batch`` only stacks). ``to_batch`` computes what ``ToTensor`` + ``Normalize`` compute, in
    the same order, so the exact path stays bit-identical to timm's transform.
    """

    per_image: Callable[[Any], Any]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    load: Callable[[str, tuple[int, int] | None], Any] = load_image  # what per_image takes

    def to_batch(self, images: Any) -> Any:
        """A stacked batch from ``per_image`` -> the float (B, C, H, W) model input."""
        if self.mean is None or images.is_floating_point():
            return images
        import torch

        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return images.float().div_(255).sub_(mean).div_(std)


def eval_pipeline(data_config: dict[str, Any], fast: bool = False) -> EvalPipeline:
    """The model's eval transform as an ``EvalPipeline``.

    With ``fast``, ``load`` is ``load_image_fast`` (JPEGs decoded by torchvision into tensors, the
    same pixels) and downscaling resizes run on uint8 in torch (SIMD antialias, Pillow's bilinear or
    bicubic filter, within 1-2 levels of 255 of it, ~4x faster than Pillow's); images that are not
    downscaled take the exact Pillow steps, so fast only ever changes images larger than the resize.
    """
    from torchvision import transforms as T

    transform = eval_transform(data_config)
    steps = list(getattr(transform, "transforms", []))
    if (len(steps) < 2 or not isinstance(steps[-1], T.Normalize)
            or not isinstance(steps[-2], T.ToTensor)  # timm's MaybeToTensor is a ToTensor
            or not all(isinstance(s, (T.Resize, T.CenterCrop)) for s in steps[:-2])):
        return EvalPipeline(transform, None, None)
    mean = tuple(float(v) for v in np.asarray(steps[-1].mean).reshape(-1))
    std = tuple(float(v) for v in np.asarray(steps[-1].std).reshape(-1))
    pil_steps = steps[:-2]
    fast_resize = _fast_resize_crop(pil_steps) if fast else None
    return EvalPipeline(_Uint8Image(pil_steps, fast_resize), mean, std,
                        load_image_fast if fast_resize is not None else load_image)


class _Uint8Image:
    """PIL resize/crop steps, then the pixels as a uint8 (C, H, W) tensor (a picklable callable)."""

    def __init__(self, steps: list[Any], fast_resize: _FastResizeCrop | None = None):
        self.steps = steps
        self.fast_resize = fast_resize

    def __call__(self, img: Any) -> Any:
        import torch

        if self.fast_resize is not None and (out := self.fast_resize(img)) is not None:
            return out
        if isinstance(img, torch.Tensor):  # from load_image_fast, not downscaled: the exact Pillow steps
            img = Image.fromarray(img.permute(1, 2, 0).numpy())
        for step in self.steps:
            img = step(img)
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class _FastResizeCrop:
    """``Resize`` (shorter side or exact size) + ``CenterCrop`` as torch uint8 ops, downscales only."""

    def __init__(self, size: int | tuple[int, int], mode: str, crop: tuple[int, int]):
        self.size, self.mode, self.crop = size, mode, crop

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) after the resize, as torchvision computes it."""
        if isinstance(self.size, int):
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.size, int(self.size * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        return self.size

    def __call__(self, img: Any) -> Any:
        """A PIL RGB image or uint8 (3, H, W) tensor -> uint8 (3, crop_h, crop_w), or None."""
        import torch

        is_tensor = isinstance(img, torch.Tensor)
        height, width = img.shape[-2:] if is_tensor else (img.height, img.width)
        new_h, new_w = self.output_size(width, height)
        crop_h, crop_w = self.crop
        if not (is_tensor or img.mode == "RGB") or not (new_w < width and new_h < height) \
                or new_h < crop_h or new_w < crop_w:
            return None  # upscaling or padding: leave it to the exact Pillow steps
        if is_tensor:  # torch's uint8 antialias kernels are fastest on channels_last (0.75 vs 0.89 ms here)
            x = img.unsqueeze(0).contiguous(memory_format=torch.channels_last)
        else:
            x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)  # channels_last
        x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode=self.mode, antialias=True)
        top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))
        return x[0, :, top:top + crop_h, left:left + crop_w].contiguous()


def _fast_resize_crop(steps: list[Any]) -> _FastResizeCrop | None:
    """The torch equivalent of exactly [Resize(size, bilinear|bicubic), CenterCrop], else None."""
    from torchvision import transforms as T

    if len(steps) != 2 or not isinstance(steps[0], T.Resize) or not isinstance(steps[1], T.CenterCrop):
        return None
    resize, crop = steps
    mode = {T.InterpolationMode.BILINEAR: "bilinear", T.InterpolationMode.BICUBIC: "bicubic"}.get(resize.interpolation)
    size = resize.size
    if isinstance(size, (list, tuple)):
        size = int(size[0]) if len(size) == 1 else (int(size[0]), int(size[1]))
    crop_size = tuple(int(v) for v in crop.size)
    if mode is None or resize.max_size is not None or len(crop_size) != 2:
        return None
    return _FastResizeCrop(size, mode, crop_size)
