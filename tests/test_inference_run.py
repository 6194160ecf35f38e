"""vitcli.inference.run: the job from start to end (group, shared open of --output, engine, sinks closed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import make_image
from vitcli.inference.job import PredictJob
from vitcli.inference.predict import Prediction, PredictOptions
from vitcli.inference.run import predictor_for, run_job


class Sink:
    def __init__(self, fail_on: str | None = None) -> None:
        self.records: list[str] = []
        self.closed = False
        self.fail_on = fail_on

    def write(self, record) -> None:
        if record.source == self.fail_on:
            raise OSError(28, "No space left on device")
        self.records.append(record.source)

    def close(self) -> None:
        self.closed = True


def test_every_sink_and_the_output_are_closed_when_a_sink_fails(tmp_path):
    photos = [str(make_image(tmp_path / f"{i}.png", seed=i)) for i in range(3)]
    job = PredictJob(photos, output=tmp_path / "out.jsonl")
    table, full = Sink(), Sink(fail_on=photos[1])

    def engine(options):
        return lambda: lambda sources: (Prediction(s) for s in sources)

    with pytest.raises(OSError, match="No space left"):
        run_job(job, PredictOptions(), engine, files=lambda: [full], terminal=lambda job: [table])

    assert table.closed and full.closed and job.opened.stream.closed
    assert table.records == photos[:2] and full.records == photos[:1]
    assert (tmp_path / "out.jsonl").read_text().count("\n") == 1  # the output sink follows: one whole record


def test_the_engine_is_chosen_by_the_model_and_loads_only_when_asked(tmp_path, monkeypatch):
    import vitcli.inference.run as run

    loads = []
    monkeypatch.setattr(run, "onnx_predictor", lambda path, options: loads.append(("onnx", path)))
    monkeypatch.setattr(run, "load_torch_model", lambda model, weights, loading: loads.append(("torch", model)))
    monkeypatch.setattr(run, "torch_predictor", lambda loaded, options: None)

    onnx, torch_ = predictor_for("m.ONNX", None, PredictOptions()), predictor_for("deit", None, PredictOptions())
    assert loads == []
    onnx(), torch_()
    assert loads == [("onnx", "m.ONNX"), ("torch", "deit")]

    from vitcli.errors import UsageError

    with pytest.raises(UsageError, match="--weights, --precision do.es. not apply to an .onnx model"):
        predictor_for("m.onnx", tmp_path / "w.pth", PredictOptions(precision="bf16"))


def test_an_output_rank_0_cannot_open_ends_every_torchrun_rank_with_its_error(tiny_model_dir, tmp_path):
    """Rank 0 opens --output; its error reaches rank 1 through on_rank0, so rank 1 stops at once with
    it rather than waiting for records (or dying of a lost connection when rank 0 is gone)."""
    photos = [make_image(tmp_path / "photos" / f"{i}.png", seed=i) for i in range(4)]
    output = tmp_path / "out.txt"  # not .jsonl or .csv: rank 0's open refuses it
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "vitcli", "predict", *map(str, photos), "--model", str(tiny_model_dir), "-o", str(output)]

    run = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})

    assert run.returncode != 0
    assert "Error: --output '" in run.stderr and "use a .jsonl or .csv file name" in run.stderr  # rank 0
    assert "Error: rank 1: rank 0 of 2 failed: --output '" in run.stderr, run.stderr  # rank 1, with rank 0's error
    assert "internal error" not in run.stderr
