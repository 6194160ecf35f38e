"""vitcli.inference.batching: DataLoader processes for accelerators, per-core streams on the CPU."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import torch

from conftest import make_image
from vitcli.inference.batching import ImageSourceDataset, collate_images, scored_batches


def test_cpu_streams_score_whole_batches_in_order_on_their_share_of_threads(tmp_path):
    sources = [str(make_image(tmp_path / f"s{i}.png", size=(24, 24), seed=i)) for i in range(7)]
    dataset = ImageSourceDataset(sources, lambda img: torch.from_numpy(np.array(img)))
    threads = torch.get_num_threads()
    seen = []

    def score(batch):
        images, errors = batch
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return images[:, 0, 0, 0].tolist()  # one pixel per image identifies it

    scored = list(scored_batches(dataset, 2, collate_images, score, torch.device("cpu"), workers=2))

    inline = list(scored_batches(dataset, 2, collate_images, lambda b: b[0][:, 0, 0, 0].tolist(),
                                 torch.device("cpu"), 0))
    assert scored == inline and [len(b) for b in scored] == [2, 2, 2, 1]
    assert all(name.startswith("vitcli-stream") for name, _ in seen)
    assert {n for _, n in seen} == {max(1, threads // 2)}
    assert torch.get_num_threads() == threads  # restored


def test_cpu_streams_share_a_small_job_equally(tmp_path):
    dataset = [torch.full((1,), i) for i in range(7)]  # 7 items, batches of up to 6, 2 streams

    scored = list(scored_batches(dataset, 6, torch.stack, lambda x: x.flatten().tolist(), torch.device("cpu"), 2))

    assert scored == [[0, 1, 2, 3], [4, 5, 6]]  # not [0..5] on one core and [6] on the other


def test_keyed_batches_come_back_with_their_keys_in_order_from_dataloader_processes(tmp_path):
    from vitcli.inference.batching import SourceImages, scored_key_batches

    sources = [str(make_image(tmp_path / f"k{i}.png", size=(24, 24), seed=i)) for i in range(7)]
    images = SourceImages(lambda img: torch.from_numpy(np.array(img)))

    def first_pixels(batch):
        return batch[0][:, 0, 0, 0].tolist()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pin_memory without a GPU
        loader = list(scored_key_batches(images, iter(sources), 3, collate_images, first_pixels,
                                         torch.device("cuda"), workers=2))
    inline = list(scored_key_batches(images, iter(sources), 3, collate_images, first_pixels, torch.device("cpu"), 0))

    assert [keys for keys, _ in loader] == [sources[0:3], sources[3:6], sources[6:]]
    assert loader == inline


def fake_machine(monkeypatch, tmp_path, cpu_count: int, affinity: int, cpu_max: str | None,
                 local_world: int | None) -> None:
    """A machine of ``cpu_count`` CPUs on which this process may use ``affinity`` of them, under a cgroup
    v2 ``cpu.max`` (None: no file), started by torchrun with ``local_world`` ranks on this node."""
    import os

    from vitcli import cpuinfo

    root = tmp_path / "cgroup"
    root.mkdir(exist_ok=True)
    if cpu_max is not None:
        (root / "cpu.max").write_text(cpu_max + "\n")
    monkeypatch.setattr(os, "cpu_count", lambda: cpu_count)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    monkeypatch.setattr(cpuinfo, "CGROUP_ROOT", root)
    if local_world is None:
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(var, raising=False)
    else:  # as torchrun sets them, on the second of two such machines
        for var, value in (("RANK", local_world), ("LOCAL_RANK", 0), ("WORLD_SIZE", 2 * local_world),
                           ("LOCAL_WORLD_SIZE", local_world)):
            monkeypatch.setenv(var, str(value))


def test_default_workers_share_the_usable_cpus_among_the_ranks_on_this_machine(monkeypatch, tmp_path):
    from vitcli.inference.batching import default_workers

    # 64 CPUs in the machine, 8 in this job's affinity set, 4 ranks of torchrun on this node: 2 each
    fake_machine(monkeypatch, tmp_path, cpu_count=64, affinity=8, cpu_max=None, local_world=4)
    assert default_workers() == 2

    # taskset -c 0: one CPU, whatever the machine has
    fake_machine(monkeypatch, tmp_path, cpu_count=64, affinity=1, cpu_max=None, local_world=None)
    assert default_workers() == 1


def test_a_cgroup_cpu_quota_caps_the_workers(monkeypatch, tmp_path):
    from vitcli import cpuinfo
    from vitcli.inference.batching import default_workers

    # docker --cpus 1.5 on a 64-CPU machine: 2 CPUs' worth (rounded up), all of the affinity set allowed
    fake_machine(monkeypatch, tmp_path, cpu_count=64, affinity=64, cpu_max="150000 100000", local_world=None)
    assert cpuinfo.cgroup_cpu_quota() == 1.5 and cpuinfo.usable_cpus() == 2
    assert default_workers() == 2

    fake_machine(monkeypatch, tmp_path, cpu_count=64, affinity=3, cpu_max="max 100000", local_world=None)
    assert cpuinfo.cgroup_cpu_quota() is None and default_workers() == 3
