"""vitcli.io.images: loading one image (EXIF, modes, frames, bad files, pixel limits) and URLs."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_image
from vitcli.errors import ImageLoadError
from vitcli.io.images import load_image, to_rgb

# ---------------------------------------------------------------------------- orientation, modes


def _save_with_orientation(img: Image.Image, path: Path, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation tag
    img.save(path, exif=exif)
    return path


def test_exif_orientation_is_applied(tmp_path):
    # a 3x2 PNG with distinct pixels (lossless, so the rotation can be checked pixel by pixel)
    arr = np.arange(3 * 2 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    path = _save_with_orientation(Image.fromarray(arr, "RGB"), tmp_path / "rot.png", 6)

    img = load_image(str(path))

    assert img.mode == "RGB"
    assert img.size == (2, 3)  # orientation 6: the stored 3x2 image is displayed rotated 90 degrees
    np.testing.assert_array_equal(np.asarray(img), np.rot90(arr, k=-1))


def test_exif_orientation_is_applied_to_jpegs(tmp_path):
    src = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    path = _save_with_orientation(src, tmp_path / "rot.jpg", 6)

    assert Image.open(path).size == (64, 48)
    assert load_image(str(path)).size == (48, 64)


def test_grayscale_becomes_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (5, 4), 77).save(path)

    img = load_image(str(path))

    assert img.mode == "RGB"
    assert img.getpixel((2, 2)) == (77, 77, 77)


def test_palette_becomes_rgb(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 200, 100, 50] + [0] * (3 * 254))
    img.putpixel((0, 0), 0)
    path = tmp_path / "palette.png"
    img.save(path)

    rgb = load_image(str(path))

    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (0, 0, 0)
    assert rgb.getpixel((3, 3)) == (200, 100, 50)


def test_palette_transparency_is_composited_onto_white(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 200, 100, 50] + [0] * (3 * 254))
    img.putpixel((0, 0), 0)
    path = tmp_path / "palette_t.png"
    img.save(path, transparency=0)  # palette index 0 (black) is transparent

    rgb = load_image(str(path))

    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((3, 3)) == (200, 100, 50)


def test_rgba_alpha_is_composited_onto_white(tmp_path):
    img = Image.new("RGBA", (3, 1))
    img.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent
    img.putpixel((1, 0), (10, 20, 30, 255))  # opaque
    img.putpixel((2, 0), (0, 0, 0, 128))  # half transparent black
    path = tmp_path / "rgba.png"
    img.save(path)

    rgb = load_image(str(path))

    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (10, 20, 30)
    assert all(abs(c - 127) <= 1 for c in rgb.getpixel((2, 0)))


def test_la_alpha_is_composited_onto_white():
    img = Image.new("LA", (2, 1))
    img.putpixel((0, 0), (0, 0))
    img.putpixel((1, 0), (50, 255))

    rgb = to_rgb(img)

    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (50, 50, 50)


def test_cmyk_becomes_rgb(tmp_path):
    img = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (0, 255, 255, 0))  # magenta + yellow = red
    path = tmp_path / "cmyk.tif"
    img.save(path)
    assert Image.open(path).mode == "CMYK"

    rgb = load_image(str(path))

    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (255, 0, 0)


def test_cmyk_jpeg_loads(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(path)
    assert Image.open(path).mode == "CMYK"

    rgb = load_image(str(path))

    assert rgb.mode == "RGB" and rgb.size == (16, 16)
    assert all(c >= 250 for c in rgb.getpixel((8, 8)))


def test_16bit_png_is_scaled_to_8_bits(tmp_path):
    arr = np.zeros((4, 6), dtype=np.uint16)
    arr[:, :2] = 65535
    arr[:, 2:4] = 32768
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I;16")

    rgb = load_image(str(path))

    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((2, 0)) == (128, 128, 128)
    assert rgb.getpixel((5, 0)) == (0, 0, 0)


def test_dark_16bit_image_is_not_brightened():
    # a 16-bit image whose values are all small is dark, not an 8-bit image
    img = Image.fromarray(np.full((2, 2), 255, dtype=np.uint16))
    assert img.mode.startswith("I;16")

    assert to_rgb(img).getpixel((0, 0)) == (1, 1, 1)


def test_32bit_integer_image_in_8_bit_range_is_kept():
    img = Image.fromarray(np.full((2, 2), 200, dtype=np.int32), "I")

    assert to_rgb(img).getpixel((0, 0)) == (200, 200, 200)


def _two_frame_gif(path: Path) -> Path:
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    blue = Image.new("RGB", (8, 8), (0, 0, 255))
    red.save(path, save_all=True, append_images=[blue], duration=100, loop=0)
    assert Image.open(path).n_frames == 2
    return path


def test_animated_gif_uses_first_frame(tmp_path):
    path = _two_frame_gif(tmp_path / "anim.gif")

    img = load_image(str(path))

    assert img.mode == "RGB" and img.size == (8, 8)
    assert img.getpixel((4, 4)) == (255, 0, 0)


def test_to_rgb_rewinds_an_animation_to_its_first_frame(tmp_path):
    with Image.open(_two_frame_gif(tmp_path / "anim.gif")) as img:
        img.seek(1)
        assert img.convert("RGB").getpixel((4, 4)) == (0, 0, 255)

        assert to_rgb(img).getpixel((4, 4)) == (255, 0, 0)


@pytest.mark.parametrize("suffix", [".webp", ".png"], ids=["animated-webp", "apng"])
def test_animated_webp_and_apng_use_their_first_frame(tmp_path, suffix):
    path = tmp_path / f"anim{suffix}"
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0,
                   **({"lossless": True} if suffix == ".webp" else {}))
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 2 and check.format in ("WEBP", "PNG")

    img = load_image(str(path))

    assert img.mode == "RGB" and img.size == (8, 8)
    assert img.getpixel((4, 4)) == (255, 0, 0)


def test_rgb_jpeg_loads_unchanged(tmp_path):
    path = make_image(tmp_path / "a.png", size=(20, 10))

    img = load_image(str(path))

    np.testing.assert_array_equal(np.asarray(img), np.asarray(Image.open(path).convert("RGB")))


# ------------------------------------------------------------------------------------ bad files


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="no such file") as info:
        load_image(str(tmp_path / "missing.jpg"))
    assert info.value.source == str(tmp_path / "missing.jpg")


def test_folder_is_not_a_file(tmp_path):
    with pytest.raises(ImageLoadError, match="not a file"):
        load_image(str(tmp_path))


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")

    with pytest.raises(ImageLoadError, match=r"file is empty \(0 bytes\)"):
        load_image(str(path))


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "fake.jpg"
    path.write_text("this is not a JPEG\n" * 10)

    with pytest.raises(ImageLoadError, match="not an image Pillow can read"):
        load_image(str(path))


@pytest.mark.parametrize("draft", [None, (300, 300)])
def test_truncated_jpeg(tmp_path, draft):
    full = make_image(tmp_path / "full.jpg", size=(128, 96)).read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(full[: len(full) // 2])

    with pytest.raises(ImageLoadError, match="corrupt or truncated image") as info:
        load_image(str(path), draft)
    assert info.value.source == str(path)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own, before vitcli refuses
@pytest.mark.parametrize("size", [(64, 48), (40, 40)], ids=["over-2x-limit", "between-1x-and-2x"])
def test_decompression_bomb_is_refused(tmp_path, monkeypatch, size):
    path = make_image(tmp_path / "big.png", size=size)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)

    with pytest.raises(ImageLoadError, match="decompression-bomb limit"):
        load_image(str(path))


def test_decompression_bomb_at_pillows_default_limit(tmp_path):
    # a PNG whose header claims 30000 x 30000 pixels (900 Mpx, over 2x the default limit); Pillow
    # refuses it from the header alone, before any decoding
    assert Image.MAX_IMAGE_PIXELS is not None and 30000 * 30000 > 2 * Image.MAX_IMAGE_PIXELS

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))

    with pytest.raises(ImageLoadError, match="decompression-bomb limit"):
        load_image(str(path))


# ------------------------------------------------------------------------------------------ URLs


@pytest.fixture(scope="module")
def image_server():
    """A local HTTP server (127.0.0.1 only) with an image, a 404, an oversized body and a trickle."""
    import http.server
    import io
    import threading
    import time

    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 200, 30)).save(buffer, format="PNG")
    png = buffer.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path == "/img.png":
                self._send(png, length=len(png))
            elif self.path == "/declared-big":
                self._send(b"x" * 10, length=10_000_000)  # Content-Length says 10 MB
            elif self.path == "/undeclared-big":
                self._send(b"x" * 300_000, length=None)  # no Content-Length, more than the limit
            elif self.path == "/trickle":
                self.send_response(200)
                self.end_headers()
                try:
                    for _ in range(100):  # one byte every 0.1 s: every read is quick, the whole is not
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.1)
                except OSError:
                    pass
            else:
                self.send_error(404, "Not Found")

        def _send(self, body: bytes, length: int | None) -> None:
            self.send_response(200)
            if length is not None:
                self.send_header("Content-Length", str(length))
            self.end_headers()
            try:
                self.wfile.write(body)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


def test_url_image_loads(image_server, no_proxy):
    img = load_image(f"{image_server}/img.png")

    assert img.size == (32, 24) and img.getpixel((5, 5)) == (10, 200, 30)


def test_url_http_error_names_the_status(image_server, no_proxy):
    with pytest.raises(ImageLoadError, match="could not download .*Not Found") as info:
        load_image(f"{image_server}/missing.jpg")
    assert info.value.source == f"{image_server}/missing.jpg" and "\n" not in str(info.value)


@pytest.mark.parametrize("path", ["/declared-big", "/undeclared-big"])
def test_url_size_limit_with_and_without_content_length(image_server, no_proxy, path):
    from vitcli.io.images import fetch_url

    with pytest.raises(ImageLoadError, match="over the 0 MiB limit"):
        fetch_url(f"{image_server}{path}", max_bytes=100_000)


def test_url_timeout_is_a_deadline_for_the_whole_download(image_server, no_proxy):
    import time

    from vitcli.io.images import fetch_url

    start = time.monotonic()
    with pytest.raises(ImageLoadError, match="took longer than 1 s"):
        fetch_url(f"{image_server}/trickle", timeout=1.0)
    assert time.monotonic() - start < 2.5  # a per-read timeout would wait for all 100 bytes (10 s)
