"""vitcli.charts: PNGs that open, tolerate gaps, grow with the classes, and are written atomically."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitcli.charts import save_confusion_matrix, save_curves


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()  # decodes the whole file: a truncated PNG fails here
        return img.size


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_curves_with_nan_missing_keys_and_csv_strings(tmp_path):
    rows = [
        {"epoch": 1, "train_loss": 1.2, "val_loss": math.nan, "val_top1": 0.41, "val_top5": 0.9, "lr": 1e-4},
        {"epoch": 2, "train_loss": 0.8, "val_loss": 0.7, "val_top1": 0.63},  # no val_top5
        {"epoch": "3", "train_loss": "0.5", "val_loss": "", "val_top1": "0.71", "val_top5": "nan"},  # csv text
    ]
    path = save_curves(rows, tmp_path / "plots" / "curves.png")
    assert path == tmp_path / "plots" / "curves.png"
    width, height = png_size(path)
    assert width > height > 300
    assert leftovers(path.parent) == []


def test_curves_of_no_rows_and_all_nan_still_draw(tmp_path):
    assert png_size(save_curves([], tmp_path / "empty.png"))[0] > 0
    rows = [{"epoch": e, "train_loss": math.nan, "val_loss": math.nan} for e in range(1, 4)]
    assert png_size(save_curves(rows, tmp_path / "nan.png"))[0] > 0


def test_curves_replace_an_existing_file(tmp_path):
    path = tmp_path / "curves.png"
    path.write_bytes(b"old")
    save_curves([{"epoch": 1, "train_loss": 1.0}], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_confusion_matrix_png_from_a_tensor(tmp_path):
    matrix = torch.tensor([[5, 1, 0], [2, 7, 1], [0, 0, 4]])
    path = save_confusion_matrix(matrix, ["cat", "dog", "bird"], tmp_path / "cm.png", title="tiny on test")
    width, height = png_size(path)
    assert width > 500 and height > 500
    assert leftovers(tmp_path) == []


def test_confusion_matrix_grows_with_many_classes(tmp_path):
    rng = np.random.default_rng(0)
    small = save_confusion_matrix(np.eye(3, dtype=int), ["a", "b", "c"], tmp_path / "small.png")
    labels = [f"a rather long class name number {i}" for i in range(60)]  # beyond the annotation limit
    big = save_confusion_matrix(rng.integers(0, 20, (60, 60)), labels, tmp_path / "big.png")
    assert png_size(big)[0] > 3 * png_size(small)[0]


def test_confusion_matrix_of_zeros_and_nested_lists(tmp_path):
    assert png_size(save_confusion_matrix([[0, 0], [0, 0]], ["a", "b"], tmp_path / "zeros.png"))[0] > 0


def test_confusion_matrix_that_does_not_fit_the_labels_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="does not fit 3 labels"):
        save_confusion_matrix(np.zeros((2, 2)), ["a", "b", "c"], tmp_path / "cm.png")
    assert list(tmp_path.iterdir()) == []


def test_importing_plots_does_not_import_matplotlib():
    check = "import sys, vitcli.charts; assert 'matplotlib' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", check], timeout=60).returncode == 0


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The figures the charts draw, rendered, instead of written."""
    import vitcli.charts as charts

    figures: list = []

    def keep(fig, path):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig).draw()
        figures.append(fig)
        return path

    monkeypatch.setattr(charts, "save_figure", keep)
    return figures


def pixel(fig, ax, x: float, y: float) -> tuple[int, int, int]:
    """The RGB of the rendered figure at data point (x, y) of ``ax``."""
    rgba = np.asarray(fig.canvas.buffer_rgba())
    px, py = ax.transData.transform((x, y))
    return tuple(int(v) for v in rgba[rgba.shape[0] - int(py), int(px), :3])


def test_reliability_diagram_draws_each_bin_at_its_confidence_and_accuracy(tmp_path, drawn):
    from vitcli.charts import save_reliability_diagram
    from vitcli.metrics import ReliabilityBin

    bins = [ReliabilityBin(b / 15, (b + 1) / 15, 0, 0.0, 0.0) for b in range(15)]
    bins[6] = ReliabilityBin(6 / 15, 7 / 15, 10, 0.43, 0.9)  # underconfident: right 90% at 0.43
    bins[14] = ReliabilityBin(14 / 15, 1.0, 30, 0.97, 0.2)  # overconfident
    save_reliability_diagram(bins, tmp_path / "r.png", title="m", ece=0.5, temperature=2.0)
    fig = drawn[0]
    ax, hist = fig.axes[:2]
    blue = (72, 120, 207)  # the accuracy bars' colour
    assert pixel(fig, ax, 0.433, 0.5) == pixel(fig, ax, 0.433, 0.85) == blue  # bin 6 reaches 0.9
    assert pixel(fig, ax, 0.433, 0.95) == (255, 255, 255)  # and stops there
    assert pixel(fig, ax, 0.25, 0.5) == (255, 255, 255)  # empty bins draw nothing
    assert pixel(fig, ax, 0.95, 0.1) == blue and pixel(fig, ax, 0.95, 0.3) != blue  # bin 14 stops at 0.2
    assert sorted(t.get_text() for t in hist.texts) == ["10", "30"]  # the counts
    assert "ECE 0.5000" in ax.get_title() and "temperature 2" in ax.get_title()


def test_mistakes_grid_shows_each_image_in_order_with_its_caption(tmp_path, drawn):
    from vitcli.charts import save_mistakes_grid
    from vitcli.evaluate import Mistake

    paths = []
    for name, colour in (("red", (230, 20, 20)), ("blue", (20, 20, 230))):
        paths.append(tmp_path / f"{name}.png")
        Image.new("RGB", (60, 40), colour).save(paths[-1])
    mistakes = [Mistake(str(paths[0]), "green", "red", 0.99, 0.01), Mistake(str(paths[1]), "red", "blue", 0.6, 0.3)]
    save_mistakes_grid(mistakes, tmp_path / "m.png", title="audit")
    fig = drawn[0]
    first, second = fig.axes[:2]
    assert first.get_title(loc="left").splitlines() == ["#1 red.png", "label green (0.01)", "predicted red (0.99)"]
    assert second.get_title(loc="left").startswith("#2 blue.png")
    assert pixel(fig, first, 30, 20)[:1] == (230,) and pixel(fig, second, 30, 20)[2] == 230  # each its own image
