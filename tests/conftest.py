"""Shared fixtures: tiny timm models saved as model folders, generated images, the shared data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VITCLI_SHARED_DATA", REPO.parent / "shared" / "data"))
DEIT_WEIGHTS = SHARED_DATA / "weights" / "deit_tiny_patch16_224.safetensors"
TINY_LABELS = ["cat", "dog", "bird"]


def error_line(result) -> str:
    """The one ``Error: ...`` line a failed command printed on stderr (and nothing else)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def predict_without_torch(argv: list[str]):
    """``vitcli predict ARGV --json`` in a fresh interpreter; its last stderr line is `EXIT code HEAVY modules`:
    the torch-free engines (ONNX Runtime, OpenVINO) must import no torch, timm or torchvision."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from vitcli.cli.app import main\n"
        f"sys.argv = ['vitcli', 'predict', *{argv!r}, '--json']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision'))\n"
        "print('EXIT', code, 'HEAVY', ','.join(heavy), file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def shared(*parts: str) -> Path:
    """A path under ../shared/data, skipping the test cleanly when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


def make_image(path: Path, size: tuple[int, int] = (64, 48), mode: str = "RGB", seed: int = 0) -> Path:
    """A random-noise image in any Pillow mode, saved by extension."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """timm's test_vit (3 classes, random weights) saved as a model folder with label names."""
    import timm
    import torch

    from vitcli.models.folders import save_model_folder

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=len(TINY_LABELS))
    return save_model_folder(model.eval(), tmp_path_factory.mktemp("models") / "tiny", TINY_LABELS)


@pytest.fixture
def jpeg_drafts(monkeypatch) -> list[tuple[int, int]]:
    """The sizes of the JPEGs Pillow is asked to decode at a reduced DCT scale (``draft``), in order."""
    from PIL import JpegImagePlugin

    drafted: list[tuple[int, int]] = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real_draft(self, mode, size)
        drafted.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return drafted


@pytest.fixture
def images(tmp_path) -> list[Path]:
    """Three small RGB JPEG/PNG images."""
    return [make_image(tmp_path / "imgs" / f"img{i}.{ext}", seed=i) for i, ext in enumerate(["jpg", "png", "jpg"])]


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """One compiled-model cache for the whole session: each tiny model is converted to OpenVINO once."""
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path, monkeypatch, session_cache):
    """Every test sees an empty weights store, no hub and the session's cache (never the user's).

    Tests run torch unless they ask for another --backend: converting every tiny model a test
    builds to OpenVINO would cost seconds each (the engine's own tests pass --backend auto/openvino).
    """
    monkeypatch.setenv("VITCLI_WEIGHTS", str(tmp_path / "store"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(session_cache))
    monkeypatch.setenv("VITCLI_BACKEND", "torch")


@pytest.fixture
def no_figures(monkeypatch):
    """matplotlib takes half the time of a tiny fit(); only the tests that check the PNGs draw them."""
    from vitcli.finetune import rundir

    monkeypatch.setattr(rundir, "write_figures", lambda *args: None)


@pytest.fixture(scope="module")
def source_vit():
    """test_vit with its default 1000-class head and seeded random weights."""
    import timm
    import torch

    torch.manual_seed(1)
    return timm.create_model("test_vit", pretrained=False).eval()


@pytest.fixture(scope="module")
def batch():
    """Two random 160x160 images (test_vit's input size)."""
    import torch

    return torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    """A hub endpoint that refuses connections and an empty Hugging Face cache, online or not."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(autouse=True)
def _restore_sigchld():
    """torch's DataLoader leaves its SIGCHLD handler in this process; once OpenVINO has run here too, a
    later child's exit can crash pytest with SIGSEGV (seen in the previous session): put it back."""
    import signal

    saved = signal.getsignal(signal.SIGCHLD)
    yield
    if signal.getsignal(signal.SIGCHLD) is not saved:
        signal.signal(signal.SIGCHLD, saved if saved is not None else signal.SIG_DFL)
