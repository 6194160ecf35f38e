"""vitcli embed: pre-logits features, .npy + sources / .jsonl outputs, resume, near duplicates, leakage check."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import REPO, make_image, shared
from vitcli.cli.app import app
from vitcli.inference.embed import embed, near_duplicates
from vitcli.inference.predict import PredictOptions

runner = CliRunner()
EXAMPLES = REPO / "examples"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def embed_tiny(tiny_model_dir, *args):
    return invoke("embed", *args, "--model", tiny_model_dir, "--workers", "0")


def photos(folder: Path, n: int, start: int = 0) -> list[Path]:
    return [make_image(folder / f"{i:02d}.png", size=(40, 32), seed=i) for i in range(start, start + n)]


def test_embeddings_are_timms_pre_logits_features_and_a_duplicated_image_gets_the_same_one(tiny_model_dir,
                                                                                           tmp_path):
    import timm
    import torch
    from PIL import Image

    from vitcli.models.resolve import load_model

    a, b = photos(tmp_path / "a", 2)
    copy = tmp_path / "elsewhere" / "copy.png"
    copy.parent.mkdir()
    shutil.copy(a, copy)
    loaded = load_model(str(tiny_model_dir))
    options = PredictOptions(batch_size=2, workers=0, device="cpu", precision="fp32", fast_decode=False)

    got = list(embed(loaded, [str(a), str(b), str(copy)], options))

    assert [r.source for r in got] == [str(a), str(b), str(copy)] and all(r.ok for r in got)
    np.testing.assert_array_equal(got[0].vector, got[2].vector)
    assert not np.allclose(got[0].vector, got[1].vector)
    assert got[0].vector.dtype == np.float32 and np.linalg.norm(got[0].vector) == pytest.approx(1, abs=1e-6)
    # what timm gives: forward_features, then forward_head(pre_logits=True) (not the logits), normalised
    transform = timm.data.create_transform(**loaded.data_config)
    with torch.inference_mode():
        x = transform(Image.open(a).convert("RGB"))[None]
        features = loaded.model.forward_head(loaded.model.forward_features(x), pre_logits=True)[0]
    assert features.shape[0] == loaded.model.num_features != loaded.num_classes
    np.testing.assert_allclose(got[0].vector, (features / features.norm()).numpy(), atol=1e-5)
    raw = list(embed(loaded, [str(a)], options, normalize=False))[0].vector
    np.testing.assert_allclose(raw, features.numpy(), rtol=1e-5, atol=1e-5)


def test_npy_rows_align_with_the_sources_file_and_a_bad_image_gets_no_row(tiny_model_dir, tmp_path):
    images = photos(tmp_path / "p", 4)
    (tmp_path / "p" / "02.png").write_bytes(b"not an image")
    out = tmp_path / "out" / "emb.npy"

    result = embed_tiny(tiny_model_dir, tmp_path / "p", tmp_path / "gone.jpg", "-o", out, "--batch-size", "3")

    assert result.exit_code == 1
    assert "gone.jpg: no such file" in result.stderr and "02.png" in result.stderr
    vectors = np.load(out)
    sources = (tmp_path / "out" / "emb.sources.txt").read_text().splitlines()
    good = [str(p) for p in images if p.name != "02.png"]
    assert sources == good and vectors.shape[0] == 3
    meta = json.loads((tmp_path / "out" / "emb.json").read_text())
    assert meta["model"] == str(tiny_model_dir) and meta["normalized"] is True
    for source, row in zip(sources, vectors, strict=True):  # row i is line i's image, alone
        alone = tmp_path / f"alone{Path(source).stem}.npy"
        assert embed_tiny(tiny_model_dir, source, "-o", alone).exit_code == 0
        np.testing.assert_allclose(np.load(alone)[0], row, atol=1e-6)


@pytest.mark.parametrize("suffix", [".npy", ".jsonl"])
def test_a_run_killed_mid_write_resumes_to_the_uninterrupted_file(tiny_model_dir, tmp_path, suffix):
    photos(tmp_path / "p", 7)
    whole, part = tmp_path / f"whole{suffix}", tmp_path / f"part{suffix}"
    assert embed_tiny(tiny_model_dir, tmp_path / "p", "-o", whole, "-b", "2").exit_code == 0
    assert embed_tiny(tiny_model_dir, tmp_path / "p", "-o", part, "-b", "2").exit_code == 0
    if suffix == ".npy":  # killed in the middle of row 5, its source line not yet written; header says 7
        data = part.read_bytes()
        part.write_bytes(data[: 128 + 4 * 64 * 4 + 100])
        lines = (tmp_path / "part.sources.txt").read_text().splitlines(keepends=True)
        (tmp_path / "part.sources.txt").write_text("".join(lines[:5]))
    else:  # killed in the middle of line 5
        text = part.read_text()
        cut = [i for i, c in enumerate(text) if c == "\n"][3] + 50
        part.write_text(text[:cut])

    rerun = embed_tiny(tiny_model_dir, tmp_path / "p", "-o", part, "-b", "2")

    assert rerun.exit_code == 0, rerun.stderr
    assert "sources already done" in rerun.stderr
    if suffix == ".npy":
        assert part.read_bytes() == whole.read_bytes()
        assert (tmp_path / "part.sources.txt").read_text() == (tmp_path / "whole.sources.txt").read_text()
        assert np.load(part).shape == (7, 64)
    else:
        assert part.read_text() == whole.read_text() and len(part.read_text().splitlines()) == 7


def test_near_duplicates_find_a_planted_copy_across_two_folders_only(tmp_path):
    """The train/val leakage check, with the shipped model on four real photos."""
    train, val = tmp_path / "train", tmp_path / "val"
    for name in ("corgi", "german_shepherd", "grace_hopper"):
        (train / "dogs").mkdir(parents=True, exist_ok=True)
        shutil.copy(EXAMPLES / f"{name}.jpg", train / "dogs" / f"{name}.jpg")
    shutil.copy(EXAMPLES / "corgi.jpg", train / "dogs" / "corgi_again.jpg")  # a pair within train
    (val / "dogs").mkdir(parents=True)
    shutil.copy(EXAMPLES / "samoyed.jpg", val / "dogs" / "samoyed.jpg")
    shutil.copy(EXAMPLES / "grace_hopper.jpg", val / "dogs" / "leaked.jpg")  # the planted leak

    across = invoke("embed", train, val, "--near-duplicates", "0.95", "--json")
    within = invoke("embed", train, "--near-duplicates", "0.95", "--json")

    assert across.exit_code == 0, across.stderr
    pairs = [json.loads(line) for line in across.stdout.splitlines()]
    assert [(Path(p["a"]).name, Path(p["b"]).name) for p in pairs] == [("grace_hopper.jpg", "leaked.jpg")]
    assert pairs[0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert "1 pair(s) at cosine >= 0.95 between" in across.stderr
    assert within.exit_code == 0
    assert [(Path(p["a"]).name, Path(p["b"]).name) for p in map(json.loads, within.stdout.splitlines())] == [
        ("corgi.jpg", "corgi_again.jpg")]


def test_near_duplicates_by_tiles_equal_the_full_similarity_matrix():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((50, 8)).astype(np.float32)
    vectors[37] = vectors[3] * 2  # same direction, another length
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ unit.T
    threshold = 0.6
    expected = {(a, b) for a in range(50) for b in range(a + 1, 50) if sims[a, b] >= threshold}

    got = list(near_duplicates(vectors, threshold, tile=7))

    assert {(p.a, p.b) for p in got} == expected and (3, 37) in expected
    assert [p.a for p in got] == sorted(p.a for p in got)
    groups = (np.arange(50) >= 30).astype(np.int8)
    across = {(p.a, p.b) for p in near_duplicates(vectors, threshold, groups, tile=7)}
    assert across == {(a, b) for a, b in expected if a < 30 <= b}


@pytest.mark.parametrize(("args", "code", "message"), [
    (["IMG", "-o", "emb.txt"], 2, "use a .npy file"),
    (["IMG"], 2, "give --output FILE"),
    (["IMG", "-o", "emb.npy", "--near-duplicates", "1.5"], 2, "--near-duplicates"),
    (["IMG", "GONE", "-o", "emb.npy"], 1, "GONE: no such file"),
])
def test_bad_input(tiny_model_dir, tmp_path, monkeypatch, args, code, message):
    image = make_image(tmp_path / "a.png")
    args = [str(image) if a == "IMG" else str(tmp_path / "GONE") if a == "GONE" else a for a in args]
    monkeypatch.chdir(tmp_path)

    result = embed_tiny(tiny_model_dir, *args)

    assert result.exit_code == code and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_an_onnx_model_and_a_file_of_another_model_are_usage_errors(tiny_model_dir, tmp_path):
    image = make_image(tmp_path / "a.png")
    assert embed_tiny(tiny_model_dir, image, "-o", tmp_path / "emb.npy").exit_code == 0

    onnx = invoke("embed", image, "--model", tmp_path / "m.onnx", "-o", tmp_path / "x.npy")
    other = invoke("embed", image, "-o", tmp_path / "emb.npy")  # the shipped model, into the tiny model's file

    assert onnx.exit_code == 2 and "holds only the logits" in onnx.stderr
    assert other.exit_code == 2 and f"holds embeddings of the model {tiny_model_dir}" in other.stderr


def test_a_second_writer_to_the_same_file_fails_at_once(tiny_model_dir, tmp_path):
    from vitcli.errors import VitcliError
    from vitcli.io.embeddings import open_embeddings

    image = make_image(tmp_path / "a.png")
    held = open_embeddings(tmp_path / "emb.npy", model=str(tiny_model_dir))
    try:
        result = embed_tiny(tiny_model_dir, image, "-o", tmp_path / "emb.npy")
        with pytest.raises(VitcliError, match="being written by another"):
            open_embeddings(tmp_path / "emb.npy", model=str(tiny_model_dir))
    finally:
        held.close()
    assert result.exit_code == 1 and "being written by another" in result.stderr


def test_torchrun_two_cpu_processes_write_the_one_process_file(tiny_model_dir, tmp_path):
    photos(tmp_path / "p", 7)
    assert embed_tiny(tiny_model_dir, tmp_path / "p", "-o", tmp_path / "one.npy", "-b", "2").exit_code == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "vitcli", "embed", str(tmp_path / "p"), "--model", str(tiny_model_dir), "-b", "2",
               "-o", str(tmp_path / "two.npy")]

    run = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})

    assert run.returncode == 0, run.stderr
    assert (tmp_path / "two.sources.txt").read_text() == (tmp_path / "one.sources.txt").read_text()
    np.testing.assert_allclose(np.load(tmp_path / "two.npy"), np.load(tmp_path / "one.npy"), atol=1e-6)


@pytest.mark.slow
def test_five_nearest_neighbours_on_hymenoptera_classify_val_from_train():
    """The default model's embeddings, train as the index and val as queries: 5-NN accuracy >= 0.95."""
    from vitcli.io.embeddings import load_embeddings

    data = shared("hymenoptera")
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"vitcli-knn-{os.getpid()}"
    try:
        for split in ("train", "val"):
            result = invoke("embed", data / split, "-o", out / f"{split}.npy")
            assert result.exit_code == 0, result.stderr
        index, index_sources = load_embeddings(out / "train.npy")
        queries, query_sources = load_embeddings(out / "val.npy")
        label = {"ants": 0, "bees": 1}
        index_labels = np.array([label[Path(s).parent.name] for s in index_sources])
        truth = np.array([label[Path(s).parent.name] for s in query_sources])
        nearest = np.argsort(-(np.asarray(queries) @ np.asarray(index).T), axis=1)[:, :5]  # cosine: unit rows
        votes = index_labels[nearest].mean(axis=1)
        accuracy = float(((votes > 0.5) == truth).mean())
        one_nn = float((index_labels[nearest[:, 0]] == truth).mean())
        print(f"5-NN accuracy {accuracy:.3f}, 1-NN {one_nn:.3f} ({len(truth)} queries, {len(index_labels)} index)")
        assert len(truth) == 153 and len(index_labels) == 245
        assert accuracy >= 0.95
    finally:
        shutil.rmtree(out, ignore_errors=True)
