"""vitcli.inference.batching: DataLoader processes for accelerators, per-core streams on the CPU."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import torch

from conftest import make_image
from vitcli.inference.batching import ImageSourceDataset, collate_images, decoded_batches, scored_batches


def test_an_accelerator_is_fed_by_dataloader_processes_the_cpu_inline(tmp_path):
    sources = [str(make_image(tmp_path / f"d{i}.png", size=(40, 30), seed=i)) for i in range(5)]
    dataset = ImageSourceDataset(sources, lambda img: torch.from_numpy(np.array(img)))

    on_gpu = decoded_batches(dataset, 2, collate_images, torch.device("cuda"), workers=2)
    on_cpu = decoded_batches(dataset, 2, collate_images, torch.device("cpu"), workers=2)

    assert isinstance(on_gpu, torch.utils.data.DataLoader) and on_gpu.num_workers == 2
    assert not isinstance(on_cpu, torch.utils.data.DataLoader)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pin_memory without a GPU
        gpu_batches = list(on_gpu)
    cpu_batches = list(on_cpu)
    assert [len(errors) for _, errors in cpu_batches] == [2, 2, 1]
    for (a, a_errors), (b, b_errors) in zip(gpu_batches, cpu_batches, strict=True):
        assert torch.equal(a, b) and a_errors == b_errors


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
