"""--backend and the compiled-model cache: build once, hit without torch, refusals, damage, concurrency, no disk."""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import TINY_LABELS, make_image
from vitcli.cli.app import app
from vitcli.inference import backend, cache

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache_home(tmp_path, monkeypatch) -> Path:
    """An empty cache for this test alone."""
    home = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home / "vitcli"


_CONVERTED: dict = {}


def convert_once(model, example, dynamic_size=False, real=None):
    """Each distinct model is converted once per module: these tests are about the cache, not the converter
    (test_inference_openvino_engine and the concurrent build here run it for real)."""
    import hashlib

    first = next(model.parameters()).detach().numpy().tobytes()
    key = (type(model).__name__, tuple(example.shape), hashlib.sha256(first).hexdigest())
    if key not in _CONVERTED:
        _CONVERTED[key] = real(model, example, dynamic_size)
    return _CONVERTED[key].clone()


@pytest.fixture(autouse=True)
def _convert_once(monkeypatch):
    from vitcli.export import openvino

    monkeypatch.setattr(openvino, "convert", functools.partial(convert_once, real=openvino.convert))


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory) -> Path:
    """A cache holding the tiny model's entry, built once for the module (building takes seconds)."""
    home = tmp_path_factory.mktemp("built")
    from vitcli.export import openvino
    from vitcli.models.resolve import load_model

    saved, real = os.environ.get("XDG_CACHE_HOME"), openvino.convert
    os.environ["XDG_CACHE_HOME"] = str(home)
    openvino.convert = functools.partial(convert_once, real=real)
    try:
        choice = backend.choose_engine(str(tiny_model_dir), None, lambda: load_model(str(tiny_model_dir)), "auto")
        assert choice.engine == "openvino", choice.line
    finally:
        openvino.convert = real
        os.environ.pop("XDG_CACHE_HOME") if saved is None else os.environ.update(XDG_CACHE_HOME=saved)
    return home


@pytest.fixture
def warm_cache(built, cache_home) -> Path:
    """A copy of the module's built cache for this test alone."""
    shutil.copytree(built, cache_home.parent)
    return cache_home


def predict(model: Path, images, *extra: str):
    return runner.invoke(app, ["predict", *map(str, images), "--model", str(model), "--json", "-k", "3",
                               "--workers", "0", "--exact-decode", "--precision", "fp32", *extra])


def probs(stdout: str) -> list[list[float]]:
    return [[p["prob"] for p in json.loads(line)["predictions"]] for line in stdout.splitlines()]


def entries(root: Path) -> list[Path]:
    return sorted(p for p in (root / "openvino").iterdir() if not p.name.startswith("."))


def test_auto_builds_once_then_hits_and_agrees_with_torch(tiny_model_dir, images, cache_home):
    first = predict(tiny_model_dir, images, "--backend", "auto")
    assert first.exit_code == 0, first.stderr
    assert first.stderr.startswith("openvino fp32, built and verified in "), first.stderr
    (entry,) = entries(cache_home)
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["metadata"]["labels"] == TINY_LABELS
    assert set(manifest["files"]) == {"model.blob"}

    second = predict(tiny_model_dir, images, "--backend", "auto")
    assert second.exit_code == 0 and second.stderr == "openvino fp32, cached\n", second.stderr
    torch_ = predict(tiny_model_dir, images, "--backend", "torch")
    assert torch_.stderr == ""  # an explicit --backend torch says nothing
    np.testing.assert_allclose(probs(second.stdout), probs(torch_.stdout), atol=1e-5)
    assert probs(first.stdout) == probs(second.stdout)


def test_vitcli_backend_env_is_the_default_and_a_bad_one_is_a_usage_error(tiny_model_dir, images, monkeypatch):
    monkeypatch.setenv("VITCLI_BACKEND", "tensorflow")
    result = predict(tiny_model_dir, images[:1])
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: VITCLI_BACKEND=tensorflow is not a backend; use auto, torch")


def test_a_cache_hit_never_imports_torch_or_timm(tiny_model_dir, images, warm_cache):
    code = (
        "import sys\n"
        "from vitcli.cli.app import main\n"
        f"sys.argv = ['vitcli', 'predict', {str(images[0])!r}, '--model', {str(tiny_model_dir)!r}, '--json',"
        " '--backend', 'auto', '--precision', 'fp32']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision'))\n"
        "print('EXIT', code, 'HEAVY', ','.join(heavy), file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    lines = proc.stderr.splitlines()
    assert lines[0] == "openvino fp32, cached", proc.stderr
    assert lines[-1].strip() == "EXIT 0 HEAVY", proc.stderr  # no torch, timm or torchvision
    assert json.loads(proc.stdout)["predictions"][0]["label"] in TINY_LABELS


def damage_entry(entry: Path, damage: str) -> None:
    blob, manifest = entry / "model.blob", entry / "manifest.json"
    if damage == "truncated blob":
        blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    elif damage == "flipped byte":
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
    elif damage == "foreign manifest":
        doc = json.loads(manifest.read_text())
        doc["key"]["weights"] = "0" * 64
        manifest.write_text(json.dumps(doc))
    elif damage == "garbage manifest":
        manifest.write_bytes(b"\x00{not json")
    else:
        blob.unlink()


@pytest.mark.parametrize("damage", ["truncated blob", "flipped byte", "foreign manifest", "garbage manifest",
                                    "missing blob"])
def test_read_entry_detects_every_kind_of_damage(tmp_path, damage):
    key = cache.cache_key("w" * 64, None, "fp32", "test")
    tmp = cache.new_entry_dir(tmp_path, key)
    (tmp / "model.blob").write_bytes(bytes(range(256)) * 64)
    entry = cache.commit_entry(tmp_path, key, tmp, {"status": "ok"})
    assert cache.read_entry(tmp_path, key).manifest["files"] == {"model.blob": [16384, cache.file_digest(
        entry.folder / "model.blob")]}
    damage_entry(entry.folder, damage)
    with pytest.raises(cache.EntryDamaged):
        cache.read_entry(tmp_path, key)
    cache.discard(tmp_path, key)
    assert cache.read_entry(tmp_path, key) is None and list((tmp_path / "openvino").iterdir()) == []


def test_a_damaged_entry_is_rebuilt(tiny_model_dir, images, warm_cache):
    (entry,) = entries(warm_cache)
    damage_entry(entry, "truncated blob")

    result = predict(tiny_model_dir, images[:1], "--backend", "auto")

    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith("openvino fp32, built and verified in "), result.stderr
    assert "a damaged cache entry was rebuilt: model.blob differs from the manifest" in result.stderr
    (again,) = entries(warm_cache)
    assert cache.read_entry(warm_cache, cache.CacheKey(json.loads((again / "manifest.json").read_text())["key"]))
    assert predict(tiny_model_dir, images[:1], "--backend", "auto").stderr == "openvino fp32, cached\n"


def foreign_blob(entry: Path) -> None:
    """Bytes OpenVINO rejects as the blob, with a manifest whose sizes and SHA-256 match them (an entry
    from another OpenVINO build or CPU looks like this: whole, and not importable here)."""
    blob, manifest = entry / "model.blob", entry / "manifest.json"
    blob.write_bytes(b"a blob compiled by another OpenVINO for another CPU\n" * 64)
    doc = json.loads(manifest.read_text())
    doc["files"]["model.blob"] = [blob.stat().st_size, cache.file_digest(blob)]
    manifest.write_text(json.dumps(doc))


def test_a_blob_openvino_cannot_import_is_rebuilt(tiny_model_dir, images, warm_cache):
    from vitcli.inference.openvino_engine import import_blob

    (entry,) = entries(warm_cache)
    foreign_blob(entry)
    key = cache.CacheKey(json.loads((entry / "manifest.json").read_text())["key"])
    assert cache.read_entry(warm_cache, key).ok  # the checksums pass: only importing tells
    with pytest.raises(RuntimeError):
        import_blob(entry / "model.blob")

    result = predict(tiny_model_dir, images, "--backend", "auto")

    assert result.exit_code == 0, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("openvino fp32, built and verified in "), line
    assert "(a cache entry OpenVINO could not import was rebuilt: " in line, line
    assert "Exception from" not in line  # OpenVINO's source locations are not the reason
    rebuilt = cache.read_entry(warm_cache, key)
    assert rebuilt.ok and import_blob(rebuilt.folder / "model.blob") is not None
    torch_ = predict(tiny_model_dir, images, "--backend", "torch")
    np.testing.assert_allclose(probs(result.stdout), probs(torch_.stdout), atol=1e-5)
    assert predict(tiny_model_dir, images[:1], "--backend", "auto").stderr == "openvino fp32, cached\n"


def test_a_rebuilt_blob_that_cannot_import_either_falls_back_to_torch_once(tiny_model_dir, images, warm_cache,
                                                                           monkeypatch):
    calls = []

    def reject(path, precision="fp32"):
        calls.append(path)
        raise RuntimeError("Exception from src/inference/src/cpp/core.cpp:217:\n"
                           "[CPU] Cannot import compiled blob: incompatible runtime requirements magic.")

    monkeypatch.setattr(backend, "import_blob", reject)
    result = predict(tiny_model_dir, images, "--backend", "auto")

    assert result.exit_code == 0, result.stderr
    why = "[CPU] Cannot import compiled blob: incompatible runtime requirements magic."
    assert result.stderr == (f"torch: openvino could not import the compiled model it built ({why}) "
                             f"(a cache entry OpenVINO could not import was rebuilt: {why})\n")
    assert len(calls) == 2  # the cached blob, then the rebuilt one: no loop
    torch_ = predict(tiny_model_dir, images, "--backend", "torch")
    assert probs(result.stdout) == probs(torch_.stdout)  # torch ran
    forced = predict(tiny_model_dir, images[:1], "--backend", "openvino")
    assert forced.exit_code == 2
    assert forced.stderr.startswith(f"Error: --backend openvino cannot run {tiny_model_dir}: OpenVINO could not "
                                    f"import the compiled model it built ({why}); use --backend torch")


def test_two_processes_building_the_same_entry_both_finish(tiny_model_dir, tmp_path, cache_home):
    image = make_image(tmp_path / "a.png")
    command = [sys.executable, "-m", "vitcli", "predict", str(image), "--model", str(tiny_model_dir), "--json",
               "--backend", "auto", "--precision", "fp32"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    lines = sorted(err.splitlines()[0] for _, err in outs)
    assert lines[0].startswith("openvino fp32, built and verified") and lines[1] == "openvino fp32, cached", lines
    assert outs[0][0] == outs[1][0]
    (entry,) = entries(cache_home)
    assert [p.name for p in (cache_home / "openvino").iterdir()] == [entry.name]  # no temporary folder left


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_a_cache_that_cannot_be_written_compiles_in_memory(tiny_model_dir, images, cache_home, monkeypatch, fault):
    if fault == "read-only":
        def refuse(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(cache, "build_lock", refuse)
    else:
        from vitcli.inference import openvino_engine

        def full(compiled, path):
            path.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(openvino_engine, "export_blob", full)

    result = predict(tiny_model_dir, images, "--backend", "auto")

    assert result.exit_code == 0, result.stderr
    line = result.stderr.splitlines()[0]
    assert line.startswith("openvino fp32, built and verified in ") and "compiled in memory" in line, line
    assert ("Read-only file system" if fault == "read-only" else "No space left on device") in line
    torch_ = predict(tiny_model_dir, images, "--backend", "torch")
    np.testing.assert_allclose(probs(result.stdout), probs(torch_.stdout), atol=1e-5)
    kept = list((cache_home / "openvino").iterdir()) if (cache_home / "openvino").exists() else []
    assert kept == []  # nothing half-written stays


def test_a_refusal_falls_back_to_torch_with_one_line_and_is_remembered(tiny_model_dir, images, cache_home,
                                                                       monkeypatch):
    monkeypatch.setattr(backend._Build, "verify", lambda self, compiled: {
        "ok": False, "reason": "disagreed on 2 of 16 photos", "flips": 2, "images": 16})
    result = predict(tiny_model_dir, images, "--backend", "auto")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == "torch: openvino disagreed on 2 of 16 photos\n"
    torch_ = predict(tiny_model_dir, images, "--backend", "torch")
    assert probs(result.stdout) == probs(torch_.stdout)  # torch ran

    from vitcli.export import openvino

    monkeypatch.setattr(openvino, "convert", lambda *a, **k: pytest.fail("the refusal was not remembered"))
    again = predict(tiny_model_dir, images, "--backend", "auto")
    assert again.exit_code == 0 and again.stderr == "torch: openvino disagreed on 2 of 16 photos\n"
    # asked for by name, the refused model still runs, and says what it is
    forced = predict(tiny_model_dir, images, "--backend", "openvino")
    assert forced.exit_code == 0 and "openvino fp32 (asked for; it disagreed on 2 of 16 photos" in forced.stderr


def test_a_model_openvino_cannot_convert(tiny_model_dir, images, cache_home, monkeypatch):
    from vitcli.export import openvino

    def fail(*args, **kwargs):
        raise RuntimeError("Check 'is_op_supported' failed: no conversion rule for aten::mystery\nmore detail")

    monkeypatch.setattr(openvino, "convert", fail)
    auto = predict(tiny_model_dir, images, "--backend", "auto")
    assert auto.exit_code == 0, auto.stderr
    assert auto.stderr == ("torch: openvino could not convert the model (Check 'is_op_supported' failed: "
                           "no conversion rule for aten::mystery)\n")
    forced = predict(tiny_model_dir, images, "--backend", "openvino")
    assert forced.exit_code == 2
    assert forced.stderr.startswith(f"Error: --backend openvino cannot run {tiny_model_dir}: OpenVINO could not "
                                    "convert the model (Check 'is_op_supported' failed"), forced.stderr
    assert forced.stdout == ""


@pytest.mark.parametrize(("extra", "message"), [
    (["--backend", "onnxruntime"], "--backend onnxruntime runs exported .onnx files"),
    (["--backend", "openvino", "--device", "cuda"], "--backend openvino runs on the CPU"),
    (["--backend", "openvino", "--device", "cpu", "--precision", "fp16"], "--precision fp16 does not run on OpenVINO"),
])
def test_backends_that_cannot_run_the_model_are_usage_errors(tiny_model_dir, images, cache_home, extra, message):
    result = predict(tiny_model_dir, images[:1], *extra)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: {message}"), result.stderr


def test_auto_on_a_gpu_machine_is_torch(monkeypatch):
    monkeypatch.setattr(backend, "gpu_present", lambda: True)
    choice = backend.choose_engine("deit_tiny_patch16_224", None, lambda: pytest.fail("loaded"), "auto")
    assert (choice.engine, choice.line) == ("torch", "torch on a GPU")
    assert backend.choose_engine("x", None, lambda: None, "auto", device="cuda").line == "torch on cuda"


def test_precision_auto_tries_bf16_only_where_it_is_fast(monkeypatch):
    from vitcli import cpuinfo

    for flags, expected in [({"avx512_bf16", "avx512f"}, ["bf16", "fp32"]), ({"amx_bf16"}, ["bf16", "fp32"]),
                            ({"avx2", "avx512f"}, ["fp32"])]:
        monkeypatch.setattr(cpuinfo, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert backend.openvino_precisions("auto") == expected
    assert backend.openvino_precisions("bf16") == ["bf16"] and backend.openvino_precisions("fp16") == []


def test_model_files_are_found_without_torch(tiny_model_dir, tmp_path, monkeypatch):
    from vitcli.embedded import EMBEDDED_DIR

    deit = EMBEDDED_DIR / "deit_tiny_patch16_224"
    assert cache.model_files("deit_tiny_patch16_224") == [deit / "config.json", deit / "model.safetensors"]
    assert cache.model_files(str(tiny_model_dir)) == [tiny_model_dir / "config.json",
                                                      tiny_model_dir / "model.safetensors"]
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "best")
    assert cache.model_files(str(run))[0] == run / "best" / "config.json"  # a run folder stands for best/
    store = tmp_path / "store"
    shutil.copytree(tiny_model_dir, store / "pets")
    monkeypatch.setenv("VITCLI_WEIGHTS", str(store))
    assert cache.model_files("pets")[0] == store / "pets" / "config.json"
    assert cache.model_files("vit_base_patch16_224.augreg_in21k") is None  # timm's hub: only loading tells
    assert cache.model_files("hf-hub:org/name") is None
    weights = tiny_model_dir / "model.safetensors"
    assert cache.model_files("test_vit", weights) == [weights]


def test_the_key_changes_with_weights_precision_openvino_and_cpu(monkeypatch):
    from vitcli import cpuinfo

    base = cache.cache_key("w" * 64, None, "fp32", "2026.4")
    assert cache.cache_key("w" * 64, None, "fp32", "2026.4").id == base.id
    others = [cache.cache_key("v" * 64, None, "fp32", "2026.4"),
              cache.cache_key("w" * 64, "test_vit", "fp32", "2026.4"),
              cache.cache_key("w" * 64, None, "bf16", "2026.4"), cache.cache_key("w" * 64, None, "fp32", "2026.5")]
    monkeypatch.setattr(cpuinfo, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(cache, "cpu_flags", lambda: frozenset({"avx2"}))
    others.append(cache.cache_key("w" * 64, None, "fp32", "2026.4"))
    assert len({base.id, *(k.id for k in others)}) == 6


def test_cache_root_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_root() == tmp_path / "vitcli"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the spec: relative paths are ignored
    assert cache.cache_root() == Path.home() / ".cache" / "vitcli"


def test_evaluate_with_openvino_scores_as_torch(tiny_model_dir, tmp_path, warm_cache):
    data = tmp_path / "data"
    for i, label in enumerate(TINY_LABELS * 2):
        make_image(data / label / f"{i}.png", seed=i)
    args = ["evaluate", str(data), "--model", str(tiny_model_dir), "--json", "--workers", "0", "--precision", "fp32"]
    ov = runner.invoke(app, [*args, "--backend", "openvino"])
    torch_ = runner.invoke(app, [*args, "--backend", "torch"])
    assert ov.exit_code == 0 and torch_.exit_code == 0, ov.stderr + torch_.stderr
    assert ov.stderr == "openvino fp32, cached\n", ov.stderr
    a, b = json.loads(ov.stdout), json.loads(torch_.stdout)
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["top1"] == b["top1"]
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
