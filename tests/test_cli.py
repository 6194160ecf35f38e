"""The vitcli command line: exit codes, stdout/stderr separation, output schemas, real-data accuracy."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO, TINY_LABELS, make_image, shared
from vitcli import __version__
from vitcli.cli.app import app

runner = CliRunner()


def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def predict_tiny(tiny_model_dir: Path, *args, input: str | None = None):
    return invoke("predict", *args, "--model", tiny_model_dir, "--workers", "0", input=input)


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def error_lines(stderr: str) -> list[str]:
    lines = stderr.splitlines()
    assert all(line.startswith("Error: ") for line in lines), stderr
    return lines


# ----------------------------------------------------------------------------- help and version


def test_version():
    result = invoke("--version")

    assert result.exit_code == 0
    assert result.stdout.strip() == f"vitcli {__version__}"


def test_help_lists_the_commands():
    result = invoke("--help")

    assert result.exit_code == 0
    assert "predict" in result.stdout and "weights" in result.stdout


def test_predict_help_shows_an_example_and_the_options():
    result = invoke("predict", "--help")

    assert result.exit_code == 0
    for text in ("Example: vitcli predict", "--model", "--weights", "--top-k", "--json", "--csv",
                 "--files-from", "--exact-decode", "--tta", "--precision"):
        assert text in result.stdout


def test_python_m_vitcli_help_in_a_subprocess():
    result = subprocess.run([sys.executable, "-m", "vitcli", "--help"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "COLUMNS": "120"})

    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and "predict" in result.stdout
    assert result.stderr == ""


def test_the_cli_app_imports_neither_torch_nor_timm():
    code = ("import sys, vitcli.cli.app; "
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm'))[:5]")

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------ happy path


EXAMPLES = {"corgi.jpg": {263, 264}, "german_shepherd.jpg": {235}, "grace_hopper.jpg": {652}, "samoyed.jpg": {258}}


def test_the_readme_first_command_runs_offline_from_anywhere(tmp_path, monkeypatch):
    """`vitcli predict examples/`: the shipped default model, no --model, no network, another directory."""
    monkeypatch.chdir(tmp_path)

    result = invoke("predict", REPO / "examples", "--json", "--top-k", "1")

    assert result.exit_code == 0, result.stderr
    top1 = {Path(r["source"]).name: r["predictions"][0]["index"] for r in json_lines(result.stdout)}
    assert set(top1) == set(EXAMPLES) == {p.name for p in (REPO / "examples").glob("*.jpg")}
    assert all(top1[name] in EXAMPLES[name] for name in EXAMPLES), top1


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["table", "json"])
def test_inputs_that_name_no_image_fail_before_any_model_loads(tmp_path, monkeypatch, json_flag):
    import timm

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(timm, "create_model", no_model)
    (tmp_path / "empty").mkdir()

    result = invoke("predict", tmp_path / "gone.jpg", tmp_path / "empty", *json_flag)

    assert result.exit_code == 1
    assert error_lines(result.stderr) == [f"Error: {tmp_path / 'gone.jpg'}: no such file or directory",
                                          f"Error: {tmp_path / 'empty'}: folder has no images (.bmp, .gif, .jfif, "
                                          ".jpeg, .jpg, .pbm, ...)"]
    if json_flag:
        assert [(r["source"], r["predictions"]) for r in json_lines(result.stdout)] == [
            (str(tmp_path / "gone.jpg"), []), (str(tmp_path / "empty"), [])]
    else:
        assert result.stdout == ""


def test_table_output(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image(Path("a.jpg"))
    make_image(Path("b.png"), seed=1)

    result = predict_tiny(tiny_model_dir, "a.jpg", "b.png", "--top-k", "2")

    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert "a.jpg" in result.stdout and "b.png" in result.stdout
    assert sum(result.stdout.count(label) for label in TINY_LABELS) == 4  # two labels per image


def test_json_lines_schema(tiny_model_dir, images):
    result = predict_tiny(tiny_model_dir, images[0].parent, "--json", "--top-k", "2")

    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    records = json_lines(result.stdout)
    assert [r["source"] for r in records] == sorted(str(p) for p in images)
    for record in records:
        assert set(record) == {"source", "predictions", "error"}
        assert record["error"] is None
        predictions = record["predictions"]
        assert len(predictions) == 2
        assert all(set(p) == {"rank", "index", "label", "prob"} for p in predictions)
        assert [p["rank"] for p in predictions] == [1, 2]
        assert all(p["label"] == TINY_LABELS[p["index"]] for p in predictions)
        probs = [p["prob"] for p in predictions]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


class WriteSpy:
    """A file stream that keeps each chunk written to it and, at each flush, what the file on disk holds."""

    def __init__(self, stream, path: Path):
        self.stream, self.path = stream, path
        self.chunks: list[str] = []
        self.on_disk_at_flush: list[tuple[int, int]] = []  # (characters written so far, bytes on disk)

    def write(self, text: str) -> int:
        self.chunks.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        self.on_disk_at_flush.append((sum(len(c) for c in self.chunks), self.path.stat().st_size))

    def __getattr__(self, name):
        return getattr(self.stream, name)


def test_csv_file(tiny_model_dir, images, tmp_path, monkeypatch):
    out = tmp_path / "out" / "predictions.csv"
    missing = tmp_path / "missing.jpg"
    spies: list[WriteSpy] = []
    real_open = Path.open

    def spied_open(self, *args, **kwargs):
        stream = real_open(self, *args, **kwargs)
        if self == out and args and args[0] == "a":
            spies.append(WriteSpy(stream, self))
            return spies[-1]
        return stream

    monkeypatch.setattr(Path, "open", spied_open)

    result = predict_tiny(tiny_model_dir, *images, missing, "--csv", out, "--top-k", "3")

    assert result.exit_code == 1
    rows = list(csv.DictReader(out.open(newline="")))
    assert list(rows[0]) == ["source", "rank", "index", "label", "prob", "error"]
    good = [r for r in rows if not r["error"]]
    assert len(good) == 3 * len(images)
    for image in images:
        mine = [r for r in good if r["source"] == str(image)]
        assert [int(r["rank"]) for r in mine] == [1, 2, 3]
        assert {r["label"] for r in mine} == set(TINY_LABELS)
        assert all(r["label"] == TINY_LABELS[int(r["index"])] for r in mine)
        assert sum(float(r["prob"]) for r in mine) == pytest.approx(1.0, abs=1e-5)
    [bad] = [r for r in rows if r["error"]]
    assert bad["source"] == str(missing) and bad["rank"] == "" and "no such file" in bad["error"]
    assert [p.name for p in out.parent.iterdir()] == ["predictions.csv"]
    # each record leaves in one write, flushed to the file at once: a kill leaves whole records only
    [spy] = spies
    header, *chunks = spy.chunks
    assert header == ",".join(["source", "rank", "index", "label", "prob", "error"]) + "\r\n"
    assert len(chunks) == len(images) + 1
    for chunk in chunks:
        rows = list(csv.reader(chunk.splitlines()))
        assert len({row[0] for row in rows}) == 1 and len(rows) in (1, 3), chunk  # one record, all its rows
    assert all(written == on_disk for written, on_disk in spy.on_disk_at_flush)  # ASCII names: chars == bytes
    assert len(spy.on_disk_at_flush) >= len(spy.chunks)


def test_files_from_a_list_file_and_from_stdin(tiny_model_dir, images, tmp_path):
    list_file = tmp_path / "list.txt"
    list_file.write_text(f"# two of them\n{images[0]}\n\n{images[2]}\n")

    from_file = predict_tiny(tiny_model_dir, "--files-from", list_file, "--json")
    from_stdin = predict_tiny(tiny_model_dir, images[1], "--files-from", "-", "--json",
                              input=f"{images[0]}\n{images[2]}\n")

    assert from_file.exit_code == 0, from_file.stderr
    assert [r["source"] for r in json_lines(from_file.stdout)] == [str(images[0]), str(images[2])]
    assert from_stdin.exit_code == 0, from_stdin.stderr
    assert [r["source"] for r in json_lines(from_stdin.stdout)] == [str(p) for p in (images[1], images[0], images[2])]


def test_a_missing_files_from_list_is_a_usage_error(tiny_model_dir, tmp_path):
    result = predict_tiny(tiny_model_dir, "--files-from", str(tmp_path / "list.txt"))

    assert result.exit_code == 2
    [line] = error_lines(result.stderr)
    assert f"--files-from '{tmp_path / 'list.txt'}' does not exist" in line


def test_many_images_with_progress_keep_stdout_clean(tiny_model_dir, tmp_path):
    folder = tmp_path / "many"
    for i in range(70):  # over the progress-bar threshold
        make_image(folder / f"{i:03d}.png", size=(16, 16), seed=i)

    result = predict_tiny(tiny_model_dir, folder, "--json", "--top-k", "1", "--batch-size", "16")

    assert result.exit_code == 0, result.stderr
    assert len(json_lines(result.stdout)) == 70


def test_tta_bf16_and_workers_flags(tiny_model_dir, images):
    plain = predict_tiny(tiny_model_dir, *images, "--json", "--top-k", "3")
    for flags in (["--tta"], ["--precision", "bf16", "--device", "cpu"], ["--workers", "2"]):
        result = predict_tiny(tiny_model_dir, *images, "--json", "--top-k", "3", *flags)

        assert result.exit_code == 0, (flags, result.stderr)
        records = json_lines(result.stdout)
        assert [r["source"] for r in records] == [str(p) for p in images]
        for record in records:
            assert sum(p["prob"] for p in record["predictions"]) == pytest.approx(1.0, abs=1e-3)
        if flags == ["--tta"]:
            assert records != json_lines(plain.stdout)
        if flags == ["--workers", "2"]:
            assert records == json_lines(plain.stdout)


def test_jpegs_are_decoded_at_a_reduced_scale_unless_exact_decode(tiny_model_dir, tmp_path, jpeg_drafts):
    """640x480 JPEGs for a 160x160 model: libjpeg's draft decodes them at 1/2 scale (320x240) by default;
    --exact-decode decodes every pixel."""
    photos = [make_image(tmp_path / f"p{i}.jpg", size=(640, 480), seed=i) for i in range(3)]
    drafted = jpeg_drafts

    fast = predict_tiny(tiny_model_dir, *photos, "--json", "--top-k", "3", "--workers", "0")
    assert fast.exit_code == 0, fast.stderr
    assert drafted == [(320, 240)] * 3
    drafted.clear()
    exact = predict_tiny(tiny_model_dir, *photos, "--json", "--top-k", "3", "--workers", "0", "--exact-decode")
    assert exact.exit_code == 0, exact.stderr
    assert drafted == []

    for a, b in zip(json_lines(fast.stdout), json_lines(exact.stdout), strict=True):
        assert a["source"] == b["source"]
        probs = {p["index"]: p["prob"] for p in b["predictions"]}
        assert all(abs(p["prob"] - probs[p["index"]]) < 0.05 for p in a["predictions"])


# ------------------------------------------------------------------------------------ bad inputs


def test_bad_inputs_are_reported_one_line_each_and_the_rest_predicted(tiny_model_dir, tmp_path):
    good1 = make_image(tmp_path / "good1.jpg", seed=1)
    good2 = make_image(tmp_path / "good2.png", seed=2)
    missing = tmp_path / "no_such_photo.jpg"
    text = tmp_path / "text_not_image.jpg"
    text.write_text("hello, I am not a JPEG\n")
    truncated = tmp_path / "truncated.jpg"
    full = make_image(tmp_path / "src" / "full.jpg", size=(160, 120), seed=3).read_bytes()
    truncated.write_bytes(full[: len(full) // 2])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")

    result = predict_tiny(tiny_model_dir, good1, missing, text, truncated, empty, good2, "--json")

    assert result.exit_code == 1
    lines = error_lines(result.stderr)
    assert len(lines) == 4
    expected = {missing: "no such file or directory", text: "not an image Pillow can read",
                truncated: "corrupt or truncated image", empty: "file is empty (0 bytes)"}
    for path, problem in expected.items():
        [line] = [line for line in lines if f" {path}: " in line]
        assert problem in line
    assert "Traceback" not in result.stderr
    records = {r["source"]: r for r in json_lines(result.stdout)}
    assert set(records) == {str(p) for p in (good1, good2, missing, text, truncated, empty)}
    for path in (good1, good2):
        assert records[str(path)]["error"] is None and len(records[str(path)]["predictions"]) == 3
    for path, problem in expected.items():
        assert problem in records[str(path)]["error"] and records[str(path)]["predictions"] == []


def test_bad_inputs_in_table_mode_keep_errors_off_stdout(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image(Path("good.jpg"))
    Path("broken.jpg").write_text("nope")

    result = predict_tiny(tiny_model_dir, "good.jpg", "broken.jpg", "gone.jpg")

    assert result.exit_code == 1
    assert "good.jpg" in result.stdout
    assert "broken.jpg" not in result.stdout and "gone.jpg" not in result.stdout
    assert error_lines(result.stderr) == ["Error: broken.jpg: not an image Pillow can read",
                                          "Error: gone.jpg: no such file or directory"]


def test_json_records_keep_input_order_with_input_problems_in_place(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image(Path("first.jpg"))
    folder = [make_image(Path("folder") / f"{i}.png", seed=i) for i in (1, 2)]
    Path("empty").mkdir()
    Path("broken.jpg").write_text("nope")
    make_image(Path("last.png"), seed=3)
    inputs = ["first.jpg", "[draft] gone.jpg", "folder", "empty", "broken.jpg", "*.webp", "last.png", "also_gone.jpg"]

    result = predict_tiny(tiny_model_dir, *inputs, "--json", "--top-k", "1", "--csv", "out.csv")

    assert result.exit_code == 1
    records = json_lines(result.stdout)
    sources = ["first.jpg", "[draft] gone.jpg", *map(str, folder), "empty", "broken.jpg", "*.webp", "last.png",
               "also_gone.jpg"]
    assert [r["source"] for r in records] == sources
    failed = [r for r in records if r["error"]]
    assert [r["source"] for r in failed] == ["[draft] gone.jpg", "empty", "broken.jpg", "*.webp", "also_gone.jpg"]
    assert all(set(r) == {"source", "predictions", "error"} and r["predictions"] == [] for r in failed)
    assert all(len(r["predictions"]) == 1 for r in records if not r["error"])
    # stderr says the same, one line each, in the same order (markup-like names printed as they are)
    assert [line.split(": ")[1] for line in error_lines(result.stderr)] == [r["source"] for r in failed]
    assert [row["source"] for row in csv.DictReader(open("out.csv", newline=""))] == sources


def test_image_over_the_decompression_bomb_limit(tiny_model_dir, tmp_path, monkeypatch):
    import PIL.Image

    small = make_image(tmp_path / "small.png", size=(20, 20))
    big = make_image(tmp_path / "big.png", size=(300, 300))
    # big.png is over 2x the limit; the limit stays above the model's 160x160 input (resizes check it too)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 40_000)

    result = predict_tiny(tiny_model_dir, small, big, "--json")

    assert result.exit_code == 1
    [line] = error_lines(result.stderr)
    assert f"{big}: image is over Pillow's decompression-bomb limit" in line
    records = {r["source"]: r for r in json_lines(result.stdout)}
    assert records[str(small)]["error"] is None
    assert "decompression-bomb" in records[str(big)]["error"]


def test_empty_folder_and_unmatched_glob(tiny_model_dir, images, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()

    result = predict_tiny(tiny_model_dir, images[0], empty, tmp_path / "*.webp", "--json")

    assert result.exit_code == 1
    lines = error_lines(result.stderr)
    assert len(lines) == 2
    assert f"{empty}: folder has no images" in lines[0]
    assert "*.webp: no image matches this pattern" in lines[1]
    assert [r["error"] for r in json_lines(result.stdout)].count(None) == 1


# ---------------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(("args", "message"), [
    ([], "no images given"),
    (["IMG", "--model", "vit_bse_patch16_224"], "did you mean vit_base_patch16_224"),
    (["IMG", "--model", "vit_base_patch16_224.augreg_in21k_ft_in1"], "vit_base_patch16_224.augreg_in21k_ft_in1k"),
    (["IMG", "--top-k", "0"], "--top-k"),
    (["IMG", "--model", "TINY", "--precision", "fp16", "--device", "cpu"], "fp16 needs a GPU"),
    (["IMG", "--model", "TINY", "--precision", "fp32x"], "--precision"),
    (["IMG", "--model", "TINY", "--batch-size", "0"], "--batch-size"),
], ids=["no-inputs", "unknown-model", "unknown-tag", "top-k-0", "fp16-on-cpu", "bad-precision", "batch-0"])
def test_usage_errors_exit_2_without_a_traceback(tiny_model_dir, images, args, message):
    args = [{"IMG": str(images[0]), "TINY": str(tiny_model_dir)}.get(a, a) for a in args]

    result = invoke("predict", *args)

    assert result.exit_code == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_fp16_on_an_auto_device_without_a_gpu_is_a_usage_error(tiny_model_dir, images):
    import torch

    if torch.cuda.is_available():
        pytest.skip("auto picks the GPU here")
    result = predict_tiny(tiny_model_dir, images[0], "--precision", "fp16")

    assert result.exit_code == 2
    assert error_lines(result.stderr) == ["Error: --precision fp16 needs a GPU; on the CPU use bf16 (or fp32)"]


def test_unknown_model_is_one_line(images):
    result = invoke("predict", images[0], "--model", "vit_bse_patch16_224")

    assert result.exit_code == 2
    [line] = error_lines(result.stderr)
    assert line.startswith("Error: unknown model 'vit_bse_patch16_224'; did you mean vit_base_patch16_224")


# ------------------------------------------------------------------------------ model job errors


def test_malicious_pickle_is_refused_with_one_line(images, tmp_path):
    sentinel = tmp_path / "SENTINEL"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {sentinel}",)

    import torch

    evil = tmp_path / "evil.pth"
    torch.save({"model": Exploit()}, evil)

    result = invoke("predict", images[0], "--model", "test_vit", "--weights", evil)

    assert result.exit_code == 1
    [line] = error_lines(result.stderr)
    assert f"refused to load '{evil}'" in line
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not sentinel.exists()


def test_truncated_weights_file_is_one_line_not_called_unsafe(images, tmp_path):
    import timm
    import torch

    path = tmp_path / "cut_short.pth"
    torch.save(timm.create_model("test_vit").state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    noise = tmp_path / "noise.pt"
    noise.write_bytes(bytes(range(256)) * 8)  # raises pickle.UnpicklingError, as a refused global does

    for weights in (noise, path):
        result = invoke("predict", images[0], "--model", "test_vit", "--weights", weights)

        assert result.exit_code == 1
        [line] = error_lines(result.stderr)
        assert f"'{weights}' is not a readable PyTorch checkpoint; the file is corrupt or truncated" in line
        assert "refused" not in line and "run code" not in line
        assert result.stdout == ""


def test_weights_that_do_not_fit_with_one_line(images, tmp_path):
    import safetensors.torch
    import timm

    path = tmp_path / "test_vit.safetensors"
    safetensors.torch.save_file(timm.create_model("test_vit").state_dict(), path)

    result = invoke("predict", images[0], "--model", "deit_tiny_patch16_224", "--weights", path)

    assert result.exit_code == 1
    [line] = error_lines(result.stderr)
    assert "does not fit deit_tiny_patch16_224: cls_token has shape (1, 1, 64), model expects (1, 1, 192)" in line


def test_unreachable_hub_is_one_line_naming_the_way_out(images, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))

    result = invoke("predict", images[0], "--model", "vit_tiny_patch16_224")

    assert result.exit_code == 1
    [line] = error_lines(result.stderr)
    assert "could not reach the Hugging Face Hub" in line and "--weights" in line


# -------------------------------------------------------------------------------- weights store


def test_weights_list_empty_store():
    result = invoke("weights", "list")

    assert result.exit_code == 0
    assert result.stdout == ""
    assert "is empty" in result.stderr


def test_store_entries_are_listed_and_load_by_name(tiny_model_dir, images):
    import shutil

    import safetensors.torch
    import timm

    store = Path(os.environ["VITCLI_WEIGHTS"])
    shutil.copytree(tiny_model_dir, store / "pets")
    safetensors.torch.save_file(timm.create_model("test_resnet").state_dict(), store / "test_resnet.safetensors")

    listed = invoke("weights", "list")
    as_json = invoke("weights", "list", "--json")
    predicted = invoke("predict", images[0], "--model", "pets", "--json", "--workers", "0")

    assert listed.exit_code == 0 and "pets" in listed.stdout and "test_resnet" in listed.stdout
    entries = {e["name"]: e for e in json.loads(as_json.stdout)}
    assert entries["pets"]["architecture"] == "test_vit" and entries["pets"]["num_classes"] == 3
    assert entries["test_resnet"]["architecture"] == "test_resnet"
    assert predicted.exit_code == 0, predicted.stderr
    [record] = json_lines(predicted.stdout)
    assert {p["label"] for p in record["predictions"]} == set(TINY_LABELS)


def test_weights_pull_offline_fails_with_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))

    result = invoke("weights", "pull", "vit_tiny_patch16_224")

    assert result.exit_code == 1
    [line] = error_lines(result.stderr)
    assert "could not reach the Hugging Face Hub" in line
    assert not (Path(os.environ["VITCLI_WEIGHTS"]) / "vit_tiny_patch16_224").exists()


@pytest.fixture
def fake_hub(monkeypatch):
    """A hub download that builds test_vit with seeded random weights and counts its calls."""
    import timm
    import torch

    import vitcli.models.store

    calls = []

    def download(name, pretrained, kwargs, *, store, implicit=False):
        calls.append(name)
        torch.manual_seed(len(calls))
        return timm.create_model("test_vit", pretrained=False)

    monkeypatch.setattr(vitcli.models.store, "create_from_hub", download)
    monkeypatch.setattr(vitcli.models.store, "check_arch", lambda name: name.partition(".")[0])
    return calls


def test_weights_pull_saves_a_model_folder_that_loads_offline(fake_hub, images):
    store = Path(os.environ["VITCLI_WEIGHTS"])

    pulled = invoke("weights", "pull", "vit_tiny_patch16_224")
    predicted = invoke("predict", str(images[0]), "--model", "vit_tiny_patch16_224", "--json", "-j", "0")

    assert pulled.exit_code == 0, pulled.stderr
    assert f"vit_tiny_patch16_224 -> {store / 'vit_tiny_patch16_224'}" in pulled.stdout
    config = json.loads((store / "vit_tiny_patch16_224" / "config.json").read_text())
    assert config["architecture"] == "test_vit" and len(config["label_names"]) == 1000
    assert predicted.exit_code == 0, predicted.stderr
    assert fake_hub == ["vit_tiny_patch16_224"]  # predict loaded it from the store, not the hub


def test_weights_pull_never_rewrites_a_store_entry_or_a_path_unless_refreshed(fake_hub, tiny_model_dir):
    store = Path(os.environ["VITCLI_WEIGHTS"])
    assert invoke("weights", "pull", "vit_tiny_patch16_224").exit_code == 0
    before = (store / "vit_tiny_patch16_224" / "model.safetensors").read_bytes()

    again = invoke("weights", "pull", "vit_tiny_patch16_224")
    path = invoke("weights", "pull", str(tiny_model_dir))
    refreshed = invoke("weights", "pull", "vit_tiny_patch16_224", "--refresh")

    assert again.exit_code == 2 and "already in the store" in again.stderr and "--refresh" in again.stderr
    assert path.exit_code == 2 and "is a local path" in path.stderr
    assert fake_hub == ["vit_tiny_patch16_224", "vit_tiny_patch16_224"]  # only --refresh downloaded again
    assert refreshed.exit_code == 0, refreshed.stderr
    assert (store / "vit_tiny_patch16_224" / "model.safetensors").read_bytes() != before  # new seed, new weights


# ------------------------------------------------------------------------------------- real data


def read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.mark.slow
def test_default_model_gets_every_labelled_image_right():
    folder = shared("images")
    labels = read_tsv(folder / "LABELS.tsv")
    ambiguous = read_tsv(folder / "LABELS_AMBIGUOUS.tsv")
    assert len(labels) >= 10 and len(ambiguous) >= 1

    # no --model, no --weights: the shipped DeiT-Tiny
    result = invoke("predict", *(folder / row["filename"] for row in labels + ambiguous), "--json", "--top-k", "5")

    assert result.exit_code == 0, result.stderr
    top1 = {Path(r["source"]).name: r["predictions"][0] for r in json_lines(result.stdout)}
    wrong = {row["filename"]: (top1[row["filename"]]["index"], int(row["index"]))
             for row in labels if top1[row["filename"]]["index"] != int(row["index"])}
    assert wrong == {}, "top-1 (predicted, expected)"
    for row in labels:
        # stored ImageNet names: the first synonym of the class name
        assert top1[row["filename"]]["label"] == row["class_name"].split(",")[0]
    for row in ambiguous:
        acceptable = {int(i) for i in row["acceptable_indices"].split("|")}
        assert top1[row["filename"]]["index"] in acceptable, row["filename"]


# ------------------------------------------------------------------------ streaming, resume, shards


def image_folder(folder: Path, n: int, size: tuple[int, int] = (16, 16)) -> list[Path]:
    return [make_image(folder / f"{i:03d}.png", size=size, seed=i) for i in range(n)]


def test_output_jsonl_and_csv_hold_every_record_in_input_order(tiny_model_dir, tmp_path):
    photos = image_folder(tmp_path / "photos", 5)
    sources = [str(photos[0]), str(tmp_path / "gone.jpg"), *map(str, photos[1:])]

    for suffix in (".jsonl", ".csv"):
        out = tmp_path / f"out{suffix}"
        result = predict_tiny(tiny_model_dir, photos[0], tmp_path / "gone.jpg", *photos[1:], "-o", out, "-k", "2")

        assert result.exit_code == 1  # the missing file
        if suffix == ".jsonl":
            assert [r["source"] for r in json_lines(out.read_text())] == sources
        else:
            rows = list(csv.DictReader(out.open(newline="")))
            assert list(dict.fromkeys(r["source"] for r in rows)) == sources and len(rows) == 5 * 2 + 1


def test_rerun_with_the_same_output_skips_what_is_done_without_loading_a_model(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    photos = image_folder(tmp_path / "photos", 4)
    out = tmp_path / "out.jsonl"
    first = predict_tiny(tiny_model_dir, tmp_path / "photos", "-o", out)
    assert first.exit_code == 0, first.stderr
    import timm

    monkeypatch.setattr(timm, "create_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model built")))

    again = predict_tiny(tiny_model_dir, tmp_path / "photos", "-o", out, "--json")

    assert again.exit_code == 0, again.stderr
    assert again.stdout == "" and "4 sources already done, skipping them" in again.stderr
    assert [r["source"] for r in json_lines(out.read_text())] == [str(p) for p in photos]


def test_ctrl_c_leaves_whole_lines_exits_130_and_a_rerun_completes_once_each(tiny_model_dir, tmp_path):
    """The list arrives through a pipe, read as it comes: interrupt the job while it waits for more."""
    import signal
    import time

    photos = image_folder(tmp_path / "photos", 20)
    fifo = tmp_path / "list.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "vitcli", "predict", "--model", str(tiny_model_dir), "--output", str(out),
               "--batch-size", "2", "--workers", "0"]
    process = subprocess.Popen([*command, "--files-from", str(fifo)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:  # open the writing end once vitcli has opened the reading end (never block on a dead child)
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "w") as pipe:
        pipe.write("".join(f"{p}\n" for p in photos[:10]))
        pipe.flush()
        while (not out.exists() or out.read_text().count("\n") < 10) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert out.read_text().count("\n") == 10  # streamed: written before the list is complete
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    assert "Error: interrupted after 10 records; rerun the same command to resume" in stderr
    assert [r["source"] for r in json_lines(out.read_text())] == [str(p) for p in photos[:10]]
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"{p}\n" for p in photos))

    resumed = subprocess.run([*command, "--files-from", str(listed)], capture_output=True, text=True, timeout=300)

    assert resumed.returncode == 0, resumed.stderr
    assert "10 sources already done" in resumed.stderr
    assert [r["source"] for r in json_lines(out.read_text())] == [str(p) for p in photos]  # exactly one each


def test_two_shards_concatenated_are_the_one_process_output(tiny_model_dir, tmp_path):
    image_folder(tmp_path / "photos", 7)
    (tmp_path / "empty").mkdir()
    inputs = [tmp_path / "photos", tmp_path / "empty", tmp_path / "gone.jpg"]

    whole = predict_tiny(tiny_model_dir, *inputs, "--json", "-k", "3")
    shards = [predict_tiny(tiny_model_dir, *inputs, "--shard", f"{i}/2", "-o", tmp_path / f"part{i}.jsonl")
              for i in range(2)]

    assert whole.exit_code == 1 and [s.exit_code for s in shards] == [0, 1]  # the problems are in shard 1
    parts = [json_lines((tmp_path / f"part{i}.jsonl").read_text()) for i in range(2)]
    assert [len(p) for p in parts] == [4, 5]
    assert parts[0] + parts[1] == json_lines(whole.stdout)


def test_shard_with_a_list_from_stdin_is_a_usage_error(tiny_model_dir):
    result = predict_tiny(tiny_model_dir, "--files-from", "-", "--shard", "0/2", input="a.jpg\n")

    assert result.exit_code == 2
    assert "save the list to a file" in result.stderr


def torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "vitcli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_torchrun_two_cpu_processes_give_the_one_process_records(tiny_model_dir, tmp_path):
    image_folder(tmp_path / "photos", 9)
    inputs = [tmp_path / "photos", tmp_path / "gone.jpg"]
    whole = predict_tiny(tiny_model_dir, *inputs, "--json", "-k", "3", "--batch-size", "2")

    run = torchrun("predict", *inputs, "--model", tiny_model_dir, "--json", "-k", "3", "--batch-size", "2",
                   "-o", tmp_path / "out.csv")

    assert run.returncode == 1, run.stderr  # gone.jpg
    assert json_lines(run.stdout) == json_lines(whole.stdout)
    assert run.stderr.count("gone.jpg: no such file or directory") == 1  # from rank 0 only
    rows = list(csv.DictReader((tmp_path / "out.csv").open(newline="")))
    assert list(dict.fromkeys(r["source"] for r in rows)) == [r["source"] for r in json_lines(whole.stdout)]


@pytest.mark.slow
def test_torchrun_and_shards_match_one_process_on_hymenoptera_val(tmp_path):
    val = shared("hymenoptera", "val")
    exact = ("--precision", "fp32")  # auto may be bf16, whose last digits depend on the batch
    whole = invoke("predict", val, "--json", "-k", "5", *exact)
    assert whole.exit_code == 0, whole.stderr
    expected = json_lines(whole.stdout)

    run = torchrun("predict", val, "--json", "-k", "5", *exact)
    shards = [invoke("predict", val, "--shard", f"{i}/2", "-o", tmp_path / f"part{i}.jsonl", *exact) for i in range(2)]

    assert run.returncode == 0, run.stderr
    assert all(s.exit_code == 0 for s in shards)
    from_shards = [r for i in range(2) for r in json_lines((tmp_path / f"part{i}.jsonl").read_text())]
    for records in (json_lines(run.stdout), from_shards):
        assert [r["source"] for r in records] == [r["source"] for r in expected] and len(expected) == 153
        for got, want in zip(records, expected, strict=True):
            assert [p["index"] for p in got["predictions"]] == [p["index"] for p in want["predictions"]]
            assert [p["prob"] for p in got["predictions"]] == pytest.approx([p["prob"] for p in want["predictions"]],
                                                                             abs=1e-6)


def test_a_reader_that_goes_away_ends_predict_quietly(tiny_model_dir, tmp_path):
    """`vitcli predict ... --json | head -n 1`: exit 141 (128 + SIGPIPE) with nothing on stderr."""
    image_folder(tmp_path / "photos", 40)
    command = [sys.executable, "-m", "vitcli", "predict", str(tmp_path / "photos"), "--model", str(tiny_model_dir),
               "--json", "--batch-size", "1", "--workers", "0"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = proc.stdout.readline()
    proc.stdout.close()  # as head does after its line
    stderr = proc.stderr.read()
    proc.wait(timeout=120)

    assert json.loads(first)["error"] is None
    assert proc.returncode == 141 and stderr == "", stderr


def test_a_job_that_fails_before_its_first_record_leaves_an_existing_csv_alone(images, tmp_path):
    csv_file = tmp_path / "predictions.csv"
    csv_file.write_text("source,rank\nearlier,1\n")

    result = invoke("predict", str(images[0]), "--model", "vit_bse_patch16_224", "--csv", str(csv_file))

    assert result.exit_code == 2 and "did you mean" in result.stderr
    assert csv_file.read_text() == "source,rank\nearlier,1\n"


def test_errors_of_other_torchrun_ranks_are_printed_with_their_rank(monkeypatch, capsys):
    import vitcli.console
    from vitcli.cli.errors import fail

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(vitcli.console.err, "quiet", True)  # as finetune sets it on ranks other than 0

    exit_ = fail("CUDA out of memory")

    assert exit_.exit_code == 1 and vitcli.console.err.quiet is True
    assert "Error: rank 1: CUDA out of memory" in capsys.readouterr().err
