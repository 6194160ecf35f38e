"""Loading one image as 8-bit RGB, robustly, with Pillow (and NumPy) only: no torch at import, so the
torch-free ONNX path (``vitcli.inference.onnx_engine``) uses it too.

Image rules (documented in the README):
  * EXIF orientation is applied before anything else.
  * Animated images (GIF, WebP, APNG) use their first frame.
  * Transparency (RGBA, LA, P with a transparent colour) is composited onto a white background.
  * 16-bit images are scaled to 8 bits by their type's range; 32-bit integer and float images by
    their own range (float values in 0..1 as 0..255); NaN or infinite values are refused. CMYK,
    YCbCr, grayscale and palette images are converted to RGB.
  * Images over Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) are refused, and so
    are images longer than ``MAX_ASPECT`` times their width (or wider than that times their height),
    from their header, before any pixel is decoded: resized to a model's input such a strip grows to
    gigabytes (a 3 KB 30000x1 PNG to 8 GB), however few pixels it has.
  * URLs: a size limit and one deadline for the whole download; proxies from the environment.
"""

from __future__ import annotations

import functools
import io
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vitcli.errors import ImageLoadError, first_line

MAX_ASPECT = 32  # longest side / shortest side: panoramas (4:1, 10:1) pass, strips that resize to GBs do not
URL_MAX_BYTES = 50 * 1024 * 1024
URL_TIMEOUT_S = 15.0  # seconds for the whole download
URL_CHUNK_BYTES = 64 * 1024


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def fetch_url(url: str, max_bytes: int = URL_MAX_BYTES, timeout: float = URL_TIMEOUT_S) -> bytes:
    """Download an image with a size limit and one deadline for the whole download.

    ``timeout`` bounds the connection and every read, and the download as a whole: a server that
    trickles bytes is cut off when the deadline passes. Proxies come from HTTP(S)_PROXY/NO_PROXY.
    """
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"User-Agent": "vitcli"})
    chunks: list[bytes] = []
    size = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise ImageLoadError(url, f"download is {int(length) / 2**20:.0f} MiB, over the "
                                     f"{max_bytes / 2**20:.0f} MiB limit")
            while size <= max_bytes:
                if time.monotonic() > deadline:
                    raise ImageLoadError(url, f"download took longer than {timeout:g} s; check the URL "
                                         "and your connection, or download the file first")
                chunk = response.read1(URL_CHUNK_BYTES)  # what has arrived (<= a chunk): the deadline is checked often
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except ImageLoadError:
        raise
    except Exception as e:  # URLError, HTTPError, timeout, ...
        raise ImageLoadError(url, f"could not download ({first_line(getattr(e, 'reason', e))}); "
                             "check the URL and your connection") from e
    if size > max_bytes:
        raise ImageLoadError(url, f"download is over the {max_bytes / 2**20:.0f} MiB limit")
    return b"".join(chunks)


def load_image(source: str, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Open one image as 8-bit RGB, applying the module's rules, or raise ImageLoadError.

    Args:
        source: a path or an http(s) URL.
        draft_size: for JPEGs, let libjpeg decode at a reduced scale that still covers this
            (width, height); much faster for large photos (see docs/predict.md, "Speed").
    """
    return _load(source, draft_size, tensor_ok=False)


def load_image_fast(source: str, draft_size: tuple[int, int] | None = None) -> Any:
    """``load_image``, except that an RGB or grayscale JPEG that the draft would not shrink comes
    back as a uint8 (3, H, W) tensor decoded by torchvision: the same libjpeg-turbo decode, EXIF
    orientation and pixels, straight into a tensor, about 25% faster than through Pillow."""
    return _load(source, draft_size, tensor_ok=True)


def _load(source: str, draft_size: tuple[int, int] | None, tensor_ok: bool) -> Any:
    if is_url(source):
        fp: Any = io.BytesIO(fetch_url(source))
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageLoadError(source, "no such file" if not path.exists() else "not a file")
        if path.stat().st_size == 0:
            raise ImageLoadError(source, "file is empty (0 bytes)")
        fp = path
    try:
        with Image.open(fp) as img:  # Pillow raises DecompressionBombError over twice its pixel limit
            _refuse_over_pixel_limit(img.size)  # and only warns between 1x and 2x: refuse those too
            _refuse_extreme_aspect(img.size)
            if (tensor_ok and img.format == "JPEG" and img.mode in ("RGB", "L")
                    and not _draft_shrinks(img.size, draft_size)
                    and (tensor := _decode_jpeg_tensor(fp)) is not None):
                return tensor
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", draft_size)
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(source, f"image is over Pillow's decompression-bomb limit ({e}); "
                             "raise PIL.Image.MAX_IMAGE_PIXELS only for files you trust") from e
    except UnusableImage as e:
        raise ImageLoadError(source, str(e)) from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(source, "not an image Pillow can read") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated data, broken headers
        raise ImageLoadError(source, f"corrupt or truncated image ({str(e).strip() or type(e).__name__})") from e


def _refuse_over_pixel_limit(size: tuple[int, int]) -> None:
    """Raise what Pillow raises over 2x ``MAX_IMAGE_PIXELS`` for anything over 1x. (Not a
    ``warnings.catch_warnings`` block turning Pillow's warning into an error: images load in
    several threads at once, and ``catch_warnings`` is not thread-safe.)"""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > limit:
        raise Image.DecompressionBombError(f"{size[0] * size[1]} pixels, limit {limit}")


class UnusableImage(ValueError):
    """An image that decodes but cannot be used as it is (the reason says why)."""


def _refuse_extreme_aspect(size: tuple[int, int]) -> None:
    width, height = size
    if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
        raise UnusableImage(f"image is {width}x{height}, longer than {MAX_ASPECT} times its width; resized to the "
                            "model's input it would take far more memory than it is worth: crop it into parts first")


def _draft_shrinks(size: tuple[int, int], draft_size: tuple[int, int] | None) -> bool:
    """Whether Pillow's JPEG draft would decode at 1/2, 1/4 or 1/8 scale (its own rule)."""
    return draft_size is not None and min(size[0] // draft_size[0], size[1] // draft_size[1]) >= 2


@functools.cache
def _quiet_decode_jpeg() -> None:
    """Silence torchvision's decode_jpeg deprecation once per process (a global filter, not a
    ``catch_warnings`` block: images load in several threads at once)."""
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)


def _decode_jpeg_tensor(fp: Any) -> Any:
    """A JPEG file or buffer -> uint8 (3, H, W) RGB tensor with EXIF orientation applied, or None
    when torchvision cannot decode it (then Pillow tries, and words any error the usual way)."""
    import torch

    try:  # deprecated in torchvision 0.29 in favour of TorchCodec; Pillow takes over once it is gone
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    _quiet_decode_jpeg()
    try:
        data = torch.from_numpy(np.fromfile(fp, dtype=np.uint8) if isinstance(fp, Path)
                                else np.frombuffer(fp.getvalue(), dtype=np.uint8).copy())
        return decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError:  # truncated or corrupt data
        return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB (first frame; alpha onto white; high bit depths scaled to 8 bits)."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise UnusableImage("image holds NaN or infinite values; there is no brightness to scale them to")
        low, high = float(arr.min()), float(arr.max())
        if img.mode.startswith("I;16") or (img.mode == "I" and low >= 0 and high <= 65535):
            peak = 65535.0 if img.mode.startswith("I;16") or high > 255 else 255.0  # 16-bit PNGs open as "I"
            arr = arr * (255.0 / peak)
        elif img.mode == "F" and low >= 0 and high <= 1:  # the usual range of float images
            arr = arr * 255.0
        elif img.mode == "I" and low >= 0 and high <= 255:
            pass
        else:  # int32 beyond 16 bits, floats in other units: the image's own range
            arr = (arr - low) * (255.0 / (high - low)) if high > low else np.zeros_like(arr)
        arr = np.clip(arr, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
