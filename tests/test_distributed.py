"""vitcli.distributed: outcomes shared by every rank; torchrun jobs where one rank fails end at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _finetune import class_folders
from vitcli.distributed import Rank, on_every_rank, on_rank0
from vitcli.errors import DatasetError

# Each rank runs fit() through the Python API and writes what happened to RANK.json; rank 0 can be made to
# fail (a plain RuntimeError, not a vitcli error) while the job sets up, in a training step, or while saving.
SCRIPT = r'''
import json, os, sys, time
from pathlib import Path

from vitcli.finetune import data as fdata, loop, rundir
from vitcli.finetune.config import FinetuneConfig

mode, data, model, out = sys.argv[1:5]
rank = int(os.environ["RANK"])
checked, real_drop = [], fdata.drop_unreadable


def counting(samples, strict=False):
    checked.append(len(samples))
    return real_drop(samples, strict=strict)


def boom(*args, **kwargs):
    raise RuntimeError("disk on fire")


fdata.drop_unreadable = counting
prepared, real_prepare = [], loop.prepare_data
loop.prepare_data = lambda config, dist: prepared.append(real_prepare(config, dist)) or prepared[-1]
if rank == 0 and mode == "setup":
    fdata.discover = boom
elif rank == 0 and mode == "save":
    rundir.save_model = boom
elif rank == 0 and mode == "validate":
    make = loop.make_loaders

    def failing_val(*args, **kwargs):
        train, val, sampler = make(*args, **kwargs)

        class Failing:
            def __iter__(self):
                yield next(iter(val))
                raise RuntimeError("disk on fire")

        return train, Failing(), sampler

    loop.make_loaders = failing_val
elif rank == 0 and mode == "step":
    build = loop.build_parts

    def poisoned(*args, **kwargs):
        parts = build(*args, **kwargs)
        loss_fn, calls = parts.loss_fn, []

        def loss(logits, targets):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("disk on fire")
            return loss_fn(logits, targets)

        parts.loss_fn = loss
        return parts

    loop.build_parts = poisoned
start = time.monotonic()
try:
    loop.fit(FinetuneConfig(data=data, model=model, img_size=64, batch_size=2, workers=0, precision="fp32",
                            project=str(Path(out) / "runs"), device="cpu", epochs=1, max_steps=3))
    outcome = "ok"
except Exception as e:
    outcome = f"{type(e).__name__}: {e}"
skipped = [p for p, _ in prepared[0].skipped] if prepared else None
Path(out, f"{rank}.json").write_text(json.dumps({"outcome": outcome, "seconds": time.monotonic() - start,
                                                 "checked": checked, "skipped": skipped}))
'''


def torchrun(tmp_path: Path, tiny_model_dir: Path, mode: str, data: Path) -> tuple[subprocess.CompletedProcess, dict]:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           mode, str(data), str(tiny_model_dir), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    ranks = {int(p.stem): json.loads(p.read_text()) for p in tmp_path.glob("[0-9].json")}
    return proc, ranks


def test_one_process_runs_the_function_itself():
    assert on_rank0(lambda: 7, Rank()) == 7
    assert on_every_rank(lambda: 7, Rank()) == [7]
    with pytest.raises(DatasetError, match="bad"):
        on_rank0(lambda: (_ for _ in ()).throw(DatasetError("bad")), Rank())


@pytest.mark.parametrize("mode", ["setup", "step", "validate", "save"])
def test_a_plain_exception_on_rank_0_ends_every_rank_at_once_with_the_error(tmp_path, tiny_model_dir, mode):
    """Rank 0 fails with a RuntimeError while rank 1 waits in a collective: both stop within seconds (the
    collective timeout is 30 minutes), rank 1 with rank 0's error rather than a lost connection."""
    data = class_folders(tmp_path / "data", {"ants": 6, "bees": 6})
    started = time.monotonic()
    proc, ranks = torchrun(tmp_path, tiny_model_dir, mode, data)
    assert time.monotonic() - started < 120, "the job waited for a collective timeout"
    assert sorted(ranks) == [0, 1], proc.stderr[-3000:]
    assert ranks[0]["outcome"] == "RuntimeError: disk on fire"
    assert ranks[1]["outcome"] == "RankFailedError: rank 0 of 2 failed: RuntimeError: disk on fire"
    assert max(r["seconds"] for r in ranks.values()) < 60


def test_ranks_share_the_image_check(tmp_path, tiny_model_dir):
    data = class_folders(tmp_path / "data", {"ants": 7, "bees": 7})
    (data / "bees" / "broken.jpg").write_bytes(b"not a jpeg")
    proc, ranks = torchrun(tmp_path, tiny_model_dir, "ok", data)
    assert proc.returncode == 0 and ranks[0]["outcome"] == ranks[1]["outcome"] == "ok", proc.stderr[-3000:]
    assert sorted(ranks[0]["checked"] + ranks[1]["checked"]) == [7, 8]  # 15 files, each checked once
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == [str(data / "bees" / "broken.jpg")]


# predict or evaluate under torchrun, where rank 1 is killed (SIGKILL: no Python cleanup, no error shared)
# while it decodes its second image; Image.open is what every decode path goes through.
KILLED_RANK = r'''
import os, signal, sys

from PIL import Image

if os.environ["RANK"] == "1":
    real_open, opened = Image.open, []

    def open_then_die(*args, **kwargs):
        opened.append(1)
        if len(opened) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_open(*args, **kwargs)

    Image.open = open_then_die

from vitcli.cli.app import app

sys.argv = ["vitcli", *sys.argv[1:]]
app()
'''


@pytest.mark.slow
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_rank_killed_mid_job_ends_the_job_with_an_error_not_a_hang(tmp_path, tiny_model_dir, command):
    data = class_folders(tmp_path / "data", {"cat": 12, "dog": 12})
    script = tmp_path / "job.py"
    script.write_text(KILLED_RANK)
    args = [str(data), "--model", str(tiny_model_dir), "--json", "-b", "2", "--workers", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                           os.environ.get("PYTHONPATH", "")]))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), command, *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    took = time.monotonic() - started

    assert proc.returncode != 0
    assert "Signal 9 (SIGKILL)" in proc.stderr or "exitcode  : -9" in proc.stderr, proc.stderr[-3000:]
    assert took < 120, f"the job took {took:.0f} s: the surviving rank waited for the dead one"
    if command == "evaluate":
        assert proc.stdout == ""  # no scores from half the images
