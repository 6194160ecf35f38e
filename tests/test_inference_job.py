"""vitcli.inference.job: a predict job as a stream of records into writers, resumable, model loaded only if needed."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from conftest import make_image
from vitcli.distributed import Rank
from vitcli.errors import UsageError
from vitcli.inference.job import PredictJob, Tally, write_records
from vitcli.inference.predict import Label, Prediction, PredictOptions
from vitcli.inference.shards import Shard
from vitcli.io.records import JsonlWriter, from_json, open_output


def never_load():
    raise AssertionError("a model was loaded")


def test_any_iterator_of_records_is_written_to_every_sink_as_it_comes():
    """What a torch-free predictor (ONNX Runtime) hands over: a plain generator of records."""
    first, second = io.StringIO(), io.StringIO()
    seen_before_next: list[int] = []

    def records():
        for i in range(3):
            yield Prediction(f"{i}.jpg", [Label(1, i, f"class{i}", 0.5)] if i != 1 else [], None if i != 1 else "bad")
            seen_before_next.append(first.getvalue().count("\n"))  # written before the next one is made

    tally = write_records(records(), [JsonlWriter(first), JsonlWriter(second)])

    assert (tally.written, tally.failed, tally.ok) == (3, 1, False)
    assert seen_before_next == [1, 2, 3]
    assert first.getvalue() == second.getvalue()
    assert [from_json(line).source for line in first.getvalue().splitlines()] == ["0.jpg", "1.jpg", "2.jpg"]


def test_no_inputs_is_a_usage_error():
    with pytest.raises(UsageError, match="no images given"):
        PredictJob([])


def test_inputs_that_name_no_image_give_records_without_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    job = PredictJob([str(tmp_path / "gone.jpg"), str(tmp_path / "empty")])

    records = list(job.records(never_load))

    assert [(Path(r.source).name, r.ok) for r in records] == [("gone.jpg", False), ("empty", False)]


def test_a_job_skips_what_its_output_holds_and_counts_the_rest(tmp_path, tiny_model_dir):
    from vitcli.models.resolve import load_model

    photos = [str(make_image(tmp_path / "p" / f"{i}.png", size=(16, 16), seed=i)) for i in range(5)]
    out = tmp_path / "out.jsonl"
    done = open_output(out)
    done.writer.write(Prediction(photos[1], error="from an earlier run"))
    done.writer.write(Prediction(photos[3], error="from an earlier run"))
    done.close()
    loads = []
    job = PredictJob([str(tmp_path / "p")], output=out)
    job.open()

    try:
        assert job.count() == 3
        records = list(job.records(lambda: loads.append(1) or load_model(str(tiny_model_dir)),
                                   PredictOptions(workers=0, top_k=1)))
    finally:
        job.close()

    assert [r.source for r in records] == [photos[0], photos[2], photos[4]] and all(r.ok for r in records)
    assert job.tally.skipped == 2 and loads == [1]


def test_a_shard_is_skipped_and_counted_within_its_slice(tmp_path):
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"{tmp_path}/missing{i}.jpg\n" for i in range(7)))

    jobs = [PredictJob([], str(listed), shard=Shard(i, 3)) for i in range(3)]

    assert [job.count() for job in jobs] == [2, 2, 3]
    assert [r.source for job in jobs for r in job.records(never_load)] == [f"{tmp_path}/missing{i}.jpg"
                                                                           for i in range(7)]


def test_stdin_lists_cannot_be_sharded():
    with pytest.raises(UsageError, match="save the list to a file"):
        PredictJob([], "-", rank=Rank(0, 0, 2))
    assert not PredictJob([], "-").countable


def test_tally_defaults():
    assert Tally().ok and Tally(3, 1).ok is False


def test_the_streaming_core_imports_no_torch():
    """A torch-free predictor (ONNX Runtime) can reuse the writers, the resume logic and the shards."""
    import subprocess
    import sys

    code = ("import sys, vitcli.inference.predict, vitcli.io.records, vitcli.inference.shards, vitcli.inference.job; "
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules")

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr


def test_any_predictor_streams_through_a_job_with_problems_in_place(tmp_path):
    """How a torch-free predictor plugs in: ``stream(make_predictor)``, built only when needed."""
    photos = [str(make_image(tmp_path / "p" / f"{i}.png", size=(8, 8), seed=i)) for i in range(3)]
    made = []

    def make_predictor():
        made.append(1)
        return lambda sources: (Prediction(s, [Label(1, 0, "x", 1.0)]) for s in sources)

    job = PredictJob([photos[0], str(tmp_path / "gone.jpg"), *photos[1:]])

    records = list(job.stream(make_predictor))

    assert [r.source for r in records] == [photos[0], str(tmp_path / "gone.jpg"), *photos[1:]]
    assert [r.ok for r in records] == [True, False, True, True] and made == [1]
