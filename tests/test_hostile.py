"""Hostile and unlucky inputs (issue 14): nothing lost, nothing injected, bounded work per input.

Each test here failed on the code before its fix. The memory tests measure the peak RSS of a real
child process (``resource.getrusage(RUSAGE_CHILDREN)``), not a mock.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TINY_LABELS, make_image
from vitcli.cli.app import app

runner = CliRunner()


def invoke(*args: object, input: str | bytes | None = None):
    return runner.invoke(app, [a if isinstance(a, str) else os.fsdecode(a) for a in args], input=input)


def predict_tiny(model: Path, *args: object, input: str | bytes | None = None):
    return invoke("predict", *args, "--model", str(model), "--workers", "0", input=input)


@pytest.fixture(scope="module")
def markup_model_dir(tmp_path_factory) -> Path:
    """test_vit whose label names are rich markup and terminal controls (as a hostile model file carries)."""
    import timm
    import torch

    from vitcli.models.folders import save_model_folder

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=3)
    labels = ["[link=http://evil.example]click[/link]", "a[/]b", "esc\x1b[31mred"]
    return save_model_folder(model.eval(), tmp_path_factory.mktemp("models") / "markup", labels)


# ------------------------------------------------------------------- item 8: data printed as text


def test_escape_shows_markup_controls_bidi_and_foreign_bytes_as_text():
    from rich.console import Console

    from vitcli.cli.render import escape

    def shown(text: str) -> str:
        return Console().render_str(escape(text)).plain

    assert shown("a[red]b.jpg") == "a[red]b.jpg"
    assert shown("x[/b]y.jpg") == "x[/b]y.jpg"
    assert shown("[link=http://evil]c[/link]") == "[link=http://evil]c[/link]"
    assert shown("e\x1b[31mred\r\n") == "e\\x1b[31mred\\r\\n"
    assert shown("\u202egpj.exe") == "\\u202egpj.exe"  # a bidi override would show "exe.jpg"
    assert shown(os.fsdecode(b"caf\xe9.jpg")) == "caf\\xe9.jpg"


def test_names_and_labels_from_data_print_as_text(markup_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = ["a[red]b.png", "x[/b]y.png", "[link=http:]c.png", "e\x1b[31mr.png"]
    for i, name in enumerate(names):
        make_image(Path(name), seed=i)

    result = predict_tiny(markup_model_dir, *names, "--top-k", "3")

    assert result.exit_code == 0, result.output
    stdout = result.stdout
    assert "\x1b" not in stdout  # neither the name's nor the label's ESC reaches the terminal
    for shown in ("a[red]b.png", "x[/b]y.png", "[link=http:]c.png", "e\\x1b[31mr.png",
                  "[link=http://evil.exam", "a[/]b", "esc\\x1b[31mred"):
        assert shown in stdout, (shown, stdout)


def test_error_lines_stay_one_line_and_show_what_the_name_holds(tiny_model_dir, tmp_path):
    bad = tmp_path / "no\nsuch\x1b(/).jpg"

    result = predict_tiny(tiny_model_dir, bad)

    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "no\\nsuch\\x1b(/).jpg: no such file or directory" in result.stderr


def test_the_resume_notice_the_finetune_report_and_weights_list_print_names_as_text(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    import shutil

    from vitcli.cli import finetune as finetune_cli
    from vitcli.finetune.progress import RunResult

    monkeypatch.chdir(tmp_path)
    make_image(Path("a.png"))
    assert predict_tiny(tiny_model_dir, "a.png", "-o", "o[/]ut.jsonl").exit_code == 0
    rerun = predict_tiny(tiny_model_dir, "a.png", "-o", "o[/]ut.jsonl")
    assert rerun.exit_code == 0, rerun.output
    assert "o[/]ut.jsonl: 1 sources already done" in rerun.stderr

    shutil.copytree(tiny_model_dir, tmp_path / "store" / "w[red]x")
    listed = invoke("weights", "list")
    assert listed.exit_code == 0, listed.output
    assert "w[red]x" in listed.stdout, listed.stderr

    finetune_cli._report(RunResult(Path("runs/p[/]"), 0.5, 1, 1, 10, "done"))  # --project 'runs/p[/]'
    assert "run folder: runs/p[/]" in capsys.readouterr().out


# ------------------------------------------------------ item 10: names that are not UTF-8


@pytest.mark.skipif(os.name != "posix", reason="file names as bytes")
def test_names_that_are_not_utf8_round_trip_in_every_format(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = Path("imgs")
    make_image(folder / "plain.png")
    raw = b"imgs/caf\xe9.png"
    make_image(Path(os.fsdecode(raw)), seed=1)
    Path("list.txt").write_bytes(raw + b"\n" + b"imgs/gone\xff.png\n")

    first = predict_tiny(tiny_model_dir, folder, "-o", "out.csv", "--csv", "also.csv")
    again = predict_tiny(tiny_model_dir, folder, "-o", "out.csv")
    listed = predict_tiny(tiny_model_dir, "--files-from", "list.txt", "--json")

    assert first.exit_code == 0, first.output
    assert raw in Path("out.csv").read_bytes() and raw in Path("also.csv").read_bytes()
    assert again.exit_code == 0, again.output
    assert "2 sources already done" in again.stderr
    assert Path("out.csv").read_bytes().count(raw) == len(TINY_LABELS)  # its 3 rows, written once
    assert listed.exit_code == 1  # the second line names no file: a per-input error, not a crash
    records = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [os.fsencode(r["source"]) for r in records] == [raw, b"imgs/gone\xff.png"]
    assert records[0]["error"] is None and records[1]["error"] == "no such file or directory"
    assert "imgs/gone\\xff.png: no such file or directory" in listed.stderr


# ------------------------------------------------------------ item 1: two writers, one output


@pytest.mark.parametrize("option", ["--output", "--csv"])
def test_a_second_writer_of_an_output_fails_at_once_and_leaves_it_alone(tiny_model_dir, tmp_path, option):
    import fcntl

    make_image(tmp_path / "a.png")
    out = tmp_path / ("out.jsonl" if option == "--output" else "out.csv")
    so_far = ('{"source": "x.png", "predictions": [], "error": "gone"}\n' if out.suffix == ".jsonl"
              else "source,rank,index,label,prob,error\nx.png,,,,,gone\n")  # what the first job wrote so far
    with out.open("a") as first:
        fcntl.flock(first.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the first vitcli job holds
        first.write(so_far)
        first.flush()

        second = predict_tiny(tiny_model_dir, tmp_path / "a.png", option, out)

        assert second.exit_code == 1
        assert second.stderr.count("\n") == 1, second.stderr
        assert f"'{out}' is being written by another vitcli job" in second.stderr
        assert out.read_text() == so_far  # not truncated, not appended to
    assert predict_tiny(tiny_model_dir, tmp_path / "a.png", "-o", tmp_path / "later.jsonl").exit_code == 0


# ---------------------------------------------- item 2: a cut CSV record is redone, not skipped


def test_a_csv_record_cut_between_its_rows_is_redone_on_resume(tiny_model_dir, tmp_path):
    import csv

    for i in range(3):
        make_image(tmp_path / "imgs" / f"{i}.png", seed=i)
    out = tmp_path / "out.csv"
    whole = predict_tiny(tiny_model_dir, tmp_path / "imgs", "-o", out, "--top-k", "3")
    assert whole.exit_code == 0, whole.output
    expected = out.read_text()
    lines = expected.splitlines(keepends=True)
    assert len(lines) == 1 + 3 * 3
    out.write_text("".join(lines[:1 + 3 + 1]))  # the disk filled after the first row of the second image

    again = predict_tiny(tiny_model_dir, tmp_path / "imgs", "-o", out, "--top-k", "3")

    assert again.exit_code == 0, again.output
    assert "1 sources already done" in again.stderr
    rows = list(csv.reader(out.open(newline="")))[1:]
    assert [r[0] for r in rows] == [str(tmp_path / "imgs" / f"{i}.png") for i in range(3) for _ in range(3)]
    assert out.read_text() == expected


def test_a_csv_cut_inside_a_quoted_name_is_redone(tiny_model_dir, tmp_path):
    image = make_image(tmp_path / "two\nlines.png")
    out = tmp_path / "out.csv"
    assert predict_tiny(tiny_model_dir, image, "-o", out).exit_code == 0
    expected = out.read_bytes()
    out.write_bytes(expected[:expected.index(b"\n", expected.index(b"two")) + 1])  # cut inside the quotes

    again = predict_tiny(tiny_model_dir, image, "-o", out)

    assert again.exit_code == 0, again.output
    assert out.read_bytes() == expected


# ------------------------------------------------- item 13: resume by (source, occurrence)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_list_naming_one_image_many_times_resumes_to_the_uninterrupted_output(tiny_model_dir, tmp_path, suffix):
    image = make_image(tmp_path / "a.png")
    other = make_image(tmp_path / "b.png", seed=1)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{image}\n" if i % 3 else f"{other}\n" for i in range(20)))
    whole, out = tmp_path / f"whole{suffix}", tmp_path / f"out{suffix}"
    assert predict_tiny(tiny_model_dir, "--files-from", listing, "-o", whole).exit_code == 0
    lines = whole.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:8] if suffix == ".jsonl" else lines[:1 + 3 * 8]))  # killed after 8 records

    again = predict_tiny(tiny_model_dir, "--files-from", listing, "-o", out)

    assert again.exit_code == 0, again.output
    assert out.read_text() == whole.read_text()


# --------------------------------------- items 3, 4, 16: finetune run folders that are not ours


def finetune_args(tmp_path: Path, model: Path, *extra: str) -> list[str]:
    for c, name in enumerate(["ants", "bees"]):
        for i in range(4):
            make_image(tmp_path / "data" / name / f"{i}.png", size=(40, 32), seed=10 * c + i)
    return ["finetune", str(tmp_path / "data"), "--model", str(model), "--img-size", "64", "--batch-size", "4",
            "--workers", "0", "--precision", "fp32", "--project", str(tmp_path / "victim"), *extra]


def test_exist_ok_refuses_a_folder_that_no_vitcli_run_made_and_removes_nothing(tmp_path, tiny_model_dir):
    notes = tmp_path / "victim" / "mydata" / "last" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("mine")

    result = invoke(*finetune_args(tmp_path, tiny_model_dir, "--name", "mydata", "--exist-ok", "--max-steps", "1"))

    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "has no vitcli args.json; nothing in it was removed" in result.stderr
    assert notes.read_text() == "mine"


def test_leftovers_of_a_save_cut_short_are_removed_and_named_on_resume(tmp_path, tiny_model_dir):
    first = invoke(*finetune_args(tmp_path, tiny_model_dir, "--max-steps", "1"))
    assert first.exit_code == 0, first.output
    run = tmp_path / "victim" / "exp"
    (run / ".state.pt.k3j9x_2a").write_bytes(b"\0" * 2_000_000)  # a kill -9 during torch.save
    (run / ".best.x8w2q1ab").mkdir()  # ... or during a model folder's copy
    (run / ".best.x8w2q1ab" / "model.safetensors").write_bytes(b"\0" * 1000)
    (run / "notes.state.pt.txt").write_text("mine")

    resumed = invoke("finetune", "--resume", str(run), "--max-steps", "2")

    assert resumed.exit_code == 0, resumed.output
    assert ".state.pt.k3j9x_2a (2.0 MB)" in resumed.stderr and ".best.x8w2q1ab (0.0 MB)" in resumed.stderr
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    assert (run / "notes.state.pt.txt").read_text() == "mine"


def test_a_damaged_args_json_on_resume_is_one_line_naming_it(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text('{"config": {"data": ')
    (run / "state.pt").write_bytes(b"")

    result = invoke("finetune", "--resume", str(run))

    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1
    assert f"cannot resume: '{run / 'args.json'}' is damaged" in result.stderr and "internal" not in result.stderr


# ----------------------------------------------- items 6, 7: bounded work per input (peak RSS)

MEMORY_CAP = 3 << 30  # RLIMIT_DATA of the measured child: a regression fails the test, not the machine


# A fresh, small process starts the measured one and reads its peak from getrusage(RUSAGE_CHILDREN): a
# child forked from pytest itself would count pytest's own pages (torch and all) until its exec.
MEASURE = """
import resource, subprocess, sys
cap, timeout, peak_file, cmd = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4:]
try:
    code = subprocess.run(cmd, timeout=timeout,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))).returncode
except subprocess.TimeoutExpired:
    code = 124
open(peak_file, "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def run_measured(cmd: list[str], cwd: Path, timeout: float = 300) -> tuple[int, str, str, float]:
    """Run ``cmd`` as a child process; (exit code, stdout, stderr, its peak RSS in MiB)."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    peak = cwd / ".peak"
    done = subprocess.run([sys.executable, "-c", MEASURE, str(MEMORY_CAP), str(timeout), str(peak), *cmd],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout + 60)
    return done.returncode, done.stdout, done.stderr, int(peak.read_text()) / 1024  # ru_maxrss is in KiB


def test_aspect_ratio_bombs_are_refused_from_their_header_at_the_memory_of_a_normal_photo(tiny_model_dir, tmp_path):
    import sys

    from PIL import Image

    Image.new("RGB", (30000, 1), (200, 10, 10)).save(tmp_path / "strip.png")  # 3 KB
    Image.new("RGB", (65000, 2), (10, 200, 10)).save(tmp_path / "strip.jpg")
    make_image(tmp_path / "photo.jpg", size=(640, 480))
    predict = [sys.executable, "-m", "vitcli", "predict", "--model", str(tiny_model_dir), "--json"]

    code, stdout, _, normal = run_measured([*predict, "photo.jpg"], tmp_path)
    assert code == 0
    code, stdout, stderr, bombs = run_measured([*predict, "strip.png", "strip.jpg", "photo.jpg"], tmp_path)

    assert code == 1, stderr
    records = [json.loads(line) for line in stdout.splitlines()]
    assert [bool(r["predictions"]) for r in records] == [False, False, True]  # the photo is still predicted
    assert stderr.splitlines() == [
        "Error: strip.png: image is 30000x1, longer than 32 times its width; resized to the model's input it "
        "would take far more memory than it is worth: crop it into parts first",
        "Error: strip.jpg: image is 65000x2, longer than 32 times its width; resized to the model's input it "
        "would take far more memory than it is worth: crop it into parts first"]
    print(f"peak RSS: photo alone {normal:.0f} MiB, with the two bombs {bombs:.0f} MiB")
    assert bombs < normal * 1.2 + 64, (normal, bombs)


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_a_double_star_glob_never_walks_through_symlinked_folders(tmp_path):
    import sys

    loop = tmp_path / "loop2"
    make_image(loop / "a.jpg")
    make_image(loop / "sub" / "b.jpg", seed=1)
    (loop / "self1").symlink_to(".")
    (loop / "self2").symlink_to(".")
    (loop / "sub" / "up").symlink_to("..")
    script = ("from vitcli.io.inputs import expand_inputs; import json; "
              "print(json.dumps(expand_inputs(['loop2/**/*.jpg', 'loop2/**'])[0]))")

    code, stdout, stderr, peak = run_measured([sys.executable, "-c", script], tmp_path, timeout=60)

    assert code == 0, stderr  # before: still listing 2^40 paths when killed at 60 s
    assert json.loads(stdout) == ["loop2/a.jpg", "loop2/sub/b.jpg"] * 2
    print(f"peak RSS of the glob: {peak:.0f} MiB")
    assert peak < 200, peak


@pytest.mark.parametrize(("pattern", "expected"), [
    ("d/**/*.jpg", ["d/a.jpg", "d/x/b.jpg", "d/x/y/c.jpg"]),
    ("d/**/y/*.jpg", ["d/x/y/c.jpg"]),
    ("d/*/*.jpg", ["d/x/b.jpg"]),
    ("d/**/[ab].jpg", ["d/a.jpg", "d/x/b.jpg"]),
    ("**/c.jpg", ["d/x/y/c.jpg"]),
])
def test_double_star_globs_match_as_python_globs_do(tmp_path, monkeypatch, pattern, expected):
    import glob

    from vitcli.io.inputs import expand_inputs

    monkeypatch.chdir(tmp_path)
    for name in ("d/a.jpg", "d/x/b.jpg", "d/x/y/c.jpg", "d/.hidden/e.jpg", "d/x/.f.jpg"):
        make_image(Path(name))

    assert expand_inputs([pattern])[0] == expected == sorted(glob.glob(pattern, recursive=True))


# ------------------------------------------------------- item 14: float and int32 TIFFs


def test_float_and_int32_tiffs_are_scaled_by_their_own_range_and_nan_is_refused(tmp_path):
    import numpy as np
    from PIL import Image

    from vitcli.errors import ImageLoadError
    from vitcli.io.images import load_image

    ramp = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)
    Image.fromarray(ramp, mode="F").save(tmp_path / "float.tif")
    Image.fromarray((ramp * 4e6).astype(np.int32), mode="I").save(tmp_path / "int32.tif")
    Image.fromarray(np.where(ramp > 0.5, np.nan, ramp).astype(np.float32), mode="F").save(tmp_path / "nan.tif")

    for name in ("float.tif", "int32.tif"):
        pixels = np.asarray(load_image(str(tmp_path / name)))[..., 0].astype(int)
        assert pixels.min() == 0 and pixels.max() == 255, name  # before: all black (float), saturated (int32)
        assert abs(pixels.mean() - 127.5) < 2, name
    with pytest.raises(ImageLoadError, match="NaN or infinite values"):
        load_image(str(tmp_path / "nan.tif"))


# ------------------------------------- items 5, 11, 12: model metadata checked once, on load

GOOD_META = {"labels": ["cat", "dog", "bird"], "input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5],
             "std": [0.25, 0.25, 0.25], "crop_pct": 0.875, "interpolation": "bilinear"}


def small_onnx(path: Path, meta: dict, classes: int = 3, side: int = 32, raw: dict | None = None) -> Path:
    """A 400-byte ONNX classifier (mean of each channel -> a 3 x classes matrix) with vitcli's metadata."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(3 * classes, dtype=np.float32).reshape(3, classes) / 10, "w")
    axes = numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
         helper.make_node("MatMul", ["m", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, side, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", classes])], [weight, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    props = {k: json.dumps(v) for k, v in meta.items()} | (raw or {})
    helper.set_model_props(model, props)
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(("change", "raw", "key"), [
    ({"input_size": [3, 100000, 100000]}, None, "input_size"),  # before: 24 GB, OOM-killed
    ({"input_size": [3, 64, 64]}, None, "input_size"),  # not the graph's own 32x32
    ({"crop_pct": 0.0001}, None, "crop_pct"),
    ({"std": [0, 0, 0]}, None, "std"),  # before: NaN probabilities, top-1 "tench", a bare NaN in --json
    ({"mean": ["a", 1, 2]}, None, "mean"),
    ({"labels": ["cat"]}, None, "labels"),  # before: IndexError
    ({}, {"labels": "not json"}, "labels"),  # before: split into characters
    ({}, {"labels": "[" * 100_000 + "]" * 100_000}, "labels"),  # before: RecursionError
])
def test_onnx_metadata_out_of_bounds_is_refused_on_load_naming_the_key(tmp_path, change, raw, key):
    import sys

    make_image(tmp_path / "a.png")
    small_onnx(tmp_path / "m.onnx", GOOD_META | change, raw=raw)

    # in a capped child: without the check, the first cases grow to 24 GB
    code, stdout, stderr, _ = run_measured([sys.executable, "-m", "vitcli", "predict", "m.onnx", "a.png", "--json"],
                                           tmp_path)

    assert code == 1, stderr
    assert stdout == ""
    assert stderr.count("\n") == 1, stderr
    assert "'m.onnx'" in stderr and f"'{key}'" in stderr
    assert "internal error" not in stderr


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
def test_sane_onnx_metadata_predicts_and_a_non_finite_output_is_a_per_image_error(tmp_path):
    import numpy as np
    from PIL import Image

    from vitcli.inference.onnx_engine import load_onnx, predict_onnx

    make_image(tmp_path / "a.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "black.png")
    model = load_onnx(small_onnx(tmp_path / "m.onnx", GOOD_META), "cpu")
    model.metadata["std"] = [0.0] * 3  # past the load check, as a model whose output overflows: inf, NaN

    records = list(predict_onnx(model, [str(tmp_path / "a.png"), str(tmp_path / "black.png")]))

    assert [r.error for r in records] == [records[0].error] * 2
    assert "not a number" in records[0].error


def test_json_output_never_holds_a_bare_nan():
    from vitcli.inference.predict import Label, Prediction
    from vitcli.io.records import to_json

    with pytest.raises(ValueError):
        to_json(Prediction("a.png", [Label(1, 0, "cat", float("nan"))]))


def test_the_onnx_input_size_bomb_is_refused_at_the_memory_of_an_empty_run(tmp_path):
    import sys

    make_image(tmp_path / "a.jpg", size=(640, 480))
    small_onnx(tmp_path / "good.onnx", GOOD_META)
    small_onnx(tmp_path / "huge.onnx", GOOD_META | {"input_size": [3, 100000, 100000]}, side=100000)
    predict = [sys.executable, "-m", "vitcli", "predict", "--json"]

    code, _, _, normal = run_measured([*predict, "good.onnx", "a.jpg"], tmp_path)
    assert code == 0
    code, stdout, stderr, huge = run_measured([*predict, "huge.onnx", "a.jpg"], tmp_path)

    assert code == 1 and stdout == "" and "'input_size'" in stderr, stderr
    print(f"peak RSS: ONNX predict {normal:.0f} MiB, refused input_size 100000 {huge:.0f} MiB")
    assert huge < normal + 32


def test_a_model_folder_config_json_out_of_bounds_or_of_wrong_types_is_one_line(tiny_model_dir, tmp_path):
    import shutil

    make_image(tmp_path / "a.png")
    cases = {"std": ("pretrained_cfg", "std", [0, 0, 0]),
             "num_classes": (None, "num_classes", "three"),
             "label_names": (None, "label_names", "not a list"),
             "pretrained_cfg": (None, "pretrained_cfg", [1, 2])}
    for key, (section, field, value) in cases.items():
        folder = tmp_path / key
        shutil.copytree(tiny_model_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        (config[section] if section else config)[field] = value
        (folder / "config.json").write_text(json.dumps(config))

        result = predict_tiny(folder, tmp_path / "a.png")

        assert result.exit_code == 1, (key, result.output)
        assert result.stderr.count("\n") == 1, result.stderr
        assert f"{folder / 'config.json'}" in result.stderr and f"'{key}'" in result.stderr, result.stderr
        assert "internal error" not in result.stderr


def test_a_model_folder_input_size_bomb_is_refused_before_any_image(tiny_model_dir, tmp_path):
    import shutil
    import sys

    make_image(tmp_path / "a.png")
    shutil.copytree(tiny_model_dir, tmp_path / "huge")
    config = json.loads((tmp_path / "huge" / "config.json").read_text())
    config["pretrained_cfg"]["input_size"] = [3, 100000, 100000]
    (tmp_path / "huge" / "config.json").write_text(json.dumps(config))

    code, _, stderr, peak = run_measured([sys.executable, "-m", "vitcli", "predict", "a.png", "--model", "huge"],
                                         tmp_path)

    assert code == 1 and stderr.count("\n") == 1, stderr
    assert f"{Path('huge') / 'config.json'}" in stderr and "'input_size'" in stderr
    print(f"peak RSS: model folder with input_size 100000, refused: {peak:.0f} MiB")


# ------------------------------------------------------------- item 9: say which folder shadows


def test_a_weights_folder_shadowing_the_shipped_model_is_named_on_stderr(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from vitcli.embedded import DEFAULT_MODEL

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VITCLI_WEIGHTS")  # the default store: ./weights
    shutil.copytree(tiny_model_dir, tmp_path / "weights" / DEFAULT_MODEL)
    make_image(tmp_path / "a.png")

    result = invoke("predict", "a.png", "--workers", "0", "--json")

    assert result.exit_code == 0, result.output
    assert {p["label"] for p in json.loads(result.stdout)["predictions"]} <= set(TINY_LABELS)
    assert result.stderr == (f"Note: '{DEFAULT_MODEL}' is loaded from the model store, "
                             f"'weights/{DEFAULT_MODEL}', which comes before the shipped model of that name; "
                             "rename or remove it to use the other\n")


# ------------------------------------------ items 15, 16: damaged model folders name the file


def test_model_folder_weights_of_another_shape_or_damaged_name_the_keys_or_the_file(tiny_model_dir, tmp_path):
    import shutil

    import safetensors.torch
    import timm

    make_image(tmp_path / "a.png")
    wrong = tmp_path / "wrong"
    shutil.copytree(tiny_model_dir, wrong)
    state = timm.create_model("test_vit", num_classes=5).state_dict()
    safetensors.torch.save_file(state, wrong / "model.safetensors")
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir, damaged)
    (damaged / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")

    shape = predict_tiny(wrong, tmp_path / "a.png")
    broken = predict_tiny(damaged, tmp_path / "a.png")

    assert shape.exit_code == 1 and shape.stderr.count("\n") == 1, shape.stderr
    assert "head.weight has shape (5, 64), model expects (3, 64)" in shape.stderr
    assert broken.exit_code == 1 and broken.stderr.count("\n") == 1, broken.stderr
    assert f"'{damaged / 'model.safetensors'}' is damaged" in broken.stderr and "internal" not in broken.stderr


def test_a_model_that_outputs_nan_gives_a_per_image_error_and_valid_json(tiny_model_dir, tmp_path):
    import shutil

    import safetensors.torch

    make_image(tmp_path / "a.png")
    folder = tmp_path / "nan"
    shutil.copytree(tiny_model_dir, folder)
    state = safetensors.torch.load_file(folder / "model.safetensors")
    state["head.bias"][0] = float("nan")
    safetensors.torch.save_file(state, folder / "model.safetensors")

    result = predict_tiny(folder, tmp_path / "a.png", "--json")

    assert result.exit_code == 1, result.output
    [record] = [json.loads(line) for line in result.stdout.splitlines()]  # valid JSON: no bare NaN
    assert record["predictions"] == [] and "not a number" in record["error"]


# ---------------------------------- item 16: errors of the machine are one line naming the file


def test_a_full_disk_under_output_is_one_line_and_the_rerun_completes(tiny_model_dir, tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png", seed=1)
    out = tmp_path / "out.jsonl"
    out.symlink_to("/dev/full")  # every write: ENOSPC

    full = predict_tiny(tiny_model_dir, tmp_path / "a.png", tmp_path / "b.png", "-o", out)
    out.unlink()  # space freed
    again = predict_tiny(tiny_model_dir, tmp_path / "a.png", tmp_path / "b.png", "-o", out)

    assert full.exit_code == 1, full.output
    assert full.stderr.count("\n") == 1 and "internal" not in full.stderr, full.stderr
    assert f"'{out}': No space left on device; free some space and rerun the same command" in full.stderr
    assert again.exit_code == 0 and len(out.read_text().splitlines()) == 2


@pytest.mark.parametrize(("errno_name", "fix"), [("EROFS", "the file system is read-only"),
                                                 ("EACCES", "write somewhere you may")])
@pytest.mark.parametrize("option", ["-o", "--csv"])
def test_a_read_only_or_forbidden_output_is_one_line_naming_it(tiny_model_dir, tmp_path, monkeypatch, errno_name,
                                                               fix, option):
    import errno

    make_image(tmp_path / "a.png")
    out = tmp_path / "ro" / ("out.jsonl" if option == "-o" else "out.csv")
    real_open = Path.open

    def refusing_open(self, *args, **kwargs):  # as root nothing is read-only: the file system's answer, mocked
        if self == out:
            raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)), str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refusing_open)
    result = predict_tiny(tiny_model_dir, tmp_path / "a.png", option, out)

    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and "internal" not in result.stderr, result.stderr
    assert f"'{out}': {os.strerror(getattr(errno, errno_name))}; {fix}" in result.stderr


def test_os_errors_anywhere_in_a_command_are_one_line_naming_the_file(capsys):
    import errno

    import typer

    from vitcli.cli.errors import handled_errors

    with pytest.raises(typer.Exit) as exit_info, handled_errors():
        raise OSError(errno.EROFS, "Read-only file system", "runs/finetune/exp/state.pt")

    assert exit_info.value.exit_code == 1
    assert capsys.readouterr().err == ("Error: 'runs/finetune/exp/state.pt': Read-only file system; the file system "
                                       "is read-only: write somewhere else (another --output, --project or folder)\n")


def test_patches_with_an_image_size_smaller_than_a_patch_is_a_usage_error(tmp_path):
    make_image(tmp_path / "a.png")

    result = invoke("patches", str(tmp_path / "a.png"), "--img-size", "7", "--no-pretrained", "--out",
                    str(tmp_path / "out"))

    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "--img-size 7 holds no patch" in result.stderr


def test_a_redirect_loop_is_one_line():
    import http.server
    import threading

    from vitcli.errors import ImageLoadError
    from vitcli.io.images import fetch_url

    class Loop(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(302)
            self.send_header("Location", self.path)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Loop)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ImageLoadError) as e:
            fetch_url(f"http://127.0.0.1:{server.server_address[1]}/a.jpg", timeout=10)
    finally:
        server.shutdown()
    assert "\n" not in e.value.reason and "redirect" in e.value.reason


def test_a_kill_during_the_first_save_leaves_nothing_after_resume_is_tried(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"config": {"data": str(tmp_path)}, "resolved": {}}))
    (run / ".state.pt.a1b2c3d4").write_bytes(b"\0" * 3_000_000)  # torch.save cut by kill -9, no state.pt yet

    result = invoke("finetune", "--resume", str(run))

    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "removed what a kill during its first save left: .state.pt.a1b2c3d4 (3.0 MB)" in result.stderr
    assert sorted(p.name for p in run.iterdir()) == ["args.json"]
