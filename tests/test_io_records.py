"""vitcli.io.records: JSON Lines / CSV writers, reading an output back, resuming after a kill."""

from __future__ import annotations

import csv
import io
import json

import pytest

from vitcli.errors import UsageError
from vitcli.inference.predict import Label, Prediction
from vitcli.io.records import (
    CSV_HEADER,
    CsvWriter,
    DoneSources,
    JsonlWriter,
    from_json,
    open_output,
    recorded_sources,
    to_json,
)

GOOD = Prediction("a.jpg", [Label(1, 3, "dog", 0.75), Label(2, 1, "cat, tabby", 0.125)])
BAD = Prediction("b.jpg", error="not an image Pillow can read")


def test_json_lines_round_trip_and_schema():
    assert from_json(to_json(GOOD)) == GOOD and from_json(to_json(BAD)) == BAD
    assert json.loads(to_json(BAD)) == {"source": "b.jpg", "predictions": [], "error": "not an image Pillow can read"}


class CountingStream(io.StringIO):
    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_writers_flush_every_record_whole():
    jsonl, table = CountingStream(), CountingStream()
    json_writer, csv_writer = JsonlWriter(jsonl), CsvWriter(table)

    for record in (GOOD, BAD):
        json_writer.write(record)
        csv_writer.write(record)

    assert jsonl.flushes == 2 and table.flushes == 3  # the CSV header, then one flush per record
    assert [from_json(line) for line in jsonl.getvalue().splitlines()] == [GOOD, BAD]
    rows = list(csv.reader(io.StringIO(table.getvalue())))
    assert rows == [list(CSV_HEADER), ["a.jpg", "1", "3", "dog", "0.750000", ""],
                    ["a.jpg", "2", "1", "cat, tabby", "0.125000", ""], ["b.jpg", "", "", "", "", BAD.error]]


def test_done_sources_are_64_bit_digests():
    done = DoneSources(["a.jpg", "b.jpg", "a.jpg", "photos/é.png"])

    assert len(done) == 4  # records: a.jpg twice
    assert "a.jpg" in done and "photos/é.png" in done and "c.jpg" not in done and "" not in done
    assert "a.jpg" not in DoneSources()


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_open_output_resumes_and_drops_a_partial_last_line(tmp_path, suffix):
    path = tmp_path / "out" / f"predictions{suffix}"
    first = open_output(path)
    assert len(first.done) == 0
    first.writer.write(GOOD)
    first.writer.write(BAD)
    first.close()
    with path.open("a") as f:
        f.write('{"source": "c.jpg", "predi' if suffix == ".jsonl" else "c.jpg,1,2,do")  # killed mid-write

    again = open_output(path)
    again.writer.write(Prediction("c.jpg", error="gone"))
    again.close()

    assert {s for s in ("a.jpg", "b.jpg", "c.jpg") if s in again.done} == {"a.jpg", "b.jpg"}
    assert list(recorded_sources(path)) == ["a.jpg", "b.jpg", "c.jpg"]
    if suffix == ".csv":
        assert path.read_text().count("source,rank") == 1  # the header once, not again on append


def test_open_output_without_resume_starts_afresh(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(to_json(GOOD) + "\n")

    output = open_output(path, resume=False)
    output.close()

    assert len(output.done) == 0 and path.read_text() == ""


@pytest.mark.parametrize(("name", "content", "message"), [
    ("p.txt", "", "use a .jsonl or .csv file name"),
    ("p.jsonl", "hello\n", "line 1 is not a vitcli prediction record"),
    ("p.csv", "a,b\n1,2\n", "is not a vitcli predictions CSV"),
])
def test_an_output_that_is_not_ours_is_a_usage_error(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)

    with pytest.raises(UsageError, match=message):
        open_output(tmp_path / name)
