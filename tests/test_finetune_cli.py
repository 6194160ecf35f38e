"""`vitcli finetune`: happy path, exit codes, Ctrl-C and --resume, torchrun with two CPU processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_image
from vitcli.cli.app import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture
def data(tmp_path) -> Path:
    for c, name in enumerate(["ants", "bees"]):
        for i in range(6):
            make_image(tmp_path / "data" / name / f"{i}.png", size=(40, 32), seed=10 * c + i)
    return tmp_path / "data"


def args(tmp_path: Path, data: Path, model: Path, *extra: str) -> list[str]:
    return ["finetune", str(data), "--model", str(model), "--img-size", "64", "--batch-size", "4",
            "--workers", "0", "--precision", "fp32", "--project", str(tmp_path / "runs"), *extra]


def test_happy_path(tmp_path, data, tiny_model_dir):
    result = runner.invoke(app, args(tmp_path, data, tiny_model_dir, "--epochs", "2", "--max-steps", "3"))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "exp"
    assert "best val top-1" in result.stdout and str(run) in result.stdout
    assert "stopped at --max-steps" in result.stderr and "ants" in result.stderr  # class counts table
    assert "top-1" in result.stderr and "top-5" not in result.stderr  # 2 classes: every image is in the top 5
    for name in ("best/model.safetensors", "last/config.json", "metrics.csv", "args.json", "split.json",
                 "state.pt", "curves.png", "confusion_matrix.png"):
        assert (run / name).is_file(), name
    predicted = runner.invoke(app, ["predict", str(data / "ants" / "0.png"), "--model", str(run / "best")])
    assert predicted.exit_code == 0, predicted.output


def test_data_error_is_one_line_and_exit_1(tmp_path, tiny_model_dir):
    (tmp_path / "data" / "only").mkdir(parents=True)
    make_image(tmp_path / "data" / "only" / "a.png")
    result = runner.invoke(app, args(tmp_path, tmp_path / "data", tiny_model_dir))
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and "single class" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "0"], "--epochs"),  # typer's range check
    (["--balance", "often"], "--balance"),  # not a choice
    (["--balance", "loss", "--mixup", "0.8"], "cannot be combined"),  # checked by the core
])
def test_usage_errors_exit_2(tmp_path, data, tiny_model_dir, extra, message):
    result = runner.invoke(app, args(tmp_path, data, tiny_model_dir, *extra))
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_data_and_bad_resume_exit_2(tmp_path):
    result = runner.invoke(app, ["finetune"])
    assert result.exit_code == 2 and "missing DATA" in result.stderr
    result = runner.invoke(app, ["finetune", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "not a finetune run folder" in result.stderr


def test_resume_refuses_a_changed_recipe(tmp_path, data, tiny_model_dir):
    assert runner.invoke(app, args(tmp_path, data, tiny_model_dir, "--max-steps", "1")).exit_code == 0
    run = tmp_path / "runs" / "exp"
    result = runner.invoke(app, ["finetune", "--resume", str(run), "--lr", "0.1"])
    assert result.exit_code == 2 and "--lr cannot change" in result.stderr
    result = runner.invoke(app, ["finetune", "--resume", str(run), "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "args.json").read_text())["config"]["epochs"] == 2


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_a_resumable_state_and_exits_128_plus_its_number(tmp_path, data, tiny_model_dir, signum, code):
    """A real SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop) to a real process: exit 128 + the signal number
    and a --resume hint; the resumed run finishes."""
    env = dict(os.environ, VITCLI_DEBUG="0")
    cmd = [sys.executable, "-m", "vitcli", *args(tmp_path, data, tiny_model_dir, "--epochs", "1000")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    for line in proc.stderr:  # the class table is printed once the stop-on-signal handler is installed
        if line.strip().startswith("total") or "│ total" in line:
            break
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Interrupted" in stderr and "--resume" in stderr and "Traceback" not in stderr
    run = tmp_path / "runs" / "exp"
    assert (run / "state.pt").is_file() and (run / "last" / "model.safetensors").is_file()
    resumed = runner.invoke(app, ["finetune", "--resume", str(run), "--max-steps", "4"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming at epoch" in resumed.stderr


def test_torchrun_two_cpu_processes_write_one_run_folder(tmp_path, data, tiny_model_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vitcli", *args(tmp_path, data, tiny_model_dir, "--max-steps", "2", "--device", "cpu")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["exp"]
    run = tmp_path / "runs" / "exp"
    assert json.loads((run / "args.json").read_text())["resolved"]["world_size"] == 2
    assert (run / "best" / "model.safetensors").is_file() and (run / "state.pt").is_file()
    assert proc.stdout.count("best val top-1") == 1  # rank 0 speaks for both


def test_help_imports_no_torch():
    code = "import sys, vitcli.cli.app; assert 'torch' not in sys.modules and 'timm' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
    proc = subprocess.run([sys.executable, "-m", "vitcli", "finetune", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--resume" in proc.stdout


def test_resume_accepts_the_same_model_and_weights_given_again_as_relative_paths(tmp_path, data, tiny_model_dir,
                                                                                  monkeypatch):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "model")
    shutil.copy(tiny_model_dir / "model.safetensors", tmp_path / "w.safetensors")
    monkeypatch.chdir(tmp_path)
    cases = (("folder", ["--model", "model"]), ("file", ["--model", "test_vit", "--weights", "w.safetensors"]))
    for name, given in cases:
        first = runner.invoke(app, ["finetune", str(data), *given, "--img-size", "64", "--batch-size", "4",
                                    "--workers", "0", "--precision", "fp32", "--project", "runs", "--name", name,
                                    "--epochs", "1", "--max-steps", "1"])
        assert first.exit_code == 0, first.output
        saved = json.loads((tmp_path / "runs" / name / "args.json").read_text())["config"]
        assert saved["model"] in ("test_vit", str(tmp_path / "model"))
        assert saved["weights"] in (None, str(tmp_path / "w.safetensors"))

        resumed = runner.invoke(app, ["finetune", "--resume", f"runs/{name}", *given])
        assert resumed.exit_code == 0, resumed.output

    shutil.copytree(tmp_path / "model", tmp_path / "other")
    refused = runner.invoke(app, ["finetune", "--resume", "runs/folder", "--model", "other"])
    assert refused.exit_code == 2 and "--model cannot change" in refused.stderr


KILLED_SAVE = r'''
import os, signal, sys

import torch

from vitcli.io import fileio

if sys.argv[1] == "state.pt":  # killed once state.pt's temporary copy is complete, before its rename
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save
else:  # killed once the new model folder is complete, before it replaces best/
    fileio.replace_dir = lambda new, folder: os.kill(os.getpid(), signal.SIGKILL)

from vitcli.cli.app import app

sys.argv = ["vitcli", *sys.argv[2:]]
app()
'''


@pytest.mark.slow
@pytest.mark.parametrize(("killed_in", "then"), [("state.pt", "--resume"), ("best", "--exist-ok")])
def test_a_kill_9_during_a_real_save_leaves_copies_that_the_next_start_removes_and_names(
        tmp_path, data, tiny_model_dir, killed_in, then):
    assert runner.invoke(app, args(tmp_path, data, tiny_model_dir, "--epochs", "1", "--max-steps", "1")).exit_code == 0
    run = tmp_path / "runs" / "exp"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_SAVE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    killed = subprocess.run([sys.executable, str(script), killed_in, "finetune", "--resume", str(run)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    left = [p.name for p in run.iterdir() if p.name.startswith(f".{killed_in}.")]
    assert len(left) == 1 and left[0] != f".{killed_in}.old", sorted(p.name for p in run.iterdir())
    size = sum(p.stat().st_size for p in [run / left[0], *(run / left[0]).rglob("*")] if p.is_file())
    assert size > 100_000  # a whole copy: the model's weights

    if then == "--resume":
        again = runner.invoke(app, ["finetune", "--resume", str(run)])
    else:
        again = runner.invoke(app, args(tmp_path, data, tiny_model_dir, "--epochs", "1", "--name", "exp", "--exist-ok"))

    assert again.exit_code == 0, again.output
    assert f"removed what a run killed while saving left: {left[0]} ({size / 1e6:.1f} MB)" in again.stderr
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []
    assert (run / "best" / "model.safetensors").is_file() and (run / "state.pt").is_file()
