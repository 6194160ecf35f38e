"""vitcli.inference.predict: batched prediction records, options, error isolation, parity with plain timm."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DEIT_WEIGHTS, TINY_LABELS, make_image, shared
from vitcli.errors import UsageError
from vitcli.inference.predict import Prediction, PredictOptions, predict
from vitcli.models.resolve import LoadedModel, load_model

FAST = PredictOptions(workers=0)  # in-process decoding: the quickest for a handful of images


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> LoadedModel:
    return load_model(str(tiny_model_dir))


def run(loaded: LoadedModel, sources, **options) -> list[Prediction]:
    return list(predict(loaded, [str(s) for s in sources], PredictOptions(**{"workers": 0, **options})))


def probs_by_index(prediction: Prediction, num_classes: int) -> torch.Tensor:
    """The full probability vector of a prediction made with top_k >= num_classes."""
    assert len(prediction.top) == num_classes
    probs = torch.zeros(num_classes, dtype=torch.float64)
    for label in prediction.top:
        probs[label.index] = label.prob
    return probs


# --------------------------------------------------------------------------------------- records


def test_one_prediction_per_source_in_order_with_top_k(tiny, images):
    results = run(tiny, images, top_k=2)

    assert [r.source for r in results] == [str(p) for p in images]
    for r in results:
        assert r.ok and r.error is None
        assert [label.rank for label in r.top] == [1, 2]
        assert all(label.label == TINY_LABELS[label.index] for label in r.top)
        probs = [label.prob for label in r.top]
        assert probs == sorted(probs, reverse=True)
        assert 0 < sum(probs) <= 1 + 1e-6


def test_top_k_is_capped_at_the_number_of_classes(tiny, images):
    results = run(tiny, images, top_k=10)

    for r in results:
        assert sorted(label.index for label in r.top) == [0, 1, 2]
        assert sum(label.prob for label in r.top) == pytest.approx(1.0, abs=1e-5)


def test_invalid_options_are_usage_errors(tiny, images):
    with pytest.raises(UsageError, match="--top-k"):
        run(tiny, images, top_k=0)
    with pytest.raises(UsageError, match="--batch-size"):
        run(tiny, images, batch_size=0)
    with pytest.raises(UsageError, match="fp16 needs a GPU"):
        run(tiny, images, device="cpu", precision="fp16")


def test_bad_files_become_errors_and_batch_order_is_kept(tiny, tmp_path):
    goods = [make_image(tmp_path / f"good{i}.png", seed=10 + i) for i in range(5)]
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    fake = tmp_path / "fake.jpg"
    fake.write_text("not an image")
    # bad files in the middle of batches of 3: [g0 empty g1] [g2 g3 fake] [g4 missing]
    sources = [goods[0], empty, goods[1], goods[2], goods[3], fake, goods[4], tmp_path / "missing.png"]

    results = run(tiny, sources, batch_size=3, top_k=3)

    assert [r.source for r in results] == [str(s) for s in sources]
    assert [r.ok for r in results] == [True, False, True, True, True, False, True, False]
    assert "empty" in results[1].error and "not an image" in results[5].error
    assert "no such file" in results[7].error
    assert all(r.top == [] for r in results if not r.ok)
    alone = {r.source: r for r in run(tiny, goods, batch_size=1, top_k=3)}
    for r in results:
        if r.ok:
            assert [x.index for x in r.top] == [x.index for x in alone[r.source].top]
            assert [x.prob for x in r.top] == pytest.approx([x.prob for x in alone[r.source].top], abs=1e-6)


def test_a_batch_of_only_bad_files(tiny, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("x")

    results = run(tiny, [bad, bad], batch_size=2)

    assert [r.ok for r in results] == [False, False]


def test_on_batch_reports_progress(tiny, images):
    done: list[int] = []

    list(predict(tiny, [str(p) for p in images], PredictOptions(workers=0, batch_size=2), on_batch=done.append))

    assert done == [2, 3]


@pytest.mark.parametrize("workers", [2, 3])
def test_cpu_streams_give_identical_results_in_order(tiny, tmp_path, workers):
    # 300x240 JPEGs take the fast path (torchvision decode, torch resize) inside the stream threads
    sources = [make_image(tmp_path / f"w{i}.jpg", size=(300, 240), seed=i) for i in range(7)]
    bad = tmp_path / "bad.jpg"
    bad.write_text("x")
    sources.insert(3, bad)

    inline = run(tiny, sources, batch_size=3, workers=0, top_k=3)
    threads = run(tiny, sources, batch_size=3, workers=workers, top_k=3)

    assert [r.source for r in threads] == [str(s) for s in sources]
    assert threads == inline  # same order, same errors, same probabilities to the last bit
    assert [r.ok for r in threads] == [True, True, True, False, True, True, True, True]


def test_abandoning_predict_midway_restores_torch_threads(tiny, tmp_path):
    sources = [str(make_image(tmp_path / f"a{i}.png", size=(40, 40), seed=i)) for i in range(8)]
    threads = torch.get_num_threads()

    results = predict(tiny, sources, PredictOptions(batch_size=2, workers=2, device="cpu"))
    first = next(results)
    results.close()

    assert first.ok and torch.get_num_threads() == threads


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own, before vitcli refuses
def test_pixel_limit_holds_in_decoding_threads_and_leaves_warning_filters_alone(tiny, tmp_path, monkeypatch):
    import PIL.Image

    def filters() -> list:  # vitcli may add one filter, once, for torchvision's decode_jpeg deprecation
        return [f for f in warnings.filters if not (f[1] is not None and "TorchVision" in f[1].pattern)]

    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 50_000)
    sources = [make_image(tmp_path / f"s{i}.jpg", size=(200, 200), seed=i) for i in range(6)]
    sources[2] = make_image(tmp_path / "over.jpg", size=(240, 240))  # 57,600 px: between 1x and 2x the limit
    before = filters()

    results = run(tiny, sources, batch_size=2, workers=3)  # 3 streams decoding at once

    assert [r.ok for r in results] == [True, True, False, True, True, True]
    assert "decompression-bomb limit" in results[2].error
    assert filters() == before


def test_tta_changes_probabilities_but_they_still_sum_to_one(tiny, images):
    plain = run(tiny, images, top_k=3)
    tta = run(tiny, images, top_k=3, tta=True)

    differences = []
    for a, b in zip(plain, tta, strict=True):
        pa, pb = probs_by_index(a, 3), probs_by_index(b, 3)
        assert float(pb.sum()) == pytest.approx(1.0, abs=1e-5)
        differences.append(float((pa - pb).abs().max()))
    assert max(differences) > 1e-4


def test_bf16_on_cpu_gives_valid_probabilities(tiny, images):
    fp32 = run(tiny, images, top_k=3)
    bf16 = run(tiny, images, top_k=3, precision="bf16", device="cpu")

    for a, b in zip(fp32, bf16, strict=True):
        assert b.ok
        pb = probs_by_index(b, 3)
        assert float(pb.sum()) == pytest.approx(1.0, abs=1e-3)
        assert torch.all((pb >= 0) & (pb <= 1))
        assert float((probs_by_index(a, 3) - pb).abs().max()) < 0.1  # bf16 has ~3 significant digits


@pytest.mark.parametrize("cpu, runs", [("amx-xeon", "bf16"), ("zen4", "bf16"), ("icelake", "fp32"), ("avx2", "fp32")])
def test_auto_precision_runs_bf16_only_where_torch_gains_from_it(tiny, images, monkeypatch, tmp_path, cpu, runs):
    from _cpus import forget_cpu, use_cpu

    fp32, bf16 = run(tiny, images, top_k=3, precision="fp32"), run(tiny, images, top_k=3, precision="bf16")
    assert fp32 != bf16  # the two are told apart by their probabilities
    use_cpu(monkeypatch, tmp_path, cpu)
    try:
        auto = run(tiny, images, top_k=3, device="cpu")  # the default precision is auto
    finally:
        forget_cpu()
    assert auto == {"fp32": fp32, "bf16": bf16}[runs]


def test_fast_decode_leaves_images_smaller_than_the_resize_alone(tiny, images):
    # the draft never decodes below the resize target, and these 64x48 images are smaller than it
    assert run(tiny, images, top_k=3) == run(tiny, images, top_k=3, fast_decode=False)


def test_fast_decode_runs_on_large_photos_and_stays_close_to_exact(tiny, tmp_path, monkeypatch):
    import timm
    from PIL import Image

    from vitcli.io import transforms as data

    big = []
    for i in range(3):  # smooth 1024x768 photos, far larger than the 160-pixel model input
        y, x = np.mgrid[0:768, 0:1024]
        arr = np.stack([(x * (i + 1)) % 256, (y // 3) % 256, ((x + y) // 5) % 256], axis=-1).astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / f"big{i}.jpg", quality=90)
        big.append(tmp_path / f"big{i}.jpg")
    took_fast_path = []
    original = data._FastResizeCrop.__call__

    def spy(self, img):
        out = original(self, img)
        took_fast_path.append(out is not None)
        return out

    monkeypatch.setattr(data._FastResizeCrop, "__call__", spy)
    fast = run(tiny, big, top_k=3, precision="fp32")  # fp32: compared with timm to the last bit below
    exact = run(tiny, big, top_k=3, fast_decode=False, precision="fp32")

    assert took_fast_path == [True, True, True]  # draft decode + torch resize ran for every photo
    for a, b in zip(fast, exact, strict=True):
        assert float((probs_by_index(a, 3) - probs_by_index(b, 3)).abs().max()) < 0.02
    # and the exact path is timm's own eval transform, to the last bit
    transform = timm.data.create_transform(**tiny.data_config, is_training=False)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in big])
    with torch.inference_mode():
        reference = tiny.model(x).softmax(dim=1).double()
    for r, probs in zip(exact, reference, strict=True):
        torch.testing.assert_close(probs_by_index(r, 3), probs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_any_timm_classifier_predicts(tmp_path, images, name):
    import timm

    from vitcli.models.folders import save_model_folder

    torch.manual_seed(0)
    folder = save_model_folder(timm.create_model(name, num_classes=3), tmp_path / name, ["a", "b", "c"])
    loaded = load_model(str(folder))

    results = run(loaded, images, top_k=3)

    assert loaded.arch == name
    assert all(r.ok and {x.label for x in r.top} == {"a", "b", "c"} for r in results)


def test_a_new_resolution_is_fed_at_that_resolution(images):
    loaded = load_model("test_vit", pretrained=False, num_classes=3, img_size=96, dynamic_img_size=False)

    results = run(loaded, images)

    assert all(r.ok for r in results)


# ----------------------------------------------------------------------------- parity with timm


def labelled_images() -> list[Path]:
    folder = shared("images")
    rows = [line.split("\t") for line in (folder / "LABELS.tsv").read_text().splitlines()[1:] if line]
    rows += [line.split("\t") for line in (folder / "LABELS_AMBIGUOUS.tsv").read_text().splitlines()[1:] if line]
    return [folder / row[0] for row in rows]


@pytest.fixture(scope="module")
def deit() -> LoadedModel:
    return load_model()  # the shipped default model; the reference below reads the official weights file


@pytest.fixture(scope="module")
def reference_probs(deit) -> dict[str, torch.Tensor]:
    """Plain timm: the same weights, timm's own eval transform, PIL's RGB conversion, one forward."""
    import timm
    from PIL import Image

    model = timm.create_model("deit_tiny_patch16_224", pretrained=True,
                              pretrained_cfg_overlay={"file": str(shared("weights", DEIT_WEIGHTS.name))}).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    paths = labelled_images()
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.inference_mode():
        probs = model(x).softmax(dim=1)
    return {str(p): probs[i] for i, p in enumerate(paths)}


def max_prob_difference(results: list[Prediction], reference: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for r in results:
        assert r.ok, r.error
        probs = probs_by_index(r, 1000).float()
        worst = max(worst, float((probs - reference[r.source]).abs().max()))
    return worst


@pytest.mark.slow
def test_exact_decode_matches_plain_timm_to_1e_5(deit, reference_probs):
    results = list(predict(deit, [str(p) for p in labelled_images()], PredictOptions(top_k=1000, precision="fp32",
                                                                                    fast_decode=False)))

    worst = max_prob_difference(results, reference_probs)
    print(f"exact decode: max abs prob difference vs plain timm = {worst:.3g}")
    assert worst < 1e-5


@pytest.mark.slow
def test_fast_decode_keeps_every_top_1(deit, reference_probs):
    results = list(predict(deit, [str(p) for p in labelled_images()], PredictOptions(top_k=1000, precision="fp32")))

    for r in results:
        assert r.top[0].index == int(reference_probs[r.source].argmax()), r.source
    worst = max_prob_difference(results, reference_probs)
    print(f"fast decode: max abs prob difference vs plain timm = {worst:.3g}")
    assert worst < 0.1


# ------------------------------------------------------------------------------------ streaming


@pytest.mark.parametrize("workers", [0, 2])
def test_records_leave_while_the_sources_are_still_being_read(tiny, tmp_path, workers):
    photo = str(make_image(tmp_path / "p.png", size=(16, 16)))
    pulled = 0

    def endless():  # a million-image list: never materialised
        nonlocal pulled
        for _ in range(1_000_000):
            pulled += 1
            yield photo

    records = predict(tiny, endless(), PredictOptions(batch_size=4, workers=workers, top_k=1))
    first = [next(records) for _ in range(10)]
    records.close()

    assert all(r.ok and r.source == photo for r in first)
    assert pulled <= 4 * (2 * max(workers, 1) + 2) + 4  # a few batches ahead, not the whole list


def test_input_problems_keep_their_place_among_streamed_records():
    from vitcli.inference.predict import with_input_problems
    from vitcli.io.inputs import InputProblem

    items = [InputProblem("gone0", "x"), "a", InputProblem("gone1", "x"), InputProblem("gone2", "x"), "b", "c",
             InputProblem("gone3", "x")]

    records = with_input_problems(items, lambda sources: (Prediction(s) for s in sources))

    assert [r.source for r in records] == ["gone0", "a", "gone1", "gone2", "b", "c", "gone3"]
