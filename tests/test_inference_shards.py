"""vitcli.inference.shards: --shard slices, torchrun rank blocks cut back and merged in input order."""

from __future__ import annotations

from collections import deque

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
    merged = [s for step in range(2) for r in range(3) if step < len(per_rank[r]) for s in per_rank[r][step]]
    assert merged == items  # rank 0's merge order: round by round, rank by rank
