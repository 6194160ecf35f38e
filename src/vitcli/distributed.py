"""torchrun, in one place: this process's rank, the process groups, collectives, and failures shared by all ranks.

No torch at import (the CLI reads the rank before any command imports torch).

A failure on one rank must end every rank at once, with the error: work done by rank 0 alone (the
run folder, saving) and work shared by every rank (the image check) go through ``on_rank0`` and
``on_every_rank``, which hand each rank the outcome, result or error, in one collective. (Without
that, a rank that fails leaves the others in a collective until its timeout: 10 to 30 minutes.)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from vitcli.errors import RankFailedError, UsageError, VitcliError, first_line

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Rank:
    """This process's place among torchrun's processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    local_world: int = 1  # the processes on this machine

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def torchrun_rank() -> Rank:
    """RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE as torchrun sets them: the one reading of them."""
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if world <= 1:
        return Rank()
    return Rank(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK") or 0), world,
                int(os.environ.get("LOCAL_WORLD_SIZE") or 1))


def init_process_group(device: str) -> tuple[Rank, str, Any]:
    """Join torchrun's process group: nccl for CUDA devices, gloo for the CPU; plus a gloo group for
    small Python objects (records), whatever the device. Returns (rank, this rank's device, group)."""
    import torch
    import torch.distributed as tdist

    from vitcli.devices import resolve_device

    rank = torchrun_rank()
    want = resolve_device(device)
    if want.type == "cuda":
        torch.cuda.set_device(rank.local_rank)
        tdist.init_process_group("nccl", rank=rank.rank, world_size=rank.world,
                                 device_id=torch.device("cuda", rank.local_rank))
        return rank, f"cuda:{rank.local_rank}", tdist.new_group(backend="gloo")
    if want.type != "cpu":
        raise UsageError(f"torchrun needs CUDA or CPU processes; --device {device} is not supported")
    tdist.init_process_group("gloo", rank=rank.rank, world_size=rank.world)
    return rank, "cpu", None


def init_distributed(device: str) -> tuple[Rank, torch.device]:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU) and pick this rank's device."""
    import torch

    from vitcli.devices import resolve_device

    dist = torchrun_rank()
    if not dist.enabled:
        return dist, resolve_device(device)
    dist, this_device, _ = init_process_group(device)
    return dist, torch.device(this_device)


def close_distributed(dist: Rank) -> None:
    if dist.enabled:
        import torch.distributed as tdist

        tdist.destroy_process_group()


def broadcast(obj: T, dist: Rank, group: Any = None) -> T:
    """Rank 0's ``obj`` on every rank (over ``group``, default the whole job)."""
    if not dist.enabled:
        return obj
    import torch.distributed as tdist

    box = [obj]
    tdist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def all_gather(obj: T, dist: Rank) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not dist.enabled:
        return [obj]
    import torch.distributed as tdist

    boxes: list[Any] = [None] * dist.world
    tdist.all_gather_object(boxes, obj)
    return boxes


def all_reduce(t: torch.Tensor, dist: Rank) -> torch.Tensor:
    """Sum ``t`` over the ranks, in place (through the GPU under nccl, which reduces CUDA tensors only)."""
    if dist.enabled:
        import torch
        import torch.distributed as tdist

        if tdist.get_backend() == "nccl" and t.device.type != "cuda":
            work = t.to(torch.device("cuda", torch.cuda.current_device()))
            tdist.all_reduce(work)
            t.copy_(work.cpu())
        else:
            tdist.all_reduce(t)
    return t


# An outcome travels between ranks as plain values: an exception may not pickle (custom __init__).
Outcome = tuple[bool, Any, str, int]  # (ok, result, error message, exit code)


def _outcome(fn: Callable[[], T]) -> tuple[Outcome, Exception | None]:
    try:
        return (True, fn(), "", 0), None
    except Exception as e:  # every failure, not only vitcli's: the other ranks must not wait for this one
        message = str(e) if isinstance(e, VitcliError) else f"{type(e).__name__}: {first_line(e)}"
        return (False, None, message, getattr(e, "exit_code", 1)), e


def _raise_first_failure(outcomes: list[Outcome], mine: Exception | None, dist: Rank) -> None:
    if mine is not None:
        raise mine  # this rank's own error, traceback and type intact
    for rank, (ok, _, message, code) in enumerate(outcomes):
        if not ok:
            raise RankFailedError(f"rank {rank} of {dist.world} failed: {message}", code)


def on_rank0(fn: Callable[[], T], dist: Rank) -> T:
    """``fn()`` run on rank 0; its result on every rank, or its error (any exception) raised on every rank."""
    if not dist.enabled:
        return fn()
    outcome, error = _outcome(fn) if dist.main else ((True, None, "", 0), None)
    shared = broadcast(outcome, dist)
    _raise_first_failure([shared], error, dist)
    return shared[1]


def on_every_rank(fn: Callable[[], T], dist: Rank) -> list[T]:
    """``fn()`` run on every rank; all the results in rank order, or the first error raised on every rank."""
    outcome, error = _outcome(fn)
    outcomes = all_gather(outcome, dist)
    _raise_first_failure(outcomes, error, dist)
    return [result for _, result, _, _ in outcomes]


def any_rank(flag: bool, dist: Rank) -> bool:
    """Whether ``flag`` is set on any rank (one small collective)."""
    import torch

    return bool(all_reduce(torch.tensor([float(flag)]), dist).item() > 0)


def share_step(loss: torch.Tensor | None, interrupt: bool, failure: Exception | None,
               dist: Rank) -> tuple[float, bool]:
    """One collective per batch: the mean loss (for the NaN check), whether any rank was interrupted, and
    whether any rank failed (then every rank raises, the failed one its own error)."""
    import torch

    if failure is not None and not dist.enabled:
        raise failure
    flags = torch.tensor([loss.item() if failure is None else 0.0, float(interrupt), float(failure is not None)])
    all_reduce(flags, dist)
    if flags[2].item() > 0:
        on_every_rank(lambda: _raise(failure), dist)
    return flags[0].item() / dist.world, flags[1].item() > 0


def _raise(failure: Exception | None) -> None:
    if failure is not None:
        raise failure
