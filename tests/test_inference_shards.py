"""vitcli.inference.shards: --shard slices, torchrun rank blocks cut back and merged in input order."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest

from vitcli.distributed import Rank
from vitcli.errors import UsageError
from vitcli.inference.predict import Prediction
from vitcli.inference.shards import Shard, rank_blocks, records_by_block, shard_items


@pytest.mark.parametrize("text", ["1", "2/2", "-1/2", "a/b", "0/0", "1/"])
def test_bad_shard_specs_are_usage_errors(text):
    with pytest.raises(UsageError, match="0 <= I < N"):
        Shard.parse(text)


@pytest.mark.parametrize("total", [0, 1, 5, 7, 100])
@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_contiguous_shards_concatenate_to_the_whole_order(total, count):
    items = [f"img{i}.jpg" for i in range(total)]

    shards = [list(shard_items(lambda: iter(items), Shard.parse(f"{i}/{count}"))) for i in range(count)]

    assert [x for shard in shards for x in shard] == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_rank_blocks_take_turns_and_records_are_cut_back_into_blocks():
    items = [f"s{i}" for i in range(11)]
    per_rank = {}
    for r in range(3):
        sizes: deque[int] = deque()
        mine = list(rank_blocks(items, Rank(r, r, 3), 2, sizes))
        records = iter([Prediction(s) for s in mine])
        per_rank[r] = [[p.source for p in block] for block in records_by_block(records, sizes)]

    assert per_rank == {0: [["s0", "s1"], ["s6", "s7"]], 1: [["s2", "s3"], ["s8", "s9"]], 2: [["s4", "s5"], ["s10"]]}


# Each of 3 processes joins a gloo group, takes its rank's blocks of N items and runs the real merged_records;
# every rank writes what it yielded. Rank 0 must get every record in input order, the others none.
MERGE = r'''
import json, sys
from collections import deque

import torch.distributed as dist

from vitcli.distributed import Rank
from vitcli.inference.predict import Prediction
from vitcli.inference.shards import merged_records, rank_blocks, records_by_block

rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=3)
me = Rank(rank, rank, 3, 3)
merged = {}
for total in TOTALS:
    sizes = deque()
    items = [f"s{i}" for i in range(total)]
    records = (Prediction(s) for s in rank_blocks(items, me, 2, sizes))
    merged[total] = [p.source for p in merged_records(records_by_block(records, sizes), me)]
dist.destroy_process_group()
with open(f"{out}.{rank}", "w") as f:
    json.dump(merged, f)
'''
TOTALS = (11, 3, 0)  # an uneven last round; a rank with no block at all; nothing to do


def test_rank_0_merges_every_ranks_records_in_input_order_over_gloo(tmp_path):
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "merge.py"
    script.write_text(MERGE.replace("TOTALS", repr(TOTALS)))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                           os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "store"), str(tmp_path / "out")],
                              env=env, stderr=subprocess.PIPE, text=True)
             for r in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors

    got = {r: json.loads((tmp_path / f"out.{r}").read_text()) for r in range(3)}
    for total in TOTALS:
        assert [got[r][str(total)] for r in range(3)] == [[f"s{i}" for i in range(total)], [], []], total
